"""Triton LoRA and DoRA linears: the same math and signatures as :mod:`lrzoo.kernels.lora`.

The graph is split at the N×r tensor ``xa = drop(x) Aᵀ`` (LoRAFusion's split):

forward   ``xa = drop(x) Aᵀ``                       shrink, mask from a seed (never stored)
          ``y  = c ⊙ (x Wᵀ + s·xa Bᵀ) + b``         one GEMM; the expand is a K=r second
                                                     accumulator of the same tile (DoRA: c = m/‖W+sBA‖)
backward  ``ds = s·(dy⊙c) B``,  ``∂B = s·(dy⊙c)ᵀ xa``   two thin GEMMs over dy
          ``∂A = dsᵀ drop(x)``                        mask rebuilt from the seed
          ``∂x = (dy⊙c) W + drop(ds A)``              one GEMM, ds·A in its epilogue
          DoRA ``∂m = Σ_N dy ⊙ (x Wᵀ + s·xa Bᵀ) / n``  the forward GEMM re-run with a column-sum
                                                     epilogue (no N×d_out tensor written)

Saved: x (only when A trains), xa, and a seed. The r×r-core family reuses :func:`lora_linear`
with ``B' = B·C`` (see :func:`lrzoo.kernels.lora.fold_core`). The GEMM kernel itself is the shared
:func:`lrzoo.kernels.triton_common.fused_mm`; this file holds the autograd Function wiring it.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import bias_grad, remember_bias
from .lora import dora_weight_norm
from .triton_common import fused_mm, new_seed


def _dropout(seed: int, p: float, where: str, row_len: int) -> Optional[tuple]:
    return (where, seed, p, row_len) if p > 0 else None


class TritonLoraFunction(torch.autograd.Function):
    """LoRA (``magnitude=None``) or DoRA linear on the fused Triton GEMM."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float, training: bool):
        x2 = x.reshape(-1, x.shape[-1])
        d_in = x2.shape[1]
        p = dropout_p if training else 0.0
        seed = new_seed() if p > 0 else 0
        xa = fused_mm(x2, lora_A, dropout=_dropout(seed, p, "x", d_in))
        norm = colscale = None
        if magnitude is not None:
            norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
            colscale = magnitude.float() / norm
        out = fused_mm(x2, weight, low_rank=(xa, lora_B, scaling), colscale=colscale, bias=bias)
        keep_x = ctx.needs_input_grad[3] or magnitude is not None
        ctx.save_for_backward(x2 if keep_x else None, weight, lora_A, lora_B, magnitude, xa, norm)
        ctx.scaling, ctx.p, ctx.seed, ctx.x_shape = scaling, p, seed, x.shape
        remember_bias(ctx, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, lora_A, lora_B, magnitude, xa, norm = ctx.saved_tensors
        s, p, seed = ctx.scaling, ctx.p, ctx.seed
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(xa.dtype)
        d_in = weight.shape[1]
        need_x, need_A, need_B, need_m = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        g = None if magnitude is None else magnitude.float() / norm
        grad_x = grad_A = grad_B = grad_m = None
        if need_m:
            zsum = fused_mm(x2, weight, low_rank=(xa, lora_B, s), reduce_with=dy)
            grad_m = (zsum / norm).to(magnitude.dtype)
        ds = fused_mm(dy, lora_B.t(), alpha=s, kscale=g) if (need_x or need_A) else None  # (N, r)
        if need_B:
            grad_B = fused_mm(dy.t(), xa.t(), alpha=s, out_dtype=torch.float32)
            grad_B = (grad_B if g is None else grad_B * g[:, None]).to(lora_B.dtype)
        if need_A:
            grad_A = fused_mm(ds.t(), x2.t(), dropout=_dropout(seed, p, "w", d_in), out_dtype=torch.float32)
            grad_A = grad_A.to(lora_A.dtype)
        if need_x:
            grad_x = fused_mm(dy, weight.t(), kscale=g, low_rank=(ds, lora_A.t(), 1.0),
                              dropout=_dropout(seed, p, "low_rank", d_in))
            grad_x = grad_x.reshape(ctx.x_shape)
        return grad_x, None, bias_grad(ctx, dy), grad_A, grad_B, grad_m, None, None, None


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False):
    """Triton LoRA linear; same contract as :func:`lrzoo.kernels.lora.lora_linear`."""
    return TritonLoraFunction.apply(x, weight.detach(), bias, lora_A, lora_B, None, float(scaling), float(dropout_p),
                                    bool(training))


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, training=False):
    """Triton DoRA linear; same contract as :func:`lrzoo.kernels.lora.dora_linear`."""
    return TritonLoraFunction.apply(x, weight.detach(), bias, lora_A, lora_B, magnitude, float(scaling),
                                    float(dropout_p), bool(training))
