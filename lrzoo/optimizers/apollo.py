"""APOLLO and APOLLO-Mini (Zhu et al., arXiv 2412.05270; zhuhanqing/APOLLO, PyPI ``apollo-torch`` 1.0.3).

Adam's moments are kept for a *random* rank-r projection R of each targeted weight's gradient G, and are used
only to estimate how much Adam would rescale G: the update is the raw, full-size G times that factor.

    P ~ N(0, 1/r), redrawn at t = 1, T+1, 2T+1, ... from a seed per weight (right side r×n for m ≥ n,
                   left m×r for m < n, as GaLore's ``std``)
    N = M / (√V + ε)         the Adam moments of R, not bias-corrected (see :mod:`.projector`)
    φ = ‖N‖ / (‖R‖ + 1e-8)   per row of G (right side) or column (left) for ``scale_type="channel"``;
                             one number (Frobenius norms) for ``"tensor"``
    U = φ ⊙ G, then Fira's norm-growth limiter (γ = 1.01) unless ``disable_nl``, then U·√scale
                             (``scale_front``: √scale before the limiter; the limiter is scale-invariant up to
                             its 1e-8, so it changes rounding only)
    W ← W − lr·√(1−β2ᵗ)/(1−β1ᵗ)·U,   then   W ← W − lr·wd·W

APOLLO-Mini is the same optimizer at rank 1 with tensor-wise scaling and scale 128 (the README's and the
60M/130M scripts' values: the scale makes up for the tiny rank-1 factor).

Seeds as the official code: every parameter of every group is numbered 1, 2, ... in group order at
construction; weight i starts from seed i and, after each draw, moves to the 15th draw of ``randint(0, 2⁶³−1)``
from a CPU generator seeded with it. P is drawn in fp32 from a private generator on G's device (the global RNG
is untouched), so a CPU run and a CUDA run draw different P. The current seed is an int in the state, so a
reloaded optimizer draws the same P as one that never stopped.
"""

from __future__ import annotations

import math

import torch

from .checks import as_real
from .projector import ProjectedAdamW, orthonormal_basis
from .registry import register_optimizer

PROJECTIONS = ("random", "svd")
SCALE_TYPES = ("channel", "tensor")
#: Draws of randint(0, 2⁶³−1) per seed advance (the official ADV_DEFAULT).
SEED_ADVANCE = 15


def random_projection(shape: tuple[int, int], seed: int, device: torch.device) -> torch.Tensor:
    """An fp32 Gaussian matrix of ``shape`` with entries of variance 1/r (r the smaller side), from ``seed``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    rank = min(shape)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32) / math.sqrt(rank)


def next_seed(seed: int) -> int:
    """The seed after ``seed``: the last of 15 draws of randint(0, 2⁶³−1) from a CPU generator seeded with it."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (SEED_ADVANCE,), generator=generator).tolist()[-1]


class ApolloAdamW(ProjectedAdamW):
    """APOLLO-AdamW: projected groups step by the channel- or tensor-wise rescaled raw gradient; others are AdamW.

    Group options besides GaLore's (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``): ``proj``
    (``"random"``, the paper's; ``"svd"``, GaLore's projector) and ``scale_type`` (``"channel"``/``"tensor"``).
    ``scale_front`` and ``disable_nl`` are the official constructor's flags (here group options too).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, proj: str = "random", scale_type: str = "channel",
                 scale_front: bool = False, disable_nl: bool = False, weight_names=None):
        self.method_defaults = {"proj": proj, "scale_type": scale_type, "scale_front": scale_front,
                                "disable_nl": disable_nl}
        self._check_options(self.method_defaults)
        self._numbered = 0
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, weight_names=weight_names)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        # The official numbering: every parameter of every group in order, frozen ones counted too.
        for param in self.param_groups[-1]["params"]:
            self._numbered += 1
            if param.requires_grad:
                self.state[param]["seed"] = self._numbered

    def check_method_options(self, param_group: dict) -> None:
        self._check_options(param_group)

    @staticmethod
    def _check_options(options: dict) -> None:
        for key, allowed in (("proj", PROJECTIONS), ("scale_type", SCALE_TYPES)):
            if key in options and options[key] not in allowed:
                raise ValueError(f"ApolloAdamW: {key} must be one of {', '.join(allowed)}, got {options[key]!r}.")
        for key in ("scale_front", "disable_nl"):
            if key in options and not isinstance(as_real(options[key]), bool):
                raise ValueError(f"ApolloAdamW: {key} must be true or false, got {options[key]!r}.")

    def new_projector(self, grad: torch.Tensor, state: dict, group: dict, side: str) -> torch.Tensor:
        if group["proj"] == "svd":
            return orthonormal_basis(grad, group["rank"], side)
        m, n = grad.shape
        shape = (group["rank"], n) if side == "right" else (m, group["rank"])
        basis = random_projection(shape, state["seed"], grad.device)
        state["seed"] = next_seed(state["seed"])
        return basis if grad.dtype == torch.float32 else basis.to(grad.dtype)

    def full_update(self, grad: torch.Tensor, low_rank_grad: torch.Tensor, normed: torch.Tensor,
                    state: dict, group: dict, side: str) -> torch.Tensor:
        if group["scale_type"] == "channel":
            # along the rank axis: one factor per row of G (R is m×r) or per column (R is r×n)
            dim = 1 if side == "right" else 0
            factor = (torch.linalg.vector_norm(normed, dim=dim, keepdim=True)
                      / (torch.linalg.vector_norm(low_rank_grad, dim=dim, keepdim=True) + 1e-8))
        else:
            factor = torch.linalg.vector_norm(normed) / (torch.linalg.vector_norm(low_rank_grad) + 1e-8)
        update = grad * factor
        root_scale = math.sqrt(group["scale"])
        if group["scale_front"]:
            update *= root_scale
        if not group["disable_nl"]:
            norm = torch.linalg.vector_norm(update)
            if "update_norm" in state:
                limiter = torch.clamp(norm / (state["update_norm"] + 1e-8), min=1.01) / 1.01
                update = update / limiter
                norm = norm / limiter
            state["update_norm"] = norm
        if not group["scale_front"]:
            update *= root_scale
        return update


# HF transformers' optim="apollo_adamw" defaults (rank 128, random, channel, T 200, scale 1); the C4 scripts'
# 60M rank (130M: 192, 350M-7B: 256).
register_optimizer(
    "apollo",
    ApolloAdamW,
    group_defaults={"rank": 128, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std", "proj": "random",
                    "scale_type": "channel"},
    summary="APOLLO: the raw gradient rescaled channel-wise by Adam's factor estimated in a random rank-r space.",
)

# The README's APOLLO-Mini: rank 1, tensor-wise scaling, scale 128 (= d_model/4 at 60M, the scripts' value).
register_optimizer(
    "apollo_mini",
    ApolloAdamW,
    group_defaults={"rank": 1, "update_proj_gap": 200, "scale": 128.0, "proj_type": "std", "proj": "random",
                    "scale_type": "tensor"},
    summary="APOLLO-Mini: APOLLO at rank 1 with one tensor-wise scaling factor and scale 128 (SGD-sized state).",
)
