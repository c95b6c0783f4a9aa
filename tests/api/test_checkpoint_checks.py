"""Loaded checkpoints are checked (issue 11, item 10): a damaged lrzoo checkpoint fails at load with
an error naming the file and the fix, and the base-weight fingerprint is never skipped silently."""

from __future__ import annotations

import json
import re
import shutil
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import lrzoo
from lrzoo.methods.lora_xs import LoraXSConfig
from lrzoo.peft_bridge import UnverifiedBaseWeightsWarning
from adapter_cases import CASES
from conftest import TINY_MODELS

#: lrzoo-native methods and the PEFT-native ones lrzoo saves (LORA, LORA+DoRA, RANDLORA).
METHODS = ["lora_xs", "loldu", "tera", "flora", "lora", "dora", "randlora"]
CASE = {case.method: case for case in reversed(CASES)}  # the first (non-conv) row of each method
LOADERS = {
    "lrzoo.load": lambda model, path: lrzoo.load(model, str(path)),
    "PeftModel.from_pretrained": lambda model, path: PeftModel.from_pretrained(model, path),
}


def fresh_base(method: str):
    return TINY_MODELS[CASE[method].model]()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved checkpoint per method (random non-zero tensors), copied by each test that damages it."""
    dirs = {}
    for method in METHODS:
        case = CASE[method]
        path = tmp_path_factory.mktemp(method)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lrzoo.wrap(fresh_base(method), method, **case.kwargs, **case.random_init).save_pretrained(path)
        dirs[method] = path
    return dirs


def damaged_copy(saved, method, tmp_path):
    path = tmp_path / "adapter"
    shutil.copytree(saved[method], path)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    # A tensor of the first adapted layer that is its own (RandLoRA also saves each layer's view of the
    # shared projections, which loading overwrites from the shared copy).
    key = [k for k in sorted(tensors) if ".0." in k][-1]
    return path, weights, tensors, key


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("method", METHODS)
def test_missing_tensor_names_file_and_key(saved, method, loader, tmp_path):
    path, weights, tensors, key = damaged_copy(saved, method, tmp_path)
    del tensors[key]
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=re.escape(str(weights))) as error:
        LOADERS[loader](fresh_base(method), path)
    assert key in str(error.value) and "Re-save" in str(error.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_tensor_names_file_and_key(saved, method, value, tmp_path):
    path, weights, tensors, key = damaged_copy(saved, method, tmp_path)
    tensors[key].view(-1)[0] = value
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=re.escape(str(weights)) + ".*NaN/Inf") as error:
        LOADERS["PeftModel.from_pretrained"](fresh_base(method), path)
    assert key in str(error.value)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("method", METHODS)
def test_deleted_weights_file_names_the_path(saved, method, loader, tmp_path):
    path, weights, _, _ = damaged_copy(saved, method, tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(weights)) + ".*directory save_pretrained wrote"):
        LOADERS[loader](fresh_base(method), path)


@pytest.mark.parametrize("loader", LOADERS)
def test_unknown_lrzoo_type_names_config_types_and_fix(saved, loader, tmp_path):
    path, _, _, _ = damaged_copy(saved, "lora_xs", tmp_path)
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["peft_type"] = "LRZOO_NOPE"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(str(config_file)) + ".*LRZOO_NOPE") as error:
        LOADERS[loader](fresh_base("lora_xs"), path)
    message = str(error.value)
    assert "LRZOO_LORA_XS" in message and "LRZOO_TERA" in message  # the known types
    assert "Upgrade lrzoo" in message and "register" in message


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rank", ["4", 4.0, 0, True])
def test_a_rank_that_is_not_a_positive_integer_names_the_config(saved, method, loader, rank, tmp_path):
    """"r": "4" in adapter_config.json was PEFT's TypeError ('<=' not supported between str and int) or a
    torch one deep inside layer construction (issue 25 item 13)."""
    path, _, _, _ = damaged_copy(saved, method, tmp_path)
    config_file = path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "r": rank}))
    with pytest.raises(ValueError, match=re.escape(str(config_file)) + ": r must be a positive integer") as error:
        LOADERS[loader](fresh_base(method), path)
    assert "\n" not in str(error.value) and '"r": 8' in str(error.value)


@pytest.mark.parametrize("method", METHODS)
def test_wrap_says_r_must_be_a_positive_integer(method):
    with pytest.raises(ValueError, match="r must be a positive integer"):
        lrzoo.wrap(fresh_base(method), method, r="4")


def test_a_damaged_second_adapter_is_not_left_on_the_model(saved, tmp_path):
    path, weights, tensors, key = damaged_copy(saved, "lora_xs", tmp_path)
    del tensors[key]
    save_file(tensors, weights)
    model = lrzoo.load(fresh_base("lora_xs"), str(saved["lora_xs"]))
    with pytest.raises(ValueError, match=re.escape(key)):
        model.load_adapter(str(path), adapter_name="second")
    assert set(model.peft_config) == {"default"}


def test_wrap_with_default_targets_records_the_fingerprint():
    """target_modules=None (the architecture default) used to skip the fingerprint and save none."""
    model = get_peft_model(fresh_base("lora_xs"), LoraXSConfig(r=2))
    fingerprint = model.peft_config["default"].base_weights_hash
    assert fingerprint is not None
    assert fingerprint == lrzoo.wrap(fresh_base("lora_xs"), "lora_xs", r=2).peft_config["default"].base_weights_hash


@pytest.mark.parametrize("is_trainable", [False, True])
def test_checkpoint_without_fingerprint_warns_at_load(saved, is_trainable, tmp_path):
    path, _, _, _ = damaged_copy(saved, "lora_xs", tmp_path)
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    del config["base_weights_hash"]
    config_file.write_text(json.dumps(config))
    with pytest.warns(UnverifiedBaseWeightsWarning, match=re.escape(str(config_file)) + ".*no base_weights_hash"):
        model = PeftModel.from_pretrained(fresh_base("lora_xs"), path, is_trainable=is_trainable)
    # Not filled in from whatever base it was loaded on: a re-save must not vouch for this base.
    assert model.peft_config["default"].base_weights_hash is None


def test_checkpoint_without_fingerprint_can_be_made_an_error(saved, tmp_path):
    path, _, _, _ = damaged_copy(saved, "lora_xs", tmp_path)
    config_file = path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_weights_hash": None}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedBaseWeightsWarning)
        with pytest.raises(UnverifiedBaseWeightsWarning):
            lrzoo.load(fresh_base("lora_xs"), str(path))


@pytest.mark.parametrize("method", METHODS)
def test_intact_checkpoint_still_loads_exactly(saved, method):
    """The checks add no false alarms: an undamaged checkpoint loads and reproduces the saved outputs."""
    from conftest import tiny_inputs

    case = CASE[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = lrzoo.wrap(fresh_base(method), method, **case.kwargs, **case.random_init).eval()(tiny_inputs())
        loaded = lrzoo.load(fresh_base(method), str(saved[method])).eval()
    torch.testing.assert_close(loaded(tiny_inputs()).logits, expected.logits)
