"""TeRA linear, torch path: ΔW as the rank-Q product it is, applied the cheaper of two ways.

TeRA's update (``lrzoo.methods.tera``) is ``ΔW = s·reshape(G ×_1 U_1Λ_1 ⋯ ×_N U_NΛ_N)`` with
``N = 2K`` modes, the first K splitting d_out and the last K splitting d_in. Grouping the row modes
and the column modes turns it into three matrices:

    L  = U_1 ⊙ … ⊙ U_K   (row-wise Kronecker)        (d_out, Q)    Q = R^K, frozen
    Rc = U_K+1 ⊙ … ⊙ U_N                              (d_in,  Q)    frozen
    Gλ = reshape(G ⊙ λ_1 ∘ … ∘ λ_N, (Q, Q))            trainable through the λ_n
    ΔW = s · (L Gλ) Rcᵀ = s · T Rcᵀ

so ΔW has rank ≤ Q however large d is. ``L`` and ``Rc`` are Kronecker products of the (I_n, R)
factors (the row-wise Kronecker of row vectors is the Kronecker product), so the torch path applies
them mode by mode and never builds them: ``y = x Wᵀ + s·((x·Rc)·Gλᵀ)·Lᵀ`` (:class:`TeraTuckerFunction`),
whose dense work is the Q×Q core, ``N·Q²`` per product, against ``N·d·Q`` for a product with the
dense ``Rc`` or ``T = L·Gλ``. Building ``W' = W + ΔW`` (``d_out·d_in·Q``) plus the weight-gradient GEMM
``dyᵀx`` wins only when Q nears the width and tokens are many (:func:`merged_form_wins`).
The Triton side is :mod:`lrzoo.kernels.triton_tera` (the fused LoRA kernel with ``A = Rcᵀ``, ``B = T``,
or a merge kernel; it picks with :func:`merge_wins`); the dispatch entry is at the bottom.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import (apply_mask, base_out, bias_grad, check_tensors, dropout_mask, flatten, materialize_wins,
                     remember_bias)
from .lora import lora_linear
from .registry import CheckCase, KernelEntry, register


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


def kron_apply(x2: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
    """``x2 · (M_1 ⊗ … ⊗ M_k)`` for ``x2: (N, Π rows)`` -> ``(N, Π cols)``, one mode at a time.

    Row-major in both indices, as :func:`_kron_rows` (``Rc = kron(U_K+1, …, U_N)``). The last mode is one
    GEMM over every token; each earlier one a batched ``(c_k × r_k)·(r_k × Π c_>k)`` product on contiguous
    views (no transposed copies). ``N·Σ_k (Π r_<k)·r_k·c_k·(Π c_>k)`` multiply-adds instead of ``N·Π r·Π c``
    for the dense product (x·Rc on a 576-wide layer with R = 16: 7.9 M against 75 M per 512 tokens).
    """
    n = x2.shape[0]
    rows = [mat.shape[0] for mat in mats]
    out = x2.reshape(-1, rows[-1]) @ mats[-1]
    trailing = mats[-1].shape[1]
    for k in range(len(mats) - 2, -1, -1):
        out = torch.matmul(mats[k].t(), out.reshape(-1, rows[k], trailing))
        trailing *= mats[k].shape[1]
    return out.reshape(n, -1)


def kron_cost(tokens: int, rows: tuple[int, ...], cols: tuple[int, ...]) -> int:
    """Multiply-adds of :func:`kron_apply` with factors of shapes ``(rows[k], cols[k])``."""
    return sum(tokens * math.prod(rows[:k]) * rows[k] * cols[k] * math.prod(cols[k + 1:]) for k in range(len(rows)))


def merged_form_wins(tokens: int, modes: tuple[int, ...], rank: int, training: bool) -> bool:
    """Whether the torch path should build ``W' = W + ΔW`` instead of the Tucker form, by multiply-add count.

    Tucker form (:class:`TeraTuckerFunction`): ``x·Rc`` and ``z·Lᵀ`` (and their transposes in the backward)
    one mode at a time, plus the Q×Q core, ``N·Q²`` once forward and once backward. Merged form (autograd):
    ``T = L·Gλ`` and ``T·Rcᵀ`` to build ΔW; in training also the weight-gradient GEMM ``dyᵀx`` and the two products back to ``Gλ``. The GEMM ``x·W'ᵀ`` (or ``x·Wᵀ``) and
    ``∂x = dy·W'`` are on both sides. The merged form only wins when Q nears the width and tokens are many.
    """
    k = len(modes) // 2
    rows, cols, q = modes[:k], modes[k:], rank ** k
    d_out, d_in = math.prod(rows), math.prod(cols)
    ranks = (rank,) * k
    if training:
        tucker = 2 * tokens * q * q + 2 * (kron_cost(tokens, cols, ranks) + kron_cost(tokens, rows, ranks))
        merged = tokens * d_out * d_in + 2 * d_out * d_in * q + 2 * d_out * q * q
    else:
        tucker = tokens * q * q + kron_cost(tokens, cols, ranks) + kron_cost(tokens, ranks, rows)
        merged = d_out * q * q + d_out * d_in * q
    return merged < tucker


def _outer(vectors) -> torch.Tensor:
    """``v_1 ⊗ … ⊗ v_k`` as a flat vector (row-major), from k − 1 outer products."""
    out = vectors[0]
    for vec in vectors[1:]:
        out = torch.outer(out, vec).reshape(-1)
    return out


def _outer_grad(grad: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``∂v_n`` of ``v_1 ⊗ … ⊗ v_k`` given its gradient (flat): ``grad`` contracted with every other ``v_m``.
    The leading modes are contracted once, in a running prefix, and each mode's trailing ones from it."""
    n_modes, rank = vectors.shape
    out = torch.empty_like(vectors)
    lead = grad
    for n in range(n_modes):
        rest = lead
        for m in range(n_modes - 1, n, -1):
            rest = rest.reshape(-1, rank) @ vectors[m]
        out[n] = rest
        if n < n_modes - 1:
            lead = vectors[n] @ lead.reshape(rank, -1)
    return out


def _tucker_parts(factors, core, lam, modes, dtype):
    """``(U_out, U_in, G)``: the frozen mode factors (views of the shared tensor, in ``dtype``) and the core
    as a (Q, Q) matrix, rows the output modes."""
    k = len(modes) // 2
    us = [factors[n, :size].to(device=lam.device, dtype=dtype) for n, size in enumerate(modes)]
    q = lam.shape[1] ** k
    return us[:k], us[k:], core.to(device=lam.device, dtype=dtype).reshape(q, q)


class TeraTuckerFunction(torch.autograd.Function):
    """``x Wᵀ + b + s·((drop(x)·Rc)·Gλᵀ)·Lᵀ``: ΔW applied through its Tucker structure.

    ``Rc = U_K+1 ⊗ … ⊗ U_N`` and ``L = U_1 ⊗ … ⊗ U_K`` are Kronecker products of the frozen mode factors, so
    ``x·Rc`` and ``z·Lᵀ`` run mode by mode (:func:`kron_apply`); neither they nor ``T = L·Gλ`` are ever built.
    ``Gλ = diag(λ_1 ⊗ … ⊗ λ_K)·G·diag(λ_K+1 ⊗ … ⊗ λ_N)``: the λ's of the row modes scale the columns of
    ``L`` (``U_k diag λ_k``), those of the column modes the core's columns, so no N×Q pass applies them.
    The dense work is the Q×Q core, ``N·Q²`` per product: once forward, ``z0 = xa·(G·diag s_in)ᵀ``, and once
    backward, ``w = (ĝ ⊙ s_out)·G`` with ``ĝ = s·dy·L``, which gives ``∂x = dy·W + drop((w ⊙ s_in)·Rcᵀ)``,
    ``∂s_in = Σ_N w ⊙ xa`` and, with the saved ``z0``, ``∂s_out = Σ_N ĝ ⊙ z0``; the λ's follow
    (:func:`_outer_grad`). Without ``z0``, ``∂s_out`` costs a second ``N·Q²`` product (``ĝᵀ·xa``).

    Before this, the rank-Q form multiplied by the dense ``Rc`` and ``T`` (``N·d·Q`` each, five times per step,
    plus ``d_out·Q²`` three times to build T); on SmolLM2-135M that was 1.6× LoRA's step time
    (docs/benchmarks.md). Saved: ``xa = drop(x)·Rc`` and ``z0`` (N×Q each; x instead of xa when Q > d_in,
    recomputing xa), the dropout mask, and the parameters (W, λ, the shared factors and core).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lam, factors, core, modes: tuple[int, ...], scaling: float, dropout_p: float,
                training: bool):
        x2 = flatten(x)
        k = len(modes) // 2
        u_out, u_in, g = _tucker_parts(factors, core, lam, modes, x2.dtype)
        lam_d = lam.to(x2.dtype)
        mask = dropout_mask(x2, dropout_p, training)
        xa = kron_apply(apply_mask(x2, mask, dropout_p), u_in)
        z0 = xa @ (g * _outer(lam_d[k:])).t()
        out = base_out(x2, weight.to(x2.dtype), bias)
        out.add_(kron_apply(z0, [(u * lam_d[n]).t() for n, u in enumerate(u_out)]), alpha=scaling)
        keep_x = g.shape[1] > x2.shape[1]
        need_lam = ctx.needs_input_grad[3]
        ctx.save_for_backward(x2 if keep_x and need_lam else None, None if keep_x and need_lam else xa,
                              z0 if need_lam else None, weight, lam, factors, core, mask)
        ctx.modes, ctx.scaling, ctx.dropout_p, ctx.x_shape, ctx.dtype = modes, scaling, dropout_p, x.shape, x2.dtype
        remember_bias(ctx, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, z0, weight, lam, factors, core, mask = ctx.saved_tensors
        s, p, dtype, modes = ctx.scaling, ctx.dropout_p, ctx.dtype, ctx.modes
        k = len(modes) // 2
        dy = flatten(grad_out).to(dtype)
        need_x, need_lam = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        lam_d = lam.to(dtype)
        u_out, u_in, g = _tucker_parts(factors, core, lam_d, modes, dtype)
        s_out, s_in = _outer(lam_d[:k]), _outer(lam_d[k:])
        g_hat = kron_apply(dy, u_out).mul_(s)  # s·dy·L: (N, Q)
        w = (g_hat * s_out) @ g  # ∂(xa ⊙ s_in)
        grad_x = grad_lam = None
        if need_lam:
            if xa is None:
                xa = kron_apply(apply_mask(x2, mask, p), u_in)
            grad_out_side = (g_hat * z0).sum(0)
            grad_in_side = (w * xa).sum(0)
            grad_lam = torch.cat([_outer_grad(grad_out_side, lam_d[:k]), _outer_grad(grad_in_side, lam_d[k:])]).to(lam.dtype)
        if need_x:
            back = kron_apply(w.mul_(s_in), [u.t() for u in u_in])
            grad_x = torch.addmm(apply_mask(back, mask, p), dy, weight.to(dtype)).reshape(ctx.x_shape)
        return grad_x, None, bias_grad(ctx, dy), grad_lam, None, None, None, None, None, None


def tera_linear(x, weight, bias, factors, core, lam, modes, scaling, dropout_p=0.0, training=False):
    """``x (W + ΔW)ᵀ + b`` (``x Wᵀ + drop(x) ΔWᵀ + b`` with dropout). The base weight is frozen; a trained
    bias gets its gradient.

    The Tucker form (:class:`TeraTuckerFunction`) unless building ``W'`` costs fewer multiply-adds
    (:func:`merged_form_wins`; never with dropout on x). Shared factors or a core that require a gradient
    (nothing in lrzoo trains them) go through plain autograd on ``T``, ``Rc``."""
    modes = tuple(modes)
    rank = lam.shape[1]
    tokens = x.numel() // max(x.shape[-1], 1)
    merged = not (dropout_p > 0 and training) and merged_form_wins(tokens, modes, rank, torch.is_grad_enabled())
    if not merged and not (torch.is_grad_enabled() and (factors.requires_grad or core.requires_grad)):
        return TeraTuckerFunction.apply(x, weight.detach(), bias, lam, factors, core, modes, float(scaling),
                                        float(dropout_p), bool(training))
    T, Rc = tera_factors(factors, core, lam, modes, x.dtype)
    if not merged:
        return lora_linear(x, weight, bias, Rc.t(), T, scaling, dropout_p, training)
    merged_w = weight.detach().to(x.dtype) + scaling * (T @ Rc.t())
    return F.linear(x, merged_w, None if bias is None else bias.to(x.dtype))


def _check(device: torch.device, dtype: torch.dtype) -> list[CheckCase]:
    """Both forms of the Triton side: Q = 4 on a 64-wide layer (the LoRA kernel with A = Rcᵀ, B = T) and
    Q = 16 on a 16-wide one (the merge kernel, ``merge_wins``), 40 tokens each."""
    cases = []
    for name, modes, rank in (("Q=4, 64→64, LoRA form", (8, 8, 8, 8), 2), ("Q=16, 16→16, merged W'", (4, 4, 4, 4), 4)):
        rand = check_tensors(device, dtype, seed=rank)
        f32 = torch.float32
        width = modes[0] * modes[1]
        inputs = dict(x=rand(2, 20, width), weight=rand(width, width, scale=0.2), bias=rand(width),
                      factors=rand(4, max(modes) + 2, rank, scale=0.5, dtype_=f32), core=rand(*(rank,) * 4, dtype_=f32),
                      lam=rand(4, rank, dtype_=f32), modes=modes, scaling=0.4)
        cases.append(CheckCase(name, inputs, ("x", "bias", "lam")))
    return cases


register(KernelEntry(op="tera_linear", reference=tera_linear, triton="triton_tera:tera_linear", check=_check))
