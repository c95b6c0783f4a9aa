"""Metrics on hand-made predictions, checked against values worked out by hand from their definitions."""

from __future__ import annotations

import math

import pytest

from lrzoo.tasks import get_task
from lrzoo.tasks.metrics import compute

# 8 binary predictions: TP=3, TN=2, FP=1, FN=2.
PRED = [1, 1, 1, 0, 0, 1, 0, 0]
GOLD = [1, 1, 1, 1, 1, 0, 0, 0]


def test_accuracy_is_the_fraction_of_matches():
    assert compute(["accuracy"], PRED, GOLD) == {"accuracy": 5 / 8}


def test_f1_is_the_harmonic_mean_of_precision_and_recall_of_class_1():
    precision, recall = 3 / 4, 3 / 5
    assert compute(["f1"], PRED, GOLD)["f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_matthews_correlation_matches_its_confusion_matrix_formula():
    tp, tn, fp, fn = 3, 2, 1, 2
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert compute(["matthews_correlation"], PRED, GOLD)["matthews_correlation"] == pytest.approx(expected)


def test_pearson_and_spearman_on_scores():
    gold = [0.0, 1.0, 2.0, 3.0]
    pred = [0.0, 2.0, 1.0, 4.0]
    # Pearson by definition: centred dot product over the product of norms.
    dg, dp = [g - 1.5 for g in gold], [p - 1.75 for p in pred]
    pearson = sum(a * b for a, b in zip(dg, dp)) / math.sqrt(sum(a * a for a in dg) * sum(b * b for b in dp))
    # Spearman: ranks gold 1,2,3,4 and pred 1,3,2,4 -> 1 - 6*sum(d^2)/(n(n^2-1)) with sum(d^2) = 2.
    result = compute(["pearson", "spearmanr"], pred, gold)
    assert result["pearson"] == pytest.approx(pearson)
    assert result["spearmanr"] == pytest.approx(1 - 6 * 2 / (4 * 15))


@pytest.mark.parametrize("name, keys", [
    ("glue/cola", {"matthews_correlation"}), ("glue/stsb", {"pearson", "spearmanr"}),
    ("glue/mrpc", {"accuracy", "f1"}), ("glue/qqp", {"accuracy", "f1"}), ("glue/sst2", {"accuracy"}),
    ("glue/mnli", {"accuracy"}), ("glue/qnli", {"accuracy"}), ("glue/rte", {"accuracy"}),
])
def test_glue_tasks_return_the_evaluate_glue_keys(name, keys):
    task = get_task(name)
    assert set(task.compute_metrics([0, 1, 1, 0], [0, 1, 0, 1])) == keys == set(task.metric_names)
    assert task.primary_metric in keys


def test_generation_accuracy_uses_the_tasks_equivalence():
    task = get_task("math/math500")
    # "0.5" == "\frac{1}{2}" after normalisation, "" (no answer extracted) is wrong, 3 != 4.
    assert task.compute_metrics(["0.5", "", "3"], ["\\frac12", "1", "4"]) == {"accuracy": 1 / 3}


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions for 3 references"):
        compute(["accuracy"], [0, 1], [0, 1, 1])


def test_logits_instead_of_class_ids_are_an_error():
    with pytest.raises(ValueError, match="argmax"):
        get_task("glue/sst2").compute_metrics([[0.1, 0.9], [0.8, 0.2]], [1, 0])
