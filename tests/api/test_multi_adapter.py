"""Several adapters of one method on one model (issue 11, item 3): ``lrzoo.wrap(peft_model, ...,
adapter_name=...)`` / ``add_adapter`` / ``load_adapter`` of a second adapter work for every method, each
adapter computes what it computes alone, both survive save→load, and each carries its own fingerprint."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

import lrzoo
from adapter_cases import CASES
from conftest import TINY_MODELS, tiny_inputs, tiny_llama

METHODS = ["lora", "dora", "randlora", "lora_xs", "lora_sb", "loldu", "svfit", "salt", "flora", "tera"]
CASE = {case.method: case for case in reversed(CASES)}  # the first (non-conv) row of each method
SEEDS = {"default": 10, "second": 11}


def fresh_base(method: str, seed: int = 0):
    return TINY_MODELS[CASE[method].model](seed)


def add(model, method: str, adapter_name: str):
    """``lrzoo.wrap`` with the method's random non-zero init, seeded per adapter name."""
    case = CASE[method]
    torch.manual_seed(SEEDS[adapter_name])
    return lrzoo.wrap(model, method, adapter_name=adapter_name, **case.kwargs, **case.random_init).eval()


def logits(model, adapter_name: str):
    model.set_adapter(adapter_name)
    with torch.no_grad():
        return model(tiny_inputs()).logits


@pytest.mark.parametrize("method", METHODS)
def test_second_adapter_switches_saves_and_loads(method, tmp_path):
    # The references: a model wrapped with only that adapter, from the same seed.
    case = CASE[method]
    alone = {}
    for name, seed in SEEDS.items():
        base = fresh_base(method)
        torch.manual_seed(seed)
        alone[name] = logits(lrzoo.wrap(base, method, **case.kwargs, **case.random_init).eval(), "default")

    model = add(add(fresh_base(method), method, "default"), method, "second")
    assert set(model.peft_config) == {"default", "second"}
    for name in ("default", "second", "default"):  # switch there and back
        torch.testing.assert_close(logits(model, name), alone[name])
    assert not torch.allclose(alone["default"], alone["second"])

    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()  # non-default adapters in subfolders
    loaded = lrzoo.load(fresh_base(method), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "second"), adapter_name="second")
    loaded.eval()
    for name in ("second", "default"):
        torch.testing.assert_close(logits(loaded, name), alone[name])


def test_tera_second_adapter_through_peft_add_adapter():
    """PEFT's add_adapter skips _pre_injection_hook, where TeRA's shared core used to be built."""
    model = add(fresh_base("tera"), "tera", "default")
    config = type(model.peft_config["default"])(r=2, seed=5, init_weights=False, target_modules=["q_proj"])
    model.add_adapter("second", config)
    tuner = model.base_model
    assert tuner.tera_core["second"].shape == (2,) * 4
    assert not torch.equal(tuner.tera_factors["second"][..., :2], tuner.tera_factors["default"][..., :2])
    assert logits(model, "second").isfinite().all()


@pytest.mark.parametrize("method", ["lora_xs", "lora_sb"])
def test_second_adapter_carries_its_own_fingerprint(method, tmp_path):
    model = add(add(fresh_base(method), method, "default"), method, "second")
    fingerprints = {name: config.base_weights_hash for name, config in model.peft_config.items()}
    assert fingerprints["second"] is not None and fingerprints["second"] == fingerprints["default"]

    model.save_pretrained(tmp_path)
    other = lrzoo.wrap(fresh_base(method, seed=1), method, r=2)  # a different base model
    with pytest.raises(ValueError, match="different base weights"):
        other.load_adapter(str(tmp_path / "second"), adapter_name="second")
    assert set(other.peft_config) == {"default"}


def test_second_adapter_fingerprint_matches_a_first_adapter_on_the_same_base():
    """The second adapter fingerprints the base weights under the adapter layers, by the same names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = lrzoo.wrap(fresh_base("tera"), "tera", r=2)
        first = lrzoo.wrap(first, "tera", r=2, adapter_name="second")
        alone = lrzoo.wrap(fresh_base("tera"), "tera", r=2)
    assert first.peft_config["second"].base_weights_hash == alone.peft_config["default"].base_weights_hash


def _zero_pivot_llama():
    """A tiny Llama whose second layer's q_proj has a zero first column: LoLDU's first LU pivot is 0 there."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[:, 0] = 0.0
    return model


def test_a_refused_adapter_leaves_the_model_as_it_was():
    """LoLDU refuses layer 1 after injecting layer 0: nothing half-built may remain, first or second adapter."""
    x = tiny_inputs()
    model = _zero_pivot_llama()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="zero pivot"):
        lrzoo.wrap(model, "loldu", r=4, target_modules=["q_proj"])
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())  # the user's model is untouched
    assert {n: p for n, p in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(model.state_dict()[n], v) for n, v in before.items())

    peft_model = lrzoo.wrap(_zero_pivot_llama(), "loldu", r=4, target_modules=["v_proj"], init_weights=False)
    peft_model.eval()
    with torch.no_grad():
        expected, state = peft_model(x).logits, {k: v.clone() for k, v in peft_model.state_dict().items()}
        with peft_model.disable_adapter():
            base = peft_model(x).logits
    with pytest.raises(ValueError, match="zero pivot"):
        lrzoo.wrap(peft_model, "loldu", r=4, target_modules=["q_proj"], adapter_name="second")
    assert "second" not in peft_model.peft_config
    assert peft_model.state_dict().keys() == state.keys()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, expected, rtol=0, atol=0)
        with peft_model.disable_adapter():
            torch.testing.assert_close(peft_model(x).logits, base, rtol=0, atol=0)
