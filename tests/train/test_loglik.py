"""Likelihood scoring of multiple-choice items (``eval.mode=loglik``, lrzoo/train/loglik.py): the scores against
a hand computation, acc vs acc_norm, option parsing on the shared test sets, a recipe run with its
``results.json``/``predictions.json``, ``adapter=zero_shot``, the held-out rule of ``evaluate`` and the
config hash of the ``eval`` node."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import SHARED_DATA
from lrzoo.cli.train import run_recipe
from lrzoo.runs.identity import config_hash, hashed_config, run_hash
from lrzoo.tasks import get_task
from lrzoo.tasks.commonsense import SPECS, CommonsenseTask, choice_labels, choice_question, choice_texts
from lrzoo.tasks.prompts import alpaca_prompt
from lrzoo.train import loglik
from lrzoo.train.config import EvalConfig
from lrzoo.train.evaluation import EvaluationMixin
from recipe_helpers import compose, run_dir_of

# Short ARC-style items with 3, 4 and 5 options (the real files have 3-5 for ARC).
ITEMS = [
    ("Which is hot?", ["ice", "fire", "snow"], 2),
    ("Which can fly?", ["a rock", "a bird", "a fish", "a tree"], 2),
    ("Which is a color?", ["red", "run", "ten", "sky", "cup"], 1),
    ("Which is wet?", ["sand", "water", "dust", "salt"], 2),
    ("Which is big?", ["ant", "whale", "bee"], 2),
]


def _record(question: str, options: list[str], gold: int) -> dict:
    listed = " ".join(f"Answer{k + 1}: {text}" for k, text in enumerate(options))
    labels = "/".join(f"answer{k + 1}" for k in range(len(options)))
    return {"instruction": f"Please choose the correct answer to the question: {question}\n\n{listed}\n\n"
                           f"Answer format: {labels}",
            "input": "", "output": f"the correct answer is answer{gold}", "answer": f"answer{gold}"}


def _rows() -> list[dict]:
    task = CommonsenseTask(SPECS["arc_e"])
    return [task._row(_record(*item), f"item {i}", "test") for i, item in enumerate(ITEMS)]


@pytest.fixture(scope="module")
def tiny():
    from lrzoo.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model("tiny_llama", "generation", config_overrides={"initializer_range": 0.2})
    return model.eval(), tokenizer


def _hand_scores(model, items: list[dict]) -> list[list[float]]:
    """One unbatched forward per option: log_softmax, gather the continuation tokens, sum."""
    out = []
    for item in items:
        scores = []
        for ids, n in zip(item["options"], item["scored"]):
            with torch.no_grad():
                logprobs = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float().log_softmax(-1)
            scores.append(sum(logprobs[j - 1, ids[j]].item() for j in range(len(ids) - n, len(ids))))
        out.append(scores)
    return out


@pytest.mark.parametrize("choices", ["label", "text"])
@pytest.mark.parametrize("max_length", [400, 170])  # 170: contexts cut on the left
def test_option_scores_match_one_forward_per_option(tiny, choices, max_length):
    model, tokenizer = tiny
    task = get_task("commonsense/arc_e")
    items = loglik.encode_items(task, _rows(), tokenizer, max_length, choices)
    assert [len(item["options"]) for item in items] == [3, 4, 5, 4, 3]
    assert all(len(ids) <= max_length + 1 for item in items for ids in item["options"])
    expected = _hand_scores(model, items)
    for shared_prefix in (False, True):
        for batches in (loglik.pack(range(5), items, 8), [[i] for i in range(5)]):
            got = {}
            for batch in batches:
                with torch.no_grad():
                    scores = loglik.score_items(model, [items[i] for i in batch], pad_id=tokenizer.pad_token_id,
                                                device="cpu", autocast=contextlib.nullcontext,
                                                shared_prefix=shared_prefix)
                got.update(zip(batch, scores))
            for i, want in enumerate(expected):
                assert got[i] == pytest.approx(want, abs=2e-4), (shared_prefix, i)


@pytest.mark.parametrize("choices", ["label", "text"])
def test_scores_equal_lm_eval_harness(tiny, choices):
    """lm-eval's own HFLM.loglikelihood on the same requests (with the BOS the tiny tokenizer adds, as in
    training; lm-eval adds none for causal models unless add_bos_token)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny
    task = get_task("commonsense/arc_e")
    rows = _rows()[:3]
    items = loglik.encode_items(task, rows, tokenizer, 400, choices)
    with torch.no_grad():
        ours = loglik.score_items(model, items, pad_id=tokenizer.pad_token_id, device="cpu",
                                  autocast=contextlib.nullcontext, shared_prefix=True)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=400, add_bos_token=True)
    requests = [Instance("loglikelihood", {}, (context, option), i) for row in rows
                for context, options, _ in [task.choice_request(row, choices)] for i, option in enumerate(options)]
    theirs = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    assert [x for scores in ours for x in scores] == pytest.approx(theirs, abs=2e-4)


def test_encoding_follows_lm_eval(tiny):
    """The context's trailing newline moves into the continuation (which is then scored); the option's
    length for acc_norm counts its characters without the delimiter space."""
    _, tokenizer = tiny  # a character tokenizer: one token per character (a run of newlines is one), "<s>" first
    row = _rows()[0]
    task = get_task("commonsense/arc_e")
    label = loglik.encode_items(task, [row], tokenizer, 1000, "label")[0]
    assert row["prompt"].endswith("### Response:\n")
    assert label["scored"] == [len("\nthe correct answer is answer1")] * 3
    assert label["chars"] == [len("the correct answer is answer1")] * 3
    assert tokenizer.decode(label["options"][1][-label["scored"][1]:]) == "\nthe correct answer is answer2"
    text = loglik.encode_items(task, [row], tokenizer, 1000, "text")[0]
    assert text["scored"] == [len(" ice"), len(" fire"), len(" snow")] and text["chars"] == [3, 4, 4]
    assert text["gold"] == 1
    assert text["options"][0] == tokenizer(row["prompt"] + "the correct answer is ice")["input_ids"]  # jointly


def test_acc_and_acc_norm():
    # LL -10 over 5 characters (-2/char) beats -12 over 20 (-0.6/char) for acc, not for acc_norm
    assert loglik.choose([-10.0, -12.0], [5, 20]) == (0, 1)
    assert loglik.choose([-3.0, -3.0, -6.0], [1, 1, 2]) == (0, 0)  # ties: the first option
    assert loglik.choose([-4.0, -1.0, -2.0], [8, 1, 1]) == (1, 0)
    assert loglik.choose([-4.0, -1.0], [4, 1]) == (1, 0)  # -1 per character each: the first for acc_norm
    assert loglik.metrics([0, 1, 1, 2], [1, 1, 0, 2], [0, 1, 0, 1]) == {"accuracy": 0.5, "acc_norm": 0.5,
                                                                        "modal_share": 0.5}
    assert loglik.metrics([0, 0], [1, 1], [1, 1]) == {"accuracy": 0.0, "acc_norm": 1.0, "modal_share": 1.0}
    assert loglik.metrics([2, 0, 2, 2, 1], [0] * 5, [0] * 5)["modal_share"] == 0.6   # option 2 on 3 of 5 items


def test_packing_keeps_items_whole():
    items = [{"options": [[1] * n] * k} for n, k in ((3, 4), (9, 5), (2, 2), (4, 3), (5, 9))]
    batches = loglik.pack(range(5), items, 8)
    assert sorted(i for batch in batches for i in batch) == list(range(5))
    assert all(sum(len(items[i]["options"]) for i in batch) <= 8 or len(batch) == 1 for batch in batches)
    assert [4] in batches  # 9 options: a batch of its own


SHARED_FIRST_ROWS = {  # task -> (labels of the first test item, gold index, its first option text)
    "boolq": (["true", "false"], 1, "true"),
    "piqa": (["solution1", "solution2"], 0, "Provide the guinea pig with a cage full of a few inches of bedding made "
             "of ripped paper strips, you will also need to supply it with a water bottle and a food dish."),
    "siqa": (["answer1", "answer2", "answer3"], 2, "make a new plan"),
    "winogrande": (["option1", "option2"], 1, "Sarah"),
    "arc_e": (["answer1", "answer2", "answer3", "answer4"], 0,
              "Sunlight is the source of energy for nearly all ecosystems."),
    "arc_c": (["answer1", "answer2", "answer3", "answer4"], 2, "Planetary density will decrease."),
    "obqa": (["answer1", "answer2", "answer3", "answer4"], 1, "make more phone calls"),
}


@pytest.mark.shared_data
@pytest.mark.parametrize("key", sorted(SHARED_FIRST_ROWS))
def test_labels_and_texts_of_the_shared_test_sets(key):
    labels, gold, first_text = SHARED_FIRST_ROWS[key]
    task = get_task(f"commonsense/{key}")
    row = task.load_split("test", SHARED_DATA, limit=1)[0]
    context, continuations, index = task.choice_request(row, "label")
    assert context == row["prompt"] and index == gold
    assert continuations == [f"the correct answer is {label}" for label in labels]
    context, continuations, index = task.choice_request(row, "text")
    assert context == row["prompt"] + "the correct answer is" and index == gold
    assert len(continuations) == len(labels) and continuations[0] == " " + first_text
    assert all(c.startswith(" ") and c.strip() and "Answer format" not in c for c in continuations)
    # lm-eval's plain shape: the bare question, the same option texts
    question, same, index = task.choice_request(row, "question")
    assert same == continuations and index == gold
    assert question.startswith("Question: ") and question.endswith("\nAnswer:") and question.count("\n") == 1
    assert not any(word in question for word in ("Please", "Answer format", "Answer1:", "Solution1:", "Option1:",
                                                 "### Response"))
    trained = task.question_row(row)
    assert trained["prompt"] == question and trained["target"] == continuations[gold] and trained["answer"] == row["answer"]


def test_question_format_reads_each_template():
    cases = {  # instruction -> (question, option texts)
        "Please answer the following question with true or false, question: is it wet?\n\nAnswer format: true/false":
            ("is it wet?", ["true", "false"]),
        "Please choose the correct answer to fill in the blank to complete the given sentence: A saw B so _ ran."
        "\n\nOption1: A Option2: B Answer format: option1/option2": ("A saw B so _ ran.", ["A", "B"]),
        "Please choose the correct solution to the question: How to boil: water?\n\nSolution1: heat it\n\n"
        "Solution2: cool it\n\nAnswer format: solution1/solution2": ("How to boil: water?", ["heat it", "cool it"]),
    }
    for instruction, (question, texts) in cases.items():
        prompt = alpaca_prompt(instruction, "", "\n")
        labels = choice_labels(prompt)
        assert choice_question(prompt) == question and choice_texts(prompt, labels) == texts
        row = {"prompt": prompt, "target": f"the correct answer is {labels[1]}", "answer": labels[1]}
        trained = get_task("commonsense/all").question_row(row)
        assert trained == {**row, "prompt": f"Question: {question}\nAnswer:", "target": " " + texts[1]}
    with pytest.raises(ValueError, match="its question is unknown"):
        choice_question(alpaca_prompt("What is 2+2?\n\nAnswer format: a/b", "", "\n"))


def test_question_training_format_is_checked_against_the_evaluation():
    from lrzoo.train.recipe import formatted_train_rows

    task, rows = get_task("commonsense/arc_e"), _rows()
    scored = EvalConfig(mode="loglik", choices="question")
    assert formatted_train_rows(task, rows, None, EvalConfig()) is rows
    formatted = formatted_train_rows(task, rows, "question", scored)
    assert [r["prompt"] for r in formatted] == [task.choice_request(r, "question")[0] for r in rows]
    assert [r["target"] for r in formatted] == [task.choice_request(r, "question")[1][task.choice_request(r)[2]]
                                                for r in rows]
    with pytest.raises(ValueError, match="set eval.mode=loglik eval.choices=question"):
        formatted_train_rows(task, rows, "question", EvalConfig(mode="loglik", choices="label"))
    with pytest.raises(ValueError, match="set eval.mode=loglik eval.choices=question"):
        formatted_train_rows(task, rows, "question", EvalConfig())
    with pytest.raises(ValueError, match="must be null .* or 'question'"):
        formatted_train_rows(task, rows, "lm_eval", scored)
    with pytest.raises(ValueError, match="glue/sst2 has none"):
        formatted_train_rows(get_task("glue/sst2"), [], "question", scored)


def test_bad_items_are_refused():
    task = get_task("commonsense/arc_e")
    row = _rows()[1]
    with pytest.raises(ValueError, match="not among the labels"):
        task.choice_request({**row, "answer": "answer5", "target": "the correct answer is answer5"})
    with pytest.raises(ValueError, match="Answer format"):
        task.choice_request({**row, "prompt": row["prompt"].replace("Answer format", "Format")})
    broken = row["prompt"].replace("Answer3:", "Answer 3:")
    assert task.choice_request({**row, "prompt": broken}, "label")[2] == 1  # labels need no texts
    with pytest.raises(ValueError, match="eval.choices=label"):
        task.choice_request({**row, "prompt": broken}, "text")
    with pytest.raises(TypeError, match="not a multiple-choice task"):
        get_task("math/gsm8k").choice_request({"prompt": "", "target": "", "answer": "1"})
    with pytest.raises(ValueError, match="eval.mode='fast'"):
        EvalConfig(mode="fast")
    with pytest.raises(ValueError, match="Unknown eval option"):
        EvalConfig.from_dict({"mode": "loglik", "norm": "bytes"})


# ---- the eval node in a run: results.json, predictions.json, config hash -------------------------

def _write_arc(root: Path) -> Path:
    folder = root / "commonsense" / "ARC-Easy"
    folder.mkdir(parents=True, exist_ok=True)
    train = [_record(*ITEMS[i % len(ITEMS)]) for i in range(128)]  # 120 are held out (LLM-Adapters)
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "test.json").write_text(json.dumps([_record(*item) for item in ITEMS]))
    return root


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    data = _write_arc(tmp_path / "data")
    return ["model=tiny_llama", "task=commonsense/arc_e", f"task.data_dir={data}", f"output_root={tmp_path / 'runs'}",
            "trainer.batch_size=4", "trainer.max_steps=2", "trainer.max_length=400", "trainer.progress=false",
            "trainer.eval_batch_size=6", *extra]


@pytest.mark.parametrize("choices", ["label", "text", "question"])
def test_recipe_with_loglik_writes_accuracy_acc_norm_and_predictions(tmp_path, choices):
    trained_as = ("+task.format=question",) if choices == "question" else ()
    cfg = compose(_overrides(tmp_path, "eval.mode=loglik", f"eval.choices={choices}", *trained_as))
    results = run_recipe(cfg, run_dir_of(cfg))
    run_dir = Path(run_dir_of(cfg))
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["steps"] == 2 and set(saved["metrics"]) == {"accuracy", "acc_norm", "modal_share", "score"}
    assert saved["score"] == saved["metrics"]["accuracy"] == results["score"]
    assert saved["config"]["eval"] == {"mode": "loglik", **({"choices": choices} if choices != "label" else {})}
    assert saved["config"]["task"].get("format") == ("question" if trained_as else None)

    record = json.loads((run_dir / "predictions.json").read_text())["sets"]["commonsense/arc_e"]
    assert record["task"] == "commonsense/arc_e" and record["kind"] == "loglik"
    assert record["primary_metric"] == "accuracy"
    assert record["references"] == [gold - 1 for _, _, gold in ITEMS]
    for key, metric in (("predictions", "accuracy"), ("predictions_norm", "acc_norm")):
        chosen = record[key]
        assert all(0 <= c < len(ITEMS[i][1]) for i, c in enumerate(chosen))
        hits = sum(c == g for c, g in zip(chosen, record["references"])) / len(ITEMS)
        assert saved["metrics"][metric] == pytest.approx(hits)


def test_loglik_refuses_a_task_without_options(tmp_path):
    from recipe_helpers import write_gsm8k

    data = write_gsm8k(tmp_path / "data")
    cfg = compose(["model=tiny_llama", "task=math/gsm8k", f"task.data_dir={data}", f"output_root={tmp_path / 'runs'}",
                   "trainer.batch_size=4", "trainer.max_steps=1", "trainer.progress=false", "eval_limit=2",
                   "eval.mode=loglik"])
    with pytest.raises(ValueError, match=r"math/gsm8k .* eval\.mode=generate"):
        run_recipe(cfg, run_dir_of(cfg))
    assert not (Path(run_dir_of(cfg)) / "results.json").exists()


def test_zero_shot_scores_the_untrained_base(tmp_path):
    from lrzoo.models import load_model
    from lrzoo.train.trainer import seed_everything

    cfg = compose(_overrides(tmp_path, "adapter=zero_shot", "eval.mode=loglik"))
    results = run_recipe(cfg, run_dir_of(cfg))
    run_dir = Path(run_dir_of(cfg))
    assert results["steps"] == 0 and results["trainable_params"] == 0 and results["adapter"] == "zero_shot"
    assert json.loads((run_dir / "results.json").read_text())["metrics"] == results["metrics"]
    assert not (run_dir / "adapter").exists() and not (run_dir / "checkpoints").exists()

    # the recorded choices are the fresh base model's (built as run_recipe builds it)
    seed_everything(cfg.seed)
    model, tokenizer = load_model("tiny_llama", "generation")
    items = loglik.encode_items(get_task("commonsense/arc_e"), _rows(), tokenizer, 400, "label")
    with torch.no_grad():
        scores = loglik.score_items(model.eval(), items, pad_id=tokenizer.pad_token_id, device="cpu",
                                    autocast=contextlib.nullcontext)
    record = json.loads((run_dir / "predictions.json").read_text())["sets"]["commonsense/arc_e"]
    chosen = [loglik.choose(s, item["chars"]) for s, item in zip(scores, items)]
    assert record["predictions"] == [c[0] for c in chosen]
    assert record["predictions_norm"] == [c[1] for c in chosen]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_ranks_choose_what_one_process_chooses(tmp_path, strategy):
    """Items sharded over 2 CPU ranks (torchrun, gloo) and gathered; under FSDP the ranks' batch counts
    differ (eval_batch_size 5: rank 0 has items of 3, 5 and 3 options, three batches; rank 1 two) and the
    options run without the shared prefix. The zero-shot choices equal one process's."""
    import os
    import subprocess

    from test_distributed import LAUNCHERS

    one = _overrides(tmp_path, "adapter=zero_shot", "eval.mode=loglik", "trainer.eval_batch_size=5",
                     f"output_root={tmp_path / 'one'}")
    run_recipe(compose(one), run_dir_of(compose(one)))
    two = [*one[:-1], f"output_root={tmp_path / strategy}", f"trainer={strategy}", "trainer.precision=no"]
    done = subprocess.run([*LAUNCHERS["torchrun"], "-m", "lrzoo.cli.train", *two], cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads((Path(run_dir_of(compose(o))) / "results.json").read_text()) for o in (one, two)]
    assert results[1]["parallelism"] == strategy and results[1]["metrics"] == results[0]["metrics"]
    records = [json.loads((Path(run_dir_of(compose(o))) / "predictions.json").read_text()) for o in (one, two)]
    assert records[1] == records[0]


def test_the_default_eval_node_keeps_the_old_hash():
    default = compose([])
    assert OmegaConf.to_container(default.eval) == {"mode": "generate", "choices": "label", "forgetting": None}
    before = OmegaConf.to_container(default, resolve=False)
    before.pop("eval")  # the config as it was before the node existed
    before = OmegaConf.create(before)
    assert config_hash(default) == config_hash(before) and run_hash(default) == run_hash(before)
    assert "eval" not in hashed_config(default)
    loglik_cfg = compose(["eval.mode=loglik"])
    assert config_hash(loglik_cfg) != config_hash(default) and run_hash(loglik_cfg) != run_hash(default)
    assert config_hash(compose(["eval.mode=loglik", "eval.choices=text"])) != config_hash(loglik_cfg)


# ---- evaluate(): the held-out rule and the per-example record, on a hand-built eval_sets dict ----------

class _Evaluator(EvaluationMixin):
    """Just what evaluate() reads: ``eval_sets`` ``{name: (task, rows, canned predictions)}``."""

    def __init__(self, eval_sets: dict):
        self.model = torch.nn.Linear(1, 1)
        self.eval_sets = {name: (task, [{}] * len(rows), rows) for name, (task, rows, _) in eval_sets.items()}
        self.eval_kinds = {name: task.kind for name, (task, _, _) in eval_sets.items()}
        self.canned = {id(self.eval_sets[name][1]): canned for name, (_, _, canned) in eval_sets.items()}

    def _predict(self, task, features):
        return self.canned[id(features)]


def test_heldout_sets_are_the_selection_score_not_the_score():
    sst2, stsb = get_task("glue/sst2"), get_task("glue/stsb")
    rows = [{"label": label} for label in (1, 0, 1, 1)]
    evaluator = _Evaluator({"glue/sst2": (sst2, rows, [1, 0, 0, 1]),
                            "heldout/glue/sst2": (sst2, rows[:2], [0, 0]),
                            "glue/stsb": (stsb, [{"label": v} for v in (0.5, 2.0, 4.0)], [1.0, 2.0, 3.5])})
    metrics = evaluator.evaluate()
    assert metrics["glue/sst2/accuracy"] == 0.75 and metrics["heldout/glue/sst2/accuracy"] == 0.5
    assert metrics["selection_score"] == 0.5
    assert metrics["score"] == pytest.approx((0.75 + metrics[f"glue/stsb/{stsb.primary_metric}"]) / 2)

    record = evaluator.last_predictions
    assert record["glue/sst2"] == {"task": "glue/sst2", "kind": "classification", "primary_metric": "accuracy",
                                   "references": [1, 0, 1, 1], "predictions": [1, 0, 0, 1]}
    assert record["heldout/glue/sst2"]["predictions"] == [0, 0]
    assert record["glue/stsb"]["kind"] == "regression" and record["glue/stsb"]["predictions"] == [1.0, 2.0, 3.5]
    assert record["glue/stsb"]["references"] == [0.5, 2.0, 4.0]

    only_heldout = _Evaluator({"heldout/glue/sst2": (sst2, rows, [1, 1, 1, 1])})
    assert only_heldout.evaluate() == {"accuracy": 0.75, "selection_score": 0.75, "score": 0.75}
