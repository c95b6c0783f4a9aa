"""Training procedures: what a method adds to the training loop beyond its layers (its optimizer, its schedule,
its callbacks, a data-dependent init), and the table of them.

A method whose training is not "AdamW on the trainable tensors, the configured schedule" writes a
:class:`Procedure` subclass beside its layer (``lrzoo/methods/relora/procedure.py``,
``lrzoo/methods/lora_pro/procedure.py``, ``LoraPlusProcedure`` in ``methods/lora.py``), adds it with
:func:`register_procedure` and names it when it registers (``register_adapter(..., procedure="relora")``).
The trainer (:func:`lrzoo.train.procedures.procedure_for`) and :func:`lrzoo.make_optimizer` build a model's
procedure from its :class:`lrzoo.registry.TrainingRecord` and call the hooks; neither looks at a method's name.

This module sits between the registry and the methods (docs/architecture.md): a procedure may use torch,
transformers' schedules, the leaves, the low-rank optimizers' checks and what is here (the plain parameter
groups, the head's parameters), never the trainer's loop (``lrzoo.train``). What it needs from the loop
arrives as arguments: the run's config (any object with :class:`lrzoo.train.config.TrainerConfig`'s fields)
and, in :meth:`Procedure.before_training`, a :class:`LoopData` that turns rows into the loop's batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from transformers import get_scheduler

from .registry import TrainingRecord, record_of
from .registry_table import Table


@dataclass(frozen=True)
class LoopData:
    """What the trainer lends a procedure's :meth:`Procedure.before_training`: its own encoding of rows.

    Attributes:
        batches: ``batches(rows) -> [batch, ...]``, the rows tokenized, padded and cut into micro-batches
            exactly as the loop would.
        planned_steps: ``planned_steps(n_rows) -> int``, the optimizer steps a run over ``n_rows`` rows makes.
    """

    batches: Callable[[Sequence[dict]], list[dict]]
    planned_steps: Callable[[int], int]


@dataclass
class Procedure:
    """The plain procedure, and the hooks a method's procedure overrides (one instance per run).

    Args:
        options: the method's training options as ``wrap`` recorded them (:attr:`TrainingRecord.options`).
        config: the run's trainer config (:class:`lrzoo.train.config.TrainerConfig`); ``None`` outside the trainer.
    """

    options: dict[str, Any] = field(default_factory=dict)
    config: Optional[Any] = None

    #: the key of this procedure in :data:`PROCEDURES`
    name = "default"

    def __post_init__(self) -> None:
        """Build the run's state from ``options`` and ``config`` (subclasses; called once)."""

    def before_training(self, model: nn.Module, train_rows: Sequence[dict], task: Any, data: LoopData) -> None:
        """Data-dependent initialisation, called by the trainer first, before the model is moved or
        wrapped and before the optimizer exists (the same rows on every rank)."""

    def build_optimizer(self, model: nn.Module, lr: float, *, weight_decay: float = 0.0,
                        head_lr: Optional[float] = None,
                        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                        **optimizer_kwargs: Any) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s trainable parameters: what :func:`lrzoo.make_optimizer` returns for a
        model wrapped with this procedure's method. Plain: the head at ``head_lr``, weight decay on ≥2-D tensors."""
        head = checked_head(model, lr, head_lr)
        return optimizer_cls(plain_groups(model, lr, weight_decay, head_lr, head), lr=lr, **optimizer_kwargs)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The run's optimizer (the plain model, not a DDP wrapper), from the run's config."""
        c = self.config
        return self.build_optimizer(model, c.lr, weight_decay=c.weight_decay, head_lr=c.head_lr)

    def make_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        """The LR schedule, stepped once per optimizer step: the configured one."""
        c = self.config
        return get_scheduler(c.scheduler, optimizer, num_warmup_steps=round(c.warmup_ratio * total_steps),
                             num_training_steps=total_steps)

    def callbacks(self, model: nn.Module) -> list[Any]:
        """Callbacks run (and checkpointed) before the run's own ones (duck-typed: the hooks of
        :mod:`lrzoo.train.callbacks` they have)."""
        return []


#: procedure name -> its class (:func:`register_procedure` adds one).
PROCEDURES: Table[type[Procedure]] = Table("training procedure",
                                           hint="lrzoo.procedure.register_procedure adds one.")


def register_procedure(cls: type[Procedure]) -> type[Procedure]:
    """Add a :class:`Procedure` subclass to :data:`PROCEDURES` under its ``name`` (a class decorator)."""
    PROCEDURES.add(cls.name, cls, replace=PROCEDURES.get(cls.name) is cls)
    return cls


register_procedure(Procedure)


def procedure_class(method: Optional[str]) -> type[Procedure]:
    """The procedure class of registered method ``method`` (``AdapterSpec.procedure``); the plain one for
    ``None`` or a name lrzoo does not know as an adapter (a baseline)."""
    from .registry import get_adapter, list_adapters

    name = (get_adapter(method).procedure if method in list_adapters() else None) or "default"
    if name not in PROCEDURES:
        raise ValueError(f"Adapter {method!r} names the training procedure {name!r}, which is not registered; known: "
                         f"{', '.join(PROCEDURES.names(sort=True))} (lrzoo.procedure.register_procedure adds one).")
    return PROCEDURES[name]


def procedure_of(model: nn.Module, config: Any = None) -> Procedure:
    """The procedure of the method ``model`` was wrapped with, holding the options ``wrap`` recorded
    (read here, once); the plain one for a model lrzoo did not wrap."""
    record: TrainingRecord = record_of(model)
    return procedure_class(record.method)(dict(record.options), config)


# ----------------------------------------------------------------------------------------------
# What every procedure's optimizer shares: the head, the plain groups
# ----------------------------------------------------------------------------------------------


def head_parameter_ids(model: nn.Module) -> set[int]:
    """The ids of the trainable parameters of the task head: the ``modules_to_save`` copies, or the
    modules a baseline (:mod:`lrzoo.train.baselines`) records as :attr:`TrainingRecord.head_modules`."""
    from .peft_bridge import is_modules_to_save

    head_names = {name for name, module in model.named_modules() if is_modules_to_save(module)} \
        or set(record_of(model).head_modules)
    return {
        id(param) for name, param in model.named_parameters()
        if param.requires_grad and any(name.startswith(head + ".") for head in head_names)
    }


def checked_head(model: nn.Module, lr: float, head_lr: Optional[float]) -> set[int]:
    """The head's parameter ids, refusing an ``lr`` that would train nothing: every trainable tensor is the
    head, which trains at ``head_lr``.

    A head-only run swept over ``lr`` with ``head_lr`` set would otherwise repeat one run under several names
    (a learning-rate grid of identical points, reported as tuned).
    """
    head = head_parameter_ids(model)
    if head_lr is None or head_lr == lr:
        return head
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable and all(id(p) in head for p in trainable):
        raise ValueError(f"lr={lr:g} trains nothing: every trainable parameter is the task head, which trains at "
                         f"head_lr={head_lr:g}. Set head_lr=None (trainer.head_lr=null: the head trains at lr) "
                         "or make the two equal.")
    return head


def plain_groups(model: nn.Module, lr: float, weight_decay: float, head_lr: Optional[float],
                 head: set[int]) -> list[dict]:
    """Param groups of the trainable parameters: the head (``head``: its parameter ids) at ``head_lr``,
    weight decay on ≥2-D tensors."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group_lr = head_lr if (id(param) in head and head_lr is not None) else lr
        decay = weight_decay if param.dim() >= 2 else 0.0
        groups.setdefault((group_lr, decay), []).append(param)
    if not groups:
        raise ValueError("The model has no trainable parameters; wrap it with lrzoo.wrap first.")
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]


__all__ = ["LoopData", "PROCEDURES", "Procedure", "checked_head", "head_parameter_ids", "plain_groups",
           "procedure_class", "procedure_of", "register_procedure"]
