"""LoRA-family kernels, torch path: LoRA, DoRA and the r×r-core linears, with hand-written backward passes.

These are the ``torch`` backend and the reference the Triton side (:mod:`lrzoo.kernels.triton_lora`)
is tested against; the dispatch entries of ``lora_linear`` and ``dora_linear`` are declared at the
bottom. They beat PEFT's eager modules by saving less and fusing the adds into GEMMs:

* **LoRA** ``y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ``: the expand is an ``addmm_`` into the base output
  (no N×d_out temporary for the branch, no separate scale pass). Saved: ``x``, the N×r tensor
  ``xa = drop(x) Aᵀ`` and, with dropout, a 1-byte mask (PEFT keeps the dropped copy of x).
* **DoRA** ``y = g ⊙ (x Wᵀ + s·xa Bᵀ) + b`` with ``g = m / ‖W + sBA‖_row`` (norm detached, fp32,
  clamped by ``DORA_EPS``): the row norm is computed from ``W Aᵀ`` and ``A Aᵀ`` so ``B·A`` is never
  formed, and only ``x`` and ``xa`` are saved; the base product needed by ``∂m`` is recomputed in
  the backward (one extra GEMM) instead of keeping two N×d_out tensors alive like PEFT does.

Shapes: ``x: (..., d_in)``, ``W: (d_out, d_in)``, ``A: (r, d_in)``, ``B: (d_out, r)``, ``m: (d_out,)``.
Matmuls run in the activation dtype; adapter gradients are returned in the parameters' dtype.
The r×r-core family (:func:`core_linear`) has no entry of its own: it folds its core into B
(:func:`fold_core`) and runs ``lora_linear``'s.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import DORA_EPS, apply_mask, base_out, bias_grad, check_tensors, dropout_mask, flatten, remember_bias
from .registry import CheckCase, KernelEntry, register


def lora_grads(ctx, dz, x2, weight, lora_A, lora_B, xa, mask, needs=None):
    """``(∂x, ∂A, ∂B)`` of ``z = x Wᵀ + s·(drop(x) Aᵀ) Bᵀ`` given ``∂z: (N, d_out)``, each ``None`` where
    ``needs`` (default ``ctx.needs_input_grad`` at x 0, A 3, B 4) does not ask for it. Reads x only for ∂A.
    ``ctx`` carries ``scaling``, ``dropout_p`` and ``x_shape`` (TeRA's low-rank Function reuses it, A = Rcᵀ)."""
    s, p = ctx.scaling, ctx.dropout_p
    need_x, need_A, need_B = needs if needs is not None else (ctx.needs_input_grad[i] for i in (0, 3, 4))
    A, B = lora_A.to(dz.dtype), lora_B.to(dz.dtype)
    ds = (dz @ B) * s if (need_x or need_A) else None  # (N, r): grad of xa
    grad_x = grad_A = grad_B = None
    if need_B:
        grad_B = (dz.t() @ xa).mul_(s).to(lora_B.dtype)
    if need_A:
        grad_A = (ds.t() @ apply_mask(x2, mask, p)).to(lora_A.dtype)
    if need_x:
        if mask is None:
            grad_x = torch.addmm(dz @ weight, ds, A)
        else:
            grad_x = dz @ weight + apply_mask(ds @ A, mask, p)
        grad_x = grad_x.reshape(ctx.x_shape)
    return grad_x, grad_A, grad_B


class LoraLinearFunction(torch.autograd.Function):
    """``x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` with a backward that reuses the saved ``xa``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, training: bool):
        x2 = flatten(x)
        mask = dropout_mask(x2, dropout_p, training)
        A = lora_A.to(x2.dtype)
        B = lora_B.to(x2.dtype)
        xa = apply_mask(x2, mask, dropout_p) @ A.t()
        out = base_out(x2, weight.to(x2.dtype), bias)
        out.addmm_(xa, B.t(), alpha=scaling)
        # x is needed only for ∂A; a frozen A (the r×r-core family) keeps just the N×r tensor xa.
        ctx.save_for_backward(x2 if ctx.needs_input_grad[3] else None, weight, lora_A, lora_B, xa, mask)
        ctx.scaling, ctx.dropout_p, ctx.x_shape = scaling, dropout_p, x.shape
        remember_bias(ctx, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, lora_A, lora_B, xa, mask = ctx.saved_tensors
        dy = flatten(grad_out).to(xa.dtype)
        grad_x, grad_A, grad_B = lora_grads(ctx, dy, x2, weight.to(dy.dtype), lora_A, lora_B, xa, mask)
        return grad_x, None, bias_grad(ctx, dy), grad_A, grad_B, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """LoRA linear, torch path. The base weight is frozen; the bias gets its gradient when it trains."""
    return LoraLinearFunction.apply(x, weight.detach(), bias, lora_A, lora_B, float(scaling), float(dropout_p),
                                    bool(training))


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``‖W + s·B A‖`` per output row in fp32, without forming ``B A``, clamped at ``DORA_EPS``.

    ``‖W_i + s B_i A‖² = ‖W_i‖² + 2s·B_i·(W Aᵀ)_i + s²·B_i (A Aᵀ) B_iᵀ``: one read of W and an r×r
    Gram matrix instead of a d_out×d_in temporary. Detached, as in DoRA §4.3.
    """
    with torch.no_grad():
        W = weight.float()
        A = lora_A.float()
        B = lora_B.float()
        sq = W.square().sum(1)
        sq += (2.0 * scaling) * (B * (W @ A.t())).sum(1)
        sq += (scaling * scaling) * ((B @ (A @ A.t())) * B).sum(1)
        return sq.clamp_min(0.0).sqrt().clamp_min(DORA_EPS)


class DoraLinearFunction(torch.autograd.Function):
    """``g ⊙ (x Wᵀ + s·xa Bᵀ) + b`` with ``g = m / n`` and a detached row norm ``n``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float, training: bool):
        x2 = flatten(x)
        mask = dropout_mask(x2, dropout_p, training)
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
        g = (magnitude.float() / norm).to(x2.dtype)
        A = lora_A.to(x2.dtype)
        B = lora_B.to(x2.dtype)
        W = weight.to(x2.dtype)
        xa = apply_mask(x2, mask, dropout_p) @ A.t()
        out = x2 @ W.t()
        out.addmm_(xa, B.t(), alpha=scaling)
        out.mul_(g)
        if bias is not None:
            out.add_(bias.to(out.dtype))
        ctx.save_for_backward(x2, weight, lora_A, lora_B, magnitude, xa, mask, norm)
        ctx.scaling, ctx.dropout_p, ctx.x_shape = scaling, dropout_p, x.shape
        remember_bias(ctx, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, lora_A, lora_B, magnitude, xa, mask, norm = ctx.saved_tensors
        s = ctx.scaling
        dy = flatten(grad_out).to(x2.dtype)
        W, B = weight.to(dy.dtype), lora_B.to(dy.dtype)
        g = (magnitude.float() / norm).to(dy.dtype)
        need_m = ctx.needs_input_grad[5]
        grad_m = None
        if need_m:
            # ∂m_j = Σ_N dy_Nj z_Nj / n_j with z = x Wᵀ + s·xa Bᵀ. The base product is recomputed
            # (one GEMM) rather than saved; the low-rank part folds into the r-wide product dyᵀ·xa.
            dyt_xa = dy.t() @ xa
            zsum = (dy * (x2 @ W.t())).sum(0, dtype=torch.float32) + s * (dyt_xa.float() * B.float()).sum(1)
            grad_m = (zsum / norm).to(magnitude.dtype)
        # z's gradient is dy scaled per output channel; from there the grads are LoRA's.
        grad_x, grad_A, grad_B = lora_grads(ctx, dy * g, x2, W, lora_A, lora_B, xa, mask)
        return grad_x, None, bias_grad(ctx, dy), grad_A, grad_B, grad_m, None, None, None


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """DoRA linear, torch path (weight frozen; the bias gets its gradient when it trains)."""
    return DoraLinearFunction.apply(x, weight.detach(), bias, lora_A, lora_B, magnitude, float(scaling),
                                    float(dropout_p), bool(training))


def fold_core(lora_B: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """``B' = B C`` (``B ⊙ c`` for a diagonal core ``c: (r,)``): a differentiable d_out×r product.

    ``s·((x Aᵀ) Cᵀ) Bᵀ = s·(x Aᵀ)(B C)ᵀ``, so the r×r-core family runs on the LoRA function with B'
    and autograd carries ``∂B'`` (``s·dyᵀ xa``, built from the saved N×r tensor) to
    ``∂C = Bᵀ ∂B'`` in O(d_out·r²). Nothing N-sized is added, and x is not needed unless A trains.
    """
    if core.dim() not in (1, 2) or core.shape[0] != lora_B.shape[1]:
        raise ValueError(f"core of shape {tuple(core.shape)} does not fit B {tuple(lora_B.shape)}: expected an "
                         f"({lora_B.shape[1]}, r') matrix or a ({lora_B.shape[1]},) diagonal.")
    core = core.to(lora_B.dtype)
    return lora_B * core if core.dim() == 1 else lora_B @ core


def core_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    core: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """r×r-core linear, torch path: ``x Wᵀ + b + s·((drop(x) Aᵀ) Cᵀ) Bᵀ`` (LoRA-XS/SB, FLoRA, LoLDU, SVFit).

    Shapes: ``x: (..., d_in)``, ``W: (d_out, d_in)``, ``A: (r', d_in)``, ``core: (r, r')`` or a
    diagonal ``(r,)``, ``B: (d_out, r)``. Saved: the N×r tensor ``xa`` (plus a dropout mask); x
    only when A requires a gradient (FLoRA trains A and B, the others train the core alone).
    """
    return lora_linear(x, weight, bias, lora_A, fold_core(lora_B, core), scaling, dropout_p, training)


def _lora_check_inputs(device: torch.device, dtype: torch.dtype) -> dict:
    """Batch dims, d_out < d_in, a bias; adapter tensors in fp32. Sizes are multiples of 16, as in real
    models, so a GPU compiles the kernels with the specialisations real calls use (odd sizes and edge
    masks are the interpreter tests' job)."""
    rand = check_tensors(device, dtype)
    return dict(x=rand(2, 24, 64), weight=rand(48, 64, scale=0.2), bias=rand(48),
                lora_A=rand(16, 64, scale=0.3, dtype_=torch.float32), lora_B=rand(48, 16, scale=0.3, dtype_=torch.float32),
                scaling=1.5)


def _lora_check(device: torch.device, dtype: torch.dtype) -> list[CheckCase]:
    return [CheckCase("48 tokens, 64→48, r=16", _lora_check_inputs(device, dtype), ("x", "bias", "lora_A", "lora_B"))]


def _dora_check(device: torch.device, dtype: torch.dtype) -> list[CheckCase]:
    inputs = _lora_check_inputs(device, dtype)
    inputs["magnitude"] = check_tensors(device, torch.float32, seed=1)(48).abs() + 0.5
    return [CheckCase("48 tokens, 64→48, r=16", inputs, ("x", "bias", "lora_A", "lora_B", "magnitude"))]


register(KernelEntry(op="lora_linear", reference=lora_linear, triton="triton_lora:lora_linear", check=_lora_check))
register(KernelEntry(op="dora_linear", reference=dora_linear, triton="triton_lora:dora_linear", check=_dora_check))
