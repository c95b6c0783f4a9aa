"""Issue 3, beyond the contract rows: LoRA-XS, LoRA-SB, LoLDU, SVFit and FLoRA.

Parameter counts on a grid of layer shapes, the two frozen-factor policies and the base-weight
check, LoLDU/SVFit's untouched base (disable, unload, delete bit-exact, export against the original W),
LoLDU's pivot storage, LoRA-SB's gradient init against an independent per-sample computation, and
FLoRA's conv limits.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn
from peft import PeftModel
from safetensors.torch import load_file

import lrzoo
from lrzoo.registry import training_options
from adapter_cases import CASES_BY_METHOD
from conftest import tiny_bert, tiny_inputs

FROZEN_FROM_W = ("lora_xs", "loldu", "svfit")  # frozen factors derived from W alone
RESIDUAL = ("loldu", "svfit")  # the papers' residual base; lrzoo keeps W and adds ΔW beside it


class Shapes(nn.Module):
    """Linear layers of several shapes and conv layers (one with fewer input channels than r)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tall, self.wide, self.square = nn.Linear(24, 40), nn.Linear(40, 16), nn.Linear(20, 20)
        self.c1, self.c2, self.c3 = nn.Conv1d(5, 12, 4), nn.Conv2d(3, 16, (3, 1)), nn.Conv3d(6, 9, 2)

    def forward(self, x):
        return self.square(self.wide(self.tall(x)))


LINEARS = ["tall", "wide", "square"]


def expected_count(method: str, layer: nn.Module, r: int) -> int:
    """The spec's per-matrix formula (shared/spec/adapters.md §1), from the contract row: one source."""
    d_out, d_in, *kernel = layer.weight.shape
    return CASES_BY_METHOD[method].param_count(d_out, d_in, {"r": r, "kernel_size": tuple(kernel)})


@pytest.mark.parametrize("method", ["lora_xs", "lora_sb", "loldu", "svfit", "flora"])
def test_trainable_counts_follow_the_spec_on_a_shape_grid(method):
    model = Shapes()
    targets = LINEARS + (["c1", "c2", "c3"] if method == "flora" else [])
    layers = {name: getattr(model, name) for name in targets}
    peft_model = lrzoo.wrap(model, method, r=8, target_modules=targets)
    for name, base in layers.items():
        adapted = getattr(peft_model.base_model.model, name)
        trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        assert trainable == expected_count(method, base, 8), name


def _wrap_bert(method: str, seed: int = 0, **kwargs) -> PeftModel:
    return lrzoo.wrap(tiny_bert(seed), method, r=4, init_weights=False, **kwargs)


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("policy", ["saved", "recomputed"])
@pytest.mark.parametrize("method", FROZEN_FROM_W)
def test_frozen_factor_policy_is_recorded_and_reloads_exactly(method, policy, tmp_path):
    model = _wrap_bert(method, frozen_factors=policy)
    x = tiny_inputs()
    expected = _logits(model, x)
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["frozen_factors"] == policy and re.fullmatch(r"v2-[0-9a-f]{32}", config["base_weights_hash"])
    layer_cls = lrzoo.get_adapter(method).layer_cls
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    frozen_keys = [k for k in keys if any(f".{name}" in k for name in layer_cls.other_param_names)]
    trained_keys = [k for k in keys if any(f".{name}" in k for name in layer_cls.adapter_layer_names)]
    assert trained_keys
    assert bool(frozen_keys) == (policy == "saved")

    reloaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path)
    torch.testing.assert_close(_logits(reloaded, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", FROZEN_FROM_W + ("lora_sb", "flora"))
def test_loading_on_other_base_weights_is_refused(method, tmp_path):
    _wrap_bert(method).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="different base weights"):
        PeftModel.from_pretrained(tiny_bert(seed=1), tmp_path)


def test_lora_sb_refuses_recomputed_factors():
    with pytest.raises(ValueError, match="frozen_factors='saved'"):
        lrzoo.wrap(tiny_bert(), "lora_sb", r=4, frozen_factors="recomputed")


def _first_layer(peft_model):
    return peft_model.base_model.model.bert.encoder.layer[0].attention.self.query


def test_loldu_keeps_the_pivot_as_a_permutation_and_the_base_untouched():
    model = tiny_bert()
    W = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    layer = _first_layer(lrzoo.wrap(model, "loldu", r=4))
    rows = layer.loldu_rows["default"]
    assert rows.dtype == torch.long and rows.shape == (W.shape[0],)
    assert sorted(rows.tolist()) == list(range(W.shape[0]))
    assert all(t.numel() < W.shape[0] ** 2 for t in layer.buffers())

    L, D, U = (getattr(layer, f"loldu_{n}")["default"] for n in "LDU")
    assert torch.equal(torch.diagonal(U), torch.ones(4)) and torch.equal(L.triu(1), torch.zeros_like(L))
    sigma0 = 1.0 / 4  # alpha / r, alpha = 1 by default
    assert layer.loldu_sigma["default"].item() == pytest.approx(sigma0)
    # P L_r D_r U_r is the rank-r part of W's LU: U is upper triangular, so it reproduces W's first r
    # columns exactly (the paper's residual W − σ₀·(this)·/σ₀ is zero there).
    torch.testing.assert_close((L[rows] @ torch.diag(D) @ U)[:, :4], W[:, :4], rtol=0, atol=1e-5)
    assert torch.equal(layer.get_base_layer().weight, W)  # lrzoo never rewrites the base


@pytest.mark.parametrize("method", RESIDUAL)
def test_residual_methods_give_back_the_original_model(method):
    original = tiny_bert()
    x = tiny_inputs()
    base_logits = _logits(original, x)
    weights = {n: p.detach().clone() for n, p in original.named_parameters()}
    model = _wrap_bert(method)
    adapted = _logits(model, x)
    assert (adapted - base_logits).abs().max() > 1e-6  # tiny BERT's logits are ~1e-2
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, x), base_logits, rtol=0, atol=1e-7)

    merged = _wrap_bert(method).merge_and_unload()
    torch.testing.assert_close(_logits(merged, x), adapted, rtol=1e-4, atol=1e-7)

    for unloaded in (_wrap_bert(method).unload(), _deleted(_wrap_bert(method))):
        params = {n.replace(".base_layer", "").replace(".original_module", ""): p for n, p in unloaded.named_parameters()}
        for name, weight in weights.items():
            assert torch.equal(params[name], weight), name  # bit for bit


@pytest.mark.parametrize("method", RESIDUAL)
def test_residual_methods_leave_a_bf16_base_bit_exact(method):
    """The papers' ``(W − off) + off`` round trip lost ~1e-3 per entry in bf16; lrzoo never writes W."""
    model = tiny_bert().to(torch.bfloat16)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = lrzoo.wrap(model, method, r=4, init_weights=False)
    x = tiny_inputs()
    with peft_model.disable_adapter():
        disabled = _logits(peft_model, x)
    torch.testing.assert_close(disabled, _logits(_bf16_copy(weights), x), rtol=0, atol=0)
    unloaded = peft_model.unload()
    params = {n.replace(".base_layer", "").replace(".original_module", ""): p for n, p in unloaded.named_parameters()}
    for name, weight in weights.items():
        assert torch.equal(params[name], weight), name


def _bf16_copy(weights):
    model = tiny_bert().to(torch.bfloat16)
    model.load_state_dict(weights)
    return model


def _deleted(peft_model):
    peft_model.base_model.delete_adapter("default")
    return peft_model.base_model.model


@pytest.mark.parametrize("method", ["lora_xs", "lora_sb", "loldu", "svfit", "flora"])
def test_exported_factors_are_the_update_against_the_original_weight(method, tmp_path):
    original = {n: p.detach().clone() for n, p in tiny_bert().named_parameters()}
    model = _wrap_bert(method)
    report = lrzoo.export_lora(model, str(tmp_path))
    assert report["exact"] and report["max_relative_error"] == 0.0
    factors = load_file(tmp_path / "adapter_model.safetensors")
    merged = dict(model.merge_and_unload().named_parameters())
    for key in [k for k in factors if k.endswith("lora_A.weight")]:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        delta = factors[key.replace("lora_A", "lora_B")] @ factors[key]
        expected = merged[f"{module}.weight"] - original[f"{module}.weight"]
        assert (delta - expected).abs().max() < 1e-5, module


def test_lora_sb_init_is_the_truncated_svd_of_the_signed_per_sample_gradient_sum():
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    batches = [{"input_ids": tiny_inputs(seed=s, batch=3), "labels": torch.tensor([0, 1, 2])} for s in (5, 6)]
    lr, r = 1e-3, 4

    # Independent reference: official-style loop, one sample at a time, summing ∇W L.
    reference = tiny_bert(**no_dropout).train()
    W = reference.bert.encoder.layer[0].attention.self.query.weight
    G = torch.zeros_like(W)
    for batch in batches:
        for i in range(3):
            loss = reference(input_ids=batch["input_ids"][i:i + 1], labels=batch["labels"][i:i + 1]).loss
            G += torch.autograd.grad(loss, W)[0]
    U, S, Vh = torch.linalg.svd(-lr * torch.sign(G))
    expected = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]

    model = lrzoo.wrap(tiny_bert(**no_dropout), "lora_sb", r=r)
    before = _first_layer(model).get_base_layer().weight.detach().clone()
    assert lrzoo.init_lora_sb(model, batches, lr=lr, num_samples=5) == 5  # stops after 5 of the 6 samples
    assert lrzoo.init_lora_sb(model, batches, lr=lr) == 6
    layer = _first_layer(model)
    delta = layer.delta_weight("default")
    assert (delta - expected).norm() / expected.norm() < 1e-3
    B, A = layer.sb_B["default"], layer.sb_A["default"]
    torch.testing.assert_close(B.T @ B, torch.eye(r), atol=1e-5, rtol=0)  # orthonormal, frozen
    torch.testing.assert_close(A @ A.T, torch.eye(r), atol=1e-5, rtol=0)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["sb_R.default"]
    assert torch.equal(layer.get_base_layer().weight, before)  # the base is not modified

    via_wrap = lrzoo.wrap(tiny_bert(**no_dropout), "lora_sb", r=r, init_data=batches, init_lr=lr)
    torch.testing.assert_close(_first_layer(via_wrap).delta_weight("default"), delta)
    assert "init_data" not in training_options(via_wrap)


def test_flora_refuses_grouped_convolutions():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(ValueError, match="groups=1"):
        lrzoo.wrap(model, "flora", r=2, target_modules=["0"])


def test_flora_export_refuses_what_peft_lora_conv_cannot_express(tmp_path):
    model = lrzoo.wrap(nn.Sequential(nn.Conv2d(4, 8, 3, dilation=2)), "flora", r=2, target_modules=["0"])
    with pytest.raises(ValueError, match="dilation"):
        lrzoo.export_lora(model, str(tmp_path / "out"))
