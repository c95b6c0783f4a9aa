"""SALT (issue 15 item 3) beyond the shared contract: the official forward where lrzoo's choices agree with it,
the frozen thin SVD, the paper's init, the spec's parameter example, refusals, and the recomputed policy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrzoo
from conftest import tiny_inputs, tiny_llama
from lrzoo.methods.salt import SALTLayer


class TwoLinears(nn.Module):
    """A tall and a wide layer, so both sides of k = min(d_out, d_in) are exercised."""

    def __init__(self, d_in=64, d_mid=48, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(d_in, d_mid)  # 48×64 (wide)
        self.down = nn.Linear(d_mid, d_in)  # 64×48 (tall)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def salt_layers(model):
    return [m for m in model.modules() if isinstance(m, SALTLayer)]


def official_forward(layer, x, adapter="default"):
    """Spec §4 transcribed: C = diag(σ); C[:r,:r] = diag(a σ_r + b); C[r:,r:] += X Y; y = x (U ReLU(C) Vᵀ)ᵀ + bias,
    with the full σ taken from W in the layer's own basis (σ_i = u_iᵀ W v_i), as the official code uses its own U, V."""
    W = layer.get_base_layer().weight
    U, Vh = layer.salt_U[adapter], layer.salt_Vh[adapter]
    a, b = layer.salt_scale[adapter], layer.salt_shift[adapter]
    X, Y = layer.salt_X[adapter], layer.salt_Y[adapter]
    r = a.shape[0]
    sigma = torch.diagonal(U.T @ W.detach() @ Vh.T)
    core = torch.block_diag(torch.diag(a * sigma[:r] + b), torch.diag(sigma[r:]) + X @ Y)
    return F.linear(x, U @ torch.relu(core) @ Vh, layer.get_base_layer().bias)


def test_matches_the_official_forward_and_gradients_while_no_core_entry_is_negative():
    model = lrzoo.wrap(TwoLinears(), "salt", r=4, lora_r=8, target_modules=["up", "down"])
    torch.manual_seed(1)
    for layer in salt_layers(model):
        with torch.no_grad():  # a > 0, b ≥ 0, X, Y ≥ 0: no entry of the official core is clipped
            layer.salt_scale["default"].uniform_(0.5, 1.5)
            layer.salt_shift["default"].uniform_(0.0, 0.1)
            layer.salt_X["default"].uniform_(0.0, 0.3)
            layer.salt_Y["default"].uniform_(0.0, 0.3)
        x = torch.randn(3, 5, layer.in_features, requires_grad=True)
        params = [p for p in layer.parameters() if p.requires_grad]
        grad_out = torch.randn(3, 5, layer.out_features)
        ours = layer(x)
        theirs = official_forward(layer, x)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad((ours * grad_out).sum(), [x, *params])
        want = torch.autograd.grad((theirs * grad_out).sum(), [x, *params])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_the_official_relu_is_where_lrzoo_differs():
    """Documented choice: once an entry of X Y is negative the official core clips it; lrzoo does not."""
    model = lrzoo.wrap(TwoLinears(), "salt", r=4, lora_r=8, target_modules=["up"], init_weights=False)
    layer = salt_layers(model)[0]
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert (layer.salt_X["default"] @ layer.salt_Y["default"] < 0).any()
        assert (layer(x) - official_forward(layer, x)).abs().max() > 1e-3


def test_frozen_factors_are_the_thin_svd_of_w_with_canonical_signs():
    model = lrzoo.wrap(TwoLinears(), "salt", r=4, lora_r=8, target_modules=["up", "down"])
    for layer in salt_layers(model):
        W = layer.get_base_layer().weight.detach()
        U, Vh, S = layer.salt_U["default"], layer.salt_Vh["default"], layer.salt_S["default"]
        k = min(W.shape)
        assert U.shape == (W.shape[0], k) and Vh.shape == (k, W.shape[1]) and S.shape == (4,)
        torch.testing.assert_close(U.T @ U, torch.eye(k), atol=1e-5, rtol=0)
        torch.testing.assert_close(Vh @ Vh.T, torch.eye(k), atol=1e-5, rtol=0)
        core = U.T @ W @ Vh.T  # diagonal, descending, its first r entries σ_r
        sigma = torch.diagonal(core)
        torch.testing.assert_close(core, torch.diag(sigma), atol=1e-5, rtol=0)
        assert (sigma[:-1] >= sigma[1:]).all()
        torch.testing.assert_close(sigma[:4], S, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(U @ torch.diag(sigma) @ Vh, W, atol=1e-5, rtol=0)
        pivots = U.abs().argmax(dim=0)
        assert (U[pivots, torch.arange(k)] > 0).all()


def test_init_is_the_official_one_and_an_exact_no_op():
    model = lrzoo.wrap(TwoLinears(), "salt", r=4, lora_r=8, target_modules=["up", "down"])
    x = torch.randn(4, 64)
    with model.disable_adapter(), torch.no_grad():
        base = model(x)
    with torch.no_grad():
        assert torch.equal(model(x), base)
    for layer in salt_layers(model):
        assert torch.equal(layer.salt_scale["default"], torch.ones(4))
        assert torch.equal(layer.salt_shift["default"], torch.zeros(4))
        assert not layer.salt_Y["default"].any()
        X = layer.salt_X["default"]
        bound = math.sqrt(6 / 8)  # Kaiming-uniform, ReLU gain, fan_in = r_L
        assert X.abs().max() <= bound and X.abs().max() > 0.8 * bound
        assert not layer.delta_weight("default").any()  # ΔW = 0 exactly, not approximately


def test_trainable_parameters_follow_the_spec_example():
    """Spec §4 [R]: 48×64, ratio 0.1 (r=4), r_L=8 → 712 per matrix; the tall 64×48 layer has the same k."""
    model = lrzoo.wrap(TwoLinears(), "salt", r=4, lora_r=8, target_modules=["up", "down"])
    assert model.get_nb_trainable_parameters()[0] == 2 * 712
    layer = salt_layers(model)[0]
    assert layer.salt_X["default"].shape == (44, 8) and layer.salt_Y["default"].shape == (8, 44)


def test_lora_factors_are_exact_with_rank_r_plus_lora_r():
    model = lrzoo.wrap(TwoLinears(), "salt", r=4, lora_r=8, target_modules=["up", "down"], init_weights=False)
    for layer in salt_layers(model):
        B, A = layer.lora_factors("default")
        assert B.shape == (layer.out_features, 12) and A.shape == (12, layer.in_features)
        torch.testing.assert_close(B @ A, layer.delta_weight("default"), rtol=0, atol=0)
        assert torch.linalg.matrix_rank(B @ A).item() == 12


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 32}, r"SALT needs r < min\(d_out, d_in\) = 32"),
    ({"r": 4, "lora_r": 0}, "lora_r must be a positive integer"),
    ({"r": 4, "lora_r": 2.5}, "lora_r must be a positive integer"),
])
def test_refusals_name_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lrzoo.wrap(tiny_llama(), "salt", target_modules=["q_proj"], **kwargs)


def test_a_lora_rank_above_the_residual_spectrum_is_allowed_as_in_the_official_code_with_a_warning():
    with pytest.warns(UserWarning, match=r"SALT: lora_r=40 is ≥ min\(d_out, d_in\) − r on 2 of 2 layers "
                                         r"\(model\.layers\.0\.self_attn\.q_proj \(32×32: k − r = 28\)"):
        model = lrzoo.wrap(tiny_llama(), "salt", r=4, lora_r=40, target_modules=["q_proj"])  # k − r = 28 < 40
    layer = salt_layers(model)[0]
    assert layer.salt_X["default"].shape == (28, 40)
    with torch.no_grad():
        out = model(tiny_inputs()).logits
    assert torch.isfinite(out).all()


def test_the_full_rank_residual_warning_comes_once_per_wrap_and_names_only_those_layers():
    """Issue 25 item 6: lora_r ≥ k − r is a full-rank update in disguise; k/v (16×32) have k − r = 12, q 28."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lrzoo.wrap(tiny_llama(), "salt", r=4, lora_r=12, target_modules=["q_proj", "k_proj"])
    salt = [str(w.message) for w in caught if str(w.message).startswith("SALT: lora_r")]
    assert len(salt) == 1 and "on 2 of 4 layers" in salt[0] and "k_proj" in salt[0] and "q_proj" not in salt[0]
    assert "Set lora_r < 12" in salt[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lrzoo.wrap(tiny_llama(), "salt", r=4, lora_r=11, target_modules=["q_proj", "k_proj"])
    assert not [w for w in caught if str(w.message).startswith("SALT: lora_r")]


def test_recomputed_factors_keep_only_the_trained_tensors_and_load_exactly(tmp_path):
    model = lrzoo.wrap(tiny_llama(), "salt", r=4, lora_r=8, frozen_factors="recomputed", init_weights=False).eval()
    with torch.no_grad():
        expected = model(tiny_inputs()).logits
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert keys and all(any(n in key for n in ("salt_scale", "salt_shift", "salt_X", "salt_Y")) for key in keys)
    loaded = lrzoo.load(tiny_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tiny_inputs()).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spectrum", ["repeated", "rank_deficient"])
def test_recomputed_factors_are_refused_for_a_weight_without_a_unique_svd(spectrum):
    net = TwoLinears()
    d = torch.linspace(2.0, 1.0, 48)
    if spectrum == "repeated":  # any rotation of the two pairs' vectors is as valid
        d[20] = d[21]
    else:  # a zero singular value: its left vector is arbitrary
        d[-1] = 0.0
    with torch.no_grad():
        net.up.weight.zero_()
        net.up.weight[:, :48] = torch.diag(d)
    with pytest.raises(ValueError, match="frozen_factors='recomputed' needs distinct, non-zero singular values"):
        lrzoo.wrap(net, "salt", r=4, lora_r=8, target_modules=["up"], frozen_factors="recomputed")
    lrzoo.wrap(net, "salt", r=4, lora_r=8, target_modules=["up"])  # "saved" keeps the basis it trained in


def test_several_steps_move_every_trained_tensor():
    """Y = 0 at init, so X gets no gradient on the first step (a, b and Y do); after two, every tensor has moved."""
    model = lrzoo.wrap(tiny_llama(), "salt", r=4, lora_r=8).train()
    x = tiny_inputs(batch=4, length=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    for _ in range(2):
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), before[name]), name


def test_at_init_the_official_relu_gives_the_same_output_but_another_gradient_of_y():
    """docs/adapters/salt.md: Y = 0 leaves the residual block's off-diagonal entries at exactly 0, where the ReLU's
    gradient is 0, so the official first dY keeps only that block's diagonal; a, b agree, X has no gradient."""
    model = lrzoo.wrap(TwoLinears(), "salt", r=4, lora_r=8, target_modules=["up"])
    layer = salt_layers(model)[0]
    torch.manual_seed(3)
    x, grad_out = torch.randn(16, 64), torch.randn(16, 48)
    params = [layer.salt_scale["default"], layer.salt_shift["default"], layer.salt_X["default"], layer.salt_Y["default"]]
    ours, theirs = layer(x), official_forward(layer, x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad((ours * grad_out).sum(), params)
    want = torch.autograd.grad((theirs * grad_out).sum(), params)
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert got[2].abs().max() == 0
    dY, official_dY = got[3], want[3]
    assert F.cosine_similarity(dY.flatten(), official_dY.flatten(), dim=0) < 0.5
    assert official_dY.norm() < dY.norm() / 3
    # only the residual block's diagonal passes the ReLU: the official dY = Xᵀ diag(d), column j parallel to X[j]
    Xt = layer.salt_X["default"].T
    d = (official_dY * Xt).sum(0) / (Xt * Xt).sum(0)
    torch.testing.assert_close(official_dY, Xt * d, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dY, Xt * (dY * Xt).sum(0) / (Xt * Xt).sum(0), atol=1e-3)  # lrzoo's is not
