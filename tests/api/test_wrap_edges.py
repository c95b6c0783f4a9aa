"""Options mean what they say: alpha <= 0, non-integer ranks, meta and integer base weights are
refused by lrzoo.wrap with lrzoo's reason; LoRA+ keeps its groups and gives the head ``head_lr``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import lrzoo
from conftest import tiny_bert, tiny_inputs, tiny_llama


#: every method adapts q/v at r=2 (LoRA-SB needs no data to be wrapped: its init is a separate step).
SMALL = {"r": 2, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("alpha", [0, 0.0, -1.0])
# SALT and SVFit have no scale and refuse any alpha (tests/api/test_ignored_options.py)
@pytest.mark.parametrize("method", [m for m in lrzoo.list_adapters() if "alpha" not in lrzoo.registry.ignored_options(m)])
def test_alpha_that_is_not_positive_is_refused_with_the_reason(method, alpha):
    with pytest.raises(ValueError, match=r"alpha must be > 0, got .*nothing would train"):
        lrzoo.wrap(tiny_llama(), method, alpha=alpha, **SMALL)


@pytest.mark.parametrize("method, key", [("lora", "lora_alpha"), ("dora", "lora_alpha"), ("randlora", "randlora_alpha")])
def test_alpha_under_the_peft_name_is_checked_too(method, key):
    with pytest.raises(ValueError, match="alpha must be > 0"):
        lrzoo.wrap(tiny_llama(), method, **{key: 0}, **SMALL)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "16", True])
def test_alpha_that_is_not_a_finite_number_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        lrzoo.wrap(tiny_llama(), "lora_xs", alpha=alpha, r=2)


@pytest.mark.parametrize("r", [True, False, 1.5, "8", float("nan"), 0, -2, np.int64(0)])
@pytest.mark.parametrize("method", ["lora", "lora_xs", "randlora"])
def test_rank_that_is_not_a_positive_integer_gets_lrzoos_message(method, r):
    with pytest.raises(ValueError, match=r"r must be a positive integer \(the rank\)"):
        lrzoo.wrap(tiny_llama(), method, r=r)


@pytest.mark.parametrize("method", ["lora", "lora_xs"])
def test_integral_numpy_and_float_ranks_are_accepted_as_ints(method, tmp_path):
    model = lrzoo.wrap(tiny_llama(), method, r=np.int64(2), alpha=np.float32(4.0))
    config = model.peft_config["default"]
    assert config.r == 2 and type(config.r) is int
    alpha = config.lora_alpha if method == "lora" else config.alpha
    assert alpha == 4.0 and type(alpha) is float
    model.save_pretrained(tmp_path)  # JSON: numpy scalars would not serialise
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2
    assert lrzoo.wrap(tiny_llama(), method, r=2.0).peft_config["default"].r == 2


def _meta_llama():
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("method", ["lora", "dora", "lora_xs", "randlora"])
def test_meta_device_base_weights_are_refused_with_the_fix(method):
    with pytest.raises(ValueError, match=r"on the meta device.*Materialise the model first.*from_pretrained"):
        lrzoo.wrap(_meta_llama(), method, r=2)


@pytest.mark.parametrize("method", ["lora", "dora", "lora_xs", "loldu", "randlora"])
def test_integer_base_weights_are_refused_for_every_kind_of_method(method):
    model = tiny_llama()
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(layer.weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"int8.*not a bitsandbytes quantization.*floating-point or a bitsandbytes.*Dequantize"):
        lrzoo.wrap(model, method, r=2, target_modules=["q_proj"])


# ----------------------------------------------------------------------------- LoRA+ and head_lr
def _lr_of_each_parameter(optimizer) -> dict[int, float]:
    lrs = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in lrs, "a parameter is in two groups"
            lrs[id(p)] = group["lr"]
    return lrs


def test_loraplus_gives_the_head_head_lr_and_keeps_its_adapter_groups():
    model = lrzoo.wrap(tiny_bert(), "loraplus", r=4)  # λ = 16
    optimizer = lrzoo.make_optimizer(model, lr=1e-4, head_lr=2e-3, weight_decay=0.1)
    lrs = _lr_of_each_parameter(optimizer)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(lrs) == {id(p) for p in trainable.values()}
    for name, p in trainable.items():
        if ".modules_to_save." in name:
            expected = 2e-3
        elif "lora_B" in name:
            expected = 1.6e-3
        else:
            assert "lora_A" in name, name
            expected = 1e-4
        assert lrs[id(p)] == pytest.approx(expected), name
    assert any(".modules_to_save." in n for n in trainable)
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    head_weight = next(p for n, p in trainable.items() if ".modules_to_save." in n and n.endswith("weight"))
    head_bias = next(p for n, p in trainable.items() if ".modules_to_save." in n and n.endswith("bias"))
    assert decay[id(head_weight)] == 0.1 and decay[id(head_bias)] == 0.0


def test_loraplus_with_head_lr_trains_with_the_hf_loop():
    model = lrzoo.wrap(tiny_bert(), "loraplus", r=4).train()
    optimizer = lrzoo.make_optimizer(model, lr=1e-3, head_lr=1e-2)
    x = tiny_inputs(batch=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=x, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        optimizer.step()
    moved = {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p)}
    assert any("lora_B" in n for n in moved) and any(".modules_to_save." in n for n in moved)


# ----------------------------------------------------------------------------- train/eval mode
def test_a_model_wrapped_in_eval_mode_applies_no_adapter_dropout_until_train():
    model = lrzoo.wrap(tiny_llama(), "dora", r=2, init_lora_weights=False)  # dora.yaml: dropout 0.05
    assert model.peft_config["default"].lora_dropout == 0.05
    dropouts = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and not any(m.training for m in dropouts)
    x = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, model(x).logits, rtol=0, atol=0)
    model.train()
    assert all(m.training for m in dropouts)


@pytest.mark.parametrize("bad", [{"r": True}, {"r": 1.5}, {"r": "8"}, {"r": 0}, {"alpha": 0.0}, {"alpha": -1.0},
                                 {"alpha": float("nan")}])
def test_hand_built_native_configs_follow_wraps_rules(bad):
    """A config built by hand (or read from an edited adapter_config.json) is checked like wrap's keywords."""
    from lrzoo.methods.lora_xs import LoraXSConfig

    with pytest.raises(ValueError, match="r must be a positive integer|alpha must be a positive number"):
        LoraXSConfig(**bad)
