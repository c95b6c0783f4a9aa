"""The task loaders on the real benchmark files in ../shared/data (skipped when it is absent)."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA
from lrzoo.tasks import get_task

pytestmark = pytest.mark.shared_data

# Published split sizes (SOURCES.md); MNLI, QQP and some commonsense train files are not in the folder.
SIZES = {
    ("glue/cola", "train"): 8551, ("glue/cola", "validation"): 1043, ("glue/sst2", "train"): 67349,
    ("glue/sst2", "validation"): 872, ("glue/rte", "train"): 2490, ("glue/rte", "validation"): 277,
    ("glue/stsb", "train"): 5749, ("glue/stsb", "validation"): 1500, ("glue/qnli", "validation"): 5463,
    ("glue/mrpc", "train"): 3668, ("glue/mrpc", "validation"): 408,
    ("commonsense/boolq", "test"): 3270, ("commonsense/piqa", "test"): 1838, ("commonsense/siqa", "test"): 1954,
    ("commonsense/winogrande", "test"): 1267, ("commonsense/arc_e", "test"): 2376, ("commonsense/arc_c", "test"): 1172,
    ("commonsense/obqa", "test"): 500, ("math/gsm8k", "train"): 7473, ("math/gsm8k", "test"): 1319,
    ("math/math500", "test"): 500,
}


@pytest.mark.parametrize("name, split", sorted(SIZES))
def test_split_has_its_published_size(name, split):
    data = get_task(name).load_split(split, SHARED_DATA)
    assert len(data) == SIZES[name, split]


@pytest.mark.parametrize("name", ["glue/cola", "glue/mrpc", "glue/rte", "glue/qnli"])
def test_both_classes_occur_in_dev(name):
    labels = get_task(name).load_split("validation", SHARED_DATA)["label"]
    assert set(labels) == {0, 1}


def test_commonsense_training_file_splits_into_120_held_out_rows():
    task = get_task("commonsense/arc_c")
    train, val = task.load_split("train", SHARED_DATA), task.load_split("validation", SHARED_DATA)
    assert (len(train), len(val)) == (1119 - 120, 120)


@pytest.mark.parametrize("name", ["commonsense/boolq", "commonsense/piqa", "commonsense/siqa", "commonsense/winogrande",
                                  "commonsense/arc_e", "commonsense/obqa", "math/gsm8k"])
def test_every_gold_target_extracts_to_its_answer(name):
    task = get_task(name)
    rows = task.load_split("test", SHARED_DATA)
    assert all(task.is_correct(task.extract_answer(t), a) for t, a in zip(rows["target"], rows["answer"]))


def test_math500_last_boxed_answer_matches_the_answer_field():
    task = get_task("math/math500")
    rows = task.load_split("test", SHARED_DATA)
    with open(SHARED_DATA / "math" / "math500_test.jsonl", encoding="utf-8") as f:
        published = [json.loads(line)["answer"] for line in f]
    assert rows["answer"] == published
    extracted = [task.extract_answer(f"Let's see.\nThe answer is: {a}") for a in published]
    assert task.compute_metrics(extracted, rows["answer"]) == {"accuracy": 1.0}
