"""Low-rank gradient optimizers (GaLore, Fira, Q-GaLore, APOLLO): one module per method, registered on import.

They are optimizers, not adapters: they train a plain model's weights in full with rank-r optimizer
state. Build one with ``lrzoo.make_optimizer(model, lr, method="galore", rank=..., ...)``.
"""

from . import apollo, fira, galore, q_galore  # noqa: F401  (registers them)
from .registry import (
    OptimizerSpec,
    create_optimizer,
    get_optimizer,
    list_optimizers,
    projection_targets,
    register_optimizer,
    state_bytes,
)
from .q_galore import weight_bytes

__all__ = [
    "OptimizerSpec",
    "create_optimizer",
    "get_optimizer",
    "list_optimizers",
    "projection_targets",
    "register_optimizer",
    "state_bytes",
    "weight_bytes",
]
