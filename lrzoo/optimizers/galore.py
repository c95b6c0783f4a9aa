"""GaLore (Zhao et al., arXiv 2403.03507; jiaweizzhao/GaLore, PyPI ``galore-torch`` 1.0).

AdamW on the projected gradient R of each targeted weight, projected back and scaled by α:

    D = α · back(N),   N = M / (√V + ε),   M, V the Adam moments of R (see :mod:`.projector`)

Only R's moments (r·max(m, n) each) and P (r·min(m, n)) are kept per weight, against 2mn for AdamW;
the weight itself is updated in full. Defaults are those of HF transformers' ``optim="galore_adamw"``
(= the paper's C4 scripts): r 128, T 200, α 0.25.
"""

from __future__ import annotations

import torch

from .projector import ProjectedAdamW, project_back
from .registry import register_optimizer


class GaLoreAdamW(ProjectedAdamW):
    """GaLore-AdamW: projected groups step by α·back(N); other groups are AdamW (official conventions)."""

    def full_update(self, grad: torch.Tensor, low_rank_grad: torch.Tensor, normed: torch.Tensor,
                    state: dict, group: dict, side: str) -> torch.Tensor:
        return project_back(normed, state["projector"], side) * group["scale"]


register_optimizer(
    "galore",
    GaLoreAdamW,
    # HF transformers' galore_adamw defaults (trainer_optimizer.py), the C4 scripts' values.
    group_defaults={"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
    summary="GaLore: AdamW on the rank-r SVD projection of each weight's gradient, weights updated in full.",
)
