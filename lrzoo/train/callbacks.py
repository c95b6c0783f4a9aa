"""Trainer callbacks: the hook interface, and the metric loggers (CSV, TensorBoard, W&B) built on it.

A callback is any object with some of these methods; the trainer calls those it finds:

* ``on_train_begin(trainer)``
* ``on_step_end(step, model, optimizer, scheduler)``: after each optimizer step (``step`` counts
  from 1). Training procedures hook in here (ReLoRA's merge-and-reinit every T steps: the callbacks
  a :class:`lrzoo.procedure.Procedure` returns, :class:`lrzoo.methods.relora.ReLoRAHook`).
* ``on_log(step, metrics)``: ``metrics`` is a flat ``{"train/loss": ..., "eval/accuracy": ...}``.
* ``on_train_end(trainer)``
* ``state_dict()`` / ``load_state_dict(state)``: whatever the callback must carry across a
  checkpoint for an exact resume.

Loggers run on every rank but write only where ``is_main`` is true (rank 0).
"""

from __future__ import annotations

import csv
import os
from typing import Any, Optional

from ..io import atomic_file
from ..registry_table import Table
from ..runs.files import METRICS_FILE


class Callback:
    """Base class with no-op hooks (subclassing it is optional: the trainer duck-types)."""

    def on_train_begin(self, trainer: Any) -> None: ...

    def on_step_end(self, step: int, model: Any, optimizer: Any, scheduler: Any) -> None: ...

    def on_log(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Any) -> None: ...


class CSVLogger(Callback):
    """Long-format ``metrics.csv`` (``step,name,value``): new metric names never change the header.

    The file is appended to, never rewritten in place: a resumed run appends after the rows it has. Only when
    it holds rows past the checkpoint's step (a run killed after its last checkpoint), or a row cut short, is it
    rewritten, atomically (:func:`lrzoo.io.atomic_file`), so the file reads as one run and a full disk fails the
    run without losing a row written before.
    """

    FIELDS = ("step", "name", "value")

    def __init__(self, run_dir: str, is_main: bool = True):
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.is_main = is_main

    def on_train_begin(self, trainer: Any) -> None:
        if not self.is_main:
            return
        kept, intact = self._rows_up_to(trainer.start_step) if trainer.start_step > 0 else ([], False)
        if intact:
            return
        with atomic_file(self.path, "w") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.FIELDS)
            writer.writerows(kept)

    def _rows_up_to(self, step: int) -> tuple[list[list[str]], bool]:
        """``(rows up to step, whether the file is exactly those rows)``: the file is kept as it is only then."""
        try:
            with open(self.path, newline="") as handle:
                text = handle.read()
        except FileNotFoundError:
            return [], False
        lines = text.splitlines()
        whole = text.endswith("\n")
        if not whole:  # a row cut short by a kill mid-append: its value may be cut too
            lines = lines[:-1]
        rows = list(csv.reader(lines))
        if not rows or tuple(rows[0]) != self.FIELDS:
            return [], False
        kept = [row for row in rows[1:] if len(row) == 3 and row[0].isdigit() and int(row[0]) <= step]
        return kept, whole and len(kept) == len(rows) - 1

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        with open(self.path, "a", newline="") as handle:
            writer = csv.writer(handle)
            for name, value in metrics.items():
                writer.writerow((step, name, value))


class TensorBoardLogger(Callback):
    """Scalars to ``<run_dir>/tensorboard`` (needs ``pip install tensorboard``)."""

    def __init__(self, run_dir: str, is_main: bool = True):
        self.writer = None
        if is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError("logger=tensorboard needs TensorBoard: pip install tensorboard "
                                  "(or pick logger=csv).") from error
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)

    def on_train_end(self, trainer: Any) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbLogger(Callback):
    """Weights & Biases run (needs ``pip install wandb`` and a login, or ``WANDB_MODE=offline``)."""

    def __init__(self, run_dir: str, is_main: bool = True, project: str = "lrzoo",
                 config: Optional[dict] = None, name: Optional[str] = None):
        self.run = None
        if is_main:
            try:
                import wandb
            except ImportError as error:
                raise ImportError("logger=wandb needs Weights & Biases: pip install wandb "
                                  "(or pick logger=csv).") from error
            self.run = wandb.init(project=project, config=config, name=name, dir=run_dir, resume="allow")

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def on_train_end(self, trainer: Any) -> None:
        if self.run is not None:
            self.run.finish()


def _no_logger(run_dir: str, is_main: bool) -> None:
    return None


#: logger name -> its class (built as ``cls(run_dir, is_main, **options)``); ``none`` builds nothing.
LOGGER_CLASSES: Table[Any] = Table("logger", entries={"csv": CSVLogger, "tensorboard": TensorBoardLogger,
                                                       "wandb": WandbLogger, "none": _no_logger})
LOGGERS = tuple(LOGGER_CLASSES)


def make_logger(name: str, run_dir: str, is_main: bool, **options: Any) -> Optional[Callback]:
    """The logger callback called ``name`` (one of :data:`LOGGERS`); ``None`` for ``"none"``."""
    return LOGGER_CLASSES.lookup(name)(run_dir, is_main, **options)
