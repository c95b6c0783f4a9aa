"""lm-evaluation-harness scores lrzoo adapters (issue 16 item 5).

A tiny Llama, a LoRA-XS adapter trained with lrzoo on a local multiple-choice task of eight items, and
lm-eval's Hugging Face model class (``HFLM(pretrained=<base dir>, peft=<adapter dir>)``):

(a) the native ``LRZOO_LORA_XS`` checkpoint, in this process (which imported lrzoo, so PEFT knows the type);
(b) the same adapter after ``lrzoo.export_lora``, in a fresh process that never imports lrzoo (stock
    lm-eval; the native checkpoint is refused there).

lm-eval's per-choice log-likelihoods and its ``acc``/``acc_norm``/``acc_bytes`` are checked against an
independent plain-torch computation (spec: lowrank-training.md §5): LL = summed log-softmax of the
continuation tokens (" " + choice) after the context, acc = argmax LL is gold, acc_norm = argmax of
LL / len(choice) in characters, acc_bytes = the same over UTF-8 bytes; and (a) against (b). The
commands in docs/peft_interop.md's "Evaluate with lm-evaluation-harness" section are run as written.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_fresh_python

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lrzoo[eval]')")

pytestmark = pytest.mark.slow

TASK = "lrzoo_tiny_mc"
METRICS = ("acc", "acc_norm", "acc_bytes")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Choices of different lengths (acc_norm can disagree with acc) and one non-ASCII choice (characters
# and UTF-8 bytes differ; the character tokenizer reads "é" as [UNK]).
DOCS = [
    {"question": "2 + 3 =", "choices": ["5", "six", "23", "fifty"], "label": 0},
    {"question": "The sky is", "choices": ["green", "blue", "loud"], "label": 1},
    {"question": "Opposite of hot", "choices": ["warm", "no", "cold", "hotter"], "label": 2},
    {"question": "Capital of France", "choices": ["Rome", "Berlin", "Madrid", "Paris"], "label": 3},
    {"question": "A caf\u00e9 serves", "choices": ["caf\u00e9 au lait", "bricks", "x"], "label": 0},
    {"question": "Cats say", "choices": ["woof", "meow", "moo"], "label": 1},
    {"question": "1, 2, 3,", "choices": ["4", "five", "three"], "label": 0},
    {"question": "Ice is", "choices": ["hot", "solid water", "gas"], "label": 1},
]
LL_ATOL = 1e-4  # fp32 sums of a few log-probs; lm-eval batches (right padding), the reference does not


def context(doc: dict) -> str:
    return f"Question: {doc['question']}\nAnswer:"


TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""


# --------------------------------------------------------------------------------------------
# The independent computation (plain torch)
# --------------------------------------------------------------------------------------------

def choice_logliks(model, tokenizer, docs=DOCS) -> list[list[float]]:
    """Per doc, per choice: sum of log-softmax over the continuation tokens (" " + choice) given the
    context. The pair is encoded jointly and the continuation is the tail after len(enc(context))."""
    out = []
    with torch.no_grad():
        for doc in docs:
            ctx_ids = tokenizer(context(doc))["input_ids"]
            scores = []
            for choice in doc["choices"]:
                ids = tokenizer(context(doc) + " " + choice)["input_ids"]
                assert ids[:len(ctx_ids)] == ctx_ids
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
                # token ids[i] is predicted at position i - 1
                scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(ctx_ids), len(ids))))
            out.append(scores)
    return out


def per_doc_metrics(logliks: list[list[float]], docs=DOCS) -> dict[str, list[float]]:
    scores: dict[str, list[float]] = {metric: [] for metric in METRICS}
    for lls, doc in zip(logliks, docs):
        lls = np.asarray(lls)
        chars = np.array([len(c) for c in doc["choices"]], dtype=float)
        utf8 = np.array([len(c.encode("utf-8")) for c in doc["choices"]], dtype=float)
        for metric, values in (("acc", lls), ("acc_norm", lls / chars), ("acc_bytes", lls / utf8)):
            scores[metric].append(float(int(np.argmax(values)) == doc["label"]))
    return scores


def min_margin(logliks: list[list[float]], docs=DOCS) -> float:
    """Smallest gap between the best and second-best choice under any of the three rules."""
    gaps = []
    for lls, doc in zip(logliks, docs):
        for length in (lambda c: 1, len, lambda c: len(c.encode("utf-8"))):
            values = sorted((ll / length(c) for ll, c in zip(lls, doc["choices"])), reverse=True)
            gaps.append(values[0] - values[1])
    return min(gaps)


# --------------------------------------------------------------------------------------------
# lm-eval (this function's source also runs in the fresh process, so it imports only lm_eval)
# --------------------------------------------------------------------------------------------

def run_lm_eval(base_dir: str, adapter_dir: str, task_dir: str, task: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=base_dir, peft=adapter_dir, device="cpu", dtype="float32", batch_size=4)
    # include_defaults=False: indexing lm-eval's thousands of built-in task YAMLs takes ~10 s on 2 cores
    task_manager = TaskManager(include_path=task_dir, include_defaults=False)
    out = simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, log_samples=True)
    results = out["results"][task]
    samples = sorted(out["samples"][task], key=lambda sample: sample["doc_id"])
    metrics = ("acc", "acc_norm", "acc_bytes")
    return {
        "peft_type": str(lm.model.peft_config["default"].peft_type.value),
        "metrics": {metric: results[f"{metric},none"] for metric in metrics},
        "per_doc": {metric: [sample[metric] for sample in samples] for metric in metrics},
        "logliks": [[ll for ll, _ in sample["filtered_resps"]] for sample in samples],
        "docs": [sample["doc"] for sample in samples],
    }


FRESH_PROCESS = """
import json, sys
{run_lm_eval}
base, native, exported, task_dir, task = {args!r}
try:  # stock lm-eval cannot read the native checkpoint: PEFT does not know LRZOO_LORA_XS
    run_lm_eval(base, native, task_dir, task)
    native_error = None
except KeyError as error:
    native_error = repr(error)
result = run_lm_eval(base, exported, task_dir, task)
result["native_error"] = native_error
result["lrzoo_imported"] = sorted(name for name in sys.modules if name.split(".")[0] == "lrzoo")
assert "lrzoo" not in sys.modules
print("RESULT " + json.dumps(result))
"""


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Base model dir, trained native adapter, its LoRA export, the task dir and the reference scores."""
    import lrzoo
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrzoo.models import char_tokenizer, load_model

    root = tmp_path_factory.mktemp("lm_eval")
    paths = {name: root / name for name in ("base", "native", "exported", "tasks", "out")}

    # vocab_size = len(tokenizer): with peft=, lm-eval resizes the embeddings to len(tokenizer) otherwise
    # (see docs/peft_interop.md); initializer_range 0.2 gives the random model something to adapt.
    torch.manual_seed(0)
    vocab = len(char_tokenizer(pair_template=False))
    model, tokenizer = load_model("tiny_llama", "generation",
                                  config_overrides={"vocab_size": vocab, "initializer_range": 0.2})
    model.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])

    peft_model = lrzoo.wrap(model, "lora_xs", r=8, target_modules=TARGETS)
    rows = []
    for doc in DOCS:  # train on the gold answers: loss on the continuation tokens only
        n_ctx = len(tokenizer(context(doc))["input_ids"])
        ids = tokenizer(context(doc) + " " + doc["choices"][doc["label"]])["input_ids"]
        rows.append((ids, [-100] * n_ctx + ids[n_ctx:]))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-2)
    peft_model.train()
    for _ in range(80):
        peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(paths["native"])
    report = lrzoo.export_lora(peft_model, str(paths["exported"]))
    assert report["exact"]

    paths["tasks"].mkdir()
    data = paths["tasks"] / "data.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (paths["tasks"] / f"{TASK}.yaml").write_text(
        TASK_YAML.format(task=TASK, data=data, cache=root / "datasets_cache"))

    # The reference: the saved base + the saved native adapter, loaded back, scored in plain torch.
    base = AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
    reference_tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    base_logliks = choice_logliks(base, reference_tokenizer)
    adapted = PeftModel.from_pretrained(base, str(paths["native"])).eval()
    logliks = choice_logliks(adapted, reference_tokenizer)
    return {"paths": {name: str(path) for name, path in paths.items()}, "logliks": logliks,
            "base_logliks": base_logliks, "per_doc": per_doc_metrics(logliks),
            "base_per_doc": per_doc_metrics(base_logliks)}


@pytest.fixture(scope="module")
def native_run(zoo):
    """(a) this process imported lrzoo, so lm-eval's PeftModel.from_pretrained reads LRZOO_LORA_XS."""
    assert "lrzoo" in sys.modules
    paths = zoo["paths"]
    return run_lm_eval(paths["base"], paths["native"], paths["tasks"], TASK)


@pytest.fixture(scope="module")
def exported_run(zoo, tmp_path_factory):
    """(b) stock lm-eval in a fresh interpreter that never imports lrzoo, on the exported LoRA."""
    paths = zoo["paths"]
    code = FRESH_PROCESS.format(run_lm_eval=inspect.getsource(run_lm_eval),
                                args=(paths["base"], paths["native"], paths["exported"], paths["tasks"], TASK))
    stdout = run_fresh_python(code, cwd=tmp_path_factory.mktemp("fresh"))
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

def test_reference_is_meaningful(zoo):
    """The task can tell the adapter from the base and no argmax is a near tie."""
    assert min_margin(zoo["logliks"]) > 1e-3 and min_margin(zoo["base_logliks"]) > 1e-3
    assert np.mean(zoo["per_doc"]["acc"]) > np.mean(zoo["base_per_doc"]["acc"])  # training helped
    assert zoo["per_doc"]["acc"] != zoo["per_doc"]["acc_norm"]  # the length normalisation matters here


def _check_against_reference(run: dict, zoo: dict) -> None:
    assert run["docs"] == DOCS  # lm-eval read the local JSONL task, all of it, in order
    assert [len(lls) for lls in run["logliks"]] == [len(doc["choices"]) for doc in DOCS]
    np.testing.assert_allclose(np.concatenate(run["logliks"]), np.concatenate(zoo["logliks"]), atol=LL_ATOL, rtol=0)
    # the adapter is in lm-eval's model: its scores are not the base's
    assert np.abs(np.concatenate(run["logliks"]) - np.concatenate(zoo["base_logliks"])).max() > 100 * LL_ATOL
    for metric in METRICS:
        assert run["per_doc"][metric] == zoo["per_doc"][metric], metric
        assert run["metrics"][metric] == pytest.approx(np.mean(zoo["per_doc"][metric]), abs=1e-12), metric


def test_lm_eval_scores_native_adapter_after_import_lrzoo(native_run, zoo):
    assert native_run["peft_type"] == "LRZOO_LORA_XS"
    _check_against_reference(native_run, zoo)


def test_stock_lm_eval_scores_the_exported_lora_without_lrzoo(exported_run, zoo):
    assert exported_run["lrzoo_imported"] == []
    assert exported_run["native_error"] is not None and "LRZOO_LORA_XS" in exported_run["native_error"]
    assert exported_run["peft_type"] == "LORA"
    _check_against_reference(exported_run, zoo)


def test_native_and_exported_agree(native_run, exported_run):
    assert native_run["metrics"] == exported_run["metrics"]
    assert native_run["per_doc"] == exported_run["per_doc"]
    np.testing.assert_allclose(np.concatenate(native_run["logliks"]), np.concatenate(exported_run["logliks"]),
                               atol=LL_ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# The documented CLI commands, run as written
# --------------------------------------------------------------------------------------------

def documented_commands() -> str:
    text = (REPO / "docs" / "peft_interop.md").read_text()
    section = text.split("## Evaluate with lm-evaluation-harness", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)
    assert len(blocks) == 1, "the section has one bash block"
    return blocks[0]


def _results_json(out_dir: Path) -> dict:
    files = sorted(out_dir.rglob("results_*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())["results"][TASK]


def test_documented_cli_commands(zoo):
    paths = zoo["paths"]
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "PATH": bin_dir + os.pathsep + os.environ["PATH"],
           "BASE": paths["base"], "ADAPTER": paths["native"], "EXPORTED": paths["exported"],
           "TASK": TASK, "TASK_DIR": paths["tasks"], "OUT": paths["out"]}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", documented_commands()], cwd=Path(paths["out"]).parent,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    native = _results_json(Path(paths["out"]) / "native")
    exported = _results_json(Path(paths["out"]) / "exported")
    for metric in METRICS:
        expected = pytest.approx(np.mean(zoo["per_doc"][metric]), abs=1e-12)
        assert native[f"{metric},none"] == expected and exported[f"{metric},none"] == expected, metric
