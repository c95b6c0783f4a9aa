"""Gradient projection shared by GaLore and Fira, and the AdamW that runs in the projected space.

For a 2-D weight W (m×n as stored) with gradient G and rank r (at most min(m, n)):

* ``right`` side: P = V_rᵀ (r×n) from G = U Σ Vᵀ; R = G Pᵀ (m×r); back(N) = N P (m×n).
* ``left`` side:  P = U_r (m×r);                  R = Pᵀ G (r×n); back(N) = P N (m×n).

``proj_type="std"`` keeps the longer dimension (right for m ≥ n, left for m < n), so the Adam
moments of R are r·max(m, n) each and P is r·min(m, n); ``reverse_std`` flips that rule,
``left``/``right`` force a side. The side is a function of W's shape and ``proj_type`` only.

P is refreshed from the SVD of the current raw gradient at t = 1, T+1, 2T+1, ... (T =
``update_proj_gap``); the moments are neither reset nor rotated then, as in the official code. The
SVD runs in fp32 (bf16, fp16 and fp64 gradients are cast, as in the official code) and P is stored
in the gradient's dtype.

:class:`ProjectedAdamW` is the AdamW both methods share: the official (HF transformers-style)
update, ε outside the bias correction and decoupled decay applied after the step,

    M ← β1 M + (1−β1) R,   V ← β2 V + (1−β2) R²,   N = M / (√V + ε)
    W ← W − lr·√(1−β2ᵗ)/(1−β1ᵗ) · D,   then   W ← W − lr·wd·W

with D = N for groups without ``rank`` and D = ``full_update(...)`` (the method's math) for
projected groups.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Mapping, Optional, Union

import torch

from .checks import check_adamw, check_group_lr, check_positive

#: The projection sides ``proj_type`` may ask for (the official two-sided ``full`` is not offered).
PROJ_TYPES = ("std", "reverse_std", "left", "right")

#: Keys every projected param group carries (a group without ``rank`` is plain AdamW).
GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")


def projection_side(shape: Union[torch.Size, tuple[int, int]], proj_type: str) -> str:
    """``"left"`` or ``"right"`` for a weight of ``shape`` (m, n) under ``proj_type``."""
    if proj_type in ("left", "right"):
        return proj_type
    tall = shape[0] >= shape[1]
    if proj_type == "std":
        return "right" if tall else "left"
    if proj_type == "reverse_std":
        return "left" if tall else "right"
    raise ValueError(f"proj_type={proj_type!r} is not supported; choose one of {', '.join(PROJ_TYPES)}.")


def orthonormal_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """P from the SVD of ``grad`` (m×n): ``V_rᵀ`` (r×n) for the right side, ``U_r`` (m×r) for the left.

    A copy of the r singular vectors, not a view: a view of the SVD's factor would keep all
    min(m, n) of them alive (the official code stores such a view). The copy keeps the factor's
    column-major layout (LAPACK's), so the matmuls with P round exactly as the official code's.
    """
    matrix = grad if grad.dtype == torch.float32 else grad.float()
    U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)
    basis = Vh[:rank] if side == "right" else U[:, :rank]
    return basis.t().to(dtype=grad.dtype, copy=True, memory_format=torch.contiguous_format).t()


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """R: ``G Pᵀ`` (m×r) on the right side, ``Pᵀ G`` (r×n) on the left."""
    return grad @ basis.t() if side == "right" else basis.t() @ grad


def project_back(low_rank: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """The m×n matrix of a low-rank one: ``N P`` on the right side, ``P N`` on the left."""
    return low_rank @ basis if side == "right" else basis @ low_rank


class ProjectedAdamW(torch.optim.Optimizer):
    """AdamW whose param groups with a ``rank`` key train their 2-D weights in a rank-r gradient subspace.

    A projected group carries ``rank`` (r), ``update_proj_gap`` (T), ``scale`` (α) and
    ``proj_type``; every other group is plain AdamW with the same conventions. Subclasses supply
    :meth:`full_update`. Per projected weight the state is ``step`` (int), ``projector`` (P),
    ``exp_avg`` and ``exp_avg_sq`` (the shape of R), all of it tensors or ints, so
    ``state_dict()`` round-trips through ``torch.save``/``torch.load(weights_only=True)``.
    """

    #: A method's own group options and their defaults (set by a subclass before ``__init__`` runs).
    method_defaults: dict = {}

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        weight_names: Optional[Mapping[int, str]] = None,
    ):
        """``weight_names`` (``id(weight)`` → its name in the model) only makes messages name the weights."""
        check_adamw(self._owner(), lr, betas, eps, weight_decay)
        self._weight_names = dict(weight_names or {})
        # The rank check runs once over every group after __init__ (one warning for the whole model),
        # then on each group added later.
        self._building = True
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **self.method_defaults)
        super().__init__(params, defaults)
        self._building = False
        self._check_groups(self.param_groups)

    @classmethod
    def _owner(cls) -> str:
        return cls.__name__

    def add_param_group(self, param_group: dict) -> None:
        owner = self._owner()
        if "rank" in param_group:
            missing = [key for key in GROUP_KEYS if key not in param_group]
            if missing:
                raise ValueError(f"A projected param group (one with 'rank') needs {', '.join(GROUP_KEYS)}; "
                                 f"missing: {', '.join(missing)}.")
            for key in ("rank", "update_proj_gap"):
                value = param_group[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{owner}: {key} must be a positive integer, got {value!r}.")
            check_positive(owner, "scale", param_group["scale"],
                           " It multiplies every projected update: < 0 reverses it, 0 trains nothing, NaN makes "
                           "every weight NaN (the official scripts use 0.25; the GLUE README 4).")
            projection_side((1, 1), param_group["proj_type"])
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            not_matrices = [tuple(p.shape) for p in params if p.dim() != 2]
            if not_matrices:
                raise ValueError(f"Projected param groups hold 2-D weights only; got shapes {not_matrices}. "
                                 "Put biases, norms and other tensors in a group without 'rank'.")
            param_group["params"] = params
        self.check_method_options(param_group)
        super().add_param_group(param_group)
        if not getattr(self, "_building", False):
            self._check_groups([self.param_groups[-1]])

    def check_method_options(self, param_group: dict) -> None:
        """A subclass's check of its own group options (before the defaults fill the group)."""

    def _check_groups(self, groups: list[dict]) -> None:
        check_group_lr(self._owner(), groups)
        self._check_ranks(groups)

    def _check_ranks(self, groups: list[dict]) -> None:
        """Refuse a rank that projects nothing away; warn (once) where it does so for some weights only.

        With r ≥ min(m, n), P spans the whole gradient: the weight is trained at full rank, as AdamW in a
        rotated basis, with more optimizer state than AdamW (moments r·max(m, n) each, plus P). If that holds
        for every projected weight the run is not GaLore/Fira at all, a sizing mistake: an error. If it holds
        for some small matrices among larger ones (a narrow k/v projection), the rest is still low-rank, and
        the user may have chosen the rank for those: a warning naming them.
        """
        projected = [(p, group["rank"]) for group in groups if "rank" in group for p in group["params"]]
        full = [(p, rank) for p, rank in projected if rank >= min(p.shape)]
        if not full:
            return
        rank = full[0][1]
        named = ", ".join(f"{self._weight_names.get(id(p), 'a weight')} ({p.shape[0]}×{p.shape[1]})"
                          for p, _ in full[:3]) + (", ..." if len(full) > 3 else "")
        if len(full) == len(projected):
            widest = max(min(p.shape) for p, _ in full)
            raise ValueError(
                f"{self._owner()}: rank={rank} is ≥ min(m, n) of every projected weight ({named}): nothing is "
                f"projected away, so this is full-rank AdamW in a rotated basis with more state than AdamW. "
                f"Choose rank < {widest}, or train with AdamW.")
        smallest = min(min(p.shape) for p, _ in full)
        warnings.warn(
            f"{self._owner()}: rank={rank} is ≥ min(m, n) of {len(full)} of the {len(projected)} projected weights "
            f"({named}): those are trained at full rank (their optimizer state is larger than AdamW's). Choose "
            f"rank < {smallest} to keep every weight low-rank, or leave them out of target_modules.",
            UserWarning, stacklevel=3)

    def new_projector(self, grad: torch.Tensor, state: dict, group: dict, side: str) -> torch.Tensor:
        """P at a refresh: GaLore's top-r singular vectors of ``grad`` (APOLLO draws a random one instead)."""
        return orthonormal_basis(grad, group["rank"], side)

    def full_update(self, grad: torch.Tensor, low_rank_grad: torch.Tensor, normed: torch.Tensor,
                    state: dict, group: dict, side: str) -> torch.Tensor:
        """The m×n update direction D of a projected weight.

        Args:
            grad: G, the raw gradient (m×n).
            low_rank_grad: R, its projection (m×r or r×n).
            normed: N = M/(√V + ε), Adam's step in the projected space (R's shape).
            state: the weight's optimizer state (``projector`` holds P).
            group: its param group (``scale`` holds α).
            side: ``"left"`` or ``"right"``.
        """
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            projected = "rank" in group
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients.")
                state = self.state[param]
                if "step" not in state:
                    state["step"] = 0
                low_rank_grad, side = grad, None
                if projected:
                    side = projection_side(param.shape, group["proj_type"])
                    if state["step"] % group["update_proj_gap"] == 0:
                        state["projector"] = self.new_projector(grad, state, group, side)
                    low_rank_grad = project(grad, state["projector"], side)
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(low_rank_grad)
                    state["exp_avg_sq"] = torch.zeros_like(low_rank_grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]

                exp_avg.mul_(beta1).add_(low_rank_grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(low_rank_grad, low_rank_grad, value=1.0 - beta2)
                normed = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                if projected:
                    normed = self.full_update(grad, low_rank_grad, normed, state, group, side)
                param.add_(normed, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    # Decoupled decay of the already-updated weight, with lr (not the step size).
                    param.add_(param, alpha=-group["lr"] * group["weight_decay"])
        return loss
