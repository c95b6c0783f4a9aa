"""results.json's ``memory`` (per-step samples, lrzoo.train.memory_trace) and ``forgetting`` (eval.forgetting: the
change of the loss on WikiText-2 from the checkpoint to the trained model, lrzoo.train.forgetting), issue 28 item 5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from lrzoo.runs.identity import config_hash
from lrzoo.train.recipe import run_recipe
from lrzoo.models import load_model
from lrzoo.train.memory_trace import MemoryTrace
from recipe_helpers import compose, run_dir_of, write_gsm8k

TEXT = " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . " * 40


def _nll(model, ids, window):
    """Mean next-token loss over windows of ``window`` tokens, written out here independently of the module."""
    losses, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            chunk = torch.tensor([ids[start:start + window]])
            logits = model(input_ids=chunk).logits.float()
            logp = torch.log_softmax(logits[0, :-1], -1).gather(1, chunk[0, 1:, None])
            losses -= float(logp.sum())
            count += chunk.shape[1] - 1
    return losses / count


def test_a_run_records_memory_samples_and_its_forgetting(tmp_path):
    data = write_gsm8k(tmp_path / "data")
    (data / "wikitext-2").mkdir()
    (data / "wikitext-2" / "test.txt").write_text(TEXT)
    overrides = ["model=tiny_llama", "task=math/gsm8k", f"task.data_dir={data}", f"output_root={tmp_path / 'runs'}",
                 "trainer.batch_size=4", "trainer.max_steps=3", "trainer.progress=false", "trainer.max_length=160",
                 "trainer.lr=5e-2", "eval_limit=1", "+trainer.generation.max_new_tokens=2"]
    cfg = compose([*overrides, "eval.forgetting={data:wikitext-2,tokens:300}"])
    assert config_hash(compose(overrides)) != config_hash(cfg)   # the option is part of the run
    results = run_recipe(cfg, run_dir_of(cfg))
    memory = results["memory"]
    assert memory["samples"] == 3 and 0 < memory["mean_mb"] <= memory["peak_mb"]
    assert memory["kind"] == ("cuda_allocated" if torch.cuda.is_available() else "cpu_rss")

    torch.manual_seed(cfg.seed)
    base, tokenizer = load_model("tiny_llama", "generation")
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"][:300]
    forgetting = results["forgetting"]
    assert forgetting["tokens"] == 300 and forgetting["window"] == 160
    assert forgetting["base_nll"] == pytest.approx(_nll(base.eval(), ids, 160), rel=1e-5)
    trained = PeftModel.from_pretrained(base, Path(run_dir_of(cfg)) / "adapter").eval()
    assert forgetting["nll"] == pytest.approx(_nll(trained, ids, 160), rel=1e-5)
    assert forgetting["delta_nll"] == pytest.approx(forgetting["nll"] - forgetting["base_nll"])
    assert abs(forgetting["delta_nll"]) > 1e-4      # lr 5e-2 for 3 steps moves the model
    assert json.loads((Path(run_dir_of(cfg)) / "results.json").read_text())["forgetting"] == forgetting


@pytest.mark.parametrize("value, message", [("{data:ptb,tokens:10}", "eval.forgetting.data='ptb'"),
                                            ("{data:wikitext-2,tokens:1}", "eval.forgetting.tokens=1"),
                                            ("{data:wikitext-2,size:1}", "must be null or")])
def test_a_bad_forgetting_option_is_refused_before_the_model_loads(tmp_path, value, message):
    data = write_gsm8k(tmp_path / "data")
    cfg = compose(["model=tiny_llama", "task=math/gsm8k", f"task.data_dir={data}", f"output_root={tmp_path}",
                   f"eval.forgetting={value}"])
    with pytest.raises(ValueError, match=message):
        run_recipe(cfg, run_dir_of(cfg))


def test_the_memory_trace_averages_its_samples_across_a_resume():
    samples = iter([100.0, 300.0, 200.0, 400.0])
    trace = MemoryTrace(sample=lambda: next(samples))
    for step in (1, 2):
        trace.on_step_end(step, None, None, None)
    resumed = MemoryTrace(sample=lambda: next(samples))
    resumed.load_state_dict(trace.state_dict())
    for step in (3, 4):
        resumed.on_step_end(step, None, None, None)
    assert resumed.results()["memory"] | {"kind": None} == {"kind": None, "mean_mb": 250.0, "peak_mb": 400.0,
                                                            "samples": 4}
    assert MemoryTrace(sample=lambda: None).results()["memory"]["mean_mb"] is None
