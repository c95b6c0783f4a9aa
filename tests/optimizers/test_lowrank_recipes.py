"""``adapter=galore`` / ``fira`` / ``apollo`` / ``apollo_mini`` / ``q_galore`` in lrzoo-train (issue 15 item 4, issue 30): the whole model trained through the
low-rank optimizer, saved whole, resumed bit-exactly, with its optimizer-state size in results.json."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lrzoo.cli.train import run_recipe
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_sst2



def _run(tmp_path, method, *extra, stop_after=None):
    data = write_sst2(tmp_path / "data")
    overrides = tiny_run_overrides(data, tmp_path / "runs", f"adapter={method}", "adapter.rank=4",
                                   "adapter.update_proj_gap=3", "trainer.save_every=4", *extra)
    cfg = compose(overrides + ([f"trainer.stop_after={stop_after}"] if stop_after else []))
    return run_recipe(cfg, run_dir_of(compose(overrides))), run_dir_of(compose(overrides))


#: tiny_bert's weights (32 wide) and rank-4 projectors split into groups of 32, not Q-GaLore's default 256
EXTRA = {"q_galore": ("adapter.proj_group_size=32", "adapter.weight_group_size=32")}


@pytest.mark.parametrize("method", ["galore", "fira", "apollo", "apollo_mini", "q_galore"])
def test_lowrank_optimizer_recipe_trains_the_whole_model_and_resumes_exactly(method, tmp_path):
    from transformers import AutoModelForSequenceClassification

    extra = EXTRA.get(method, ())
    results, run_dir = _run(tmp_path / "straight", method, *extra)
    assert results["adapter"] == method and results["steps"] == 8
    assert results["trainable_params"] == results["total_params"]
    # projected moments are rank/d of AdamW's: far below 2 × (trainable params) × 4 bytes
    assert 0 < results["optimizer_state_mb"] * 2**20 < 0.8 * 8 * results["trainable_params"]
    straight = AutoModelForSequenceClassification.from_pretrained(Path(run_dir) / "adapter").state_dict()

    assert _run(tmp_path / "resumed", method, *extra, stop_after=4)[0] is None
    resumed_results, resumed_dir = _run(tmp_path / "resumed", method, *extra)
    resumed = AutoModelForSequenceClassification.from_pretrained(Path(resumed_dir) / "adapter").state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # projector state survives the checkpoint
    assert resumed_results["metrics"] == results["metrics"]


def test_lowrank_optimizers_refuse_fsdp(tmp_path):
    with pytest.raises(ValueError, match="FSDP"):
        _run(tmp_path, "galore", "trainer.strategy=fsdp")


def test_an_experiment_presets_adapter_rank_is_not_passed_to_the_optimizer(tmp_path):
    """glue_cpu sets adapter.r/alpha for every adapter; GaLore takes adapter.rank and ignores those."""
    results, _ = _run(tmp_path, "galore", "+adapter.r=8", "+adapter.alpha=16")
    assert results["steps"] == 8


def test_results_record_the_weights_as_stored_so_int8_weights_show_their_saving(tmp_path):
    """weights_mb beside optimizer_state_mb is the pre-training papers' memory column: Q-GaLore's INT8 weights
    must show up in it, not only in its optimizer."""
    galore, _ = _run(tmp_path / "galore", "galore")
    q_galore, _ = _run(tmp_path / "q_galore", "q_galore", *EXTRA["q_galore"])
    assert galore["weights_mb"] * 2**20 >= 4 * galore["total_params"]  # fp32 weights, plus buffers
    assert q_galore["weights_mb"] < 0.8 * galore["weights_mb"]
