"""GLUE-style metrics computed offline with scikit-learn and scipy.

Key names match ``evaluate.load("glue", cfg)``: ``accuracy``, ``f1`` (binary, positive class 1),
``matthews_correlation``, ``pearson`` and ``spearmanr`` (STS-B), so results line up with papers and
HF scripts without downloading evaluate's metric code.

A correlation that is undefined (a constant prediction or reference, fewer than two rows, a non-finite
value) is ``nan`` with an :class:`UndefinedMetricWarning` that says why (:func:`nonfinite_reason`),
rather than scipy's generic warning.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import math
import warnings

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from ..registry_table import Table


def modal_share(answers: Sequence) -> float:
    """The share of the most frequent answer (non-empty ``answers``): 1.0 for a model that always gives the
    same one, whatever its accuracy (the report's answer-diversity table, loglik's ``modal_share``)."""
    return Counter(answers).most_common(1)[0][1] / len(answers)


def check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references; "
                         "pass one prediction per evaluation row.")
    if len(references) == 0:
        raise ValueError("no predictions to score: the evaluation split is empty (check limit / data_dir).")


def _labels(values: Sequence) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"expected one class id per row (shape (n,)), got shape {array.shape}; "
                         "take argmax over the logits first.")
    return array


def accuracy(predictions: Sequence, references: Sequence) -> float:
    return float((_labels(predictions) == _labels(references)).mean())


def f1(predictions: Sequence, references: Sequence) -> float:
    return float(f1_score(_labels(references), _labels(predictions)))


def matthews_correlation(predictions: Sequence, references: Sequence) -> float:
    return float(matthews_corrcoef(_labels(references), _labels(predictions)))


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined (``nan``) for these predictions, e.g. the correlation of a constant prediction."""


def pearson(predictions: Sequence, references: Sequence) -> float:
    return _correlation("pearson", pearsonr, predictions, references)


def spearman(predictions: Sequence, references: Sequence) -> float:
    return _correlation("spearmanr", spearmanr, predictions, references)


def _correlation(name: str, fn: Callable, predictions: Sequence, references: Sequence) -> float:
    x, y = _scores(predictions), _scores(references)
    reason = _undefined_correlation(x, y)
    if reason is not None:
        warnings.warn(f"{name} is undefined (nan): {reason}.", UndefinedMetricWarning, stacklevel=3)
        return math.nan
    return float(fn(x, y)[0])


def _undefined_correlation(x: np.ndarray, y: np.ndarray) -> str | None:
    if len(x) < 2:
        return f"a correlation needs at least 2 rows, got {len(x)}"
    for values, what in ((x, "predictions"), (y, "references")):
        bad = int((~np.isfinite(values)).sum())
        if bad:
            return f"{bad} of {len(values)} {what} are not finite (NaN/inf)"
        if (values == values[0]).all():
            return f"the {what} are constant (every one is {values[0]:g}), so their correlation is undefined"
    return None


def nonfinite_reason(predictions: Sequence, references: Sequence) -> str:
    """Why a metric of ``predictions`` against ``references`` can come out NaN, in words."""
    try:
        x, y = _scores(predictions), _scores(references)
    except (TypeError, ValueError):
        return "the metric is undefined for these predictions"
    return _undefined_correlation(x, y) or "the metric is undefined for these predictions"


def _scores(values: Sequence) -> np.ndarray:
    return _labels(values).astype(np.float64)


METRICS: Table[Callable[[Sequence, Sequence], float]] = Table("metric", entries={
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearman,
})


def compute(names: Sequence[str], predictions: Sequence, references: Sequence) -> dict[str, float]:
    """``{name: metric(predictions, references)}`` for each of ``names``."""
    check_lengths(predictions, references)
    metrics = [METRICS.lookup(name) for name in names]  # every name checked before any is computed
    return {name: metric(predictions, references) for name, metric in zip(names, metrics)}
