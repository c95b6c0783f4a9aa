"""TeRA linear, torch path: ΔW as the rank-Q product it is, applied the cheaper of two ways.

TeRA's update (``lrzoo.methods.tera``) is ``ΔW = s·reshape(G ×_1 U_1Λ_1 ⋯ ×_N U_NΛ_N)`` with
``N = 2K`` modes, the first K splitting d_out and the last K splitting d_in. Grouping the row modes
and the column modes turns it into three matrices:

    L  = U_1 ⊙ … ⊙ U_K   (row-wise Kronecker)        (d_out, Q)    Q = R^K, frozen
    Rc = U_K+1 ⊙ … ⊙ U_N                              (d_in,  Q)    frozen
    Gλ = reshape(G ⊙ λ_1 ∘ … ∘ λ_N, (Q, Q))            trainable through the λ_n
    ΔW = s · (L Gλ) Rcᵀ = s · T Rcᵀ

so ΔW has rank ≤ Q however large d is, and the layer is a LoRA with ``A = Rcᵀ`` (frozen) and
``B = T`` (trained through λ). Per step that costs two thin GEMMs of rank Q and no weight-sized
gradient, against building ``W' = W + ΔW`` (d_out·d_in·Q) plus the weight-gradient GEMM ``dyᵀx`` the
merged form needs for λ: the low-rank form wins unless Q approaches the layer width (large R or K).
:func:`lrzoo.kernels.common.materialize_wins` decides by multiply-add count, as for RandLoRA.
The Triton side is :mod:`lrzoo.kernels.triton_tera`; the dispatch entry is at the bottom.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import apply_mask, base_out, bias_grad, dropout_mask, flatten, materialize_wins, remember_bias
from .lora import lora_grads, lora_linear
from .registry import KernelEntry, register


def _kron_rows(mats: list[torch.Tensor]) -> torch.Tensor:
    """Row-wise Kronecker product: row (i_1..i_k) = U_1[i_1] ⊗ … ⊗ U_k[i_k] (row-major in both indices)."""
    out = mats[0]
    for mat in mats[1:]:
        out = (out[:, None, :, None] * mat[None, :, None, :]).reshape(out.shape[0] * mat.shape[0], -1)
    return out


class ScaledCoreFunction(torch.autograd.Function):
    """``G ⊙ λ_1 ∘ … ∘ λ_N`` (the core scaled mode by mode) saving only G and the λ, not N intermediates.

    Through plain autograd each of the N products keeps its R^N left operand for λ_n's gradient:
    with the default (16, 16, 16, 16) core that is 1 MiB per adapted layer, 158 MiB on SmolLM2-135M
    (docs/benchmarks.md). Here the prefix products are recomputed in the backward and the gradient is
    taken with the same operations in the same order as autograd's ``MulBackward`` chain, so values and
    gradients are bit-identical.
    """

    @staticmethod
    def forward(ctx, core, lam):
        ctx.save_for_backward(core, lam)
        return _scale_core(core, lam)[-1]

    @staticmethod
    def backward(ctx, grad_scaled):
        core, lam = ctx.saved_tensors
        prefixes = _scale_core(core, lam)  # prefixes[n] = G ⊙ λ_1 ∘ … ∘ λ_n
        grad_lam = torch.zeros_like(lam) if ctx.needs_input_grad[1] else None
        grad = grad_scaled
        for n in reversed(range(lam.shape[0])):  # d(prefix_n) = d(prefix_n+1) · λ_n+1, as MulBackward does
            factor = lam[n].reshape(_mode_shape(lam, n))
            if grad_lam is not None:
                grad_lam[n] = (grad * prefixes[n]).sum_to_size(factor.shape).reshape(-1)
            grad = grad * factor
        return (grad if ctx.needs_input_grad[0] else None), grad_lam


class KronRowsProductFunction(torch.autograd.Function):
    """``T = (U_1 ⊙ … ⊙ U_K)·Gλ`` saving the frozen U_k (views of the shared factors), not their product L.

    Through autograd the GEMM keeps L, a (d_out, Q) tensor per adapted layer built from frozen factors
    (~159 MiB on SmolLM2-135M with Q = 256); rebuilding it in the backward costs d_out·Q multiplies,
    nothing next to the layer's GEMMs. ``∂Gλ = Lᵀ·∂T`` is the product autograd's ``MmBackward`` takes.
    """

    @staticmethod
    def forward(ctx, scaled, *us):
        ctx.save_for_backward(*us)
        return _kron_rows(list(us)) @ scaled

    @staticmethod
    def backward(ctx, grad_t):
        left = _kron_rows(list(ctx.saved_tensors))
        return (left.t() @ grad_t, *(None for _ in ctx.saved_tensors))


def _mode_shape(lam: torch.Tensor, n: int) -> list[int]:
    shape = [1] * lam.shape[0]
    shape[n] = lam.shape[1]
    return shape


def _scale_core(core: torch.Tensor, lam: torch.Tensor) -> list[torch.Tensor]:
    """``[G, G ⊙ λ_1, …, G ⊙ λ_1 ∘ … ∘ λ_N]``: the products autograd would record, one mode at a time."""
    prefixes = [core]
    for n in range(lam.shape[0]):
        prefixes.append(prefixes[-1] * lam[n].reshape(_mode_shape(lam, n)))
    return prefixes


def tera_factors(factors: torch.Tensor, core: torch.Tensor, lam: torch.Tensor, modes: tuple[int, ...],
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T = L·Gλ (d_out, Q), Rc (d_in, Q))`` in ``dtype``; T is differentiable in ``lam``.

    ``factors``: the shared ``(N, I_max, R)`` U_n; ``core``: the shared ``(R,)*N`` G; ``lam``: ``(N, R)``.
    """
    n_modes, rank = lam.shape
    k = n_modes // 2
    like = dict(device=lam.device, dtype=dtype)  # the shared tensors live on the tuner
    us = [factors[n, :size].to(**like) for n, size in enumerate(modes)]
    core_d, lam_d = core.to(**like), lam.to(dtype)
    if torch.is_grad_enabled() and (lam_d.requires_grad or core_d.requires_grad):
        scaled = ScaledCoreFunction.apply(core_d, lam_d)
    else:
        scaled = _scale_core(core_d, lam_d)[-1]
    q = rank ** k
    if scaled.requires_grad and not any(u.requires_grad for u in us[:k]):
        return KronRowsProductFunction.apply(scaled.reshape(q, q), *us[:k]), _kron_rows(us[k:])
    return _kron_rows(us[:k]) @ scaled.reshape(q, q), _kron_rows(us[k:])


def merge_wins(x: torch.Tensor, weight: torch.Tensor, rank_q: int, dropout_p: float, training: bool,
               rebuilds: bool = False) -> bool:
    """Whether building ``W' = W + ΔW`` beats the rank-Q LoRA form for this call (never with dropout on x);
    ``rebuilds``: the merged path builds W' again in the backward (the Triton one) instead of keeping it."""
    if dropout_p > 0 and training:
        return False
    d_out, d_in = weight.shape
    return materialize_wins(x.numel() // d_in, d_in, d_out, rank_q, torch.is_grad_enabled(), rebuilds)


class TeraLowRankFunction(torch.autograd.Function):
    """The rank-Q form ``x Wᵀ + b + s·(drop(x)·Rc)·Tᵀ`` keeping only ``xa = drop(x)·Rc`` (N×Q) and λ.

    Through :func:`lora_linear` with ``A = Rcᵀ, B = T`` the backward kept T (d_out×Q) and Rc (d_in×Q),
    tensors built from λ and the shared factors on every call: ~300 MiB on SmolLM2-135M (Q = 256), where
    LoRA's A and B are parameters. Here both are rebuilt in the backward (a few small GEMMs against the
    layer's N-sized ones) and ``∂λ`` flows through the rebuilt T by autograd, with the same operations
    as :func:`lora_linear`'s backward, so values and gradients are those of the ``lora_linear`` form.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lam, factors, core, modes: tuple[int, ...], scaling: float, dropout_p: float,
                training: bool):
        x2 = flatten(x)
        T, Rc = tera_factors(factors, core, lam, modes, x2.dtype)  # no graph: forward runs without grad
        mask = dropout_mask(x2, dropout_p, training)
        xa = apply_mask(x2, mask, dropout_p) @ Rc
        out = base_out(x2, weight.to(x2.dtype), bias)
        out.addmm_(xa, T.t(), alpha=scaling)
        ctx.save_for_backward(weight, lam, factors, core, xa, mask)
        ctx.modes, ctx.scaling, ctx.dropout_p, ctx.x_shape = modes, scaling, dropout_p, x.shape
        remember_bias(ctx, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        weight, lam, factors, core, xa, mask = ctx.saved_tensors
        dy = flatten(grad_out).to(xa.dtype)
        need_x, need_lam = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        with torch.enable_grad():
            lam_ = lam.detach().requires_grad_(need_lam)
            T, Rc = tera_factors(factors, core, lam_, ctx.modes, dy.dtype)
        # LoRA's backward with A = Rcᵀ (frozen) and B = T; ∂T then flows into λ through the rebuilt T
        grad_x, _, grad_T = lora_grads(ctx, dy, None, weight.to(dy.dtype), Rc.t(), T.detach(), xa, mask,
                                       needs=(need_x, False, need_lam))
        grad_lam = torch.autograd.grad(T, lam_, grad_T)[0] if need_lam else None
        return grad_x, None, bias_grad(ctx, dy), grad_lam, None, None, None, None, None, None


def tera_linear(x, weight, bias, factors, core, lam, modes, scaling, dropout_p=0.0, training=False):
    """``x (W + ΔW)ᵀ + b`` (``x Wᵀ + drop(x) ΔWᵀ + b`` with dropout). The base weight is frozen; a trained
    bias gets its gradient."""
    modes = tuple(modes)
    rank_q = lam.shape[1] ** (lam.shape[0] // 2)
    low_rank = not merge_wins(x, weight, rank_q, dropout_p, training)
    if low_rank and torch.is_grad_enabled() and lam.requires_grad and not (factors.requires_grad or core.requires_grad):
        return TeraLowRankFunction.apply(x, weight.detach(), bias, lam, factors, core, modes, float(scaling),
                                         float(dropout_p), bool(training))
    T, Rc = tera_factors(factors, core, lam, modes, x.dtype)
    if low_rank:
        return lora_linear(x, weight, bias, Rc.t(), T, scaling, dropout_p, training)
    merged = weight.detach().to(x.dtype) + scaling * (T @ Rc.t())
    return F.linear(x, merged, None if bias is None else bias.to(x.dtype))


register(KernelEntry(op="tera_linear", reference=tera_linear, triton="triton_tera:tera_linear"))
