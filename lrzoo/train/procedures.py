"""Training procedures: what a method adds to the training loop beyond its layers, as one table.

A method names its procedure when it registers (``register_adapter(..., procedure="relora")``, kept as
``AdapterSpec.procedure``); :data:`PROCEDURES` maps that name to a :class:`Procedure` class, whose
methods are the hooks the trainer calls. :func:`procedure_for` builds a run's procedure from the options
``wrap`` recorded on the model (:func:`lrzoo.registry.training_options`, read there once and handed to
the procedure); the trainer calls the hooks and never looks at a method's name.

============  =======================  ==========================================================
procedure     hooks it fills           what it does
============  =======================  ==========================================================
``default``   (all, plainly)           AdamW on the trainable tensors (head at ``head_lr``), the
                                       configured LR schedule, no callback
``loraplus``  ``optimizer_options``    LoRA+ groups: lora_B at λ·lr (λ = ``loraplus_lr_ratio``)
``relora``    ``callbacks``,           merge-and-reinit every ``relora_steps`` with optimizer
              ``make_scheduler``       pruning (:class:`lrzoo.train.relora.ReLoRAHook`, which
                                       checkpoints the merged weights and ReLoRA's state) and the
                                       jagged cosine schedule
``lora_sb``   ``before_training``      :func:`lrzoo.init_lora_sb` on the first training rows
``lora_pro``  ``optimizer_options``    LoRA-Pro's optimizer (full fine-tuning's step, projected)
``lowrank_    ``optimizer_options``    GaLore/Fira over a plain model's weights (recipes' ``adapter=galore``,
optimizer``                            ``adapter=fira``; not adapters: the whole model is trained and saved)
============  =======================  ==========================================================

A new procedure (LoRA-Pro's gradient adjustment, a GaLore optimizer...) subclasses :class:`Procedure`,
overrides the hooks it needs and is added with :func:`register_procedure`. Its state goes in its
callbacks' ``state_dict``/``load_state_dict``: the trainer checkpoints every callback's state (in the
order of the list, the procedure's callbacks first), so a resume restores it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from transformers import get_scheduler

from ..heads import pair_encoding
from ..methods.lora_sb import init_lora_sb
from ..registry import get_adapter, list_adapters, training_options
from .config import TrainerConfig
from .data import collate, encode_rows, planned_steps
from .optim import make_optimizer
from .relora import ReLoRA, ReLoRAHook, make_relora_scheduler


@dataclass
class Procedure:
    """The plain procedure, and the hooks a method's procedure overrides (one instance per run).

    Args:
        options: the method's training options as ``wrap`` recorded them (without ``"method"``).
        config: the run's :class:`lrzoo.train.config.TrainerConfig`.
    """

    options: dict[str, Any] = field(default_factory=dict)
    config: Optional[TrainerConfig] = None

    #: the key of this procedure in :data:`PROCEDURES`
    name = "default"

    def __post_init__(self) -> None:
        """Build the run's state from ``options`` and ``config`` (subclasses; called once)."""

    def before_training(self, model: nn.Module, train_rows: Sequence[dict], task: Any, tokenizer: Any) -> None:
        """Data-dependent initialisation, called by the trainer first, before the model is moved or
        wrapped and before the optimizer exists (the same rows on every rank)."""

    def optimizer_options(self) -> dict[str, Any]:
        """Extra keywords of :func:`lrzoo.make_optimizer` (LoRA+'s λ)."""
        return {}

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s trainable parameters (the plain model, not a DDP wrapper)."""
        c = self.config
        return make_optimizer(model, lr=c.lr, weight_decay=c.weight_decay, head_lr=c.head_lr,
                              **self.optimizer_options())

    def make_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        """The LR schedule, stepped once per optimizer step: the configured one."""
        c = self.config
        return get_scheduler(c.scheduler, optimizer, num_warmup_steps=round(c.warmup_ratio * total_steps),
                             num_training_steps=total_steps)

    def callbacks(self, model: nn.Module) -> list[Any]:
        """Callbacks run (and checkpointed) before the run's own ones."""
        return []


#: procedure name -> its class (:func:`register_procedure` adds one).
PROCEDURES: dict[str, type[Procedure]] = {}


def register_procedure(cls: type[Procedure]) -> type[Procedure]:
    """Add a :class:`Procedure` subclass to :data:`PROCEDURES` under its ``name`` (a class decorator)."""
    if cls.name in PROCEDURES and PROCEDURES[cls.name] is not cls:
        raise ValueError(f"A training procedure named {cls.name!r} is already registered.")
    PROCEDURES[cls.name] = cls
    return cls


register_procedure(Procedure)


@register_procedure
class LoraPlusProcedure(Procedure):
    """LoRA+ (arXiv 2402.12354): PEFT's reference parameter groups with η_B = λ·η_A."""

    name = "loraplus"

    def optimizer_options(self) -> dict[str, Any]:
        return {"loraplus_lr_ratio": self.options["loraplus_lr_ratio"],
                "loraplus_lr_embedding": self.options["loraplus_lr_embedding"]}


@register_procedure
class ReLoRAProcedure(Procedure):
    """ReLoRA: resets every ``relora_steps`` (:class:`lrzoo.train.relora.ReLoRAHook`), jagged cosine LR."""

    name = "relora"

    def __post_init__(self) -> None:
        self.relora = ReLoRA(**{k: self.options[k] for k in ("relora_steps", "optimizer_pruning",
                                                             "optimizer_pruning_ratio")}, seed=self.config.seed)

    def make_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        return make_relora_scheduler(
            optimizer, total_steps, round(self.config.warmup_ratio * total_steps),
            relora_steps=self.relora.relora_steps, restart_warmup_steps=self.options["restart_warmup_steps"],
            min_lr_ratio=self.options["min_lr_ratio"])

    def callbacks(self, model: nn.Module) -> list[Any]:
        return [ReLoRAHook(self.relora, model)]


@register_procedure
class LoraSBProcedure(Procedure):
    """LoRA-SB: :func:`lrzoo.init_lora_sb` on the first ``init_num_samples`` training rows, with η = lr /
    warm-up steps as in the official code unless ``init_lr`` was given."""

    name = "lora_sb"

    def before_training(self, model: nn.Module, train_rows: Sequence[dict], task: Any, tokenizer: Any) -> None:
        c = self.config
        samples = self.options.get("init_num_samples", 50)
        rows = [train_rows[i] for i in range(min(samples, len(train_rows)))]
        features = encode_rows(rows, task.kind, tokenizer, c.max_length, pairs=pair_encoding(model))
        size = c.micro_batch_size or c.batch_size
        batches = [collate(features[k:k + size], tokenizer.pad_token_id) for k in range(0, len(features), size)]
        lr = self.options.get("init_lr")
        if lr is None:
            lr = c.lr / max(round(c.warmup_ratio * planned_steps(len(train_rows), c)), 1)
        init_lora_sb(model, batches, lr=lr, num_samples=samples)


@register_procedure
class LoraProProcedure(Procedure):
    """LoRA-Pro (arXiv 2407.18242): LoRA layers, :class:`lrzoo.optimizers.lora_pro.LoraProAdamW` as optimizer."""

    name = "lora_pro"

    def optimizer_options(self) -> dict[str, Any]:
        return {"lora_pro": True, "bias_correction_offset": self.options.get("bias_correction_offset", 0)}


@register_procedure
class LowRankOptimizerProcedure(Procedure):
    """A low-rank gradient optimizer (GaLore, Fira) over every weight of a plain model: ``adapter=galore``.

    ``options`` are the recipe's: ``method`` (a name from :func:`lrzoo.list_optimizers`) and its
    options (``rank``, ``update_proj_gap``, ``scale``, ...), handed to :func:`lrzoo.make_optimizer`.
    """

    name = "lowrank_optimizer"

    def __post_init__(self) -> None:
        if self.config is not None and self.config.strategy == "fsdp":
            raise ValueError(f"{self.options.get('method')} projects each weight's full gradient, which FSDP shards "
                             "across ranks: use trainer=ddp (or a single process) for it.")

    def optimizer_options(self) -> dict[str, Any]:
        return {key: value for key, value in self.options.items() if value is not None}


def procedure_for(model: nn.Module, config: TrainerConfig) -> Procedure:
    """The procedure of the method ``model`` was wrapped with (``AdapterSpec.procedure``), built from the
    options ``wrap`` recorded on it; the plain one for a model lrzoo did not wrap (a baseline)."""
    options = training_options(model)  # the one read of wrap's record: the procedure holds them from here
    method = options.pop("method", None)
    name = (get_adapter(method).procedure if method in list_adapters() else None) or "default"
    if name not in PROCEDURES:
        raise ValueError(f"Adapter {method!r} names the training procedure {name!r}, which is not registered; known: "
                         f"{', '.join(sorted(PROCEDURES))} (lrzoo.train.procedures.register_procedure adds one).")
    return PROCEDURES[name](options, config)


__all__ = ["PROCEDURES", "LoraPlusProcedure", "LoraProProcedure", "LoraSBProcedure",
           "LowRankOptimizerProcedure", "Procedure", "ReLoRAProcedure", "procedure_for",
           "register_procedure"]
