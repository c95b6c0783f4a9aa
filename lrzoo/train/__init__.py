"""Training-procedure pieces: optimizers, schedules, callbacks and the trainer."""

from .callbacks import Callback, CSVLogger
from .divergence import DivergenceError
from .optim import make_optimizer
from .trainer import Trainer, TrainerConfig

__all__ = ["CSVLogger", "Callback", "DivergenceError", "Trainer", "TrainerConfig", "make_optimizer"]
