"""Triton TeRA linear. Same factorisation as :mod:`lrzoo.kernels.tera` (``ΔW = s·T·Rcᵀ``, rank Q):

* few tokens per weight or dropout: the Triton LoRA kernel with ``A = Rcᵀ`` and ``B = T`` (the
  rank-Q expand fused into the base GEMM, dropout mask recomputed from its seed);
* otherwise (Q near the layer width): one fused kernel writes ``W' = W + s·T·Rcᵀ`` once, in the
  activation dtype, and one GEMM applies it. Backward: ``∂x = dy·W'`` (W' merged again, not kept) and
  ``∂T = s·(dyᵀx)·Rc``; the λ gradients follow from ``T = L·Gλ`` by autograd on (Q, Q)-sized tensors.
  The autograd Function is the shared :class:`lrzoo.kernels.triton_common.MergedWeightFunction` with
  this file's merge kernel and contraction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import interpreter_on
from .tera import merge_wins, tera_factors
from .tiles import TERA_MERGE
from .triton_common import MergedWeightFunction, fused_mm
from .triton_lora import lora_linear as triton_lora_linear


def _tile() -> dict:
    """The interpreter's tile (few, large programs), else the checked one (lrzoo.kernels.tiles: no spills)."""
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_Q": 64, "num_warps": 4} if interpreter_on() else TERA_MERGE


@triton.jit
def _merge_kernel(w_ptr, t_ptr, rc_ptr, out_ptr, D_OUT, D_IN, Q, scaling,
                  stride_wm, stride_wn, stride_tm, stride_tq, stride_rn, stride_rq, stride_om, stride_on,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        rq = q0 + tl.arange(0, BLOCK_Q)
        t = tl.load(t_ptr + rm[:, None] * stride_tm + rq[None, :] * stride_tq,
                    mask=(rm < D_OUT)[:, None] & (rq < Q)[None, :], other=0.0).to(tl.float32)
        rc = tl.load(rc_ptr + rn[:, None] * stride_rn + rq[None, :] * stride_rq,
                     mask=(rn < D_IN)[:, None] & (rq < Q)[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(t, tl.trans(rc), input_precision="ieee")
    tile = (rm < D_OUT)[:, None] & (rn < D_IN)[None, :]
    w = tl.load(w_ptr + rm[:, None] * stride_wm + rn[None, :] * stride_wn, mask=tile, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
             (w + scaling * acc).to(out_ptr.dtype.element_ty), mask=tile)


def merged_weight(weight: torch.Tensor, T: torch.Tensor, Rc: torch.Tensor, scaling: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """``W + s·T·Rcᵀ`` as a new ``(d_out, d_in)`` tensor in ``dtype`` (one kernel; ΔW never stored)."""
    d_out, d_in = weight.shape
    out = torch.empty(d_out, d_in, device=weight.device, dtype=dtype)
    tile = _tile()
    _merge_kernel[(triton.cdiv(d_out, tile["BLOCK_M"]), triton.cdiv(d_in, tile["BLOCK_N"]))](
        weight, T, Rc, out, d_out, d_in, T.shape[1], float(scaling),
        *weight.stride(), *T.stride(), *Rc.stride(), *out.stride(), **tile,
    )
    return out


def contract_to_T(grad_w: torch.Tensor, factors: tuple, scaling: float, needs: tuple) -> tuple:
    """The merged-weight backward's contraction: ``(∂T = s·G·Rc, None)`` for ``(T, Rc)``, with ``G = dyᵀx``."""
    T, Rc = factors
    if not needs[0]:
        return None, None
    return (fused_mm(grad_w, Rc.float().t(), out_dtype=torch.float32) * scaling).to(T.dtype), None


def tera_linear(x, weight, bias, factors, core, lam, modes, scaling, dropout_p=0.0, training=False):
    """Triton TeRA linear; same contract as :func:`lrzoo.kernels.tera.tera_linear`."""
    T, Rc = tera_factors(factors, core, lam, tuple(modes), x.dtype)
    if not merge_wins(x, weight, T.shape[1], dropout_p, training, rebuilds=True):
        return triton_lora_linear(x, weight, bias, Rc.t(), T, scaling, dropout_p, training)
    return MergedWeightFunction.apply(x, weight.detach(), bias, float(scaling), merged_weight, contract_to_T, T,
                                      Rc.detach())
