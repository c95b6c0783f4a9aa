"""Bootstrap intervals over evaluation examples, for comparing methods on the same dev sets.

One set of replicates per task (:func:`replicate_indices`: ``replicates × n`` example indices drawn with
replacement, from an RNG seeded by :data:`SEED` and the task's name) is shared by every run on that
task: each replicate recomputes the task's primary metric on the resampled predictions of each seed
(:func:`metric_replicates`, vectorised; the same numbers as :mod:`lrzoo.tasks.metrics` on each
resample), averages over the seeds of a cell (:func:`cell_replicates`), and the 2.5th and 97.5th
percentiles of those means are the cell's 95% interval (:func:`percentile_interval`). Because two cells
of a task see the same resamples, the difference of their replicates is a *paired* bootstrap of their
difference (:func:`paired_difference`): an interval that excludes 0 is a real difference at the 95%
level; one that contains 0 is a tie, given these dev sets and these seeds.

A language-modelling set (pre-training's WikiText-2 test text) is resampled by its test blocks: each replicate's
``neg_loss`` is minus the summed NLL of the drawn blocks over their summed tokens (:func:`_neg_loss`); its
perplexity is exp(-neg_loss), so the percentiles carry over to perplexity (:mod:`lrzoo.lab.perplexity`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Optional

import numpy as np
from scipy.stats import rankdata

#: replicates per task; the percentile interval's Monte Carlo error is then ~0.1 point on GLUE dev sets
REPLICATES = 2000
SEED = 0
LEVEL = 0.95


def replicate_indices(n: int, task: str, replicates: int = REPLICATES, seed: int = SEED) -> np.ndarray:
    """``(replicates, n)`` indices into a task's ``n`` dev examples, the same for every run of the task
    (the RNG is seeded by ``seed`` and the task name, so adding a task changes no other's)."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    return rng.integers(0, n, size=(replicates, n))


def metric_replicates(metric: str, predictions: Sequence, references: Sequence, indices: np.ndarray) -> np.ndarray:
    """``metric`` (an :data:`lrzoo.tasks.metrics.METRICS` name, or a language-modelling set's ``neg_loss``:
    :func:`_neg_loss`) of every resample ``predictions[idx]`` against
    ``references[idx]`` for each row ``idx`` of ``indices``: shape ``(replicates,)``. Undefined values (the
    correlation of a constant resample) are NaN, as in :mod:`lrzoo.tasks.metrics`."""
    p, r = np.asarray(predictions), np.asarray(references)
    if p.shape != r.shape or p.ndim != 1:
        raise ValueError(f"predictions {p.shape} and references {r.shape} must be two vectors of one length")
    if metric == "accuracy":
        return (p == r)[indices].mean(axis=1)
    if metric == "f1":  # binary, positive class 1; no positive at all -> 0.0 (scikit-learn's zero_division)
        pred, ref = (p == 1)[indices], (r == 1)[indices]
        tp = (pred & ref).sum(1)
        denominator = pred.sum(1) + ref.sum(1)
        return np.divide(2.0 * tp, denominator, out=np.zeros(len(indices)), where=denominator > 0)
    if metric == "matthews_correlation":
        return _matthews(p[indices], r[indices])
    if metric == "pearson":
        return _pearson(p.astype(np.float64)[indices], r.astype(np.float64)[indices])
    if metric == "spearmanr":
        return _pearson(rankdata(p.astype(np.float64)[indices], axis=1), rankdata(r.astype(np.float64)[indices], axis=1))
    if metric == "neg_loss":
        return _neg_loss(p.astype(np.float64), r.astype(np.float64), indices)
    from ..tasks.metrics import METRICS

    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    return np.array([METRICS[metric](p[idx], r[idx]) for idx in indices], dtype=np.float64)


def _neg_loss(nll: np.ndarray, tokens: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """A language-modelling set's ``neg_loss`` per row: predictions are each test block's summed token NLL, references
    its number of predicted tokens, so a resample of blocks scores minus its summed NLL over its summed tokens (a
    ratio estimator: blocks of unequal length weigh by their tokens, as the whole set's per-token loss does, not
    the mean of per-block losses). No token at all is undefined (NaN)."""
    total = tokens[indices].sum(1)
    return np.divide(-nll[indices].sum(1), total, out=np.full(len(indices), np.nan), where=total > 0)


def _matthews(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Multiclass Matthews correlation per row (scikit-learn's formula; a zero denominator gives 0.0)."""
    n = pred.shape[1]
    correct = (pred == ref).sum(1).astype(np.float64)
    sum_pt = np.zeros(len(pred))
    sum_pp = np.zeros(len(pred))
    sum_tt = np.zeros(len(pred))
    for label in np.union1d(pred, ref):
        p_k, t_k = (pred == label).sum(1).astype(np.float64), (ref == label).sum(1).astype(np.float64)
        sum_pt += p_k * t_k
        sum_pp += p_k ** 2
        sum_tt += t_k ** 2
    cov_pt = correct * n - sum_pt
    denominator = np.sqrt((n * n - sum_pp) * (n * n - sum_tt))
    return np.divide(cov_pt, denominator, out=np.zeros(len(pred)), where=denominator > 0)


def _pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r per row; NaN where either side is constant (centring would leave rounding noise there)."""
    constant = (x == x[:, :1]).all(1) | (y == y[:, :1]).all(1)
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    denominator = np.sqrt((x * x).sum(1) * (y * y).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(constant | ~(denominator > 0), np.nan, (x * y).sum(1) / denominator)


def seed_replicates(metric: str, per_seed_predictions: Sequence[Sequence], references: Sequence,
                    indices: np.ndarray) -> np.ndarray:
    """Each seed's metric on each replicate: ``(seeds, replicates)``."""
    return np.stack([metric_replicates(metric, p, references, indices) for p in per_seed_predictions])


def cell_replicates(metric: str, per_seed_predictions: Sequence[Sequence], references: Sequence,
                    indices: np.ndarray) -> np.ndarray:
    """The mean over seeds of each replicate's metric: one cell's bootstrap distribution (``(replicates,)``)."""
    return seed_replicates(metric, per_seed_predictions, references, indices).mean(axis=0)


def seeds_resampled(per_seed: np.ndarray, task: str, seed: int = SEED) -> np.ndarray:
    """Replicates that also resample the training seeds: replicate r averages ``k`` seeds drawn with replacement
    from the cell's ``k`` (the same draws for every cell of a task), each on replicate r's resampled examples.

    The pooled replicates of :func:`cell_replicates` hold the seeds fixed, so their interval is the dev set's
    sampling error of *these* seeds' mean; a method whose seeds disagree (a seed that fails) can look really
    worse or better by it when another draw of seeds would not. This two-level bootstrap adds the seed spread
    (with 3 seeds it underestimates it by about (k - 1)/k, and only 10 seed multisets exist: a coarse check)."""
    k, replicates = per_seed.shape
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), 1])
    draws = rng.integers(0, k, size=(replicates, k))
    return per_seed[draws, np.arange(replicates)[:, None]].mean(axis=1)


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap ``values`` (NaN if any replicate is undefined)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        return (float("nan"), float("nan"))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> tuple[float, float, str]:
    """The ``level`` interval of ``a - b`` over shared replicates and a verdict: ``"worse"`` (all of it below
    0), ``"better"`` (all above), ``"tied"`` (it contains 0), ``"n/a"`` (undefined)."""
    low, high = percentile_interval(np.asarray(a) - np.asarray(b), level)
    if not (np.isfinite(low) and np.isfinite(high)):
        return low, high, "n/a"
    return low, high, "worse" if high < 0 else "better" if low > 0 else "tied"


def point_metric(metric: str, predictions: Sequence, references: Sequence) -> Optional[float]:
    """The metric on the whole set (the identity resample), through the same code as the replicates."""
    value = metric_replicates(metric, predictions, references, np.arange(len(references))[None, :])[0]
    return float(value) if np.isfinite(value) else None
