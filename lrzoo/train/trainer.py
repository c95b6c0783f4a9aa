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
  ``task.is_correct`` (or, with ``eval.mode=loglik``, by the likelihood of each option: :mod:`.loglik`).
* **Evaluation only.** A model marked ``lrzoo_evaluate_only`` (``adapter=zero_shot``) is evaluated once, untrained.

The loop is this module; its pieces are listed in :mod:`lrzoo.train`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Optional, Sequence

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .checkpoint import CheckpointMixin, latest_checkpoint, rng_state, seed_everything, set_rng_state
from .config import EvalConfig, TrainerConfig
from ..heads import pair_encoding
from .data import (IGNORE_INDEX, batch_layout, collate, encode_rows, epoch_order, planned_steps, step_rows,
                   truncated_share)
from .divergence import NonfiniteGuard, total_grad_norm
from .memory_trace import MemoryTrace
from .evaluation import EvaluationMixin, peak_memory_mb
from .precision import autocast_dtype, check_autocast, use_precision
from ..procedure import Procedure
from ..registry import record_of
from .procedures import loop_data
from .run_dir import check_shared
from .sharding import shard_model

# Re-exported: they lived here before the trainer was split (``from lrzoo.train.trainer import collate``).
__all__ = ["IGNORE_INDEX", "Trainer", "TrainerConfig", "collate", "encode_rows", "epoch_order", "latest_checkpoint",
           "peak_memory_mb", "planned_steps", "rng_state", "seed_everything", "set_rng_state"]


class Trainer(CheckpointMixin, EvaluationMixin):
    """Train ``model`` (a ``PeftModel`` from :func:`lrzoo.wrap`) on ``task`` and evaluate it.

    Args:
        model: the wrapped model (unprepared; the trainer moves and wraps it).
        tokenizer: its tokenizer (with a pad token).
        task: a :class:`lrzoo.tasks.base.Task`.
        train_rows: the training split (a ``datasets.Dataset`` or list of row dicts).
        eval_sets: ``{task name: (task, rows)}``; each is scored and reported separately.
        config: hyperparameters.
        run_dir: where checkpoints, ``metrics.csv``, ``results.json``, ``predictions.json`` and ``adapter/`` go.
        callbacks: objects with the hooks of :mod:`lrzoo.train.callbacks`.
        run_info: extra fields copied into ``results.json`` (adapter, model, seed, config hash...).
            ``run_info["config_hash"]`` must match a checkpoint's to resume from it.
        scheduler_factory: ``f(optimizer, total_steps) -> scheduler`` replacing the procedure's
            schedule.
        procedure: the method's training procedure (:func:`lrzoo.train.procedures.procedure_for`, a :class:`lrzoo.procedure.Procedure`):
            its ``before_training`` runs first, it builds the optimizer and the schedule, and its
            callbacks run before ``callbacks``. ``None``: the plain one.
        evaluation: how generation tasks are scored (the root ``eval`` node: ``mode``
            generate|loglik, ``choices`` label|text); ``None``: :class:`EvalConfig`'s defaults (decoding).
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
        evaluation: Optional[EvalConfig] = None,
    ):
        from accelerate import Accelerator

        config.validate()
        self.procedure = procedure if procedure is not None else Procedure(config=config)
        self.procedure.before_training(model, train_rows, task, loop_data(config, model, task, tokenizer))
        self.config, self.task, self.tokenizer, self.run_dir = config, task, tokenizer, run_dir
        self.evaluation = evaluation if evaluation is not None else EvalConfig()
        self.trains = not record_of(model).evaluate_only  # False: zero-shot, evaluated once
        self.callbacks = [*self.procedure.callbacks(model), *callbacks]
        self.run_info = dict(run_info or {})
        use_precision(config.precision)
        # strategy=fsdp: the model is sharded below with torch's FSDP2 (lrzoo.train.sharding), not
        # accelerate's FSDP plugin (which accelerate enables on accelerators only: on CPUs it was DDP).
        self.accelerator = Accelerator(mixed_precision=config.precision, cpu=not torch.cuda.is_available())
        self.autocast_dtype = autocast_dtype(self.accelerator)
        check_autocast(config.precision, self.autocast_dtype)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        if self.world > 1:  # several machines: before anything is resumed from, or written to, the run directory
            check_shared(run_dir, self.rank, self.world)

        self.micro, self.accum = batch_layout(config, self.world)
        self.pairs = pair_encoding(model)  # "separate" for a bi-encoder (lrzoo.heads)
        train_rows = list(train_rows)
        self.train_features = (encode_rows(train_rows, task.kind, tokenizer, config.max_length, pairs=self.pairs)
                               if self.trains else [])
        self._encode_eval_sets(eval_sets)  # self.eval_sets, self.eval_kinds (lrzoo.train.evaluation)
        # the share of rows max_length cuts, per set: results.json's "truncated" (lrzoo.train.data.truncated_share)
        self.truncated = {"train": truncated_share(train_rows, task.kind, tokenizer, config.max_length, self.pairs),
                          **{name: truncated_share(rows, t.kind, tokenizer, config.max_length, self.pairs,
                                                   scoring=self.eval_kinds[name])
                             for name, (t, _, rows) in self.eval_sets.items()}}
        self._prepare_calibration(model, train_rows)  # rows a bi-encoder's threshold is chosen on (lrzoo.train.evaluation)
        self.total_steps = planned_steps(len(self.train_features), config) if self.trains else 0
        self.steps_per_epoch = len(self.train_features) // config.batch_size

        self.peft_model = model
        # a PeftModel, or a plain model for the baselines (lrzoo.train.baselines): saved whole
        self._is_peft = isinstance(model, PeftModel)
        # FSDP with one process is plain training; with several, the frozen base is sharded.
        self.sharded = config.strategy == "fsdp" and self.world > 1
        if self.sharded:
            self.model = shard_model(model, self.accelerator.device, self.callbacks)
        else:  # (DDP refuses a model with nothing to train: zero-shot is only moved)
            self.model = self.accelerator.prepare(model) if self.trains else model.to(self.accelerator.device)
        self.optimizer = self.scheduler = None
        if self.trains:
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
        # after the others: a checkpoint written before it existed still resumes (callback states go by position)
        self.memory_trace = MemoryTrace()   # results.json's memory: the mean of per-step samples
        self.callbacks.append(self.memory_trace)
        self.forgetting = None   # lrzoo.train.forgetting.Forgetting, set by lrzoo-train for eval.forgetting

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
        mine = step_rows(order_cache[epoch], position, self.config.batch_size, self.rank, self.world)
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
                self.tokens_seen += sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask")) * self.world
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
        if self.trains:
            self._save_adapter()
        self._write_results(results)  # predictions.json, then results.json
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
