"""Options a method takes no value from (issue 27 item 9): SALT and SVFit have no scale, so ``wrap`` refuses an
``alpha``; ``lrzoo-train``, whose experiment presets set ``alpha`` for every adapter, drops it with a notice and
keeps it out of the run's identity (hash, run directory, plan key)."""

from __future__ import annotations

import pytest

import lrzoo
from conftest import tiny_llama
from lrzoo.runs.identity import plan_key
from lrzoo.cli.train import run_recipe
from lrzoo.runs.identity import config_hash, hashed_config, run_hash
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_sst2

NO_SCALE = ["salt", "svfit"]


@pytest.mark.parametrize("method", NO_SCALE)
def test_wrap_refuses_an_alpha_the_method_would_ignore_in_one_line_naming_the_fix(method):
    with pytest.raises(ValueError, match=rf"{method} has no scale.*leave alpha out") as caught:
        lrzoo.wrap(tiny_llama(), method, r=2, alpha=16, target_modules=["q_proj"])
    assert "\n" not in str(caught.value)
    lrzoo.wrap(tiny_llama(), method, r=2, target_modules=["q_proj"])  # without it: fine


def test_methods_with_a_scale_still_take_alpha():
    assert lrzoo.registry.ignored_options("lora") == ()
    assert {m for m in lrzoo.list_adapters() if lrzoo.registry.ignored_options(m)} == set(NO_SCALE)
    model = lrzoo.wrap(tiny_llama(), "lora_xs", r=2, alpha=16, target_modules=["q_proj"])
    assert next(iter(model.peft_config.values())).alpha == 16


@pytest.mark.parametrize("method", NO_SCALE)
def test_the_run_hash_does_not_depend_on_an_ignored_alpha(method):
    preset = ["experiment=glue_cpu", f"adapter={method}"]  # glue_cpu sets adapter.alpha=16 for every adapter
    configs = [compose(preset), compose([*preset, "adapter.alpha=32"]), compose([*preset, "~adapter.alpha"]),
               compose([f"adapter={method}"] + ["experiment=glue_cpu", "adapter.alpha=null"])]
    assert len({run_hash(c) for c in configs}) == 1 and len({config_hash(c) for c in configs}) == 1
    assert "alpha" not in hashed_config(configs[0])["adapter"]
    # where alpha is used it stays in the identity
    assert run_hash(compose(["experiment=glue_cpu", "adapter=lora"])) != run_hash(
        compose(["experiment=glue_cpu", "adapter=lora", "adapter.alpha=32"]))


def test_a_report_still_finds_runs_recorded_with_the_ignored_alpha():
    new = hashed_config(compose(["experiment=glue_cpu", "adapter=salt", "~adapter.alpha"]))
    recorded = {**new, "adapter": {**new["adapter"], "alpha": 16}}  # results.json of a run made before
    assert plan_key(recorded) == plan_key(new)
    lora = hashed_config(compose(["experiment=glue_cpu", "adapter=lora"]))
    assert plan_key({**lora, "adapter": {**lora["adapter"], "alpha": 32}}) != plan_key(lora)


def test_a_preset_run_of_svfit_drops_the_alpha_with_a_notice(tmp_path, capsys):
    data = write_sst2(tmp_path / "data")
    overrides = tiny_run_overrides(data, tmp_path / "runs", "adapter=svfit", "adapter.r=2", "+adapter.alpha=16",
                                   "trainer.max_steps=2")
    cfg = compose(overrides)
    results = run_recipe(cfg, run_dir_of(cfg))
    assert results["steps"] == 2 and "alpha" not in results["adapter_config"]
    assert "svfit has no scale: ignoring {'alpha': 16}" in capsys.readouterr().out

