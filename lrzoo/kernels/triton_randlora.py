"""Triton RandLoRA linear: ``W' = W + s·ΔW`` built by one fused kernel, then one GEMM.

Same math and layout as :mod:`lrzoo.kernels.randlora` (``M = Bf·Af``, ``ΔW = s·M`` or its
transpose when ``d_in > d_out``). The merge kernel forms each (D×d) tile of M as ``Σ_c Bf[:, c]·Af[c]``
with the pieces of ``Af[c] = λ·A⊙γ`` gathered from the shared bases on the fly (neither ``Af`` nor
``Bf`` is materialised), adds W and writes ``W'`` once in the activation dtype.

backward  ``∂x = dy W'``                                     W' merged again (not kept), one GEMM
          ``G = dyᵀ x``                                       the weight-gradient-sized GEMM RandLoRA
                                                               cannot avoid (docs/benchmarks.md, limits)
          ``∂Af = s·Bfᵀ G`` contracted to ``∂λ = Σ_i ∂Af⊙A⊙γ``     one fused kernel per (product chunk,
          and ``∂γ = Σ_k ∂Af⊙λ⊙A``                              column tile): ∂Af stays in registers

Saved: x (the frozen W, the bases, λ and γ are parameters or buffers). W' is not kept from forward to
backward, as on the torch path: no d_out×d_in tensor per layer alive through the step. The autograd
Function is the shared :class:`lrzoo.kernels.triton_common.MergedWeightFunction` with this file's merge
and contraction.
Dropout and few-token calls take the torch path (the entry's ``limits`` in :mod:`lrzoo.kernels.randlora`,
and :func:`lrzoo.kernels.common.materialize_wins`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import interpreter_on
from .common import materialize_wins
from .randlora import randlora_linear as torch_randlora_linear
from .tiles import RANDLORA_DIAG, RANDLORA_MERGE
from .triton_common import MergedWeightFunction


#: the interpreter's tiles (programs run one after another: few, large ones); on a GPU the kernels launch with
#: their checked tiles (lrzoo.kernels.tiles: no spills on sm_80/sm_90). BLOCK_C chunks the P = n·r products in the
#: merge and tiles them in the ∂λ/∂γ kernel; rows of Af are gathered, so P need not be a multiple of it.
_INTERPRETER_TILE = {"BLOCK_C": 32, "BLOCK_D": 64, "BLOCK_d": 64, "num_warps": 4}


def _tile(production: dict) -> dict:
    return _INTERPRETER_TILE if interpreter_on() else production


# PEFT's pairing of the flattened factors: column ``c`` of Bf is ``B[:, c // r, c % r]``; row ``c`` of
# Af is ``λ[k, j]·A[k]⊙γ[j]`` with ``k = c // n``, ``j = c % n``. Both are gathered tile by tile.
@triton.jit
def _bf_tile(b_ptr, rD, rc, D, R, P, stride_bD, stride_bj, stride_bk):
    return tl.load(b_ptr + rD[:, None] * stride_bD + (rc // R)[None, :] * stride_bj + (rc % R)[None, :] * stride_bk,
                   mask=(rD < D)[:, None] & (rc < P)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _af_pieces(a_ptr, lam_ptr, gamma_ptr, rc, rd, d, NB, P, stride_ak, stride_ad, stride_lk, stride_lj, stride_gj,
               stride_gd):
    """``(A[k] tile, γ[j] tile, λ[k, j])`` for rows ``rc`` of Af and columns ``rd``."""
    k, j = rc // NB, rc % NB
    c_ok = rc < P
    tile = c_ok[:, None] & (rd < d)[None, :]
    a = tl.load(a_ptr + k[:, None] * stride_ak + rd[None, :] * stride_ad, mask=tile, other=0.0).to(tl.float32)
    g = tl.load(gamma_ptr + j[:, None] * stride_gj + rd[None, :] * stride_gd, mask=tile, other=0.0).to(tl.float32)
    lam = tl.load(lam_ptr + k * stride_lk + j * stride_lj, mask=c_ok, other=0.0).to(tl.float32)
    return a, g, lam


@triton.jit
def _merge_kernel(
    w_ptr, out_ptr, a_ptr, b_ptr, lam_ptr, gamma_ptr,
    D, d, R, NB, scaling,
    stride_wD, stride_wd, stride_oD, stride_od, stride_ak, stride_ad, stride_bD, stride_bj, stride_bk,
    stride_lk, stride_lj, stride_gj, stride_gd,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_d: tl.constexpr,
):
    rD = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    rd = tl.program_id(1) * BLOCK_d + tl.arange(0, BLOCK_d)
    P = R * NB
    acc = tl.zeros((BLOCK_D, BLOCK_d), dtype=tl.float32)
    for c0 in range(0, P, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        a, g, lam = _af_pieces(a_ptr, lam_ptr, gamma_ptr, rc, rd, d, NB, P, stride_ak, stride_ad, stride_lk,
                               stride_lj, stride_gj, stride_gd)
        bf = _bf_tile(b_ptr, rD, rc, D, R, P, stride_bD, stride_bj, stride_bk)
        acc += tl.dot(bf, lam[:, None] * a * g, input_precision="ieee")
    tile = (rD < D)[:, None] & (rd < d)[None, :]
    w = tl.load(w_ptr + rD[:, None] * stride_wD + rd[None, :] * stride_wd, mask=tile, other=0.0).to(tl.float32)
    tl.store(out_ptr + rD[:, None] * stride_oD + rd[None, :] * stride_od,
             (w + scaling * acc).to(out_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _diag_grad_kernel(
    g_ptr, a_ptr, b_ptr, lam_ptr, gamma_ptr, dlam_ptr, dgamma_ptr,
    D, d, R, NB, scaling,
    stride_gD, stride_gd, stride_ak, stride_ad, stride_bD, stride_bj, stride_bk,
    stride_lk, stride_lj, stride_gj, stride_gdd,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_d: tl.constexpr,
):
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rd = tl.program_id(1) * BLOCK_d + tl.arange(0, BLOCK_d)
    P = R * NB
    t = tl.zeros((BLOCK_C, BLOCK_d), dtype=tl.float32)  # rows rc of ∂Af/s = Bfᵀ·∂M, this column tile
    for D0 in range(0, D, BLOCK_D):
        rD = D0 + tl.arange(0, BLOCK_D)
        bf = _bf_tile(b_ptr, rD, rc, D, R, P, stride_bD, stride_bj, stride_bk)
        gm = tl.load(g_ptr + rD[:, None] * stride_gD + rd[None, :] * stride_gd,
                     mask=(rD < D)[:, None] & (rd < d)[None, :], other=0.0).to(tl.float32)
        t += tl.dot(tl.trans(bf), gm, input_precision="ieee")
    a, g, lam = _af_pieces(a_ptr, lam_ptr, gamma_ptr, rc, rd, d, NB, P, stride_ak, stride_ad, stride_lk, stride_lj,
                           stride_gj, stride_gdd)
    daf = scaling * t * a  # ∂Af ⊙ A: what ∂λ and ∂γ contract
    k, j = rc // NB, rc % NB
    c_ok = rc < P
    # several rows c share a λ entry's column j or a γ row: accumulate with atomics
    tl.atomic_add(dlam_ptr + k * stride_lk + j * stride_lj, tl.sum(daf * g, axis=1), mask=c_ok)
    tl.atomic_add(dgamma_ptr + j[:, None] * stride_gj + rd[None, :] * stride_gdd, daf * lam[:, None],
                  mask=c_ok[:, None] & (rd < d)[None, :])


def _bases(basis_A, basis_B, lam, gamma):
    r, n = lam.shape
    d = gamma.shape[1]
    return basis_A[:r, 0, :d], basis_B[:, :n, :r], r, n, d


def merged_weight(weight, basis_A, basis_B, lam, gamma, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """``W + s·ΔW`` as a new ``(d_out, d_in)`` tensor in ``dtype`` (one fused kernel)."""
    A, B, r, n, d = _bases(basis_A, basis_B, lam, gamma)
    d_out, d_in = weight.shape
    D = max(d_out, d_in)
    out = torch.empty(d_out, d_in, device=weight.device, dtype=dtype)
    # M is (D, d); stored as ΔW = M when d_in ≤ d_out, else as Mᵀ: swap the strides, not the data.
    w_s, o_s = (weight.stride(), out.stride()) if d_in <= d_out else (weight.stride()[::-1], out.stride()[::-1])
    tile = _tile(RANDLORA_MERGE)
    _merge_kernel[(triton.cdiv(D, tile["BLOCK_D"]), triton.cdiv(d, tile["BLOCK_d"]))](
        weight, out, A, B, lam, gamma, D, d, r, n, float(scaling),
        *w_s, *o_s, A.stride(0), A.stride(1), B.stride(0), B.stride(1), B.stride(2),
        lam.stride(0), lam.stride(1), gamma.stride(0), gamma.stride(1), **tile,
    )
    return out


def diag_grads(grad_w: torch.Tensor, basis_A, basis_B, lam, gamma, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂λ, ∂γ)`` from ``grad_w = ∂W' = dyᵀ x`` (d_out, d_in), in fp32."""
    lam, gamma = lam.contiguous(), gamma.contiguous()  # ∂λ, ∂γ are written with the same strides
    A, B, r, n, d = _bases(basis_A, basis_B, lam, gamma)
    d_out, d_in = grad_w.shape
    D = max(d_out, d_in)
    g_s = grad_w.stride() if d_in <= d_out else grad_w.stride()[::-1]
    dlam = torch.zeros(r, n, device=lam.device, dtype=torch.float32)
    dgamma = torch.zeros(n, d, device=gamma.device, dtype=torch.float32)
    tile = _tile(RANDLORA_DIAG)
    _diag_grad_kernel[(triton.cdiv(r * n, tile["BLOCK_C"]), triton.cdiv(d, tile["BLOCK_d"]))](
        grad_w, A, B, lam, gamma, dlam, dgamma, D, d, r, n, float(scaling),
        *g_s, A.stride(0), A.stride(1), B.stride(0), B.stride(1), B.stride(2),
        dlam.stride(0), dlam.stride(1), dgamma.stride(0), dgamma.stride(1), **tile,
    )
    return dlam, dgamma


def contract_diag_grads(grad_w: torch.Tensor, factors: tuple, scaling: float, needs: tuple) -> tuple:
    """The merged-weight backward's contraction: ``(None, None, ∂λ, ∂γ)`` for ``(basis_A, basis_B, λ, γ)``."""
    basis_A, basis_B, lam, gamma = factors
    dlam, dgamma = diag_grads(grad_w, basis_A, basis_B, lam, gamma, scaling)
    return None, None, dlam.to(lam.dtype) if needs[2] else None, dgamma.to(gamma.dtype) if needs[3] else None


def randlora_linear(x, weight, bias, basis_A, basis_B, lam, gamma, scaling, dropout_p=0.0, training=False):
    """Triton RandLoRA linear; same contract as :func:`lrzoo.kernels.randlora.randlora_linear`.

    With few tokens the two thin GEMMs beat building W' (by FLOPs): that case runs the torch path.
    """
    d_out, d_in = weight.shape
    r, n = lam.shape
    if not materialize_wins(x.numel() // d_in, d_in, d_out, r * n, torch.is_grad_enabled(), rebuilds=True):
        return torch_randlora_linear(x, weight, bias, basis_A, basis_B, lam, gamma, scaling, dropout_p, training)
    return MergedWeightFunction.apply(x, weight.detach(), bias, float(scaling), merged_weight, contract_diag_grads,
                                      basis_A.detach(), basis_B.detach(), lam, gamma)
