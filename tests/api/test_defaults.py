"""One source of truth for defaults: ``lrzoo.wrap(model, name)`` and ``adapter=<name>`` in the Hydra
recipes build the same adapter, and every key of ``adapters/<name>.yaml`` is what wrap uses."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig

import lrzoo
from lrzoo.registry import training_options
from conftest import tiny_llama
from recipe_helpers import compose


def wide_llama():
    """Wide enough for every method's default rank (ReLoRA r=128) on q/v; one layer keeps it cheap."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=160, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).eval()


def recipe_adapter(name: str) -> dict:
    """What ``lrzoo-train adapter=<name>`` hands to ``lrzoo.wrap`` (cli/train.py: the group minus ``name``)."""
    adapter = OmegaConf.to_container(compose([f"adapter={name}"]).adapter, resolve=True)
    assert adapter.pop("name") == name
    return adapter


def used(peft_model, name: str, key: str):
    """The value ``wrap`` used for option ``key``: a training option or a (possibly renamed) config field."""
    spec = lrzoo.get_adapter(name)
    if key in spec.training_defaults:
        return training_options(peft_model)[key]
    return getattr(peft_model.peft_config["default"], spec.aliases.get(key, key))


@pytest.mark.parametrize("name", lrzoo.list_adapters())
def test_wrap_without_options_uses_every_key_of_the_adapter_yaml(name):
    recipe = recipe_adapter(name)
    assert recipe == lrzoo.adapter_defaults(name)
    by_default = lrzoo.wrap(wide_llama(), name)
    for key, value in recipe.items():
        assert used(by_default, name, key) == value, f"{name}: wrap's default {key} differs from adapters/{name}.yaml"

    as_recipe = lrzoo.wrap(wide_llama(), name, **recipe)  # the Hydra path: every key given
    assert by_default.peft_config["default"].to_dict() == as_recipe.peft_config["default"].to_dict()
    assert training_options(by_default) == training_options(as_recipe)


def test_explicit_values_win_over_the_defaults():
    model = lrzoo.wrap(tiny_llama(), "relora", r=4, alpha=2, relora_steps=7)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 2, 0.1)  # dropout: relora.yaml's
    assert training_options(model)["relora_steps"] == 7
    flora = lrzoo.wrap(tiny_llama(), "flora", r=4)
    assert flora.peft_config["default"].alpha == 64.0  # each key is a default on its own, as adapter.r=4 in Hydra


def test_a_default_rank_too_large_for_the_model_says_it_is_the_default():
    with pytest.raises(ValueError, match=r"r=128 \(the 'relora' default, from adapters/relora.yaml\) is larger"):
        lrzoo.wrap(tiny_llama(), "relora")


@pytest.mark.parametrize("name", [n for n in lrzoo.list_adapters() if lrzoo.get_adapter(n).layer_cls is not None])
def test_native_config_classes_default_to_the_adapter_yaml(name):
    """A config built by hand (``get_peft_model(model, FLoRAConfig())``) gets the same defaults as wrap."""
    import dataclasses

    config_cls = lrzoo.get_adapter(name).build_config
    fields = {f.name: f.default for f in dataclasses.fields(config_cls)}
    for key, value in lrzoo.adapter_defaults(name).items():
        if key in fields:
            assert fields[key] == value, f"{config_cls.__name__}.{key} = {fields[key]!r}, adapters/{name}.yaml: {value!r}"
