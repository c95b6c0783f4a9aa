"""The ReLoRA training procedure (arXiv 2307.05695; Guitaricet/relora): resets, optimizer pruning, LR.

Three pieces, usable from any loop:

* :class:`ReLoRA` — call ``on_step_end(step, model, optimizer)`` after each optimizer step; every
  ``relora_steps`` steps it merges the LoRA update into W, re-initialises A and B
  (:func:`lrzoo.methods.relora.layer.merge_and_reinit`) and prunes the optimizer state of the LoRA
  parameters (``reset``, ``random`` or ``magnitude`` pruning of ``exp_avg``/``exp_avg_sq``).
* :func:`make_relora_scheduler` — the "jagged cosine": linear warm-up, a global cosine decay to
  ``min_lr_ratio``, and after every reset a linear re-warm-up from 0 to the cosine envelope over
  ``restart_warmup_steps``.
* :class:`ReLoRAHook` — the same as a callback of lrzoo's trainer, checkpointing what a reset changes
  (:class:`ReLoRAProcedure`, the ``relora`` entry of :data:`lrzoo.procedure.PROCEDURES`, adds it with the schedule).
* :class:`ReLoRACallback` — the same for the HF ``Trainer``::

      model = lrzoo.wrap(base, "relora", r=128, alpha=32, relora_steps=1000, target_modules=[...])
      optimizer = lrzoo.make_optimizer(model, lr=1e-3)
      scheduler = make_relora_scheduler(optimizer, total_steps, warmup_steps, relora_steps=1000)
      Trainer(model, args, ..., optimizers=(optimizer, scheduler), callbacks=[ReLoRACallback.from_model(model)])

A plain loop calls ``relora.on_step_end(step, model, optimizer)`` after ``optimizer.step()`` and
``scheduler.step()``, with ``step`` the number of optimizer steps done (HF's ``state.global_step``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback

from ...procedure import Procedure, register_procedure
from ...registry import record_of
from .layer import RELORA_TRAINING_DEFAULTS, lora_layers, merge_and_reinit, set_resets_done

PRUNING_MODES = ("reset", "random", "magnitude")
#: The paper's code implements ``reset_optimizer_on_relora`` as random pruning at this ratio.
RESET_RATIO = 0.999


def prune_random_(tensor: torch.Tensor, ratio: float, generator: Optional[torch.Generator] = None) -> None:
    """Zero each entry of ``tensor`` with probability ``ratio``, in place."""
    keep = torch.rand(tensor.shape, generator=generator, device="cpu").to(tensor.device) > ratio
    tensor.mul_(keep)


def prune_magnitude_(tensor: torch.Tensor, ratio: float) -> None:
    """Zero the ``ratio`` fraction of entries of ``tensor`` with the smallest magnitude, in place."""
    k = int(ratio * tensor.numel())
    if k == 0:
        return
    threshold = tensor.abs().flatten().float().kthvalue(k).values  # the ratio-quantile of |·|
    tensor.mul_(tensor.abs().float() > threshold)


def lora_parameters(model: nn.Module, adapter_name: str = "default") -> list[nn.Parameter]:
    """The LoRA A and B parameters of ``adapter_name`` (the only ones whose optimizer state is pruned)."""
    params = []
    for layer in lora_layers(model, adapter_name):
        params.extend(layer.lora_A[adapter_name].parameters())
        params.extend(layer.lora_B[adapter_name].parameters())
    return params


@dataclass
class ReLoRA:
    """Merge-and-reinit every ``relora_steps`` steps, with optimizer-state pruning on the LoRA parameters."""

    relora_steps: int = RELORA_TRAINING_DEFAULTS["relora_steps"]
    optimizer_pruning: str = RELORA_TRAINING_DEFAULTS["optimizer_pruning"]
    optimizer_pruning_ratio: float = RELORA_TRAINING_DEFAULTS["optimizer_pruning_ratio"]
    adapter_name: str = "default"
    state_keys: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
    seed: int = 0

    def __post_init__(self):
        if self.relora_steps <= 0:
            raise ValueError(f"relora_steps must be a positive number of steps, got {self.relora_steps}.")
        if self.optimizer_pruning not in PRUNING_MODES:
            raise ValueError(f"optimizer_pruning must be one of {PRUNING_MODES}, got {self.optimizer_pruning!r}.")
        if not 0.0 <= self.optimizer_pruning_ratio <= 1.0:
            raise ValueError(f"optimizer_pruning_ratio must be in [0, 1], got {self.optimizer_pruning_ratio}.")
        self.resets = 0
        self._generator = torch.Generator().manual_seed(self.seed)

    @classmethod
    def from_model(cls, model: nn.Module, **overrides) -> "ReLoRA":
        """Build from the options given to ``lrzoo.wrap(..., "relora", ...)`` (recorded on the model:
        :func:`lrzoo.registry.record_of`); ``overrides`` win."""
        training = record_of(model).options
        if "relora_steps" not in training and not overrides:  # not wrapped by a method with ReLoRA's options
            raise ValueError("This model was not wrapped with lrzoo.wrap(model, 'relora', ...); pass the options.")
        options = {k: training[k] for k in ("relora_steps", "optimizer_pruning", "optimizer_pruning_ratio")
                   if k in training}
        return cls(**{**options, **overrides})

    def state_dict(self) -> dict[str, Any]:
        """What changes during training: the reset count and the state of the pruning RNG."""
        return {"resets": self.resets, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resets = state["resets"]
        self._generator.set_state(state["generator"])

    def on_step_end(self, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> bool:
        """Call after optimizer step number ``step`` (1-based); returns whether a reset happened."""
        if step <= 0 or step % self.relora_steps:
            return False
        self.reset(model, optimizer)
        return True

    def reset(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """One cycle boundary: merge into W, re-initialise A and B, prune their optimizer state."""
        if merge_and_reinit(model, self.adapter_name) == 0:
            raise ValueError(f"No LoRA layers hold adapter {self.adapter_name!r}; wrap the model with 'relora'.")
        if optimizer is not None:
            self.prune_optimizer_state(optimizer, lora_parameters(model, self.adapter_name))
        self.resets += 1

    def prune_optimizer_state(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        ratio = RESET_RATIO if self.optimizer_pruning == "reset" else self.optimizer_pruning_ratio
        for param in params:
            state = optimizer.state.get(param, {})
            for key in self.state_keys:
                tensor = state.get(key)
                if tensor is None:
                    continue
                if self.optimizer_pruning == "magnitude":
                    prune_magnitude_(tensor, ratio)
                else:
                    prune_random_(tensor, ratio, self._generator)


def jagged_cosine_factor(step: int, total_steps: int, warmup_steps: int, relora_steps: int,
                         restart_warmup_steps: int, min_lr_ratio: float) -> float:
    """The LR multiplier at optimizer step ``step`` (0-based, as ``LambdaLR`` counts).

    ``envelope(t) = m + (1 − m)·½(1 + cos(π·(t − w)/(T_total − w)))`` after the warm-up ``w``; in the
    ``restart_warmup_steps`` steps after each reset (step k·relora_steps, k ≥ 1) the LR rises linearly
    from 0 to the envelope's value at the end of that re-warm-up.
    """
    def envelope(t: int) -> float:
        progress = min(1.0, max(0.0, (t - warmup_steps) / max(1, total_steps - warmup_steps)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    if step < warmup_steps:
        return step / max(1, warmup_steps)
    since_reset = step % relora_steps
    if step >= relora_steps and since_reset < restart_warmup_steps:
        return since_reset / max(1, restart_warmup_steps) * envelope(step - since_reset + restart_warmup_steps)
    return envelope(step)


def make_relora_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    relora_steps: int = RELORA_TRAINING_DEFAULTS["relora_steps"],
    restart_warmup_steps: int = RELORA_TRAINING_DEFAULTS["restart_warmup_steps"],
    min_lr_ratio: float = RELORA_TRAINING_DEFAULTS["min_lr_ratio"],
) -> LambdaLR:
    """The jagged cosine schedule (:func:`jagged_cosine_factor`) as a ``LambdaLR`` over every group."""
    if restart_warmup_steps >= relora_steps:
        raise ValueError(f"restart_warmup_steps ({restart_warmup_steps}) must be shorter than relora_steps "
                         f"({relora_steps}).")

    def factor(step: int) -> float:
        return jagged_cosine_factor(step, total_steps, warmup_steps, relora_steps, restart_warmup_steps, min_lr_ratio)

    return LambdaLR(optimizer, factor)


class ReLoRAHook:
    """Runs :class:`ReLoRA` in lrzoo's trainer and checkpoints what it changes.

    A reset merges the LoRA update into the frozen base weights, which the trainer's checkpoint
    (adapter + trainable tensors) does not hold; this hook's state does, with :meth:`ReLoRA.state_dict`
    (the reset count and the pruning RNG), so a resume after a reset is exact.
    """

    #: read by :func:`lrzoo.train.sharding.check_supported`
    sharding_refusal = ("trainer.strategy=fsdp does not support ReLoRA: its resets merge B·A into the base weights, "
                        "which FSDP shards over the ranks, and it saves the full merged model. Train ReLoRA with "
                        "trainer=ddp (or a single process).")

    def __init__(self, relora: ReLoRA, model: nn.Module):
        self.relora, self.model = relora, model

    def on_step_end(self, step: int, model: Any, optimizer: Any, scheduler: Any) -> None:
        self.relora.on_step_end(step, model, optimizer)

    def _base_weights(self) -> dict[str, torch.Tensor]:
        layers = lora_layers(self.model, self.relora.adapter_name)
        return {name: m.get_base_layer().weight for name, m in self.model.named_modules() if m in layers}

    def state_dict(self) -> dict[str, Any]:
        return {**self.relora.state_dict(),
                "base_weights": {n: w.detach().cpu().clone() for n, w in self._base_weights().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.relora.load_state_dict(state)
        set_resets_done(self.model, state["resets"], self.relora.adapter_name)  # relora.json reports it
        with torch.no_grad():
            for name, weight in self._base_weights().items():
                weight.copy_(state["base_weights"][name])


class ReLoRACallback(TrainerCallback):
    """HF ``TrainerCallback`` running :class:`ReLoRA` after each optimizer step (schedule: pass
    :func:`make_relora_scheduler` to the Trainer's ``optimizers``)."""

    def __init__(self, relora: ReLoRA):
        self.relora = relora

    @classmethod
    def from_model(cls, model: nn.Module, **overrides) -> "ReLoRACallback":
        return cls(ReLoRA.from_model(model, **overrides))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError("ReLoRACallback needs the model; the HF Trainer passes it to callbacks.")
        self.relora.on_step_end(state.global_step, model, optimizer)
        return control


@register_procedure
class ReLoRAProcedure(Procedure):
    """ReLoRA in lrzoo's trainer: resets every ``relora_steps`` (:class:`ReLoRAHook`), the jagged cosine LR."""

    name = "relora"

    def __post_init__(self) -> None:
        self.relora = ReLoRA(**{k: self.options[k] for k in ("relora_steps", "optimizer_pruning",
                                                             "optimizer_pruning_ratio")},
                            seed=self.config.seed if self.config is not None else 0)  # None: make_optimizer's use

    def make_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        return make_relora_scheduler(
            optimizer, total_steps, round(self.config.warmup_ratio * total_steps),
            relora_steps=self.relora.relora_steps, restart_warmup_steps=self.options["restart_warmup_steps"],
            min_lr_ratio=self.options["min_lr_ratio"])

    def callbacks(self, model: nn.Module) -> list[Any]:
        return [ReLoRAHook(self.relora, model)]
