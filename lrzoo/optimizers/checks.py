"""Checks of optimizer options: a one-line error naming the option and its valid range.

A bad option does not crash an optimizer, it trains wrong: ``scale=-1`` reverses every projected update,
``scale=nan`` (or a NaN ``lr``, ``eps``, β) makes every weight NaN at the first step, ``eps=0`` divides 0 by 0
where a gradient entry is exactly 0, and ``lr·weight_decay ≥ 1`` flips or zeroes every weight each step.
So every low-rank optimizer (GaLore, Fira, LoRA-Pro) checks its options when it is built.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import torch


def as_real(value: Any) -> Any:
    """``value`` as a Python number when it is one (a one-element tensor too), else unchanged."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _is_finite_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(owner: str, name: str, value: Any, why: str = "") -> None:
    """Refuse anything but a finite number > 0."""
    value = as_real(value)
    if not _is_finite_real(value) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}.{why}")


def check_nonnegative(owner: str, name: str, value: Any, why: str = "") -> None:
    """Refuse anything but a finite number ≥ 0."""
    value = as_real(value)
    if not _is_finite_real(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite number ≥ 0, got {value!r}.{why}")


def check_betas(owner: str, betas: Any) -> None:
    """Two finite numbers in [0, 1)."""
    try:
        values = [as_real(b) for b in betas]
    except TypeError:
        values = []
    if len(values) != 2 or not all(_is_finite_real(b) and 0 <= b < 1 for b in values):
        raise ValueError(f"{owner}: betas must be two numbers in [0, 1) (β1, β2), got {betas!r}.")


def check_adamw(owner: str, lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """The AdamW options every low-rank optimizer shares."""
    check_positive(owner, "lr", lr, " An lr of 0 trains nothing.")
    check_betas(owner, betas)
    check_positive(owner, "eps", eps, " eps = 0 divides 0 by 0 where a gradient entry is exactly 0; AdamW's is 1e-8.")
    check_decay(owner, lr, weight_decay)


def check_decay(owner: str, lr: Any, weight_decay: Any) -> None:
    """A finite ``weight_decay`` ≥ 0 with ``lr·weight_decay < 1`` (decoupled decay multiplies W by 1 − lr·wd)."""
    check_nonnegative(owner, "weight_decay", weight_decay)
    if as_real(lr) * as_real(weight_decay) >= 1:
        raise ValueError(f"{owner}: lr·weight_decay must be < 1, got {as_real(lr)!r}·{as_real(weight_decay)!r}: "
                         "decoupled decay multiplies every weight by 1 − lr·weight_decay each step, so it would zero "
                         "or flip them.")


def check_group_lr(owner: str, groups: Iterable[dict]) -> None:
    """Each param group's own ``lr`` and ``weight_decay`` (a head group may set its own)."""
    for group in groups:
        check_positive(owner, "lr (of a param group)", group["lr"], " An lr of 0 trains nothing.")
        check_decay(owner, group["lr"], group.get("weight_decay", 0.0))
