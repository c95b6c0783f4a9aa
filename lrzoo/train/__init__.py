"""Training-procedure pieces: optimizers, schedules, callbacks and the trainer."""

from .optim import make_optimizer

__all__ = ["make_optimizer"]
