"""Budgets are validated (issue 12 item 6): a bad step/epoch/batch/lr/interval or an empty split is a
clear error naming the key, raised before any model is loaded."""

from __future__ import annotations

import pytest

from lrzoo.cli.train import run_recipe
from lrzoo.train.trainer import TrainerConfig, planned_steps
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_sst2


@pytest.fixture
def no_model(monkeypatch):
    import lrzoo.models

    monkeypatch.setattr(lrzoo.models, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))


BAD_BUDGETS = [
    (["trainer.max_steps=0"], "trainer.max_steps=0"),
    (["trainer.max_steps=-3"], "trainer.max_steps=-3"),
    (["trainer.max_steps=null", "trainer.epochs=-1"], "trainer.epochs=-1"),
    (["trainer.max_steps=null", "trainer.epochs=0"], "trainer.epochs=0"),
    (["trainer.batch_size=0"], "trainer.batch_size=0"),
    (["trainer.batch_size=-8"], "trainer.batch_size=-8"),
    (["trainer.micro_batch_size=0"], "trainer.micro_batch_size=0"),
    (["trainer.warmup_ratio=1.5"], "trainer.warmup_ratio=1.5"),
    (["trainer.warmup_ratio=-0.1"], "trainer.warmup_ratio=-0.1"),
    (["trainer.lr=fast"], "trainer.lr='fast'"),
    (["trainer.lr=0"], "trainer.lr=0"),
    (["trainer.lr=-1e-3"], "trainer.lr=-0.001"),
    (["trainer.lr=inf"], "trainer.lr=inf"),
    (["trainer.head_lr=0"], "trainer.head_lr=0"),
    (["trainer.head_lr=high"], "trainer.head_lr='high'"),
    (["trainer.embedding_lr=0"], "trainer.embedding_lr=0"),
    (["trainer.embedding_lr=inf"], "trainer.embedding_lr=inf"),
    (["trainer.eval_every=-1"], "trainer.eval_every=-1"),
    (["trainer.save_every=-1"], "trainer.save_every=-1"),
    (["trainer.log_every=-1"], "trainer.log_every=-1"),
    (["trainer.log_every=0"], "trainer.log_every=0"),
    (["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints=0"),
    (["trainer.on_nonfinite=ignore"], "trainer.on_nonfinite='ignore'"),
    (["trainer.scheduler=zigzag"], "trainer.scheduler='zigzag'"),
    (["train_limit=0"], "train_limit=0 keeps no row"),
    (["train_limit=-2"], "train_limit=-2"),
    (["train_limit=4"], "trainer.batch_size=8"),  # fewer rows than one batch
    (["eval_limit=0"], "eval_limit=0 keeps no row"),
]


@pytest.mark.parametrize("overrides, key", BAD_BUDGETS, ids=[" ".join(o) for o, _ in BAD_BUDGETS])
def test_bad_budget_is_refused_naming_the_key_before_the_model_is_loaded(overrides, key, no_model, tmp_path):
    data = write_sst2(tmp_path / "data")
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs", *overrides))
    with pytest.raises(ValueError) as caught:
        run_recipe(cfg, run_dir_of(cfg))
    assert key in str(caught.value)


def test_a_task_with_no_training_rows_is_refused_before_the_model_is_loaded(no_model, tmp_path):
    data = write_sst2(tmp_path / "data", train=0)
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs"))
    with pytest.raises(ValueError, match="training split of glue/sst2 is empty: the task's training split has no rows"):
        run_recipe(cfg, run_dir_of(cfg))


def test_every_bad_key_is_named_at_once():
    with pytest.raises(ValueError) as caught:
        TrainerConfig(lr=-1.0, batch_size=0, keep_checkpoints=0)
    message = str(caught.value)
    assert all(key in message for key in ("trainer.lr=-1.0", "trainer.batch_size=0", "trainer.keep_checkpoints=0"))


def test_max_steps_counts_and_null_means_epochs():
    assert planned_steps(64, TrainerConfig(batch_size=8, max_steps=3)) == 3
    assert planned_steps(64, TrainerConfig(batch_size=8, epochs=2)) == 16
    assert planned_steps(64, TrainerConfig(batch_size=8, max_steps=3, epochs=0)) == 3  # epochs unused
    assert TrainerConfig(max_grad_norm=0).max_grad_norm == 0  # 0: no clipping, as null
