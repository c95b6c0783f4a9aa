"""The torch path's hand-written backward with dropout, against plain autograd on the same mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lrzoo.kernels import lora

P, S = 0.3, 0.7


def inputs(with_magnitude: bool):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, requires_grad=True)
    W, b = torch.randn(9, 12), torch.randn(9)
    A, B = torch.randn(3, 12, requires_grad=True), torch.randn(9, 3, requires_grad=True)
    m = torch.rand(9, requires_grad=True) if with_magnitude else None
    return x, W, b, A, B, m


def mask_for(x, seed):
    # the reference path draws its mask with torch.rand_like on the flattened input
    torch.manual_seed(seed)
    return (torch.rand_like(x.reshape(-1, x.shape[-1]), dtype=torch.float32) >= P).reshape(x.shape)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dropout_backward_matches_autograd_on_the_same_mask(method):
    x, W, b, A, B, m = inputs(method == "dora")
    params = [x, A, B] + ([m] if m is not None else [])
    grad_out = torch.randn(2, 5, 9)

    torch.manual_seed(7)
    if method == "lora":
        out = lora.lora_linear(x, W, b, A, B, S, P, training=True)
    else:
        out = lora.dora_linear(x, W, b, A, B, m, S, P, training=True)
    grads = torch.autograd.grad((out * grad_out).sum(), params)

    dropped = x * mask_for(x, 7) / (1 - P)
    z = F.linear(x, W) + S * F.linear(F.linear(dropped, A), B)
    if method == "dora":
        norm = torch.linalg.norm(W + S * B @ A, dim=1).detach()
        z = (m / norm) * z
    expected_out = z + b
    expected = torch.autograd.grad((expected_out * grad_out).sum(), params)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _tera_delta(factors, core, lam, modes, scaling):
    """ΔW from the definition: contract every mode of G with U_n diag λ_n, then read the tensor as a matrix."""
    letters = "abcdefgh"[:len(modes)]
    outs = "ABCDEFGH"[:len(modes)]
    operands = [core] + [factors[n, :size] * lam[n] for n, size in enumerate(modes)]
    spec = letters + "," + ",".join(f"{o}{a}" for o, a in zip(outs, letters)) + "->" + outs
    k = len(modes) // 2
    rows = int(torch.tensor(modes[:k]).prod())
    return scaling * torch.einsum(spec, *operands).reshape(rows, -1)


@pytest.mark.parametrize("modes,rank,tokens,form", [
    ((4, 4, 4, 4), 4, 40, "merged"),       # Q = R² = 16 = width: building W' wins
    ((8, 8, 8, 8), 2, 40, "low-rank"),     # Q = 4 ≪ 64: two thin GEMMs win
    ((2, 3, 4, 2, 2, 3), 2, 9, "low-rank"),  # K = 3, uneven modes, rectangular layer
])
def test_tera_linear_matches_the_materialised_update_in_both_forms(modes, rank, tokens, form):
    from lrzoo.kernels import tera

    g = torch.Generator().manual_seed(0)
    k = len(modes) // 2
    d_out, d_in = int(torch.tensor(modes[:k]).prod()), int(torch.tensor(modes[k:]).prod())
    factors = torch.randn(len(modes), max(modes) + 1, rank, generator=g)
    core = torch.randn((rank,) * len(modes), generator=g)
    lam = torch.randn(len(modes), rank, generator=g).requires_grad_()
    x = torch.randn(tokens, d_in, generator=g).requires_grad_()
    weight, bias = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
    assert tera.merged_form_wins(tokens, modes, rank, True) == (form == "merged")

    out = tera.tera_linear(x, weight, bias, factors, core, lam, modes, 0.3)
    x_ref, lam_ref = x.detach().clone().requires_grad_(), lam.detach().clone().requires_grad_()
    expected = F.linear(x_ref, weight + _tera_delta(factors, core, lam_ref, modes, 0.3), bias)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    dy = torch.randn(out.shape, generator=g)
    out.backward(dy)
    expected.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lam.grad, lam_ref.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_modes,rank", [(4, 5), (6, 3)])
def test_tera_core_scaling_is_autograds_chain_without_its_intermediates(n_modes, rank):
    from lrzoo.bench.timing import saved_activation_bytes
    from lrzoo.kernels.tera import ScaledCoreFunction

    g = torch.Generator().manual_seed(0)
    core = torch.randn((rank,) * n_modes, generator=g)
    lam = torch.randn(n_modes, rank, generator=g).requires_grad_()

    def chain(lam):  # what autograd records: one product per mode, each keeping its R^N left operand
        scaled = core
        for n in range(n_modes):
            shape = [1] * n_modes
            shape[n] = rank
            scaled = scaled * lam[n].reshape(shape)
        return scaled

    dy = torch.randn(core.shape, generator=g)
    ours, want = ScaledCoreFunction.apply(core, lam), chain(lam)
    assert torch.equal(ours, want)
    assert torch.equal(torch.autograd.grad(ours, lam, dy)[0], torch.autograd.grad(want, lam, dy)[0])
    exclude = [core, lam]
    assert saved_activation_bytes(lambda: ScaledCoreFunction.apply(core, lam), exclude) == 0
    assert saved_activation_bytes(lambda: chain(lam), exclude) >= (n_modes - 1) * core.numel() * 4


def test_tera_row_factor_product_is_autograds_without_keeping_the_kronecker_rows():
    from lrzoo.bench.timing import saved_activation_bytes
    from lrzoo.kernels.tera import KronRowsProductFunction, _kron_rows

    g = torch.Generator().manual_seed(0)
    us = [torch.randn(size, 3, generator=g) for size in (4, 5)]
    scaled = torch.randn(9, 9, generator=g).requires_grad_()
    dy = torch.randn(20, 9, generator=g)
    ours, want = KronRowsProductFunction.apply(scaled, *us), _kron_rows(us) @ scaled
    assert torch.equal(ours, want)
    assert torch.equal(torch.autograd.grad(ours, scaled, dy)[0], torch.autograd.grad(want, scaled, dy)[0])
    assert saved_activation_bytes(lambda: KronRowsProductFunction.apply(scaled, *us), [scaled, *us]) == 0
    assert saved_activation_bytes(lambda: _kron_rows(us) @ scaled, [scaled, *us]) == 20 * 9 * 4


def _tera_inputs(modes, rank, tokens, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = len(modes) // 2
    d_out, d_in = int(torch.tensor(modes[:k]).prod()), int(torch.tensor(modes[k:]).prod())
    factors = torch.randn(len(modes), max(modes) + 1, rank, generator=g).to(dtype) / rank ** 0.5
    core = torch.randn((rank,) * len(modes), generator=g).to(dtype)
    lam = torch.randn(len(modes), rank, generator=g).to(dtype).requires_grad_()
    weight, bias = torch.randn(d_out, d_in, generator=g).to(dtype), torch.randn(d_out, generator=g).to(dtype)
    x = torch.randn(tokens, d_in, generator=g).to(dtype).requires_grad_()
    return x, weight, bias.requires_grad_(), factors, core, lam


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("modes,rank", [((8, 8, 8, 8), 2), ((2, 3, 4, 2, 2, 3), 3)])  # saves xa; saves x (Q > d_in)
def test_tera_tucker_form_gradients_are_autograds_of_the_plain_formula(dropout, modes, rank):
    """float64 gradcheck of :class:`TeraTuckerFunction` (x, λ, bias), the same mask on every evaluation."""
    from lrzoo.kernels import tera

    x, weight, bias, factors, core, lam = _tera_inputs(modes, rank, 6, torch.float64)
    assert not tera.merged_form_wins(6, modes, rank, True)

    def fn(x, lam, bias):
        torch.manual_seed(1)  # the dropout mask is drawn in the forward: the same one for every probe
        return tera.tera_linear(x, weight, bias, factors, core, lam, modes, 0.7, dropout, True)

    assert torch.autograd.gradcheck(fn, (x, lam, bias), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_tera_tucker_form_matches_the_dense_lora_form_keeping_two_n_by_q_tensors(dropout):
    """Same values and gradients as ``lora_linear`` with ``A = Rcᵀ, B = T`` (float64: only the order of the
    products differs), saving only ``xa = drop(x)·Rc`` and ``z0 = xa·(G diag s_in)ᵀ`` (N×Q each) and the mask."""
    from lrzoo.bench.timing import saved_activation_bytes
    from lrzoo.kernels import lora, tera

    modes, rank, tokens = (8, 8, 8, 8), 2, 24
    x, weight, bias, factors, core, lam = _tera_inputs(modes, rank, tokens, torch.float64)
    dy = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def through_lora_linear():  # T and Rc built densely through autograd, kept by lora_linear
        T, Rc = tera.tera_factors(factors, core, lam, modes, x.dtype)
        return lora.lora_linear(x, weight, bias, Rc.t(), T, 0.7, dropout, True)

    def ours():
        return tera.tera_linear(x, weight, bias, factors, core, lam, modes, 0.7, dropout, True)

    results = []
    for forward in (through_lora_linear, ours):
        torch.manual_seed(1)  # the same dropout mask
        out = forward()
        results.append((out, *torch.autograd.grad(out, [x, lam, bias], dy)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    exclude = [factors, core, lam, weight, bias]
    mask_bytes = tokens * 64 if dropout else 0
    assert saved_activation_bytes(ours, exclude) == 2 * tokens * rank ** 2 * 8 + mask_bytes  # xa, z0 and the mask
    assert saved_activation_bytes(through_lora_linear, exclude) > saved_activation_bytes(ours, exclude) + 64 * 4 * 8


def test_tera_tucker_form_costs_about_a_lora_layer_not_a_dense_rank_q_one():
    """SmolLM2's 576×576 projection with the default (16, 16, 16, 16) core (Q = 256): x·Rc and z·Lᵀ run mode
    by mode and the dense work is two products with the Q×Q core, so forward + backward is within 1.25× LoRA
    r = 16's FLOPs. The dense rank-Q form (x·Rc, T = L·Gλ, five N×576×256 GEMMs) was 2.39×."""
    from torch.utils.flop_counter import FlopCounterMode

    from lrzoo.kernels import lora, tera

    modes, rank, tokens = (24, 24, 24, 24), 16, 256
    x, weight, bias, factors, core, lam = _tera_inputs(modes, rank, tokens)
    A, B = torch.randn(16, 576, requires_grad=True), torch.randn(576, 16, requires_grad=True)

    def flops(step):
        with FlopCounterMode(display=False) as counter:
            step().sum().backward()
        return counter.get_total_flops()

    ratio = flops(lambda: tera.tera_linear(x, weight, None, factors, core, lam, modes, 0.1, 0.0, True)) / flops(
        lambda: lora.lora_linear(x, weight, None, A, B, 0.1, 0.0, True))
    assert ratio < 1.25, ratio


@pytest.mark.parametrize("op", ["lora", "dora", "randlora", "tera_lora_form", "tera_merged"])
def test_a_trained_bias_gets_its_gradient_on_every_torch_path(op):
    """∂b = Σ_tokens ∂y, in the bias's own dtype, whatever the method (PEFT's bias="all", ReLoRA)."""
    from lrzoo.kernels import common, randlora, tera

    torch.manual_seed(0)
    d_in = d_out = 16
    x = torch.randn(2, 40, d_in)
    W, b = torch.randn(d_out, d_in), torch.randn(d_out, requires_grad=True)
    A, B, m = torch.randn(4, d_in), torch.randn(d_out, 4), torch.rand(d_out) + 0.5
    if op == "lora":
        out = lora.lora_linear(x, W, b, A, B, S)
    elif op == "dora":
        out = lora.dora_linear(x, W, b, A, B, m, S)
    elif op == "randlora":
        r, n = 4, 4
        out = randlora.randlora_linear(x, W, b, torch.randn(r, 1, d_in), torch.randn(d_out, n, r),
                                       torch.randn(r, n), torch.randn(n, d_in), S)
    else:  # rank 2 over (4, 4, 4, 4): Q = 4 takes the LoRA form; rank 4: Q = 16 = width merges W'
        rank = 2 if op == "tera_lora_form" else 4
        out = tera.tera_linear(x, W, b, torch.randn(4, 4, rank), torch.randn(rank, rank, rank, rank),
                               torch.randn(4, rank), (4, 4, 4, 4), S)
    grad_out = torch.randn_like(out)
    (grad_b,) = torch.autograd.grad((out * grad_out).sum(), [b])
    torch.testing.assert_close(grad_b, grad_out.sum((0, 1)), rtol=1e-5, atol=1e-5)
