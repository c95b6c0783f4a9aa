"""GLUE-style metrics computed offline with scikit-learn and scipy.

Key names match ``evaluate.load("glue", cfg)``: ``accuracy``, ``f1`` (binary, positive class 1),
``matthews_correlation``, ``pearson`` and ``spearmanr`` (STS-B), so results line up with papers and
HF scripts without downloading evaluate's metric code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef


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


def pearson(predictions: Sequence, references: Sequence) -> float:
    return float(pearsonr(_scores(predictions), _scores(references))[0])


def spearman(predictions: Sequence, references: Sequence) -> float:
    return float(spearmanr(_scores(predictions), _scores(references))[0])


def _scores(values: Sequence) -> np.ndarray:
    return _labels(values).astype(np.float64)


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearman,
}


def compute(names: Sequence[str], predictions: Sequence, references: Sequence) -> dict[str, float]:
    """``{name: metric(predictions, references)}`` for each of ``names``."""
    check_lengths(predictions, references)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}.")
    return {name: METRICS[name](predictions, references) for name in names}
