"""The trainer: outputs of a run, exact resume, generation-task loss masking, training procedures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lrzoo.cli.train import run_recipe
from lrzoo.train.trainer import IGNORE_INDEX, collate, encode_rows
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_gsm8k, write_sst2


@pytest.fixture
def sst2_dir(tmp_path):
    return write_sst2(tmp_path / "data")


def _run(overrides: list[str]):
    cfg = compose(overrides)
    return cfg, run_recipe(cfg, run_dir_of(cfg))


def test_run_writes_results_metrics_and_a_reloadable_adapter(sst2_dir, tmp_path):
    cfg, results = _run(tiny_run_overrides(sst2_dir, tmp_path / "runs"))
    run_dir = Path(run_dir_of(cfg))

    saved = json.loads((run_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for key in ("task", "adapter", "metrics", "trainable_params", "wall_time_s", "train_tokens_per_s",
                "peak_memory_mb", "config_hash", "score"):
        assert key in saved, key
    assert saved["task"] == "glue/sst2" and saved["adapter"] == "lora" and saved["steps"] == 8
    assert saved["score"] == saved["metrics"]["accuracy"]

    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows if r["name"] == "train/loss"] == [2, 4, 6, 8]
    assert any(r["name"] == "eval/accuracy" for r in rows)

    # The saved adapter (with its classifier head) reproduces the reported dev accuracy.
    from peft import PeftModel

    from lrzoo.models import load_model
    from lrzoo.tasks import get_task

    torch.manual_seed(cfg.seed)
    base, tokenizer = load_model("tiny_bert", "classification", 2)
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n) \
        == saved["trainable_params"]
    rows = get_task("glue/sst2").load_split("validation", sst2_dir)
    batch = collate(encode_rows(list(rows), "classification", tokenizer, 64), tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1)
    accuracy = (predictions == torch.tensor(rows["label"])).float().mean().item()
    assert accuracy == pytest.approx(saved["metrics"]["accuracy"])


RESUME_CASES = {
    # its optimizer state (beyond AdamW's moments) read back under torch.load(weights_only=True)
    "salt": [],
    # dropout in the base and the adapter: the resumed run must restore the RNG exactly
    "lora": ["adapter.dropout=0.1"],
    # a reset at step 3 (before the checkpoint at 4) merges into the frozen base, one at 6 after it
    "relora": ["adapter.r=4", "adapter.relora_steps=3", "adapter.restart_warmup_steps=1"],
    # the data-dependent init runs again on resume and must agree with the checkpoint
    "lora_sb": ["adapter.r=4"],
    # full-size moments in the optimizer state and the eigendecomposition solve: a resume must redo it bit for bit
    "lora_pro": ["adapter.r=4"],
}


@pytest.mark.parametrize("adapter", sorted(RESUME_CASES))
def test_stopped_and_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(adapter, sst2_dir, tmp_path):
    extra = [f"adapter={adapter}", *RESUME_CASES[adapter], "trainer.save_every=4", "trainer.eval_every=100"]
    cfg, stopped = _run(tiny_run_overrides(sst2_dir, tmp_path / "a", *extra, "trainer.stop_after=4"))
    assert stopped is None
    run_a = Path(run_dir_of(cfg))
    assert (run_a / "checkpoints" / "step-0000004" / "trainer_state.pt").is_file()
    assert not (run_a / "results.json").exists()

    _, resumed = _run(tiny_run_overrides(sst2_dir, tmp_path / "a", *extra))
    cfg_b, straight = _run(tiny_run_overrides(sst2_dir, tmp_path / "b", *extra))
    assert resumed["config_hash"] == straight["config_hash"]

    run_b = Path(run_dir_of(cfg_b))
    weights = "model.safetensors" if adapter == "relora" else "adapter_model.safetensors"  # ReLoRA: the full model
    weights_a = load_file(run_a / "adapter" / weights)
    weights_b = load_file(run_b / "adapter" / weights)
    assert weights_a.keys() == weights_b.keys()
    if adapter == "relora":  # the reset before the checkpoint is counted after the resume too
        counts = [json.loads((run / "adapter" / "relora.json").read_text())["resets"] for run in (run_a, run_b)]
        assert counts == [2, 2]
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=0, msg=name)
    assert resumed["metrics"] == straight["metrics"]


def test_resume_refuses_a_checkpoint_from_another_configuration(sst2_dir, tmp_path):
    # Configurations get their own run directories; an explicit run_name can still put two in one.
    _run(tiny_run_overrides(sst2_dir, tmp_path / "runs", "trainer.save_every=4", "trainer.stop_after=4", "run_name=one"))
    with pytest.raises(ValueError, match="another configuration"):
        _run(tiny_run_overrides(sst2_dir, tmp_path / "runs", "trainer.save_every=4", "trainer.lr=1e-3", "run_name=one"))


def test_finished_run_is_not_trained_again(sst2_dir, tmp_path):
    _, first = _run(tiny_run_overrides(sst2_dir, tmp_path / "runs"))
    _, again = _run(tiny_run_overrides(sst2_dir, tmp_path / "runs"))
    assert again == json.loads(json.dumps(first))


def test_generation_features_mask_the_prompt_and_end_with_eos():
    from lrzoo.models import char_tokenizer

    tokenizer = char_tokenizer(pair_template=False)
    rows = [{"prompt": "Q: 1+2?\nA: ", "target": "The answer is: 3", "answer": "3"}]
    (train,) = encode_rows(rows, "generation", tokenizer, max_length=64)
    n_prompt = len(tokenizer(rows[0]["prompt"])["input_ids"])
    assert train["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert train["labels"][n_prompt:] == train["input_ids"][n_prompt:]
    assert tokenizer.decode(train["input_ids"][n_prompt:-1]) == rows[0]["target"]
    assert train["input_ids"][-1] == tokenizer.eos_token_id

    (short,) = encode_rows(rows, "generation", tokenizer, max_length=5)
    assert len(short["input_ids"]) == 5 and set(short["labels"]) == {IGNORE_INDEX}
    (prompt,) = encode_rows(rows, "generation", tokenizer, max_length=4, for_generation=True)
    assert tokenizer.decode(prompt["input_ids"]) == "\nA: " and prompt["answer"] == "3"

    batch = collate([train, short], tokenizer.pad_token_id, left=True)
    assert batch["attention_mask"][1].tolist() == [0] * (len(train["input_ids"]) - 5) + [1] * 5
    assert (batch["labels"][1, :-5] == IGNORE_INDEX).all()


def test_generation_task_trains_and_is_scored_by_decoding(tmp_path, monkeypatch):
    from peft import PeftModel

    from lrzoo.models import load_model
    from lrzoo.tasks import get_task
    from lrzoo.tasks.math import Gsm8kTask

    # Record every decoded text the trainer scores and answer "3" for each: of the eval_limit=2 first
    # test problems (gold 1 and 3), exactly the second is then right, so the accuracy must be 1/2
    # (a random tiny model gets 0 either way, which would not tell a scored decode from no scoring).
    decoded: list[str] = []

    def always_three(self, generated: str) -> str:
        decoded.append(generated)
        return "3"

    monkeypatch.setattr(Gsm8kTask, "extract_answer", always_three)
    data = write_gsm8k(tmp_path / "data")
    cfg, results = _run([
        "model=tiny_llama", "task=math/gsm8k", f"task.data_dir={data}", f"output_root={tmp_path / 'runs'}",
        "trainer.batch_size=4", "trainer.max_steps=3", "trainer.progress=false", "trainer.max_length=160",
        "eval_limit=2", "+trainer.generation.max_new_tokens=4",
    ])
    assert results["task"] == "math/gsm8k"
    assert results["metrics"]["accuracy"] == 0.5 and results["score"] == results["metrics"]["accuracy"]
    assert len(decoded) == 2, decoded
    record = json.loads((Path(run_dir_of(cfg)) / "predictions.json").read_text())
    assert record == {"sets": {"math/gsm8k": {"task": "math/gsm8k", "kind": "generation", "primary_metric": "accuracy",
                                              "references": ["1", "3"], "predictions": ["3", "3"]}}}

    # The scored texts are the saved adapter's greedy continuations of those two prompts (4 new tokens).
    run_dir = Path(run_dir_of(cfg))
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    torch.manual_seed(cfg.seed)
    base, tokenizer = load_model("tiny_llama", "generation")
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    rows = list(get_task("math/gsm8k").load_split("test", data, limit=2))
    batch = collate(encode_rows(rows, "generation", tokenizer, 160, for_generation=True), tokenizer.pad_token_id,
                    left=True)
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        output = model.generate(**batch, pad_token_id=tokenizer.pad_token_id, do_sample=False, num_beams=1,
                                max_new_tokens=4)
    assert output.shape[1] - batch["input_ids"].shape[1] <= 4
    assert tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True) == decoded
