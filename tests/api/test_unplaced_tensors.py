"""A load accounts for every tensor in the file (issue 25 item 2): a checkpoint tensor that finds no place
in the model (another depth, an edited target list, DoRA magnitudes under use_dora=false) is an error
naming the file and the tensors, for every adapter and both load paths, never a silently half-loaded adapter."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from peft import PeftModel

import lrzoo
from adapter_cases import CASES
from conftest import TINY_MODELS

#: every adapter that saves an adapter file (ReLoRA saves the whole merged model: transformers loads it).
SAVED = [case for case in CASES if not case.saves_full_model]
LOADERS = {
    "lrzoo.load": lambda model, path: lrzoo.load(model, str(path)),
    "PeftModel.from_pretrained": lambda model, path: PeftModel.from_pretrained(model, str(path)),
}
UNPLACED = r"adapter_model\.safetensors: \d+ tensor\(s\) of adapter '\w+' have no place in this model"


def test_every_adapter_that_saves_a_file_is_covered():
    assert {case.method for case in SAVED} | {"relora"} == set(lrzoo.list_adapters())


def deeper(case, layers: int = 4):
    """The case's tiny model with ``layers`` layers instead of 2, same width."""
    small = TINY_MODELS[case.model](0)
    config = small.config.to_dict()
    config["num_hidden_layers"] = layers
    torch.manual_seed(0)
    return type(small)(type(small.config).from_dict(config)).eval()


def save(model, case, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lrzoo.wrap(model, case.method, **case.kwargs, **case.random_init).save_pretrained(path)
    return path


def refused(loader, base, path):
    """Load ``path`` onto ``base`` with ``loader``; the error it raises (the test fails if none)."""
    with pytest.raises(ValueError, match=UNPLACED) as error:
        LOADERS[loader](base, path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", [c for c in SAVED if c.model != "conv"], ids=lambda c: c.method)
def test_an_adapter_saved_on_a_deeper_base_is_refused(case, loader, tmp_path):
    path = save(deeper(case), case, tmp_path / "adapter")
    message = refused(loader, TINY_MODELS[case.model](0), path)
    assert re.search(r"\.layers?\.[23]\.", message), message  # names tensors of the layers the base lacks
    assert "another depth" in message


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", SAVED, ids=lambda c: f"{c.method}-{c.model}")
def test_a_config_edited_to_fewer_targets_is_refused(case, loader, tmp_path):
    path = save(TINY_MODELS[case.model](0), case, tmp_path / "adapter")
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if case.model == "conv":  # no layers to pick from: drop a target instead
        config["target_modules"] = sorted(config["target_modules"])[:-1]
    else:
        config["layers_to_transform"] = [0]
    config_file.write_text(json.dumps(config))
    message = refused(loader, TINY_MODELS[case.model](0), path)
    assert "layers_to_transform" in message


@pytest.mark.parametrize("loader", LOADERS)
def test_dora_magnitudes_under_use_dora_false_are_refused(loader, tmp_path):
    case = next(c for c in CASES if c.method == "dora")
    path = save(TINY_MODELS[case.model](0), case, tmp_path / "adapter")
    config_file = path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_dora": False}))
    message = refused(loader, TINY_MODELS[case.model](0), path)
    assert "lora_magnitude_vector" in message and "use_dora: true" in message


def test_a_second_adapter_with_unplaced_tensors_is_refused_and_removed(tmp_path):
    case = next(c for c in CASES if c.method == "lora")
    path = save(deeper(case), case, tmp_path / "adapter")
    model = lrzoo.wrap(TINY_MODELS[case.model](0), "lora", r=4)
    with pytest.raises(ValueError, match=UNPLACED):
        model.load_adapter(str(path), adapter_name="second")
    assert list(model.peft_config) == ["default"]


def test_a_matching_checkpoint_still_loads_exactly(tmp_path):
    case = next(c for c in CASES if c.method == "dora")
    model = lrzoo.wrap(TINY_MODELS[case.model](0), case.method, **case.kwargs, **case.random_init).eval()
    model.save_pretrained(tmp_path / "adapter")
    x = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    loaded = lrzoo.load(TINY_MODELS[case.model](0), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
