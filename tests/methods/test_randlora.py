"""RandLoRA: interchangeable with PEFT's RandLoraConfig both ways; the torch path matches PEFT's layer."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, RandLoraConfig, get_peft_model
from peft.tuners.randlora.layer import Linear as PeftRandLoraLinear

import lrzoo
from conftest import REPO, tiny_inputs, tiny_llama
from lrzoo.kernels import randlora_linear
from lrzoo.kernels.common import materialize_wins
from lrzoo.kernels.randlora import RandLoraLinearFunction
from lrzoo.methods.randlora import FastRandLoraLinear

TARGETS = ["q_proj", "v_proj", "down_proj"]  # square, wide (32→16) and tall (48→32) layers


def peft_randlora(seed: int = 0, **kwargs):
    config = RandLoraConfig(r=4, randlora_alpha=8, target_modules=TARGETS, init_weights=False, **kwargs)
    return get_peft_model(tiny_llama(seed), config)


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_trainable_count_equals_peft_for_the_same_config():
    ours = lrzoo.wrap(tiny_llama(0), "randlora", r=4, alpha=8, target_modules=TARGETS)
    theirs = get_peft_model(tiny_llama(0), RandLoraConfig(r=4, randlora_alpha=8, target_modules=TARGETS))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_a_peft_checkpoint_loads_into_lrzoo_with_equal_outputs(tmp_path):
    peft_model = peft_randlora().eval()
    peft_model.save_pretrained(tmp_path)
    x = tiny_inputs()
    loaded = lrzoo.load(tiny_llama(0), str(tmp_path)).eval()
    layers = [m for m in loaded.modules() if isinstance(m, PeftRandLoraLinear)]
    assert layers and all(type(m) is FastRandLoraLinear for m in layers)
    torch.testing.assert_close(logits(loaded, x), logits(peft_model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_an_lrzoo_checkpoint_loads_in_stock_peft(tmp_path, fresh_python):
    model = lrzoo.wrap(tiny_llama(0), "randlora", r=4, alpha=8, target_modules=TARGETS, init_weights=False).eval()
    tiny_llama(0).save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    x = tiny_inputs()
    torch.save(x, tmp_path / "x.pt")
    fresh_python(f"""
        import sys, torch, transformers
        from peft import PeftModel
        base = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r}).eval()
        model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r})
        assert model.peft_config["default"].peft_type == "RANDLORA"
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / 'x.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
        assert "lrzoo" not in sys.modules
    """, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), logits(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d_in,d_out,r", [(24, 40, 4), (40, 24, 4), (33, 33, 5), (17, 50, 3)])
@pytest.mark.parametrize("materialize", [True, False])
def test_randlora_linear_matches_peft_values_and_gradients(d_in, d_out, r, materialize, monkeypatch):
    monkeypatch.setattr("lrzoo.kernels.randlora.materialize_wins", lambda *a, **k: materialize)
    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(d_in, d_out)),
                           RandLoraConfig(r=r, randlora_alpha=2 * r, target_modules=["0"], init_weights=False))
    layer = model.base_model.model[0]
    x = torch.randn(3, 7, d_in, requires_grad=True)
    dy = torch.randn(3, 7, d_out)
    params = [x, layer.randlora_lambda["default"], layer.randlora_gamma["default"]]
    expected = layer(x)
    grads_expected = torch.autograd.grad((expected * dy).sum(), params)
    base = layer.get_base_layer()
    actual = randlora_linear(x, base.weight, base.bias, layer.randlora_A["default"], layer.randlora_B["default"],
                             *params[1:], layer.scaling["default"])
    grads = torch.autograd.grad((actual * dy).sum(), params)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, grads_expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_dropout_path_applies_one_mask_to_the_adapter_branch_only():
    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(24, 40)),
                           RandLoraConfig(r=4, target_modules=["0"], init_weights=False))
    layer = model.base_model.model[0]
    base = layer.get_base_layer()
    args = (base.weight, base.bias, layer.randlora_A["default"], layer.randlora_B["default"],
            layer.randlora_lambda["default"], layer.randlora_gamma["default"], 2.0)
    x = torch.randn(64, 24, requires_grad=True)
    out = RandLoraLinearFunction.apply(x, *args[:2], *args[2:6], 2.0, True, 0.5, True)
    no_drop = RandLoraLinearFunction.apply(x, *args[:2], *args[2:6], 2.0, True, 0.0, False)
    base_out = torch.nn.functional.linear(x, base.weight, base.bias)
    # where dropout kept a whole row the branch is doubled, where it dropped it the base alone remains
    branch, full = out - base_out, no_drop - base_out
    ratio = (branch.abs().sum() / full.abs().sum()).item()
    assert 0.5 < ratio < 1.5 and not torch.allclose(out, no_drop)
    torch.autograd.grad(out.sum(), [x, layer.randlora_lambda["default"]])  # backward runs with the mask


def test_materialising_is_chosen_when_tokens_exceed_width():
    assert materialize_wins(2048, 1024, 1024, 1024, training=True)
    assert not materialize_wins(1, 1024, 1024, 1024, training=False)
    assert not materialize_wins(64, 1024, 1024, 1024, training=True)


def test_backward_rebuild_moves_the_boundary():
    # d = D = P = 1024: keeping W' pays off above 512 tokens, rebuilding ΔW in the backward above 768
    assert materialize_wins(600, 1024, 1024, 1024, training=True)
    assert not materialize_wins(600, 1024, 1024, 1024, training=True, rebuilds=True)
    assert materialize_wins(800, 1024, 1024, 1024, training=True, rebuilds=True)


def saved_bytes(fn) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        if not isinstance(tensor, torch.nn.Parameter):
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_saves_no_more_activation_bytes_than_peft_on_a_square_layer():
    """Both keep one N×d tensor (PEFT the N×P product, lrzoo x) plus weight-sized tensors."""
    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), RandLoraConfig(r=8, target_modules=["0"]))
    layer = model.base_model.model[0]
    x = torch.randn(512, 64, requires_grad=True)
    peft_bytes = saved_bytes(lambda: PeftRandLoraLinear.forward(layer, x))
    layer.__class__ = FastRandLoraLinear  # the class swap lrzoo.wrap and lrzoo.load do
    ours = saved_bytes(lambda: layer(x))
    assert ours <= peft_bytes, (ours, peft_bytes)


def test_wrap_uses_the_fast_layer_and_peft_from_pretrained_keeps_peft_layers(tmp_path):
    model = lrzoo.wrap(tiny_llama(0), "randlora", r=4, target_modules=TARGETS)
    assert {type(m) for m in model.modules() if isinstance(m, PeftRandLoraLinear)} == {FastRandLoraLinear}
    model.save_pretrained(tmp_path)
    plain = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path))
    assert {type(m) for m in plain.modules() if isinstance(m, PeftRandLoraLinear)} == {PeftRandLoraLinear}


@pytest.mark.parametrize("d_in,d_out", [(64, 64), (64, 96), (96, 64)])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_merged_path_keeps_no_weight_sized_tensor_for_the_backward(d_in, d_out, dropout):
    """The merged path rebuilds W' (ΔW with dropout) in the backward: it keeps x (and the mask), nothing d_out×d_in.

    Counted as lrzoo-bench counts (one count per storage, parameters and the shared bases excluded).
    With d_in ≤ d_out that is no more than PEFT, which keeps x and the P×d factor; a wide-input layer
    still keeps x (N×d_in) where PEFT keeps x·Bf (N×P), the remaining excess (docs/benchmarks.md).
    """
    from lrzoo.bench.timing import saved_activation_bytes

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(d_in, d_out)),
                           RandLoraConfig(r=8, target_modules=["0"], init_weights=False, randlora_dropout=dropout))
    layer = model.base_model.model[0].train()
    exclude = [*model.parameters(), *model.buffers()]
    x = torch.randn(512, d_in, requires_grad=True)
    assert materialize_wins(512, d_in, d_out, layer.randlora_lambda["default"].numel(), True, rebuilds=True)
    peft_bytes = saved_activation_bytes(lambda: PeftRandLoraLinear.forward(layer, x), exclude)
    layer.__class__ = FastRandLoraLinear
    ours = saved_activation_bytes(lambda: layer(x), exclude)
    mask_bytes = x.numel() if dropout else 0  # the boolean keep-mask
    assert ours == x.numel() * x.element_size() + mask_bytes, (ours, peft_bytes)
    if d_in <= d_out and not dropout:
        assert ours <= peft_bytes, (ours, peft_bytes)


@pytest.mark.parametrize("d_in,d_out", [(24, 40), (40, 24), (32, 32)])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_merged_path_backward_is_bit_identical_to_keeping_w_prime(d_in, d_out, dropout):
    """Rebuilding ΔW in the backward repeats the forward's operations: ∂x equals ∂x from the kept W' exactly."""
    torch.manual_seed(0)
    r, n = 4, 6
    W, b = torch.randn(d_out, d_in), torch.randn(d_out)
    A, B = torch.randn(r, 1, max(d_in, d_out)), torch.randn(max(d_in, d_out), n, r)
    lam, gamma = torch.randn(r, n, requires_grad=True), torch.randn(n, min(d_in, d_out), requires_grad=True)
    x = torch.randn(64, d_in, requires_grad=True)
    torch.manual_seed(1)
    out = RandLoraLinearFunction.apply(x, W, b, A, B, lam, gamma, 1.5, d_in <= d_out, dropout, True)
    dy = torch.randn_like(out)
    grad_x, grad_lam, grad_gamma = torch.autograd.grad(out, [x, lam, gamma], dy)
    from lrzoo.kernels.randlora import _update

    with torch.no_grad():
        delta, _, _ = _update(A, B, lam, gamma, max(d_in, d_out), x.dtype, 1.5, d_in <= d_out)
        if dropout:
            torch.manual_seed(1)
            keep = torch.rand_like(x, dtype=torch.float32) >= dropout
            expected_x = dy @ W + (dy @ delta) * keep * (1.0 / (1.0 - dropout))
        else:
            expected_x = dy @ delta.add_(W)
    assert torch.equal(grad_x, expected_x)


def test_the_scale_is_alpha_over_r_without_the_official_one_over_sqrt_n():
    """docs/adapters/randlora.md: the official layer scales by α/r/√n (n = ⌈min(d_in, d_out)/r⌉ bases), PEFT and
    lrzoo by α/r, so passing alpha = α_official/√n gives the official scale."""
    import math

    ours = lrzoo.wrap(tiny_llama(0), "randlora", r=4, alpha=8, target_modules=TARGETS)
    for module in ours.modules():
        if isinstance(module, PeftRandLoraLinear):
            n = math.ceil(min(module.in_features, module.out_features) / 4)
            assert module.num_bases == n and module.scaling["default"] == pytest.approx(8 / 4)
            official = 8 / 4 / math.sqrt(n)
            matched = lrzoo.wrap(tiny_llama(0), "randlora", r=4, alpha=8 / math.sqrt(n), target_modules=TARGETS)
            layer = next(m for m in matched.modules() if isinstance(m, PeftRandLoraLinear) and m.num_bases == n)
            assert layer.scaling["default"] == pytest.approx(official)
