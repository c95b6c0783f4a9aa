"""A local ``model.source`` directory is hashed as the directory it names and its bytes (lrzoo.runs.model_source):
its spellings are one run, weights re-saved in place are another (resuming the old run on them is refused), and
the built-ins and hub ids of the presets hash as they always did."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lrzoo.cli.train import run_recipe
from lrzoo.errors import UserError
from lrzoo.models import BUILTIN_MODELS, load_model
from lrzoo.runs import identity
from lrzoo.runs.identity import config_hash, hashed_config, run_hash
from lrzoo.tasks import data_identity
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_sst2


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LRZOO_CACHE_DIR", str(tmp_path / "cache"))
    data_identity._memo.clear()


def save_tiny_bert(directory: Path, seed: int) -> Path:
    """A tiny random BERT and its tokenizer, saved as a user's fine-tuned model would be."""
    torch.manual_seed(seed)
    model, tokenizer = load_model("tiny_bert", "classification", num_labels=2)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_one_local_model_spelled_several_ways_is_one_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_sst2(tmp_path / "data")
    model = save_tiny_bert(tmp_path / "my_model", seed=0)
    (tmp_path / "link").symlink_to(model, target_is_directory=True)
    spellings = ["my_model", "./my_model", "my_model/", str(model), "link", "./data/../my_model"]
    configs = [compose(tiny_run_overrides(data, tmp_path / "runs", f"model.source={spelt}")) for spelt in spellings]
    assert len({run_hash(c) for c in configs}) == 1 and len({config_hash(c) for c in configs}) == 1
    assert len({run_dir_of(c) for c in configs}) == 1  # a resume under another spelling finds its checkpoint
    hashed = hashed_config(configs[0])
    assert hashed["model"]["source"] == os.path.realpath(model)
    weights = f"{os.path.realpath(model)}/model.safetensors"
    assert hashed["data"][weights] == {"bytes": (model / "model.safetensors").stat().st_size,
                                       "sha256": data_identity._sha256(str(model / "model.safetensors"))}
    assert f"{os.path.realpath(model)}/config.json" in hashed["data"]
    assert "glue/SST-2/train.tsv" in hashed["data"]  # beside the task's files


def test_a_re_saved_local_model_is_another_run_and_resuming_the_old_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_sst2(tmp_path / "data")
    model = save_tiny_bert(tmp_path / "my_model", seed=0)
    overrides = tiny_run_overrides(data, tmp_path / "runs", f"model.source={model}")
    before = run_hash(compose(overrides))
    # a fixed run_name: the same directory whatever the weights (the hashed name gives a new run, as checked below)
    fixed = [*overrides, "run_name=fixed", "trainer.save_every=2"]
    assert run_recipe(compose([*fixed, "trainer.stop_after=4"]), str(tmp_path / "runs" / "fixed")) is None
    size = (model / "model.safetensors").stat().st_size
    save_tiny_bert(model, seed=1)  # same path, same shapes and size, other weights
    assert (model / "model.safetensors").stat().st_size == size
    assert run_hash(compose(overrides)) != before  # a new run directory, not a resume on another base model
    weights = rf"{os.path.realpath(model)}/model\.safetensors changed \([\d,]+ -> [\d,]+ bytes, sha256"
    with pytest.raises(UserError, match=r"started on other data: .*" + weights):
        run_recipe(compose(fixed), str(tmp_path / "runs" / "fixed"))
    checkpoint = next((tmp_path / "runs" / "fixed" / "checkpoints").iterdir())
    elsewhere = [*overrides, "run_name=other", f"resume={checkpoint}"]
    with pytest.raises(UserError, match=r"that run was trained on other data: .*" + weights):
        run_recipe(compose(elsewhere), str(tmp_path / "runs" / "other"))


@pytest.mark.parametrize("preset", ["minilm", "tiny_bert", "roberta_base"])
def test_a_presets_source_hashes_as_before_even_beside_a_directory_of_that_name(tmp_path, monkeypatch, preset):
    monkeypatch.chdir(tmp_path)
    data = write_sst2(tmp_path / "data")
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs", f"model={preset}"))
    # a folder spelled like the source: the loader still takes the built-in (or the hub id, which no run here has)
    save_tiny_bert(tmp_path / cfg.model.source, seed=0)
    if preset != "roberta_base":
        assert cfg.model.source in BUILTIN_MODELS
    # what the run hashed without the feature: the source as spelled, no model file among the data
    with monkeypatch.context() as without:
        without.setattr(identity, "local_model_dir", lambda source: None, raising=False)  # (absent before it)
        expected, expected_hash = hashed_config(cfg), run_hash(cfg)
    if preset == "roberta_base":  # a hub id that is a directory here is loaded from it: the directory's bytes
        assert run_hash(cfg) != expected_hash
        return
    assert hashed_config(cfg) == expected and run_hash(cfg) == expected_hash
    assert hashed_config(cfg)["model"]["source"] == preset and not any(key.startswith("/") for key in expected["data"])
    # the same folder spelled as a path is a local model: one run, not the built-in's
    as_path = [compose(tiny_run_overrides(data, tmp_path / "runs", f"model={preset}", f"model.source={spelt}"))
               for spelt in (f"./{preset}", f"{preset}/")]
    assert run_hash(as_path[0]) == run_hash(as_path[1]) != expected_hash


def test_the_torch_free_list_of_built_ins_is_the_loaders():
    from lrzoo import builtin_models

    assert builtin_models.NAMES == set(BUILTIN_MODELS)
