"""No silently ignored config key: every node a recipe reads refuses keys it does not declare (lrzoo/train/schema.py),
with the closest known key, before anything loads."""

from __future__ import annotations

import pytest

import lrzoo
from lrzoo.compose import check_overrides, config_groups
from lrzoo.cli.train import run_recipe
from lrzoo.runs.identity import plain_config
from lrzoo.errors import UserError
from lrzoo.train.schema import FIXED_NODES, adapter_keys, check_keys
from recipe_helpers import ADAPTER_FILES, EXPERIMENTS
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_sst2



@pytest.mark.parametrize("override, where, guess", [
    ("+model.quantisation=nf4", "model.quantisation", "model.quantization"),
    ("+train_limt=16", "train_limt", "train_limit"),
    ("+task.heldout_sise=32", "task.heldout_sise", "task.heldout_size"),
    ("+trainer.learning_rate=1e-3", "trainer.learning_rate", None),
    ("+eval.mod=loglik", "eval.mod", "eval.mode"),
    ("+adapter.alhpa=4", "adapter.alhpa", "adapter.alpha"),
    ("+logger.projct=x", "logger.projct", None),   # the csv logger takes no options at all
])
def test_a_mistyped_key_is_refused_with_its_closest_known_key(override, where, guess, tmp_path):
    data = write_sst2(tmp_path / "data")
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs", override))
    with pytest.raises(UserError) as refused:
        run_recipe(cfg, run_dir_of(cfg))
    text = str(refused.value)
    assert f"unknown config key {where}" in text and "\n" not in text
    assert (f"did you mean {guess}?" in text) if guess else "did you mean" not in text
    assert list((tmp_path / "runs").rglob("*")) == []  # no stub run folder left behind


def test_every_node_the_recipes_read_is_checked():
    plain = plain_config(compose(["logger=wandb", "adapter=galore"]))
    for node in ("model", "task", "trainer", "eval", "adapter", "logger"):
        bad = {**plain, node: {**plain[node], "zzz_nothing": 1}}
        with pytest.raises(UserError, match=rf"unknown config key {node}\.zzz_nothing"):
            check_keys(bad)
    with pytest.raises(UserError, match="unknown config key zzz_nothing"):
        check_keys({**plain, "zzz_nothing": 1})
    # the optimizer's own options are adapter keys of adapter=galore; a typo of one is caught with its fix
    with pytest.raises(UserError, match=r"adapter\.rnk \(did you mean adapter\.rank\?\)"):
        check_keys({**plain, "adapter": {**plain["adapter"], "rnk": 4}})


def test_documented_optional_keys_stay_accepted():
    # +task.heldout_size=N (docs/recipes.md), model.pooling (encoder heads), a logger's own options
    check_keys(plain_config(compose(["+task.heldout_size=32", "model.pooling=mean", "model.similarity_head=cross_encoder", "logger=wandb",
                                     "logger.project=p", "+adapter.target_modules=[query]", "+adapter.use_rslora=true"])))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_uses_only_declared_keys(experiment):
    check_keys(plain_config(compose([f"experiment={experiment}"])))


@pytest.mark.parametrize("adapter", ADAPTER_FILES + ["galore", "fira", "apollo", "apollo_mini", "q_galore",
                                     "full_finetune", "head_only", "zero_shot"])
def test_every_adapter_option_uses_only_declared_keys(adapter):
    # with a preset that sets r/alpha for every adapter, as results.md's runs do
    check_keys(plain_config(compose([f"adapter={adapter}", "experiment=glue_cpu"])))
    assert adapter_keys(adapter) is not None


def test_every_group_file_is_covered_by_the_schema():
    # the declared keys are a superset of what any group YAML defines (the other direction is the test above)
    for group, node in (("model", "model"), ("trainer", "trainer")):
        for option in config_groups()[group]:
            keys = set(plain_config(compose([f"{group}={option}"]))[node])
            assert keys <= FIXED_NODES[node], (group, option, keys - FIXED_NODES[node])
    for name in lrzoo.list_adapters():
        assert {"r", "alpha", "target_modules"} <= adapter_keys(name)


@pytest.mark.parametrize("override, message", [
    ("trainer.lrr=1", r"trainer\.lrr \(did you mean trainer\.lr\?\)"),
    ("adapter=lorra", r"adapter=lorra: no such adapter \(did you mean adapter=lora\?\)"),
    ("task=glue/sst3", r"did you mean task=glue/sst2\?"),
    ("-m adapter=lora,dorra", None),
])
def test_command_line_overrides_are_checked_before_hydra(override, message):
    if message is None:
        with pytest.raises(UserError, match=r"adapter=dorra"):
            check_overrides(override.split()[1:])
        return
    with pytest.raises(UserError, match=message):
        check_overrides([override])
    check_overrides(["trainer.lr=1e-3", "experiment=paper/lora/roberta_base_rte", "task=commonsense/all",
                     "+task.heldout_size=4", "adapter=lora,dora", "hydra.verbose=true", "seed=1"])
