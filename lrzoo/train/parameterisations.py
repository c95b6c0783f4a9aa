"""Weight parameterisations for training from scratch: recipe options (``adapter=sltrain``) that are neither a
PEFT adapter (no frozen base weight) nor a low-rank optimizer (they change the model's tensors).

Each entry turns a freshly initialised model into the one it trains: its targeted layers replaced, every
other parameter (embeddings, norms, the output layer) trained in full, as in the papers' pre-training code.
The recipe's ``adapter`` node gives the options (its keys are the entry's ``keys``); the run's ``seed`` seeds
anything random the parameterisation draws (SLTrain's sparse support), so a resumed run rebuilds the same
model before its checkpoint is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch.nn as nn

from ..methods.sltrain import apply_sltrain
from .baselines import prepare_baseline


@dataclass(frozen=True)
class Parameterisation:
    """One option: ``apply(model, seed=..., target_modules=..., **options)`` and the ``adapter`` keys it takes."""

    apply: Callable[..., nn.Module]
    keys: frozenset[str]


PARAMETERISATIONS: dict[str, Parameterisation] = {
    "sltrain": Parameterisation(apply_sltrain, frozenset({"r", "alpha", "density", "target_modules"})),
}


def prepare_parameterisation(model: nn.Module, name: str, options: dict[str, Any], *, seed: int,
                             default_targets: Optional[Sequence[str]] = None) -> nn.Module:
    """``model`` with parameterisation ``name`` applied (in place): every parameter trained, the targeted layers
    (``options["target_modules"]``, else ``default_targets``: the model preset's ``adapter_targets``) replaced."""
    entry = PARAMETERISATIONS[name]
    unknown = sorted(set(options) - entry.keys)
    if unknown:
        raise ValueError(f"adapter={name} takes {sorted(entry.keys)}; unknown: {unknown}.")
    options = dict(options)
    if options.get("target_modules") is None and default_targets is not None:
        options["target_modules"] = list(default_targets)
    model = prepare_baseline(model, "full_finetune")  # what is not replaced is trained in full
    return entry.apply(model, seed=seed, **options)
