"""RandLoRA linear, torch path: ΔW materialised once per call where that is cheaper than two thin GEMMs.

RandLoRA (arXiv 2502.00987) in PEFT's layout, with ``d = min(d_in, d_out)``, ``D = max(d_in, d_out)``,
``n = ⌈d/r⌉`` bases and ``P = n·r``:

    Af[(k, j), :] = λ[k, j] · A[k, :d] ⊙ γ[j, :]          (P, d)   k < r, j < n
    Bf            = B[:D, :n, :].reshape(D, P)            (D, P)   column j·r + k
    M  = Bf · Af                                          (D, d)
    ΔW = s·M if d_in ≤ d_out else s·Mᵀ                    (d_out, d_in)

``A: (r, 1, ≥d)`` and ``B: (≥D, ≥n, r)`` are PEFT's shared bases (sliced per layer). Note that ``Af``
is flattened over (k, j) and ``Bf`` over (j, k); PEFT pairs them that way, and checkpoints are only
interchangeable if lrzoo does the same.

Why materialise: PEFT applies ΔW as ``(x·firstᵀ)·secondᵀ``, two GEMMs of about the base GEMM's size
each (P ≈ d), so its forward + backward costs about 7 base GEMMs (U). With ``W' = W + ΔW`` built once
the layer costs: build ΔW (U·P/N), ``x·W'ᵀ`` (U), ``dX = dY·W'`` (U), ``dM = dYᵀ·x`` (U) and
``dAf = Bfᵀ·dM`` (U·P/N), and rebuild ΔW for ``dX`` (U·P/N): 3U + 3U·P/N, 4.5U at N = 2P. Saved for
backward: ``x`` only (and the parameters/bases), instead of PEFT's x, N×P product and P×d factor; ``W'``
is rebuilt in the backward rather than kept (see :class:`RandLoraLinearFunction`).
With few tokens (decoding) the two thin GEMMs are cheaper; :func:`lrzoo.kernels.common.materialize_wins`
picks by FLOPs. The Triton side is :mod:`lrzoo.kernels.triton_randlora`; the dispatch entry is at the bottom.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import apply_mask, bias_grad, check_tensors, dropout_mask, flatten, materialize_wins, remember_bias
from .registry import CheckCase, KernelEntry, register


class ScaledBasisFunction(torch.autograd.Function):
    """``Af = (λ[:, :, None] · A_k[:, None, :] · γ[None]).reshape(r·n, d)`` saving only λ, γ and A_k.

    Through plain autograd the second product saves its (r, n, d) left operand ``λ·A_k``, a P×d
    tensor per layer that is neither a parameter nor a basis (PEFT's ``UniqueBaseGrad`` keeps none):
    ~114 MiB on SmolLM2-135M's MLPs at r = 16. Here it is recomputed in the backward, with the same
    operations in the same order as autograd's, so values and gradients are bit-identical.
    """

    @staticmethod
    def forward(ctx, A_k, lam, gamma):
        ctx.save_for_backward(A_k, lam, gamma)
        r, n = lam.shape
        return (lam[:, :, None] * A_k[:, None, :] * gamma[None]).reshape(r * n, -1)

    @staticmethod
    def backward(ctx, grad_Af):
        A_k, lam, gamma = ctx.saved_tensors
        r, n = lam.shape
        grad_q = grad_Af.reshape(r, n, -1)
        grad_A = grad_lam = grad_gamma = None
        if ctx.needs_input_grad[2]:  # MulBackward of (λ·A_k)·γ, sum_to γ's (1, n, d)
            grad_gamma = (grad_q * (lam[:, :, None] * A_k[:, None, :])).sum(0)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_p = grad_q * gamma[None]
            if ctx.needs_input_grad[1]:  # MulBackward of λ·A_k, sum_to λ's (r, n, 1)
                grad_lam = (grad_p * A_k[:, None, :]).sum(2)
            if ctx.needs_input_grad[0]:
                grad_A = (grad_p * lam[:, :, None]).sum(1)
        return grad_A, grad_lam, grad_gamma


def randlora_factors(basis_A: torch.Tensor, basis_B: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor,
                     max_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Bf (D, P), Af (P, d), A_k (r, d))`` in ``dtype`` for one layer (differentiable in λ, γ).

    When autograd records, ``Af`` comes from :class:`ScaledBasisFunction`, which saves no
    intermediate (the bases are slices, or views, of the shared buffers: nothing is copied either).
    """
    r, n = lam.shape
    d = gamma.shape[1]
    A_k = basis_A[:r, 0, :d].to(dtype)
    lam_d, gamma_d = lam.to(dtype), gamma.to(dtype)
    if torch.is_grad_enabled() and (lam_d.requires_grad or gamma_d.requires_grad or A_k.requires_grad):
        Af = ScaledBasisFunction.apply(A_k, lam_d, gamma_d)
    else:
        Af = (lam_d[:, :, None] * A_k[:, None, :] * gamma_d[None]).reshape(r * n, d)
    Bf = basis_B[:max_dim, :n, :r].to(dtype).reshape(max_dim, n * r)
    return Bf, Af, A_k


def _update(basis_A, basis_B, lam, gamma, max_dim: int, dtype, scaling: float, in_is_min: bool):
    """``(ΔW (d_out, d_in), Bf, A_k)``, no autograd: the forward builds ΔW with it and the backward rebuilds
    it with it, by the same operations in the same order, so both see bit-identical values."""
    Bf, Af, A_k = randlora_factors(basis_A, basis_B, lam, gamma, max_dim, dtype)
    M = Bf @ Af
    return (M if in_is_min else M.t()).mul_(scaling), Bf, A_k


class RandLoraLinearFunction(torch.autograd.Function):
    """``x (W + ΔW)ᵀ + b`` (or ``x Wᵀ + drop(x) ΔWᵀ + b`` with dropout), ΔW built once, hand-written backward.

    Saved for the backward: x (and the dropout mask), plus the frozen weight, the shared bases and λ, γ,
    which are parameters or buffers, not activations. ``W'`` (or ΔW with dropout) is *not* kept: that was a
    d_out×d_in tensor per layer for the whole forward + backward, 1.12× PEFT's saved bytes end to end on
    SmolLM2-135M at 8×256 tokens (docs/benchmarks.md), where PEFT keeps a P×d factor instead. Keeping it
    on square layers only (the size of PEFT's factor there) was tried: 1.005× PEFT end to end, so no.

    The backward rebuilds ΔW from the factors for ``∂x = dy·W'``. The trade, measured per layer at N = 2048
    tokens on SmolLM2's widths (fp32, one CPU thread, fastest of 15; docs/benchmarks.md): rebuilding costs
    ``D·d·P`` multiply-adds, P/N of one base GEMM against about 3.2–3.6 for the layer's forward + backward, so
    +3% (192-wide, P = 192) to +8% (P = 576) in theory, +3–13% measured on a loaded machine. The alternative
    without rebuilding, ``∂x = dy·W + s·(dy·second)·first`` through the two thin factors, costs
    ``N·P·(d_in + d_out)`` instead, ≈ 2·P/d base GEMMs, and measured +38–53% on the same layers: it only
    wins below N ≈ D·d/(d_in + d_out), which is about where :func:`materialize_wins` already sends the
    layer to the factored path. Rebuilding also keeps ∂x bit-identical to the kept-``W'`` version.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, basis_A, basis_B, lam, gamma, scaling: float, in_is_min: bool,
                dropout_p: float, training: bool):
        x2 = flatten(x)
        dtype = x2.dtype
        with torch.no_grad():
            delta, _, _ = _update(basis_A, basis_B, lam, gamma, max(weight.shape), dtype, scaling, in_is_min)
        mask = dropout_mask(x2, dropout_p, training)
        W = weight.to(dtype)
        if mask is None:
            out = x2 @ delta.add_(W).t()  # W' = W + ΔW: one GEMM forward, one backward
        else:
            out = x2 @ W.t()
            out.addmm_(apply_mask(x2, mask, dropout_p), delta.t())
        del delta  # freed here: the backward rebuilds it (see the class docstring)
        if bias is not None:
            out.add_(bias.to(dtype))
        ctx.save_for_backward(x2, weight, basis_A, basis_B, lam, gamma, mask)
        ctx.scaling, ctx.in_is_min, ctx.dropout_p = scaling, in_is_min, dropout_p
        ctx.x_shape = x.shape
        remember_bias(ctx, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, basis_A, basis_B, lam, gamma, mask = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout_p
        dy = flatten(grad_out).to(x2.dtype)
        need_x, need_lam, need_gamma = (ctx.needs_input_grad[i] for i in (0, 5, 6))
        grad_x = grad_lam = grad_gamma = None
        Bf = A_k = None
        if need_x:
            # ΔW rebuilt (D·d·P, P/N of a base GEMM), bit-identical to the forward's; freed before dM below
            delta, Bf, A_k = _update(basis_A, basis_B, lam, gamma, max(weight.shape), dy.dtype, s, ctx.in_is_min)
            merged = delta.add_(weight.to(dy.dtype)) if mask is None else delta
            if mask is None:
                grad_x = dy @ merged
            else:
                grad_x = dy @ weight.to(dy.dtype) + apply_mask(dy @ merged, mask, p)
            del merged
            grad_x = grad_x.reshape(ctx.x_shape)
        if need_lam or need_gamma:
            xin = apply_mask(x2, mask, p)
            # dM = s·dΔW (or its transpose), then dAf = Bfᵀ·dM: two weight-sized GEMMs, no N×P tensor.
            dM = (dy.t() @ xin) if ctx.in_is_min else (xin.t() @ dy)
            if Bf is None:
                Bf, _, A_k = randlora_factors(basis_A, basis_B, lam, gamma, max(weight.shape), dy.dtype)
            r, n = lam.shape
            dAf = (Bf.t() @ dM).mul_(s).reshape(r, n, -1) * A_k[:, None, :]
            if need_lam:
                grad_lam = (dAf * gamma.to(dAf.dtype)[None]).sum(-1).to(lam.dtype)
            if need_gamma:
                grad_gamma = (dAf * lam.to(dAf.dtype)[:, :, None]).sum(0).to(gamma.dtype)
        return grad_x, None, bias_grad(ctx, dy), None, None, grad_lam, grad_gamma, None, None, None, None


def _factored(x, weight, bias, basis_A, basis_B, lam, gamma, scaling, in_is_min, dropout_p, training):
    """The low-token path: ``x Wᵀ + b + s·(drop(x)·firstᵀ)·secondᵀ`` through autograd."""
    Bf, Af, _ = randlora_factors(basis_A, basis_B, lam, gamma, max(weight.shape), x.dtype)
    first, second = (Af, Bf) if in_is_min else (Bf.t(), Af.t())
    dropped = torch.nn.functional.dropout(x, dropout_p, training) if dropout_p > 0 else x
    out = torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return out + scaling * ((dropped @ first.t()) @ second.t())


def randlora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    basis_A: torch.Tensor,
    basis_B: torch.Tensor,
    lam: torch.Tensor,
    gamma: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """RandLoRA linear, torch path: ``x (W + ΔW)ᵀ + b`` with ΔW as in the module docstring.

    Args:
        x: ``(..., d_in)``.
        weight: ``(d_out, d_in)`` (frozen); bias ``(d_out,)`` or ``None`` (gets its gradient when it trains).
        basis_A: shared ``(r, 1, ≥d)``; basis_B: shared ``(≥D, ≥n, r)`` (frozen).
        lam: ``(r, n)`` and gamma: ``(n, d)``, the trained diagonals.
        scaling: ``randlora_alpha / r``.
    """
    d_out, d_in = weight.shape
    in_is_min = d_in <= d_out
    r, n = lam.shape
    tokens = x.numel() // d_in
    args = (x, weight.detach(), bias, basis_A.detach(), basis_B.detach(),
            lam, gamma, float(scaling), in_is_min, float(dropout_p), bool(training))
    if materialize_wins(tokens, d_in, d_out, r * n, torch.is_grad_enabled(), rebuilds=True):
        return RandLoraLinearFunction.apply(*args)
    return _factored(*args)


def _triton_limits(x: torch.Tensor, dropout_p: float, training: bool) -> Optional[str]:
    if dropout_p > 0 and training:
        return "dropout (the fused RandLoRA kernel merges ΔW into W, which dropout on x forbids)"
    return None


def _check(device: torch.device, dtype: torch.dtype) -> list[CheckCase]:
    """64 tokens of a 48→64 layer, r = 16, n = 3: enough tokens that the Triton side merges W' with its kernel
    (``materialize_wins``), bases larger than the layer (sliced, strided), a bias; sizes multiples of 16."""
    rand = check_tensors(device, dtype)
    f32 = torch.float32
    inputs = dict(x=rand(2, 32, 48), weight=rand(64, 48, scale=0.2), bias=rand(64),
                  basis_A=rand(16, 1, 51, dtype_=f32), basis_B=rand(66, 4, 16, dtype_=f32), lam=rand(16, 3, dtype_=f32),
                  gamma=rand(3, 48, dtype_=f32), scaling=0.7)
    return [CheckCase("64 tokens, 48→64, merged W'", inputs, ("x", "bias", "lam", "gamma"))]


register(KernelEntry(op="randlora_linear", reference=randlora_linear, triton="triton_randlora:randlora_linear",
                     limits=_triton_limits, check=_check))
