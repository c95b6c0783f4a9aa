"""Checks of a run's budget and options, made before any model is loaded.

:func:`validate_trainer_config` runs when a :class:`lrzoo.train.config.TrainerConfig` is built and
names every bad key at once (``trainer.max_steps=0``, a negative interval, a string learning rate,
``warmup_ratio`` outside [0, 1], ...). :func:`check_splits` refuses empty or too-small data splits
(``train_limit=0``, a task with no rows) before ``lrzoo-train`` loads the model; :func:`check_limits`
checks the limits themselves before the data is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from .divergence import NONFINITE_POLICIES
from .precision import check_precision

STRATEGIES = ("auto", "fsdp")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_trainer_config(config: Any) -> None:
    """Raise one ValueError listing every invalid field of ``config`` (a TrainerConfig), each named
    ``trainer.<key>`` with its value and what it may be. Normalises ``config.precision``."""
    c = config
    errors: list[str] = []

    def bad(key: str, rule: str) -> None:
        errors.append(f"trainer.{key}={getattr(c, key)!r}: {rule}")

    def positive_int(key: str, optional: bool = False, minimum: int = 1, meaning: str = "") -> None:
        value = getattr(c, key)
        if optional and value is None:
            return
        if not _is_int(value) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            bad(key, f"must be {what}{' or null' if optional else ''}{meaning}")

    for key in ("lr", "head_lr", "embedding_lr"):
        value = getattr(c, key)
        if key != "lr" and value is None:
            continue
        if not _is_number(value) or value <= 0:
            bad(key, "must be a positive finite number (e.g. 5e-4)" + (" or null (= lr)" if key != "lr" else ""))
    if not _is_number(c.weight_decay) or c.weight_decay < 0:
        bad("weight_decay", "must be a finite number >= 0")
    positive_int("batch_size", meaning=" (the global batch)")
    positive_int("micro_batch_size", optional=True, meaning=" (null: batch_size / processes)")
    if c.max_steps is not None:
        positive_int("max_steps", meaning="; null trains trainer.epochs instead (0 would train nothing)")
        if not _is_number(c.epochs) or c.epochs < 0:
            bad("epochs", "must be a finite number >= 0 (ignored while max_steps is set)")
    elif not _is_number(c.epochs) or c.epochs <= 0:
        bad("epochs", "must be a positive finite number (or set trainer.max_steps)")
    if not isinstance(c.scheduler, str) or c.scheduler not in _scheduler_names():
        bad("scheduler", f"must be one of {sorted(_scheduler_names())}")
    if not _is_number(c.warmup_ratio) or not 0 <= c.warmup_ratio <= 1:
        bad("warmup_ratio", "must be a number in [0, 1] (the fraction of the steps spent warming up)")
    if c.max_grad_norm is not None and (not _is_number(c.max_grad_norm) or c.max_grad_norm < 0):
        bad("max_grad_norm", "must be a finite number > 0, or null / 0 for no clipping")
    try:
        c.precision = check_precision(c.precision)
    except ValueError as err:
        errors.append(f"{err}")
    if c.strategy not in STRATEGIES:
        bad("strategy", f"must be one of {list(STRATEGIES)}")
    positive_int("max_length")
    positive_int("eval_every", optional=True, minimum=0,
                 meaning=" (null: every epoch; 0: only at the end)")
    positive_int("save_every", optional=True, minimum=0, meaning=" (null: every epoch; 0: never)")
    positive_int("keep_checkpoints", meaning=" (how many of the newest checkpoints are kept)")
    positive_int("log_every", meaning=" (optimizer steps between train/loss logs)")
    positive_int("eval_batch_size")
    positive_int("stop_after", optional=True)
    if not _is_int(c.seed):
        bad("seed", "must be an integer")
    if not isinstance(c.generation, Mapping):
        bad("generation", "must be a mapping of model.generate options, e.g. {num_beams: 1}")
    if c.on_nonfinite not in NONFINITE_POLICIES:
        bad("on_nonfinite", f"must be one of {list(NONFINITE_POLICIES)}")
    if errors:
        raise ValueError("Invalid trainer option(s):\n  " + "\n  ".join(errors))


def _scheduler_names() -> set[str]:
    from transformers import SchedulerType

    return {member.value for member in SchedulerType}


def check_limits(train_limit: Any, eval_limit: Any) -> None:
    """``train_limit`` and ``eval_limit`` are null or non-negative integers (checked before any loading)."""
    for key, value in (("train_limit", train_limit), ("eval_limit", eval_limit)):
        if value is not None and (not _is_int(value) or value < 0):
            raise ValueError(f"{key}={value!r}: must be a non-negative integer (the first N rows) or null (all rows).")


def check_splits(task_name: str, train_rows: Sequence, eval_sets: Mapping[str, tuple[Any, Sequence]],
                 batch_size: int, train_limit: Optional[int] = None, eval_limit: Optional[int] = None) -> None:
    """Refuse a training split smaller than one global batch and any empty evaluation split, naming
    the key to change (``train_limit``, ``eval_limit``, ``trainer.batch_size``) or the empty task."""
    rows = len(train_rows)
    if rows == 0:
        also = " and train_limit" if train_limit else ""
        cause = (f"train_limit={train_limit} keeps no row" if train_limit == 0 else
                 f"the task's training split has no rows (check task.data_dir{also})")
        raise ValueError(f"The training split of {task_name} is empty: {cause}. Nothing would be trained.")
    if rows < batch_size:
        limit = f" (train_limit={train_limit})" if train_limit is not None else ""
        raise ValueError(f"The training split of {task_name} has {rows} rows{limit}, fewer than one batch "
                         f"(trainer.batch_size={batch_size}). Lower trainer.batch_size or raise train_limit.")
    for name, (_, eval_rows) in eval_sets.items():
        if len(eval_rows) == 0:
            cause = (f"eval_limit={eval_limit} keeps no row" if eval_limit == 0 else
                     "the split has no rows (check task.data_dir and task.eval_split)")
            raise ValueError(f"The evaluation split of {name} is empty: {cause}. There would be nothing to score.")
