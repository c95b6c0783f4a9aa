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
from .targets import input_embedding_parameter_ids


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
                        head_lr: Optional[float] = None, embedding_lr: Optional[float] = None,
                        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                        **optimizer_kwargs: Any) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s trainable parameters: what :func:`lrzoo.make_optimizer` returns for a
        model wrapped with this procedure's method. Plain: the head at ``head_lr``, the input embeddings at
        ``embedding_lr``, weight decay on ≥2-D tensors."""
        rates = checked_rates(model, lr, head_lr, embedding_lr)
        return optimizer_cls(plain_groups(model, lr, weight_decay, rates), lr=lr, **optimizer_kwargs)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The run's optimizer (the plain model, not a DDP wrapper), from the run's config."""
        c = self.config
        return self.build_optimizer(model, c.lr, weight_decay=c.weight_decay, head_lr=c.head_lr,
                                    embedding_lr=c.embedding_lr)

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
# What every procedure's optimizer shares: the head, the input embeddings, the plain groups
# ----------------------------------------------------------------------------------------------


def _head_names(model: nn.Module) -> set[str]:
    """The task head's module names: the ``modules_to_save`` copies, or the modules a baseline
    (:mod:`lrzoo.train.baselines`) records as :attr:`TrainingRecord.head_modules`."""
    from .peft_bridge import is_modules_to_save

    return {name for name, module in model.named_modules() if is_modules_to_save(module)} \
        or set(record_of(model).head_modules)


def _head_tensors(model: nn.Module, every_name: bool = False) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the task head's tensors, trainable or not. ``every_name``: a tensor under each of its
    names (``named_parameters(remove_duplicate=False)``), so an output layer tied to the input embeddings is found
    under the head's name too; else under its first name only."""
    head_names = _head_names(model)
    return [(name, param) for name, param in model.named_parameters(remove_duplicate=not every_name)
            if any(name.startswith(head + ".") for head in head_names)]


def head_parameter_ids(model: nn.Module) -> set[int]:
    """The ids of the trainable parameters of the task head: the ``modules_to_save`` copies, or the
    modules a baseline (:mod:`lrzoo.train.baselines`) records as :attr:`TrainingRecord.head_modules`.

    A parameter counts under its first name only (``named_parameters`` drops repeats): an output layer tied to the
    input embedding is not the head here: a ``head_lr`` that reaches it only so is refused (:func:`checked_rates`)."""
    return {id(param) for _, param in _head_tensors(model) if param.requires_grad}


@dataclass(frozen=True)
class OwnRates:
    """The trainable parameters that train at a rate of their own (ids): the task head at ``head_lr``, the input
    embeddings at ``embedding_lr``; a rate of ``None`` is ``lr``. Built by :func:`checked_rates`."""

    head: frozenset[int] = frozenset()
    head_lr: Optional[float] = None
    embeddings: frozenset[int] = frozenset()
    embedding_lr: Optional[float] = None

    def own_lr(self, param: torch.Tensor) -> Optional[float]:
        """``param``'s rate of its own, ``None`` for one that trains at the run's ``lr``.

        A parameter both embedding and head (a ``modules_to_save`` copy of the embeddings; a tied output layer)
        gets here only with one rate set, or the two equal (:func:`checked_rates` refuses two different ones):
        the one that is set applies, ``embedding_lr`` when it is."""
        if self.embedding_lr is not None and id(param) in self.embeddings:
            return self.embedding_lr
        if self.head_lr is not None and id(param) in self.head:
            return self.head_lr
        return None

    def lr_of(self, param: torch.Tensor, lr: float) -> float:
        """``param``'s learning rate in a run at ``lr``."""
        own = self.own_lr(param)
        return lr if own is None else own

    def __bool__(self) -> bool:
        """Whether any parameter has a rate of its own (even one equal to ``lr``: it may get a group of its own)."""
        return bool((self.head_lr is not None and self.head) or (self.embedding_lr is not None and self.embeddings))


def checked_rates(model: nn.Module, lr: float, head_lr: Optional[float] = None,
                  embedding_lr: Optional[float] = None) -> OwnRates:
    """The parameters with a rate of their own (:class:`OwnRates`), refusing rates that cannot apply as given.

    Refused: an ``embedding_lr`` for a model whose input embeddings do not train, and a ``head_lr`` for one
    without a head tensor of its own that trains (tied to the input embeddings, frozen, or none:
    :func:`refuse_unreached_head`), since either would change the run's name, not what it computes; ``head_lr``
    and ``embedding_lr`` that differ on one tensor (an embedding that is also the head); an ``lr`` that trains nothing because every trainable tensor has a rate of its own (a
    head-only run swept over ``lr`` with ``head_lr`` set would repeat one run under several names: a
    learning-rate grid of identical points, reported as tuned).
    """
    head = head_parameter_ids(model)
    embeddings: set[int] = set()
    if embedding_lr is not None:
        found = input_embedding_parameter_ids(model)
        if not found:
            raise ValueError(f"embedding_lr={embedding_lr:g} trains nothing: {type(model).__name__} has "
                             f"{'no get_input_embeddings()' if found is None else 'its input embeddings frozen'}. "
                             "Set embedding_lr=None (trainer.embedding_lr=null), or train the embeddings "
                             "(adapter=full_finetune, or the adapter's modules_to_save).")
        embeddings = found
        if head_lr is not None and head_lr != embedding_lr:
            # a tied output layer is the embedding under a second name: compare every name of the head's tensors
            shared = [name for name, param in _head_tensors(model, every_name=True) if id(param) in embeddings]
            if shared:
                raise ValueError(f"head_lr={head_lr:g} and embedding_lr={embedding_lr:g} both apply to {shared[0]}, "
                                 "an input embedding that is also the task head (tied to the output layer, or a "
                                 "modules_to_save copy): set one of them to None (trainer.head_lr=null or "
                                 "trainer.embedding_lr=null) or make the two equal.")
    if head_lr is not None and not head:
        refuse_unreached_head(model, head_lr, embedding_lr, embeddings)
    rates = OwnRates(frozenset(head), head_lr, frozenset(embeddings), embedding_lr)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable and all(rates.own_lr(p) not in (None, lr) for p in trainable):
        own = [f"the task head, which trains at head_lr={head_lr:g}" if head_lr is not None and head else "",
               f"the input embeddings, which train at embedding_lr={embedding_lr:g}" if embeddings else ""]
        fixes = [f"{key}=None (trainer.{key}=null: {what} at lr)" for key, what, used in (
            ("head_lr", "the head trains", own[0]), ("embedding_lr", "the embeddings train", own[1])) if used]
        raise ValueError(f"lr={lr:g} trains nothing: every trainable parameter is {' or '.join(o for o in own if o)}. "
                         f"Set {' or '.join(fixes)} or make them equal.")
    return rates


def refuse_unreached_head(model: nn.Module, head_lr: float, embedding_lr: Optional[float],
                          embeddings: set[int]) -> None:
    """Refuse a ``head_lr`` that reaches no tensor of its own (:func:`head_parameter_ids` found none): it would
    change the run's name, not what it computes, while the user believes the head trains at it.

    Accepted only where the head's tensors are all the input embeddings (tied) and ``embedding_lr`` equals
    ``head_lr``: the shared matrix then trains at the rate asked for."""
    tensors = _head_tensors(model, every_name=True)
    trained = [(name, param) for name, param in tensors if param.requires_grad]
    drop = "or set head_lr=None (trainer.head_lr=null)."
    if trained and all(id(param) in embeddings for _, param in trained) and embedding_lr == head_lr:
        return
    if trained:  # trainable, yet under another module's name first: the weights are the input embeddings'
        raise ValueError(f"head_lr={head_lr:g} trains nothing: {type(model).__name__}'s output layer "
                         f"({trained[0][0]}) is tied to its input embeddings (tie_word_embeddings), so it has no "
                         "weights of its own. Set embedding_lr (trainer.embedding_lr) to train the shared matrix at "
                         f"another rate, {drop}")
    # a recorded head with every tensor frozen, or (an adapter's model) a head it left out of modules_to_save
    frozen = [name for name, _ in tensors] if tensors else _frozen_head_modules(model)
    if frozen:
        raise ValueError(f"head_lr={head_lr:g} trains nothing: {type(model).__name__}'s task head/output layer "
                         f"({frozen[0]}) is frozen. Train it (the adapter's modules_to_save, e.g. "
                         f"adapter.modules_to_save=[{frozen[0].split('.')[0]}]), {drop}")
    raise ValueError(f"head_lr={head_lr:g} trains nothing: {type(model).__name__} has no task head/output layer "
                     f"(no module outside its backbone; a bi-encoder scores by a cosine). Set head_lr=None "
                     "(trainer.head_lr=null).")


def _frozen_head_modules(model: nn.Module) -> list[str]:
    """The base model's children outside its backbone that hold parameters, none of them trainable: a task head
    or output layer an adapter left frozen (not in ``modules_to_save``). Names as in the base model."""
    from transformers import PreTrainedModel

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if not isinstance(base, PreTrainedModel):   # a module of the user's own: which child is its head is unknown
        return []
    backbone = getattr(base, base.base_model_prefix or "", None)
    return [name for name, child in base.named_children()
            if child is not backbone and not isinstance(child, PreTrainedModel)
            and any(True for _ in child.parameters()) and not any(p.requires_grad for p in child.parameters())]


def plain_groups(model: nn.Module, lr: float, weight_decay: float, rates: OwnRates = OwnRates()) -> list[dict]:
    """Param groups of the trainable parameters: each at its rate (``rates``: the head at ``head_lr``, the input
    embeddings at ``embedding_lr``, the rest at ``lr``), weight decay on ≥2-D tensors."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = weight_decay if param.dim() >= 2 else 0.0
        groups.setdefault((rates.lr_of(param, lr), decay), []).append(param)
    if not groups:
        raise ValueError("The model has no trainable parameters; wrap it with lrzoo.wrap first.")
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]


__all__ = ["LoopData", "OwnRates", "PROCEDURES", "Procedure", "checked_rates", "head_parameter_ids",
           "input_embedding_parameter_ids", "plain_groups", "procedure_class", "procedure_of", "refuse_unreached_head",
           "register_procedure"]
