"""The full fine-tuning and head-only baselines of the results tables: what they train, that the
head gets ``head_lr``, that they save and resume like adapter runs, and that wrap() does not know them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lrzoo
from lrzoo.cli.train import run_recipe
from lrzoo.train.baselines import prepare_baseline
from lrzoo.train.optim import make_optimizer
from conftest import tiny_bert, tiny_llama
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_sst2


def _initial_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights the recipe starts from (run_recipe seeds, then builds the random tiny model)."""
    from lrzoo.models import load_model
    from lrzoo.train.trainer import seed_everything

    seed_everything(seed)
    model, _ = load_model("tiny_bert", "classification", 2)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["head_only", "full_finetune"])
def test_baseline_trains_what_it_says_and_resumes(name, tmp_path):
    data = write_sst2(tmp_path / "data")
    overrides = tiny_run_overrides(data, tmp_path / "runs", f"adapter={name}", "trainer.save_every=4")
    stopped = run_recipe(compose([*overrides, "trainer.stop_after=4"]), run_dir_of(compose(overrides)))
    assert stopped is None  # stopped early, resumable
    cfg = compose(overrides)
    results = run_recipe(cfg, run_dir_of(cfg))
    assert results["steps"] == 8

    saved = Path(run_dir_of(cfg)) / "adapter"
    from transformers import AutoModelForSequenceClassification

    trained = AutoModelForSequenceClassification.from_pretrained(saved).state_dict()
    start = _initial_state()
    changed = {k for k in trained if k in start and not torch.equal(trained[k], start[k])}
    head = {k for k in changed if k.startswith("classifier.")}
    assert head, "the head must be trained"
    backbone = changed - head
    if name == "head_only":
        assert not backbone
        assert results["trainable_params"] == sum(v.numel() for k, v in start.items() if k.startswith("classifier."))
    else:
        assert any(".attention." in k for k in backbone)
        assert results["trainable_params"] == results["total_params"]


def test_head_gets_head_lr_in_full_finetuning():
    model = prepare_baseline(tiny_bert(0, num_labels=2), "full_finetune")
    optimizer = make_optimizer(model, lr=1e-4, head_lr=3e-3)
    head_ids = {id(p) for p in model.classifier.parameters()}
    for group in optimizer.param_groups:
        in_head = {id(p) in head_ids for p in group["params"]}
        assert len(in_head) == 1
        assert group["lr"] == (3e-3 if in_head.pop() else 1e-4)


def test_head_only_refuses_an_lr_that_trains_nothing():
    # only the head trains: with a head_lr of its own, lr would be unused and an lr sweep a row of identical runs
    model = prepare_baseline(tiny_bert(0, num_labels=2), "head_only")
    with pytest.raises(ValueError, match=r"lr=0.0001 trains nothing.*head_lr=None"):
        make_optimizer(model, lr=1e-4, head_lr=3e-3)
    for head_lr in (None, 3e-3):
        optimizer = make_optimizer(model, lr=3e-3, head_lr=head_lr)
        assert [group["lr"] for group in optimizer.param_groups] == [3e-3] * len(optimizer.param_groups)


def test_baselines_are_recipe_options_not_adapters():
    with pytest.raises(ValueError, match="Unknown adapter"):
        lrzoo.wrap(tiny_bert(0, num_labels=2), "head_only")
    with pytest.raises(ValueError, match="choose one of"):
        prepare_baseline(tiny_bert(0, num_labels=2), "linear_probe")
    assert compose(["adapter=full_finetune"]).adapter.name == "full_finetune"
    with pytest.raises(ValueError, match="needs a task head"):
        prepare_baseline(tiny_llama(0), "head_only")  # lm_head is the output embedding, not a task head


def test_zero_shot_trains_nothing_and_evaluates_the_base_once(tmp_path):
    from lrzoo.tasks import get_task
    from lrzoo.train.trainer import collate, encode_rows

    data = write_sst2(tmp_path / "data")
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs", "adapter=zero_shot"))
    results = run_recipe(cfg, run_dir_of(cfg))
    run_dir = Path(run_dir_of(cfg))
    assert results["steps"] == 0 and results["trainable_params"] == 0 and results["optimizer_state_mb"] == 0
    assert json.loads((run_dir / "results.json").read_text()) == json.loads(json.dumps(results))
    assert not (run_dir / "adapter").exists() and not (run_dir / "checkpoints").exists()

    # predictions.json holds the untrained model's classes (its random head's argmax) and the gold labels
    record = json.loads((run_dir / "predictions.json").read_text())["sets"]["glue/sst2"]
    rows = list(get_task("glue/sst2").load_split("validation", data))
    from lrzoo.models import load_model
    from lrzoo.train.trainer import seed_everything

    seed_everything(cfg.seed)
    model, tokenizer = load_model("tiny_bert", "classification", 2)
    batch = collate(encode_rows(rows, "classification", tokenizer, 128), tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        expected = model.eval()(**batch).logits.argmax(-1).tolist()
    assert record == {"task": "glue/sst2", "kind": "classification", "primary_metric": "accuracy",
                      "references": [row["label"] for row in rows], "predictions": expected}
    assert results["score"] == sum(p == r for p, r in zip(expected, record["references"])) / len(rows)
    # finished: the same command does not run it again
    assert run_recipe(cfg, run_dir_of(cfg)) == json.loads(json.dumps(results))
