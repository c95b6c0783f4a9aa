"""Training-procedure pieces: optimizers, schedules, callbacks and the trainer."""

from .callbacks import Callback, CSVLogger
from .optim import make_optimizer
from .trainer import Trainer, TrainerConfig

__all__ = ["CSVLogger", "Callback", "Trainer", "TrainerConfig", "make_optimizer"]
