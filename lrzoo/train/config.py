"""The trainer's configuration: :class:`TrainerConfig`, what the ``trainer`` Hydra group maps onto, and
:class:`EvalConfig`, the root ``eval`` node (how generation tasks are scored).

Every option is checked when the config is built (:func:`lrzoo.train.budget.validate_trainer_config`),
before any data or model is loaded, with one error naming every bad key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import UserError, did_you_mean
from .budget import validate_trainer_config
from .forgetting import ForgettingSpec


@dataclass
class TrainerConfig:
    """Training hyperparameters (the ``trainer`` Hydra group maps onto these fields)."""

    lr: float = 5e-4
    #: learning rate of the fully trained task head; ``None``: ``lr``.
    head_lr: Optional[float] = None
    #: learning rate of the input embeddings (``get_input_embeddings()`` of the base model); ``None``: ``lr``.
    embedding_lr: Optional[float] = None
    weight_decay: float = 0.0
    #: global batch: all ranks and accumulation steps together.
    batch_size: int = 16
    #: rows per forward on one rank; ``None``: ``batch_size / world_size`` (no accumulation).
    micro_batch_size: Optional[int] = None
    epochs: float = 1.0
    #: optimizer steps; overrides ``epochs`` when set.
    max_steps: Optional[int] = None
    scheduler: str = "linear"
    warmup_ratio: float = 0.0
    #: clip the global gradient norm to this (``None`` or 0: no clipping).
    max_grad_norm: Optional[float] = 1.0
    #: ``"no"``, ``"bf16"`` or ``"fp16"`` (autocast through accelerate; fp16 needs CUDA).
    precision: str = "no"
    #: ``"auto"`` (DDP when launched with several processes) or ``"fsdp"``.
    strategy: str = "auto"
    max_length: int = 128
    #: evaluate every N optimizer steps (``None``: at the end of each epoch) and at the end.
    eval_every: Optional[int] = None
    #: checkpoint every N optimizer steps (``None``: at the end of each epoch; 0: never).
    save_every: Optional[int] = None
    keep_checkpoints: int = 1
    log_every: int = 10
    #: rows per evaluation forward (``eval.mode=loglik``: option sequences; an item's options are never split)
    eval_batch_size: int = 32
    #: stop after this many optimizer steps in this invocation, as if killed right after a
    #: checkpoint (used to test resume); the run is left incomplete.
    stop_after: Optional[int] = None
    seed: int = 0
    progress: bool = True
    #: overrides of ``task.generation_config`` (e.g. ``{num_beams: 1, max_new_tokens: 16}``).
    generation: dict[str, Any] = field(default_factory=dict)
    #: a non-finite loss or gradient norm: ``"stop"`` the run, or ``"skip_step"`` (see
    #: :mod:`lrzoo.train.divergence`).
    on_nonfinite: str = "stop"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming every invalid option (:func:`lrzoo.train.budget.validate_trainer_config`)."""
        validate_trainer_config(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainerConfig":
        return _from_dict(cls, values, "trainer")


#: ``eval.mode``: ``generate`` decodes and extracts the answer (the task's own protocol, LLM-Adapters for
#: commonsense); ``loglik`` scores each option of a multiple-choice item by its likelihood (lm-eval's rule,
#: :mod:`lrzoo.train.loglik`).
EVAL_MODES = ("generate", "loglik")
#: ``eval.choices`` (loglik only): ``label`` scores "the correct answer is answer<i>" for every label,
#: ``text`` scores " <option text>" after "the correct answer is", ``question`` scores " <option text>" after
#: lm-eval's plain ``Question: <q>\nAnswer:`` (no instruction, no listed options; ``task.format=question`` trains
#: on that shape).
EVAL_CHOICES = ("label", "text", "question")


@dataclass
class EvalConfig:
    """How generation tasks are evaluated: the root ``eval`` node of ``lrzoo-train``'s config, passed to
    :class:`lrzoo.train.trainer.Trainer` as ``evaluation``. The defaults are the protocol runs had before
    the node existed (``lrzoo.runs.identity.hashed_config`` leaves them out of the config hash)."""

    mode: str = "generate"
    choices: str = "label"
    #: {data: wikitext-2, tokens: N}: the change of the loss on text the task never trains on (lrzoo.train.forgetting)
    forgetting: Optional[dict] = None

    def __post_init__(self) -> None:
        errors = [f"eval.{key}={getattr(self, key)!r}: must be one of {list(allowed)}"
                  for key, allowed in (("mode", EVAL_MODES), ("choices", EVAL_CHOICES))
                  if getattr(self, key) not in allowed]
        try:
            ForgettingSpec.parse(self.forgetting)
        except ValueError as err:
            errors.append(str(err))
        if errors:
            raise ValueError("Invalid eval option(s):\n  " + "\n  ".join(errors))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EvalConfig":
        return _from_dict(cls, values, "eval")


def _from_dict(cls: type, values: dict[str, Any], node: str) -> Any:
    """``cls(**values)`` for the config node ``node``, with an error naming unknown keys (each with its closest
    known one) and the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        guesses = [f"{node}.{key}" + (f" (did you mean {node}.{guess}?)" if (guess := did_you_mean(key, known)) else "")
                   for key in unknown]
        raise UserError(f"Unknown {node} option(s) {', '.join(guesses)}; known: {', '.join(sorted(known))}.")
    return cls(**values)
