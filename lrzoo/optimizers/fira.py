"""Fira (Chen et al., arXiv 2410.01623; xichen-fy/Fira, PyPI ``fira`` 1.0.2).

GaLore's low-rank AdamW (:mod:`.galore`) plus the part of the gradient GaLore drops, rescaled the
way Adam rescaled the projected gradient:

    φ = ‖N‖ / (‖R‖ + 1e-8)       per row of R when it is m×r (right side), per column when r×n (left);
                                 N is not bias-corrected here
    S_t = φ ⊙ (G − α·back(R))    (for α ≠ 1 this keeps (1−α) of the in-subspace gradient, as the
                                 official code does)
    S_t ← S_t / (max(‖S_t‖ / (s_{t−1} + 1e-8), γ) / γ)  for t > 1 (norm-growth limiter, γ = 1.01);
                                 s_t = ‖S_t‖ after the limit (‖S_1‖ at the first step)
    D = α·back(N) + S_t

State per weight: GaLore's plus ``residual_norm`` (s_t, a 0-d tensor; ``scaling_grad`` in the
official code). Defaults: the C4 scripts for 60M-350M models (r 128 for 60M, T 200, α 0.25).
"""

from __future__ import annotations

import math

import torch

from .checks import as_real
from .projector import ProjectedAdamW, project_back
from .registry import register_optimizer


class FiraAdamW(ProjectedAdamW):
    """Fira-AdamW: GaLore's update plus the scaled, norm-limited residual of the gradient.

    ``norm_growth_limit`` is γ (1.01, hard-coded in the official code), a group option here.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, norm_growth_limit: float = 1.01, weight_names=None):
        self._check_limit(norm_growth_limit)
        self.method_defaults = {"norm_growth_limit": norm_growth_limit}
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, weight_names=weight_names)

    def check_method_options(self, param_group: dict) -> None:
        if "norm_growth_limit" in param_group:
            self._check_limit(param_group["norm_growth_limit"])

    @staticmethod
    def _check_limit(limit) -> None:
        value = as_real(limit)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
            raise ValueError(f"FiraAdamW: norm_growth_limit (γ) must be a finite number ≥ 1, got {limit!r} "
                             "(the residual's norm may grow by at most γ per step; the official γ is 1.01).")

    def full_update(self, grad: torch.Tensor, low_rank_grad: torch.Tensor, normed: torch.Tensor,
                    state: dict, group: dict, side: str) -> torch.Tensor:
        projector, scale = state["projector"], group["scale"]
        # φ: Adam's rescaling of each row (m×r) or column (r×n) of R, applied to the matching rows or
        # columns of W's residual: keepdim gives (m, 1) or (1, n), which broadcast over G.
        dim = 1 if side == "right" else 0
        phi = (torch.linalg.vector_norm(normed, dim=dim, keepdim=True)
               / (torch.linalg.vector_norm(low_rank_grad, dim=dim, keepdim=True) + 1e-8))
        residual = (grad - project_back(low_rank_grad, projector, side) * scale) * phi
        norm = torch.linalg.vector_norm(residual)
        if "residual_norm" in state:
            gamma = group["norm_growth_limit"]
            limiter = torch.clamp(norm / (state["residual_norm"] + 1e-8), min=gamma) / gamma
            residual = residual / limiter
            norm = norm / limiter
        state["residual_norm"] = norm
        return project_back(normed, projector, side) * scale + residual


register_optimizer(
    "fira",
    FiraAdamW,
    # The official C4 scripts (60M: rank 128, alpha 0.25; every size: update_proj_gap 200).
    group_defaults={"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
    summary="Fira: GaLore plus the gradient's out-of-subspace residual, scaled like Adam's step and norm-limited.",
)
