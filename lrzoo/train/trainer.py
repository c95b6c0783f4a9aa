"""A plain PyTorch training loop for adapted models, single-process or distributed (DDP/FSDP).

What it guarantees:

* **Exact resume.** A checkpoint is written at an optimizer-step boundary with the adapter
  weights, every trainable tensor, the optimizer, scheduler, callback state and each rank's RNG
  state. The data order is a pure function of ``(seed, epoch)``, so a resumed run replays the same
  batches and ends with the same weights as an uninterrupted one.
* **Distributed = single-process.** ``batch_size`` is the *global* batch. Each optimizer step takes
  the next ``batch_size`` rows of the epoch's permutation and gives rank ``k`` the ``k``-th
  contiguous slice, so N ranks see exactly the rows one process would (gradients are averaged
  by DDP). Only rank 0 writes files.
* **Task-agnostic heads.** Classification/regression train the model's head on
  ``(text_a, text_b) -> label``; generation tasks train a causal LM on the response tokens only
  (prompt positions are labelled -100) and are scored by decoding, ``task.extract_answer`` and
  ``task.is_correct``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..io import atomic_directory, atomic_file
from ..tasks.metrics import UndefinedMetricWarning, nonfinite_reason
from .budget import validate_trainer_config
from .divergence import NonfiniteGuard, is_finite_number, json_safe, total_grad_norm
from .precision import autocast_dtype, check_autocast, use_precision
from .procedures import Procedure
from .resume import CHECKPOINT_RE, checkpoint_dirs, read_trainer_state
from .sharding import full_state_dict, gathered_root, shard_model

IGNORE_INDEX = -100  # label of positions that do not count in the loss (prompt tokens, padding)


@dataclass
class TrainerConfig:
    """Training hyperparameters (the ``trainer`` Hydra group maps onto these fields)."""

    lr: float = 5e-4
    #: learning rate of the fully trained task head; ``None``: ``lr``.
    head_lr: Optional[float] = None
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown trainer option(s) {unknown}; known: {', '.join(sorted(known))}.")
        return cls(**values)


# --------------------------------------------------------------------------------------------
# Data: tokenisation and batching
# --------------------------------------------------------------------------------------------


def encode_rows(rows: Sequence[dict], kind: str, tokenizer: PreTrainedTokenizerBase, max_length: int,
                *, for_generation: bool = False) -> list[dict[str, Any]]:
    """Tokenise task rows (the Task API's columns) into model features, as plain lists.

    Classification/regression: ``input_ids`` (+ ``token_type_ids``) of ``(text_a, text_b)`` and
    ``labels``. Generation training: ``prompt + target + eos`` with the prompt's positions labelled
    ``IGNORE_INDEX`` (truncated on the right to ``max_length``, as LLM-Adapters' cutoff_len).
    Generation evaluation (``for_generation``): the prompt's ids only (truncated on the left, so
    the question's end and "### Response:" survive), with the gold ``answer``.
    """
    if kind in ("classification", "regression"):
        text_a = [row["text_a"] for row in rows]
        text_b = [row["text_b"] for row in rows]
        pairs = any(b is not None for b in text_b)
        encoded = tokenizer(text_a, [b or "" for b in text_b] if pairs else None, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
        return [{**{k: encoded[k][i] for k in keys}, "labels": rows[i]["label"]} for i in range(len(rows))]

    prompts = tokenizer([row["prompt"] for row in rows])["input_ids"]
    if for_generation:
        return [{"input_ids": ids[-max_length:], "answer": row["answer"]} for ids, row in zip(prompts, rows)]
    full = tokenizer([row["prompt"] + row["target"] for row in rows])["input_ids"]
    features = []
    for prompt_ids, ids in zip(prompts, full):
        ids = (ids + [tokenizer.eos_token_id])[:max_length]
        n_prompt = min(len(prompt_ids), len(ids))
        features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    return features


def collate(features: Sequence[dict], pad_id: int, *, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad a list of features to the longest; labels that are sequences are padded with -100."""
    width = max(len(f["input_ids"]) for f in features)

    def pad(seq: list, value: Any) -> list:
        filler = [value] * (width - len(seq))
        return filler + list(seq) if left else list(seq) + filler

    batch = {"input_ids": torch.tensor([pad(f["input_ids"], pad_id) for f in features]),
             "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features])}
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = torch.tensor([pad(f["token_type_ids"], 0) for f in features])
    if "labels" in features[0]:
        labels = [f["labels"] for f in features]
        batch["labels"] = (torch.tensor([pad(l, IGNORE_INDEX) for l in labels]) if isinstance(labels[0], list)
                           else torch.tensor(labels))
    return batch


def planned_steps(num_rows: int, config: TrainerConfig) -> int:
    """Optimizer steps of a run: ``max_steps``, else ``epochs`` over full global batches."""
    per_epoch = num_rows // config.batch_size
    if per_epoch == 0:
        raise ValueError(f"The training split has {num_rows} rows, fewer than one batch "
                         f"(batch_size={config.batch_size}). Lower trainer.batch_size or raise train_limit.")
    return config.max_steps if config.max_steps is not None else math.ceil(config.epochs * per_epoch)


def epoch_order(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The row permutation of ``epoch``: a pure function of (seed, epoch), identical on all ranks."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=generator)


# --------------------------------------------------------------------------------------------
# RNG state (exact resume)
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest ``<run_dir>/checkpoints/step-N`` directory, or ``None`` (unchecked: see
    :func:`lrzoo.train.resume.resume_latest` for the newest intact one)."""
    found = checkpoint_dirs(run_dir)
    return found[0] if found else None


def peak_memory_mb() -> float:
    """Peak accelerator memory of this process if on CUDA, else its peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """Train ``model`` (a ``PeftModel`` from :func:`lrzoo.wrap`) on ``task`` and evaluate it.

    Args:
        model: the wrapped model (unprepared; the trainer moves and wraps it).
        tokenizer: its tokenizer (with a pad token).
        task: a :class:`lrzoo.tasks.base.Task`.
        train_rows: the training split (a ``datasets.Dataset`` or list of row dicts).
        eval_sets: ``{task name: (task, rows)}``; each is scored and reported separately.
        config: hyperparameters.
        run_dir: where checkpoints, ``metrics.csv``, ``results.json`` and ``adapter/`` go.
        callbacks: objects with the hooks of :mod:`lrzoo.train.callbacks`.
        run_info: extra fields copied into ``results.json`` (adapter, model, seed, config hash...).
            ``run_info["config_hash"]`` must match a checkpoint's to resume from it.
        scheduler_factory: ``f(optimizer, total_steps) -> scheduler`` replacing the procedure's
            schedule.
        procedure: the method's training procedure (:func:`lrzoo.train.procedures.procedure_for`):
            its ``before_training`` runs first, it builds the optimizer and the schedule, and its
            callbacks run before ``callbacks``. ``None``: the plain one.
    """

    def __init__(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        task: Any,
        train_rows: Sequence[dict],
        eval_sets: dict[str, tuple[Any, Sequence[dict]]],
        config: TrainerConfig,
        run_dir: str,
        *,
        callbacks: Sequence[Any] = (),
        run_info: Optional[dict[str, Any]] = None,
        scheduler_factory: Optional[Any] = None,
        procedure: Optional[Procedure] = None,
    ):
        from accelerate import Accelerator

        config.validate()
        self.procedure = procedure if procedure is not None else Procedure(config=config)
        self.procedure.before_training(model, train_rows, task, tokenizer)
        self.config, self.task, self.tokenizer, self.run_dir = config, task, tokenizer, run_dir
        self.callbacks = [*self.procedure.callbacks(model), *callbacks]
        self.run_info = dict(run_info or {})
        use_precision(config.precision)
        kwargs: dict[str, Any] = {"mixed_precision": config.precision, "cpu": not torch.cuda.is_available()}
        # strategy=fsdp: the model is sharded below with torch's FSDP2 (lrzoo.train.sharding), not
        # accelerate's FSDP plugin (which accelerate enables on accelerators only: on CPUs it was DDP).
        if config.strategy not in ("auto", "fsdp"):
            raise ValueError(f"trainer.strategy must be 'auto' or 'fsdp', got {config.strategy!r}.")
        self.accelerator = Accelerator(**kwargs)
        self.autocast_dtype = autocast_dtype(self.accelerator)
        check_autocast(config.precision, self.autocast_dtype)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process

        self.micro, self.accum = self._batch_layout()
        self.train_features = encode_rows(list(train_rows), task.kind, tokenizer, config.max_length)
        self.eval_sets = {
            name: (t, encode_rows(list(rows), t.kind, tokenizer, config.max_length,
                                  for_generation=t.kind == "generation"), list(rows))
            for name, (t, rows) in eval_sets.items()
        }
        self.total_steps = planned_steps(len(self.train_features), config)
        self.steps_per_epoch = len(self.train_features) // config.batch_size

        self.peft_model = model
        # a PeftModel, or a plain model for the baselines (lrzoo.train.baselines): saved whole
        self._is_peft = isinstance(model, PeftModel)
        # FSDP with one process is plain training; with several, the frozen base is sharded.
        self.sharded = config.strategy == "fsdp" and self.world > 1
        if self.sharded:
            self.model = shard_model(model, self.accelerator.device, self.callbacks)
        else:
            self.model = self.accelerator.prepare(model)
        self.optimizer = self.accelerator.prepare(
            self.procedure.make_optimizer(self.accelerator.unwrap_model(self.model)))
        # Stepped by us once per optimizer step (accelerate's wrapper would step it once per rank).
        self.scheduler = (scheduler_factory or self.procedure.make_scheduler)(self.optimizer, self.total_steps)
        self.start_step = 0
        self.train_time = 0.0
        self.tokens_seen = 0
        self.best: dict[str, Any] = {}
        self.last_eval: dict[str, float] = {}
        self.nonfinite_metrics: dict[str, str] = {}  # last evaluation's NaN scores -> why
        # Its skip counts travel in checkpoints with the callbacks' state (it has state_dict).
        quoted = {k: getattr(config, k) for k in ("lr", "max_grad_norm", "warmup_ratio", "precision")}
        self.guard = NonfiniteGuard(config.on_nonfinite, self.total_steps, lambda: latest_checkpoint(run_dir), quoted)
        self.callbacks.append(self.guard)

    # ---- layout -----------------------------------------------------------------------------

    def _batch_layout(self) -> tuple[int, int]:
        c = self.config
        if c.batch_size % self.world:
            raise ValueError(f"trainer.batch_size={c.batch_size} (the global batch) must be divisible by the "
                             f"number of processes ({self.world}).")
        per_rank = c.batch_size // self.world
        micro = c.micro_batch_size or per_rank
        if per_rank % micro:
            raise ValueError(f"trainer.micro_batch_size={micro} must divide the per-process batch {per_rank} "
                             f"(batch_size {c.batch_size} / {self.world} processes).")
        return micro, per_rank // micro

    # ---- checkpoints ------------------------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    def save_checkpoint(self, step: int) -> None:
        """Write ``checkpoints/step-<step>`` atomically (rank 0), keeping the newest few."""
        rng = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if self.is_main:
            state = {
                "step": step,
                "config_hash": self.run_info.get("config_hash"),
                "world_size": self.world,
                "adapter": get_peft_model_state_dict(self.peft_model) if self._is_peft else None,
                "trainable": self._trainable_state(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in self.callbacks],
                "rng": rng,
                "progress": {"train_time": self.train_time, "tokens_seen": self.tokens_seen,
                             "best": self.best, "last_eval": self.last_eval},
            }
            path = os.path.join(self.run_dir, "checkpoints", f"step-{step:07d}")
            with atomic_directory(path) as tmp:
                torch.save(state, os.path.join(tmp, "trainer_state.pt"))
            self._prune_checkpoints()
        self.accelerator.wait_for_everyone()

    def _prune_checkpoints(self) -> None:
        root = os.path.join(self.run_dir, "checkpoints")
        steps = sorted(name for name in os.listdir(root) if CHECKPOINT_RE.match(name))
        for name in steps[:-max(self.config.keep_checkpoints, 1)]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def load_checkpoint(self, path: str) -> None:
        """Restore everything :meth:`save_checkpoint` wrote; training continues at its step.

        A missing, cut-short or garbled ``trainer_state.pt`` raises
        :class:`lrzoo.train.resume.UnreadableCheckpoint` before anything is changed."""
        state = read_trainer_state(path)
        expected = self.run_info.get("config_hash")
        if state["config_hash"] != expected:
            raise ValueError(
                f"Checkpoint {path} was written by a run with another configuration (hash {state['config_hash']} "
                f"vs {expected}). Resume with the same settings, pick a new run directory (run_name=...), "
                "or start over with resume=never."
            )
        if state["adapter"] is not None:
            set_peft_model_state_dict(self.peft_model, state["adapter"])
        params = dict(self.accelerator.unwrap_model(self.model).named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for cb, cb_state in zip(self.callbacks, state["callbacks"]):
            if cb_state is not None:
                cb.load_state_dict(cb_state)
        if state["world_size"] != self.world:
            print(f"[lrzoo] resuming a {state['world_size']}-process run on {self.world}: the data order is "
                  "unchanged, dropout randomness is not.", file=sys.stderr)
        set_rng_state(state["rng"][self.rank % len(state["rng"])])
        progress = state["progress"]
        self.start_step, self.train_time = state["step"], progress["train_time"]
        self.tokens_seen, self.best, self.last_eval = progress["tokens_seen"], progress["best"], progress["last_eval"]

    # ---- training ---------------------------------------------------------------------------

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(*args)

    def _step_batches(self, step: int, order_cache: dict[int, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for optimizer step ``step`` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch not in order_cache:
            order_cache.clear()
            order_cache[epoch] = epoch_order(len(self.train_features), self.config.seed, epoch)
        rows = order_cache[epoch][position * self.config.batch_size:(position + 1) * self.config.batch_size]
        per_rank = self.config.batch_size // self.world
        mine = rows[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()
        pad_id = self.tokenizer.pad_token_id
        return [collate([self.train_features[i] for i in mine[k:k + self.micro]], pad_id)
                for k in range(0, len(mine), self.micro)]

    def _is_due(self, step: int, every: Optional[int]) -> bool:
        if every is None:
            return step % self.steps_per_epoch == 0
        return every > 0 and step % every == 0

    def fit(self) -> Optional[dict[str, Any]]:
        """Train to ``total_steps`` (from ``start_step`` when resumed), evaluate, save the adapter.

        Returns the results (also written to ``results.json``), or ``None`` when ``stop_after``
        ended the run early.
        """
        c = self.config
        self._call("on_train_begin", self)
        self.model.train()
        device = self.accelerator.device
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc="train", dynamic_ncols=True,
                   disable=not (c.progress and self.is_main))
        order_cache: dict[int, torch.Tensor] = {}
        window_loss, window_steps = torch.zeros((), device=device), 0
        step, started = self.start_step, time.perf_counter()
        segment_start = started
        while step < self.total_steps:
            micro_batches = self._step_batches(step, order_cache)
            step_loss = torch.zeros((), device=device)
            for k, batch in enumerate(micro_batches):
                batch = {key: value.to(device) for key, value in batch.items()}
                self.tokens_seen += int(batch["attention_mask"].sum()) * self.world
                last = k == len(micro_batches) - 1
                with self.accelerator.no_sync(self.model) if not last else contextlib.nullcontext():
                    with self.accelerator.autocast():
                        loss = self.model(**batch).loss / self.accum
                    self.accelerator.backward(loss)
                step_loss += loss.detach()
            if self._update(step + 1, step_loss):  # False: skipped (non-finite, on_nonfinite=skip_step)
                window_loss += step_loss
                window_steps += 1
            step += 1
            bar.update(1)
            # Callbacks get the plain model and torch optimizer (its .state), not accelerate's wrappers.
            self._call("on_step_end", step, self.accelerator.unwrap_model(self.model),
                       getattr(self.optimizer, "optimizer", self.optimizer), self.scheduler)

            if step % c.log_every == 0 or step == self.total_steps:
                logged = {}
                if window_steps:  # 0 when every step of the window was skipped (same on every rank)
                    logged["train/loss"] = self.accelerator.reduce(window_loss, "mean").item() / window_steps
                    bar.set_postfix(loss=f"{logged['train/loss']:.4f}")
                logged["train/lr"] = self.scheduler.get_last_lr()[0]
                if c.on_nonfinite == "skip_step":
                    logged["train/skipped_steps"] = self.guard.skipped
                self._call("on_log", step, logged)
                window_loss.zero_()
                window_steps = 0
            if self._is_due(step, c.eval_every) and step != self.total_steps:
                self._evaluate_and_log(step)
            stopping = c.stop_after is not None and step - self.start_step >= c.stop_after
            if step != self.total_steps and (self._is_due(step, c.save_every) or stopping):
                self.train_time += time.perf_counter() - segment_start
                self.save_checkpoint(step)
                segment_start = time.perf_counter()
            if stopping and step != self.total_steps:
                bar.close()
                return None
        bar.close()
        self.train_time += time.perf_counter() - segment_start
        self._evaluate_and_log(step)
        results = self._results(step)
        self._save_adapter()
        if self.is_main:
            with atomic_file(os.path.join(self.run_dir, "results.json")) as handle:
                json.dump(results, handle, indent=2, allow_nan=False)  # strict JSON: NaN is null
        self._call("on_train_end", self)
        return results

    def _update(self, step: int, step_loss: torch.Tensor) -> bool:
        """Apply optimizer step ``step`` (1-based) unless its loss or gradient norm is non-finite
        (:class:`lrzoo.train.divergence.NonfiniteGuard`: stop or skip, the same on every rank).
        Returns whether the update was applied."""
        c = self.config
        scaler = self.accelerator.scaler  # fp16: overflowing gradients are the GradScaler's to skip
        norm = None
        if scaler is None:
            if c.max_grad_norm:
                norm = self.accelerator.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
            if norm is None:  # no clipping: the norm is still needed to see a NaN/inf gradient
                norm = total_grad_norm(self.model.parameters())
        applied = self.guard.check(step, step_loss, norm)
        if applied:
            if scaler is not None and c.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    def _evaluate_and_log(self, step: int) -> None:
        metrics = self.evaluate()
        self.last_eval = metrics
        self._call("on_log", step, {f"eval/{k}": v for k, v in metrics.items()})
        for name, reason in self.nonfinite_metrics.items():
            warnings.warn(f"eval {name} is {metrics[name]} at step {step}: {reason}. It is reported as null in "
                          "results.json (see nonfinite_metrics) and never selected as the best evaluation.",
                          UndefinedMetricWarning, stacklevel=2)
        score = metrics.get("score")
        if is_finite_number(score) and (not self.best or score > self.best["score"]):
            self.best = {"step": step, "score": score, "metrics": metrics}
        self.model.train()

    def _results(self, step: int) -> dict[str, Any]:
        model = self.accelerator.unwrap_model(self.model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        return json_safe({
            **self.run_info,
            "task": self.task.name,
            "primary_metric": self.task.primary_metric,
            "score": self.last_eval.get("score"),  # NaN -> null (json_safe), the reason in nonfinite_metrics
            "metrics": self.last_eval,
            "nonfinite_metrics": self.nonfinite_metrics,
            "best": self.best,
            "trainable_params": trainable,
            "total_params": total,
            "steps": step,
            "world_size": self.world,
            "parallelism": "fsdp" if self.sharded else "ddp" if self.world > 1 else "none",
            "wall_time_s": round(self.train_time, 3),
            "train_tokens_per_s": round(self.tokens_seen / max(self.train_time, 1e-9), 1),
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "peak_memory_kind": "cuda_allocated" if torch.cuda.is_available() else "cpu_max_rss",
            "precision": self.accelerator.mixed_precision,
            "autocast_dtype": self.autocast_dtype,
            "on_nonfinite": self.config.on_nonfinite,
            "nonfinite_steps_skipped": self.guard.skipped,
        })

    def _save_adapter(self) -> None:
        # FSDP keeps what an adapter file holds whole on every rank (lrzoo.train.sharding); a baseline
        # saves the full model: gather it (a collective: every rank calls it).
        state_dict = (full_state_dict(self.model, keep=self.is_main) if self.sharded and not self._is_peft
                      else None)
        if self.is_main:
            with atomic_directory(os.path.join(self.run_dir, "adapter")) as tmp:
                self.peft_model.save_pretrained(tmp, state_dict=state_dict)
                self.tokenizer.save_pretrained(tmp)
        self.accelerator.wait_for_everyone()

    # ---- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Score every eval set; keys ``<task>/<metric>`` when there are several, plus ``score``:
        the primary metric (the mean of the sets' primary metrics for multi-set tasks)."""
        self.model.eval()
        results: dict[str, float] = {}
        primaries = []
        self.nonfinite_metrics = {}
        for name, (task, features, rows) in self.eval_sets.items():
            predictions = self._predict(task, features)
            references = [row["answer"] if task.kind == "generation" else row["label"] for row in rows]
            missing = sum(p is None for p in predictions)
            if missing:  # non-finite model outputs: no score is better than a made-up one
                metrics = {k: math.nan for k in task.metric_names}
            else:
                with warnings.catch_warnings():  # said once, with the step, by _evaluate_and_log
                    warnings.simplefilter("ignore", UndefinedMetricWarning)
                    metrics = task.compute_metrics(predictions, references)
            prefix = f"{name}/" if len(self.eval_sets) > 1 else ""
            results.update({prefix + k: float(v) for k, v in metrics.items()})
            primaries.append(float(metrics[task.primary_metric]))
            for k, v in metrics.items():
                if not math.isfinite(float(v)):
                    self.nonfinite_metrics[prefix + k] = (
                        f"{missing} of {len(predictions)} rows got non-finite logits (NaN/inf: the weights or "
                        "activations overflowed)" if missing else nonfinite_reason(predictions, references))
        results["score"] = float(np.mean(primaries))
        if not math.isfinite(results["score"]):
            undefined = [k for k in self.nonfinite_metrics if k.split("/")[-1] in {t.primary_metric for t, _, _ in
                                                                                  self.eval_sets.values()}]
            self.nonfinite_metrics["score"] = f"the primary metric is not finite ({', '.join(undefined)})"
        return results

    def _predict(self, task: Any, features: list[dict]) -> list:
        """Predictions for ``features`` in order; rows are sharded over ranks and gathered."""
        mine = list(range(self.rank, len(features), self.world))
        # FSDP: each forward gathers weights from every rank, so all ranks run as many batches as rank 0.
        rows = -(-len(features) // self.world) if self.sharded else len(mine)
        model = self.accelerator.unwrap_model(self.model)
        size = self.config.eval_batch_size
        out: list[tuple[int, Any]] = []
        for start in tqdm(range(0, rows, size), desc=f"eval {task.name}", leave=False,
                          disable=not (self.config.progress and self.is_main)):
            index = mine[start:start + size]
            chunk = [features[i] for i in index] or features[:1]  # out of rows (FSDP): a discarded batch
            if task.kind == "generation":
                predictions = self._generate(model, task, chunk)
            else:
                batch = collate([{k: v for k, v in f.items() if k != "labels"} for f in chunk],
                                self.tokenizer.pad_token_id)
                with self.accelerator.autocast():
                    logits = model(**{k: v.to(self.accelerator.device) for k, v in batch.items()}).logits.float()
                predictions = (logits.squeeze(-1) if task.kind == "regression" else logits.argmax(-1)).tolist()
                # a row whose logits are NaN/inf has no prediction (argmax would quietly say class 0)
                finite = torch.isfinite(logits).flatten(1).all(-1).tolist()
                predictions = [p if ok else None for p, ok in zip(predictions, finite)]
            out.extend(zip(index, predictions))
        if self.world > 1:
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, out)
            out = [pair for part in gathered for pair in part]
        return [prediction for _, prediction in sorted(out, key=lambda pair: pair[0])]

    def _generate(self, model: nn.Module, task: Any, chunk: list[dict]) -> list[str]:
        options = {**getattr(task, "generation_config", {}), **self.config.generation}
        if self.sharded:  # ranks that finish early keep stepping with the others (FSDP's gathers)
            options["synced_gpus"] = True
        batch = collate(chunk, self.tokenizer.pad_token_id, left=True)
        batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        with self.accelerator.autocast(), gathered_root(model):
            output = model.generate(**batch, pad_token_id=self.tokenizer.pad_token_id, **options)
        texts = self.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [task.extract_answer(text) for text in texts]

