"""Evaluation of the trainer: scoring every eval set, decoding generation tasks, ``results.json`` and
``predictions.json``.

Classification/regression rows are scored from the logits (a row with NaN/inf logits has no prediction
and makes its metrics NaN, reported as null with the reason); generation rows are decoded with the
task's settings overridden by ``trainer.generation``, then ``task.extract_answer``; with ``eval.mode=loglik``
multiple-choice generation tasks are scored by the likelihood of each option instead (:mod:`.loglik`:
``accuracy`` and ``acc_norm``). Rows are sharded over ranks and gathered; under FSDP every rank runs as many
batches as rank 0 (each forward gathers weights from all ranks) and generation gathers the root module.
Eval sets named ``heldout/...`` (slices of the training split) are left out of ``score``: their primary
metric is ``selection_score``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import warnings
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from ..heads import best_threshold, find_pooled_head, head_spec
from ..io import atomic_file
from ..optimizers import state_bytes, weight_bytes
from ..runs.files import HELDOUT_PREFIX, PREDICTIONS_FILE, RESULTS_FILE
from ..tasks.metrics import UndefinedMetricWarning, nonfinite_reason
from . import lm, loglik
from .data import collate, encode_rows
from .divergence import is_finite_number, json_safe
from .sharding import gathered_root


def peak_memory_mb() -> float:
    """Peak accelerator memory of this process if on CUDA, else its peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


#: training rows a binary bi-encoder's threshold is chosen on when the run holds out no slice of them
CALIBRATION_ROWS = 1000


class EvaluationMixin:
    """:class:`lrzoo.train.trainer.Trainer`'s evaluation and results. Uses the trainer's ``accelerator``,
    ``model``, ``tokenizer``, ``config``, ``task``, ``eval_sets``, ``rank``/``world``/``sharded``, ``guard``
    and its progress (``best``, ``last_eval``, ``train_time``, ``tokens_seen``...)."""

    #: features a binary bi-encoder's threshold is chosen on (set by _prepare_calibration); none by default
    calibration: Optional[dict] = None

    def _encode_eval_sets(self, eval_sets: dict[str, tuple[Any, Any]]) -> None:
        """``self.eval_sets``: ``{name: (task, features, rows)}``, and how each is scored (``self.eval_kinds``:
        the task's kind, or ``"loglik"`` for a multiple-choice generation task under ``eval.mode=loglik``)."""
        self.eval_sets, self.eval_kinds = {}, {}
        for name, (task, rows) in eval_sets.items():
            rows = list(rows)
            if self.evaluation.mode == "loglik":
                if not getattr(task, "multiple_choice", False):
                    raise ValueError(f"eval.mode=loglik scores the options of multiple-choice tasks (commonsense/*); "
                                     f"{name} is a {task.kind} task without options: evaluate it with "
                                     "eval.mode=generate (the default, the task's own protocol).")
                features = loglik.encode_items(task, rows, self.tokenizer, self.config.max_length,
                                               self.evaluation.choices)
                self.eval_kinds[name] = "loglik"
            else:
                features = encode_rows(rows, task.kind, self.tokenizer, self.config.max_length,
                                       for_generation=task.kind == "generation", pairs=self.pairs)
                self.eval_kinds[name] = task.kind
            self.eval_sets[name] = (task, features, rows)

    def _prepare_calibration(self, model: nn.Module, train_rows: list) -> None:
        """``self.calibration``: the features and labels a binary bi-encoder's threshold is chosen on before each
        evaluation (:meth:`_calibrate_head`): the run's held-out slice of the training split when it has one
        (``heldout/<task>``, never dev), else the first :data:`CALIBRATION_ROWS` training rows. ``None`` for
        every other head."""
        head = find_pooled_head(model)
        self.calibration = None
        if head is None or not head.needs_threshold:
            return
        held = [name for name in self.eval_sets if name.startswith(HELDOUT_PREFIX)]
        if held:
            _, features, rows = self.eval_sets[held[0]]
            source = held[0]
        else:
            rows = train_rows[:CALIBRATION_ROWS]
            features = encode_rows(rows, self.task.kind, self.tokenizer, self.config.max_length, pairs=self.pairs)
            source = f"the first {len(rows)} training rows"
        self.calibration = {"features": features, "labels": [row["label"] for row in rows], "source": source}

    @torch.no_grad()
    def _calibrate_head(self) -> None:
        """Set a binary bi-encoder's threshold to the cut of its cosine that is most accurate on
        ``self.calibration`` (:func:`lrzoo.heads.best_threshold`); the same on every rank (gathered scores)."""
        if self.calibration is None:
            return
        self.model.eval()
        scores = self._predict(self.task, self.calibration["features"], output="similarity")
        if any(score is None or not math.isfinite(score) for score in scores):
            return  # non-finite outputs: the evaluation reports them; no threshold can be chosen
        head = find_pooled_head(self.accelerator.unwrap_model(self.model))
        head.set_threshold(best_threshold(scores, self.calibration["labels"]))

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
        head = head_spec(model)
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
            # what the optimizer keeps (moments, projectors): GaLore/Fira's saving, LoRA-Pro's full-size cost
            "optimizer_state_mb": round(state_bytes(getattr(self.optimizer, "optimizer", self.optimizer)) / 2**20, 3)
            if self.optimizer is not None else 0.0,
            # the weights as stored (INT8 codes for Q-GaLore, B, A and the sparse values and indices for SLTrain):
            # with optimizer_state_mb, the pre-training papers' memory column; a sharded run's storage is per rank
            "weights_mb": None if self.sharded else round(weight_bytes(model) / 2**20, 3),
            "peak_memory_kind": "cuda_allocated" if torch.cuda.is_available() else "cpu_max_rss",
            "precision": self.accelerator.mixed_precision,
            "autocast_dtype": self.autocast_dtype,
            "on_nonfinite": self.config.on_nonfinite,
            "nonfinite_steps_skipped": self.guard.skipped,
            # how the encoder was read (lrzoo.heads) and, for a bi-encoder's threshold, on which rows it was chosen
            "head": None if head is None else
            {**head, **({"threshold_rows": self.calibration["source"]} if self.calibration else {})},
            "max_length": self.config.max_length,
            "truncated": self.truncated,  # per set, the share of rows max_length cut (null: not measured)
            **({"selection_score": self.last_eval["selection_score"]} if "selection_score" in self.last_eval else {}),
            # the mean of per-step memory samples beside the peak (lrzoo.train.memory_trace)
            **(self.memory_trace.results() if getattr(self, "memory_trace", None) is not None else {}),
            # the change of the loss on general text (eval.forgetting, lrzoo.train.forgetting)
            **(self.forgetting.results(model) if getattr(self, "forgetting", None) is not None else {}),
        })

    def _write_results(self, results: dict[str, Any]) -> None:
        """Rank 0 writes ``predictions.json`` (the last evaluation's per-example predictions), then
        ``results.json`` (whose presence marks the run finished)."""
        if not self.is_main:
            return
        with atomic_file(os.path.join(self.run_dir, PREDICTIONS_FILE)) as handle:
            json.dump(json_safe({"sets": self.last_predictions}), handle, allow_nan=False)
        with atomic_file(os.path.join(self.run_dir, RESULTS_FILE)) as handle:
            json.dump(results, handle, indent=2, allow_nan=False)  # strict JSON: NaN is null

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Score every eval set; keys ``<set>/<metric>`` when there are several, plus ``score``: the primary
        metric (the mean of the sets' primary metrics), without the ``heldout/`` sets, whose mean is
        ``selection_score`` (``score`` too when every set is held out). Keeps each set's per-example
        predictions in ``last_predictions`` (``predictions.json``)."""
        self._calibrate_head()
        self.model.eval()
        results: dict[str, float] = {}
        primaries: dict[bool, list[float]] = {False: [], True: []}  # held out -> primary metrics
        self.nonfinite_metrics, self.last_predictions = {}, {}
        for name, (task, features, rows) in self.eval_sets.items():
            kind, extra = self.eval_kinds[name], {}
            if kind == "language_modeling":  # pre-training: each block's NLL sum and token count (lrzoo.train.lm)
                scored = self._predict_nll(task, features)
                predictions = [None if s is None else s[0] for s in scored]
                references = [None if s is None else s[1] for s in scored]
                metric_names, primary = task.metric_names, task.primary_metric
            elif kind == "loglik":
                chosen = self._predict_loglik(task, features)
                predictions = [None if c is None else c[0] for c in chosen]
                extra["predictions_norm"] = [None if c is None else c[1] for c in chosen]
                references = [f["gold"] for f in features]
                metric_names, primary = loglik.METRICS, "accuracy"
            else:
                predictions = self._predict(task, features)
                references = [row["answer"] if task.kind == "generation" else row["label"] for row in rows]
                metric_names, primary = task.metric_names, task.primary_metric
            missing = sum(p is None for p in predictions)
            if missing:  # non-finite model outputs: no score is better than a made-up one
                metrics = {k: math.nan for k in metric_names}
            elif kind == "loglik":
                metrics = loglik.metrics(predictions, extra["predictions_norm"], references)
            else:
                with warnings.catch_warnings():  # said once, with the step, by _evaluate_and_log
                    warnings.simplefilter("ignore", UndefinedMetricWarning)
                    metrics = task.compute_metrics(predictions, references)
            self.last_predictions[name] = {"task": task.name, "kind": kind, "primary_metric": primary,
                                           "references": references, "predictions": predictions, **extra}
            prefix = f"{name}/" if len(self.eval_sets) > 1 else ""
            results.update({prefix + k: float(v) for k, v in metrics.items()})
            primaries[name.startswith(HELDOUT_PREFIX)].append(float(metrics[primary]))
            for k, v in metrics.items():
                if not math.isfinite(float(v)):
                    self.nonfinite_metrics[prefix + k] = (
                        f"{missing} of {len(predictions)} rows got non-finite logits (NaN/inf: the weights or "
                        "activations overflowed)" if missing else nonfinite_reason(predictions, references))
        if primaries[True]:
            results["selection_score"] = float(np.mean(primaries[True]))
        results["score"] = float(np.mean(primaries[False] or primaries[True]))
        if not math.isfinite(results["score"]):
            undefined = [k for k in self.nonfinite_metrics if k.split("/")[-1] in {t.primary_metric for t, _, _ in
                                                                                  self.eval_sets.values()}]
            self.nonfinite_metrics["score"] = f"the primary metric is not finite ({', '.join(undefined)})"
        return results

    def _predict(self, task: Any, features: list[dict], output: str = "logits") -> list:
        """Predictions for ``features`` in order; rows are sharded over ranks and gathered. ``output="similarity"``:
        a bi-encoder's cosine of each pair instead (:class:`lrzoo.heads.PairSimilarityOutput`)."""
        model = self.accelerator.unwrap_model(self.model)
        out: list[tuple[int, Any]] = []
        for index, chunk in self._shards(features, f"eval {task.name}"):
            if task.kind == "generation":
                predictions = self._generate(model, task, chunk)
            else:
                batch = collate([{k: v for k, v in f.items() if k != "labels"} for f in chunk],
                                self.tokenizer.pad_token_id)
                with self.accelerator.autocast():
                    outputs = model(**{k: v.to(self.accelerator.device) for k, v in batch.items()})
                logits = (outputs.similarity.unsqueeze(-1) if output == "similarity" else outputs.logits).float()
                predictions = (logits.squeeze(-1) if task.kind == "regression" or output != "logits"
                               else logits.argmax(-1)).tolist()
                # a row whose logits are NaN/inf has no prediction (argmax would quietly say class 0)
                finite = torch.isfinite(logits).flatten(1).all(-1).tolist()
                predictions = [p if ok else None for p, ok in zip(predictions, finite)]
            out.extend(zip(index, predictions))
        return self._gathered(out)

    def _shards(self, features: list[dict], desc: str) -> Iterator[tuple[list[int], list[dict]]]:
        """This rank's rows of ``features`` in eval batches: ``(row indices, rows)``. FSDP: each forward gathers
        weights from every rank, so all ranks run as many batches as rank 0; a rank out of rows gets ``[]`` and the
        first row as a discarded batch."""
        mine = list(range(self.rank, len(features), self.world))
        rows = -(-len(features) // self.world) if self.sharded else len(mine)
        size = self.config.eval_batch_size
        for start in tqdm(range(0, rows, size), desc=desc, leave=False,
                          disable=not (self.config.progress and self.is_main)):
            index = mine[start:start + size]
            yield index, [features[i] for i in index] or features[:1]

    def _predict_nll(self, task: Any, features: list[dict]) -> list[Optional[tuple[float, int]]]:
        """``(summed NLL, predicted tokens)`` of each language-model block (None: non-finite), in order; blocks
        are sharded over ranks and gathered (FSDP: every rank runs as many batches as rank 0)."""
        model = self.accelerator.unwrap_model(self.model)
        out: list[tuple[int, Any]] = []
        for index, chunk in self._shards(features, f"eval {task.name} (perplexity)"):
            batch = collate(chunk, self.tokenizer.pad_token_id)
            with self.accelerator.autocast():
                sums, counts = lm.block_nll(model, {k: v.to(self.accelerator.device) for k, v in batch.items()})
            out.extend((i, (s, c) if math.isfinite(s) else None) for i, s, c in zip(index, sums, counts))
        return self._gathered(out)

    def _predict_loglik(self, task: Any, features: list[dict]) -> list[Optional[tuple[int, int]]]:
        """``(acc, acc_norm)`` option choices of each item (None: non-finite scores), in order
        (:mod:`.loglik`); items are sharded over ranks, packed into batches and gathered."""
        plans = [loglik.pack(range(r, len(features), self.world), features, self.config.eval_batch_size)
                 for r in range(self.world)]
        mine = plans[self.rank]
        # FSDP: every rank runs as many forwards as the busiest (each gathers weights from all ranks)
        count = max(map(len, plans)) if self.sharded else len(mine)
        model = self.accelerator.unwrap_model(self.model)
        out: list[tuple[int, Any]] = []
        for k in tqdm(range(count), desc=f"eval {task.name} (loglik)", leave=False,
                      disable=not (self.config.progress and self.is_main)):
            batch = mine[k] if k < len(mine) else []
            scores = loglik.score_items(model, [features[i] for i in batch or [0]],  # [0]: a discarded batch
                                        pad_id=self.tokenizer.pad_token_id, device=self.accelerator.device,
                                        autocast=self.accelerator.autocast, shared_prefix=not self.sharded)
            out.extend((i, loglik.choose(s, features[i]["chars"]) if all(map(math.isfinite, s)) else None)
                       for i, s in zip(batch, scores))
        return self._gathered(out)

    def _gathered(self, out: list[tuple[int, Any]]) -> list:
        """Every rank's ``(row index, prediction)`` pairs, as predictions in row order."""
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
