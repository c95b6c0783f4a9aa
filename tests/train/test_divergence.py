"""Runs you can trust when numbers stop being numbers (issue 12 item 1): a non-finite loss or
gradient norm stops the run before the update (or skips the step under on_nonfinite=skip_step),
lrzoo-train exits non-zero, nothing of the diverged state is written, and a NaN score is null."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lrzoo.cli.train import run_recipe
from lrzoo.train import trainer as trainer_module
from lrzoo.train.divergence import MAX_CONSECUTIVE_SKIPS, DivergenceError, NonfiniteGuard, json_safe
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_sst2


@pytest.fixture
def sst2_dir(tmp_path):
    return write_sst2(tmp_path / "data")


def _strict_json(path: Path) -> dict:
    """results.json parsed as strict JSON: a bare NaN/Infinity token fails the test."""
    return json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(f"{path} holds a bare {token}"))


def _poison_training_forwards(monkeypatch, bad_steps) -> None:
    """Make the training loss NaN at the given 1-based optimizer steps (one forward per step here)."""
    original_fit = trainer_module.Trainer.fit

    def fit(self):
        calls = {"n": 0}

        def hook(module, args, kwargs, output):
            if not module.training or getattr(output, "loss", None) is None:
                return output
            calls["n"] += 1
            if calls["n"] in bad_steps:
                output.loss = output.loss * float("nan")
            return output

        handle = self.peft_model.register_forward_hook(hook, with_kwargs=True)
        try:
            return original_fit(self)
        finally:
            handle.remove()

    monkeypatch.setattr(trainer_module.Trainer, "fit", fit)


def test_a_huge_lr_stops_the_run_and_keeps_the_last_good_checkpoint(sst2_dir, tmp_path):
    cfg = compose(tiny_run_overrides(sst2_dir, tmp_path / "runs", "trainer.lr=1e30", "trainer.save_every=1",
                                     "trainer.keep_checkpoints=2"))
    run_dir = Path(run_dir_of(cfg))
    with pytest.raises(DivergenceError) as caught:
        run_recipe(cfg, str(run_dir))
    err = caught.value
    message = str(err)
    assert f"optimizer step {err.step} of 8" in message and err.quantity in ("loss", "gradient norm")
    assert f"the {err.quantity} is" in message and "trainer.lr" in message and "What to try" in message
    # Nothing of the diverged state: no adapter, no results.json, no checkpoint at or after the bad step.
    assert not (run_dir / "adapter").exists() and not (run_dir / "results.json").exists()
    steps = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").iterdir())
    assert steps and max(steps) == err.step - 1
    assert err.checkpoint == str(run_dir / "checkpoints" / f"step-{err.step - 1:07d}")
    assert err.checkpoint in message
    state = torch.load(Path(err.checkpoint) / "trainer_state.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_lrzoo_train_exits_nonzero_on_divergence(sst2_dir, tmp_path):
    overrides = tiny_run_overrides(sst2_dir, tmp_path / "runs", "trainer.lr=1e30", "trainer.max_steps=4")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lrzoo.cli.train", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stdout[-2000:]
    assert "Training diverged" in done.stderr, done.stderr[-3000:]
    assert not list((tmp_path / "runs").rglob("results.json"))
    assert not list((tmp_path / "runs").rglob("adapter_config.json"))


def test_skip_step_skips_counts_and_reports(sst2_dir, tmp_path, monkeypatch):
    _poison_training_forwards(monkeypatch, {3, 4})
    cfg = compose(tiny_run_overrides(sst2_dir, tmp_path / "runs", "trainer.on_nonfinite=skip_step"))
    results = run_recipe(cfg, run_dir_of(cfg))
    run_dir = Path(run_dir_of(cfg))
    saved = _strict_json(run_dir / "results.json")
    assert saved["nonfinite_steps_skipped"] == results["nonfinite_steps_skipped"] == 2
    assert saved["on_nonfinite"] == "skip_step" and saved["steps"] == 8
    assert math.isfinite(saved["score"])
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    losses = {int(r["step"]): float(r["value"]) for r in rows if r["name"] == "train/loss"}
    assert all(math.isfinite(v) for v in losses.values()), losses  # skipped steps are left out of the mean
    lrs = [float(r["value"]) for r in rows if r["name"] == "train/lr"]
    # the scheduler did not step on the 2 skipped steps: the linear decay is 2 steps short of 0
    assert lrs[-1] == pytest.approx(5e-3 * 2 / 8)


def test_skip_step_gives_up_after_consecutive_skips(sst2_dir, tmp_path, monkeypatch):
    _poison_training_forwards(monkeypatch, set(range(2, 100)))
    cfg = compose(tiny_run_overrides(sst2_dir, tmp_path / "runs", "trainer.on_nonfinite=skip_step",
                                     "trainer.max_steps=20", "trainer.save_every=1"))
    with pytest.raises(DivergenceError, match=f"{MAX_CONSECUTIVE_SKIPS} optimizer steps in a row \\(2-11 of 20\\)"):
        run_recipe(cfg, run_dir_of(cfg))
    assert not (Path(run_dir_of(cfg)) / "results.json").exists()


def test_guard_checks_the_gradient_norm_and_stop_is_the_default(sst2_dir, tmp_path):
    guard = NonfiniteGuard("stop", 8, lambda: None, {"lr": 1e-3, "max_grad_norm": None})
    assert guard.check(1, torch.tensor(0.5), torch.tensor(2.0))
    with pytest.raises(DivergenceError, match="the gradient norm is inf at optimizer step 2 of 8") as caught:
        guard.check(2, torch.tensor(0.5), torch.tensor(float("inf")))
    assert "No checkpoint had been written yet" in str(caught.value)
    assert "trainer.max_grad_norm=1.0" in str(caught.value)
    assert compose([]).trainer.on_nonfinite == "stop"


def test_nan_gradients_are_caught_without_clipping(sst2_dir, tmp_path, monkeypatch):
    # No max_grad_norm: the norm is still computed to find the non-finite gradient.
    original = trainer_module.Trainer.fit

    def fit(self):
        for name, param in self.peft_model.named_parameters():
            if param.requires_grad:
                param.register_hook(lambda grad: grad * float("nan"))
                break
        return original(self)

    monkeypatch.setattr(trainer_module.Trainer, "fit", fit)
    cfg = compose(tiny_run_overrides(sst2_dir, tmp_path / "runs", "trainer.max_grad_norm=null"))
    with pytest.raises(DivergenceError, match="the gradient norm is nan at optimizer step 1 of 8"):
        run_recipe(cfg, run_dir_of(cfg))


def _write_stsb(root: Path, train: int = 16, dev: int = 8) -> Path:
    folder = root / "glue" / "STS-B"
    folder.mkdir(parents=True)
    for split, count in (("train", train), ("dev", dev)):
        lines = ["sentence1\tsentence2\tscore"] + [f"a {'good ' * (i % 3)}cat\ta cat\t{i % 6}" for i in range(count)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_a_nan_score_is_null_with_its_reason_and_never_best(tmp_path, monkeypatch):
    data = _write_stsb(tmp_path / "data")
    # a model that predicts the same score for every pair: Pearson and Spearman are undefined
    monkeypatch.setattr(trainer_module.Trainer, "_predict", lambda self, task, features: [2.5] * len(features))
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs", "task=glue/stsb", "trainer.eval_every=4"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_recipe(cfg, run_dir_of(cfg))
    messages = [str(w.message) for w in caught]
    assert any("pearson" in m and "constant" in m and "null" in m for m in messages), messages
    saved = _strict_json(Path(run_dir_of(cfg)) / "results.json")
    assert saved == results
    assert saved["score"] is None and saved["metrics"]["pearson"] is None and saved["metrics"]["spearmanr"] is None
    assert set(saved["nonfinite_metrics"]) == {"pearson", "spearmanr", "score"}
    assert "constant" in saved["nonfinite_metrics"]["pearson"]
    assert saved["best"] == {}  # NaN never wins


def test_json_safe_replaces_every_nonfinite_float():
    value = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "nan", "e": 2}
    assert json_safe(value) == {"a": None, "b": [1.0, None, {"c": None}], "d": "nan", "e": 2}
    json.dumps(json_safe(value), allow_nan=False)


def test_nonfinite_model_outputs_are_not_scored(sst2_dir, tmp_path):
    # lr=1e30 under skip_step: the first update is finite but ruins the weights, every later step is
    # skipped, and the logits at evaluation are NaN. argmax of NaN would read as class 0.
    cfg = compose(tiny_run_overrides(sst2_dir, tmp_path / "runs", "trainer.lr=1e30", "trainer.on_nonfinite=skip_step",
                                     "trainer.max_steps=5"))
    results = run_recipe(cfg, run_dir_of(cfg))
    saved = _strict_json(Path(run_dir_of(cfg)) / "results.json")
    assert saved == results and saved["nonfinite_steps_skipped"] == 4
    assert saved["score"] is None and saved["metrics"]["accuracy"] is None and saved["best"] == {}
    assert "non-finite logits" in saved["nonfinite_metrics"]["accuracy"]


GUARD_ON_TWO_RANKS = """
import torch, torch.distributed as dist
from lrzoo.train.divergence import NonfiniteGuard, DivergenceError
from lrzoo.train.teardown import exit_rank
dist.init_process_group("gloo")
rank = dist.get_rank()
loss = torch.tensor(float("nan") if rank == 1 else 0.5)  # only rank 1 sees the NaN
skip = NonfiniteGuard("skip_step", 8, lambda: None, {"lr": 1e-3})
assert skip.check(3, loss, torch.tensor(1.0)) is False and skip.skipped == 1
stop = NonfiniteGuard("stop", 8, lambda: None, {"lr": 1e-3})
try:
    stop.check(3, loss, torch.tensor(1.0))
    raise SystemExit(f"rank {rank} did not stop")
except DivergenceError as err:
    assert err.step == 3 and err.quantity == "loss", err
    print(f"rank {rank}: {err}")
exit_rank(0)  # as lrzoo-train ends a rank (lrzoo.train.teardown)
"""


def test_every_rank_takes_the_same_decision(tmp_path):
    script = tmp_path / "guard.py"
    script.write_text(GUARD_ON_TWO_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0: Training diverged: the loss is non-finite on another process" in done.stdout
    assert "rank 1: Training diverged: the loss is nan" in done.stdout


def test_the_skip_count_survives_a_resume(sst2_dir, tmp_path, monkeypatch):
    bad = {2}
    _poison_training_forwards(monkeypatch, bad)
    extra = ["trainer.on_nonfinite=skip_step", "trainer.save_every=4"]
    cfg = compose(tiny_run_overrides(sst2_dir, tmp_path / "runs", *extra, "trainer.stop_after=4"))
    assert run_recipe(cfg, run_dir_of(cfg)) is None
    bad.clear()
    cfg = compose(tiny_run_overrides(sst2_dir, tmp_path / "runs", *extra))
    assert run_recipe(cfg, run_dir_of(cfg))["nonfinite_steps_skipped"] == 1
