"""Matrix decompositions the adapters derive their frozen factors from, deterministic given W.

A trained core is only meaningful against the exact factors it was trained with, and
``frozen_factors="recomputed"`` rebuilds them from W at load time: every helper here returns the
same factors for the same W on any machine (float64, canonical signs).
"""

from __future__ import annotations

import torch


def top_singular_triplets(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U_r (d_out×r), S_r (r,), V_rᵀ (r×d_in)`` of ``weight`` in float64 with a canonical sign.

    Each singular vector pair is flipped so the largest-magnitude entry of ``u_i`` is positive;
    LAPACK's choice of sign differs across builds, and a trained core R is only meaningful
    against the exact factors it was trained with.
    """
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    pivot = U.abs().argmax(dim=0)
    signs = torch.sign(U[pivot, torch.arange(r)])
    signs[signs == 0] = 1
    return U * signs, S, Vh * signs[:, None]
