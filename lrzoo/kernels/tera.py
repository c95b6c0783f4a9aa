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

from .common import materialize_wins
from .lora import lora_linear
from .registry import KernelEntry, register


def _kron_rows(mats: list[torch.Tensor]) -> torch.Tensor:
    """Row-wise Kronecker product: row (i_1..i_k) = U_1[i_1] ⊗ … ⊗ U_k[i_k] (row-major in both indices)."""
    out = mats[0]
    for mat in mats[1:]:
        out = (out[:, None, :, None] * mat[None, :, None, :]).reshape(out.shape[0] * mat.shape[0], -1)
    return out


def tera_factors(factors: torch.Tensor, core: torch.Tensor, lam: torch.Tensor, modes: tuple[int, ...],
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T = L·Gλ (d_out, Q), Rc (d_in, Q))`` in ``dtype``; T is differentiable in ``lam``.

    ``factors``: the shared ``(N, I_max, R)`` U_n; ``core``: the shared ``(R,)*N`` G; ``lam``: ``(N, R)``.
    """
    n_modes, rank = lam.shape
    k = n_modes // 2
    like = dict(device=lam.device, dtype=dtype)  # the shared tensors live on the tuner
    us = [factors[n, :size].to(**like) for n, size in enumerate(modes)]
    scaled = core.to(**like)
    for n in range(n_modes):  # G ⊙ λ_1 ∘ … ∘ λ_N, one mode at a time
        shape = [1] * n_modes
        shape[n] = rank
        scaled = scaled * lam[n].to(dtype).reshape(shape)
    q = rank ** k
    return _kron_rows(us[:k]) @ scaled.reshape(q, q), _kron_rows(us[k:])


def merge_wins(x: torch.Tensor, weight: torch.Tensor, rank_q: int, dropout_p: float, training: bool) -> bool:
    """Whether building ``W' = W + ΔW`` beats the rank-Q LoRA form for this call (never with dropout on x)."""
    if dropout_p > 0 and training:
        return False
    d_out, d_in = weight.shape
    return materialize_wins(x.numel() // d_in, d_in, d_out, rank_q, torch.is_grad_enabled())


def tera_linear(x, weight, bias, factors, core, lam, modes, scaling, dropout_p=0.0, training=False):
    """``x (W + ΔW)ᵀ + b`` (``x Wᵀ + drop(x) ΔWᵀ + b`` with dropout). The base weight is frozen; a trained
    bias gets its gradient."""
    T, Rc = tera_factors(factors, core, lam, tuple(modes), x.dtype)
    if not merge_wins(x, weight, T.shape[1], dropout_p, training):
        return lora_linear(x, weight, bias, Rc.t(), T, scaling, dropout_p, training)
    merged = weight.detach().to(x.dtype) + scaling * (T @ Rc.t())
    return F.linear(x, merged, None if bias is None else bias.to(x.dtype))


register(KernelEntry(op="tera_linear", reference=tera_linear, triton="triton_tera:tera_linear"))
