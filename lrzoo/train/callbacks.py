"""Trainer callbacks: the hook interface, and the metric loggers (CSV, TensorBoard, W&B) built on it.

A callback is any object with some of these methods; the trainer calls those it finds:

* ``on_train_begin(trainer)``
* ``on_step_end(step, model, optimizer, scheduler)``: after each optimizer step (``step`` counts
  from 1). Training-procedure methods hook in here (ReLoRA's merge-and-reinit every T steps).
* ``on_log(step, metrics)``: ``metrics`` is a flat ``{"train/loss": ..., "eval/accuracy": ...}``.
* ``on_train_end(trainer)``
* ``state_dict()`` / ``load_state_dict(state)``: whatever the callback must carry across a
  checkpoint for an exact resume.

Loggers run on every rank but write only where ``is_main`` is true (rank 0).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

LOGGERS = ("csv", "tensorboard", "wandb", "none")


class Callback:
    """Base class with no-op hooks (subclassing it is optional: the trainer duck-types)."""

    def on_train_begin(self, trainer: Any) -> None: ...

    def on_step_end(self, step: int, model: Any, optimizer: Any, scheduler: Any) -> None: ...

    def on_log(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Any) -> None: ...


class CSVLogger(Callback):
    """Long-format ``metrics.csv`` (``step,name,value``): new metric names never change the header.

    On resume, rows past the checkpoint's step are dropped first, so the file reads as one run.
    """

    FIELDS = ("step", "name", "value")

    def __init__(self, run_dir: str, is_main: bool = True):
        self.path = os.path.join(run_dir, "metrics.csv")
        self.is_main = is_main

    def on_train_begin(self, trainer: Any) -> None:
        if not self.is_main:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        kept = []
        if trainer.start_step > 0 and os.path.exists(self.path):
            with open(self.path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= trainer.start_step]
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(kept)

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


def make_logger(name: str, run_dir: str, is_main: bool, **options: Any) -> Optional[Callback]:
    """The logger callback called ``name`` (one of :data:`LOGGERS`); ``None`` for ``"none"``."""
    if name == "csv":
        return CSVLogger(run_dir, is_main)
    if name == "tensorboard":
        return TensorBoardLogger(run_dir, is_main)
    if name == "wandb":
        return WandbLogger(run_dir, is_main, **options)
    if name == "none":
        return None
    raise ValueError(f"Unknown logger {name!r}; choose one of {', '.join(LOGGERS)}.")


# --------------------------------------------------------------------------------------------
# Training procedures: what a method adds to the loop beyond its layers
# --------------------------------------------------------------------------------------------


@dataclass
class Procedure:
    """Per-method additions to a run: callbacks and, optionally, a replacement LR schedule
    (``scheduler_factory(optimizer, total_steps) -> scheduler``)."""

    callbacks: list = field(default_factory=list)
    scheduler_factory: Optional[Callable[[Any, int], Any]] = None


class ReLoRAHook(Callback):
    """Runs :class:`lrzoo.train.relora.ReLoRA` in the trainer and checkpoints what it changes.

    A reset merges the LoRA update into the frozen base weights, which the trainer's checkpoint
    (adapter + trainable tensors) does not hold; this hook's state does, with the reset count and
    the pruning RNG, so a resume after a reset is exact.
    """

    def __init__(self, relora: Any, model: Any):
        self.relora, self.model = relora, model

    def on_step_end(self, step: int, model: Any, optimizer: Any, scheduler: Any) -> None:
        self.relora.on_step_end(step, model, optimizer)

    def _base_weights(self, model: Any) -> dict[str, Any]:
        from ..methods.relora import lora_layers

        layers = {name: m for name, m in model.named_modules() if m in lora_layers(model, self.relora.adapter_name)}
        return {name: layer.get_base_layer().weight for name, layer in layers.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"resets": self.relora.resets, "generator": self.relora._generator.get_state(),
                "base_weights": {n: w.detach().cpu().clone() for n, w in self._base_weights(self.model).items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        from ..methods.relora import set_resets_done

        self.relora.resets = state["resets"]
        set_resets_done(self.model, state["resets"], self.relora.adapter_name)  # relora.json reports it
        self.relora._generator.set_state(state["generator"])
        with torch.no_grad():
            for name, weight in self._base_weights(self.model).items():
                weight.copy_(state["base_weights"][name])


def prepare_procedure(method: str, peft_model: Any, train_rows: Any, task: Any, tokenizer: Any,
                      config: Any) -> Procedure:
    """The :class:`Procedure` of ``method``, after running any data-dependent initialisation.

    * ``relora``: the merge-and-reinit callback and the jagged cosine schedule, with the options
      given to ``wrap`` (``peft_model.lrzoo_training``).
    * ``lora_sb``: :func:`lrzoo.methods.lora_sb.init_lora_sb` on the first training rows (the same
      rows on every rank, so all ranks compute the same init), with η = lr / warm-up steps as in
      the official code unless ``init_lr`` was given.
    * every other method: nothing.
    """
    training = dict(getattr(peft_model, "lrzoo_training", {}) or {})
    if method == "relora":
        from .relora import ReLoRA, make_relora_scheduler

        relora = ReLoRA.from_model(peft_model, seed=config.seed)

        def scheduler_factory(optimizer: Any, total_steps: int) -> Any:
            return make_relora_scheduler(
                optimizer, total_steps, round(config.warmup_ratio * total_steps), relora_steps=relora.relora_steps,
                restart_warmup_steps=training["restart_warmup_steps"], min_lr_ratio=training["min_lr_ratio"])

        return Procedure([ReLoRAHook(relora, peft_model)], scheduler_factory)
    if method == "lora_sb":
        from ..methods.lora_sb import init_lora_sb
        from .trainer import collate, encode_rows, planned_steps

        samples = training.get("init_num_samples", 50)
        rows = [train_rows[i] for i in range(min(samples, len(train_rows)))]
        features = encode_rows(rows, task.kind, tokenizer, config.max_length)
        size = config.micro_batch_size or config.batch_size
        batches = [collate(features[k:k + size], tokenizer.pad_token_id) for k in range(0, len(features), size)]
        lr = training.get("init_lr")
        if lr is None:
            warmup = round(config.warmup_ratio * planned_steps(len(train_rows), config))
            lr = config.lr / max(warmup, 1)
        init_lora_sb(peft_model, batches, lr=lr, num_samples=samples)
    return Procedure()
