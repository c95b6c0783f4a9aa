"""GLUE (Wang et al. 2019): eight sentence / sentence-pair tasks, scored on the dev sets as in LoRA
(Hu et al., arXiv 2106.09685, App. D.1) and its follow-ups, since GLUE's test labels are hidden.

Sources: hub ``nyu-mll/glue`` (one config per task) or the GLUE-download TSVs under
``data_dir/glue/<Task>/{train,dev}.tsv`` (MNLI: ``dev_matched.tsv`` / ``dev_mismatched.tsv``).
Labels use the hub's ids (e.g. MNLI entailment=0, neutral=1, contradiction=2) whichever source is
read, so a model trained on one source evaluates on the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import Record, Task, require_file, with_locations
from .files import read_tsv

LAYOUT = "glue/<Task>/train.tsv and glue/<Task>/dev.tsv (MNLI: dev_matched.tsv, dev_mismatched.tsv), as the GLUE download script writes them"
STSB_RANGE = (0.0, 5.0)


@dataclass(frozen=True)
class GlueSpec:
    """Where one GLUE task's columns live in the TSV and on the hub, and how it is scored."""

    config: str                              # nyu-mll/glue config name, also the public task name
    folder: str                              # data_dir/glue/<folder>/
    tsv_columns: tuple[Any, ...]             # (text_a, text_b or None, label): header names, or indices if no header
    hub_columns: tuple[str, str | None]      # (text_a, text_b) on the hub; the label is always "label"
    label_names: tuple[str, ...] | None      # class names in hub id order; None = regression (STS-B)
    metric_names: tuple[str, ...]
    primary_metric: str
    similarity: bool = False                 # the label says how alike the two sentences are (a bi-encoder fits)
    has_header: bool = True
    num_columns: int = 0                     # only for header-less files (CoLA)
    dev_files: dict[str, str] = field(default_factory=lambda: {"validation": "dev.tsv"})
    hub_splits: dict[str, str] = field(default_factory=lambda: {"validation": "validation"})


NLI2 = ("entailment", "not_entailment")
SPECS = {spec.config: spec for spec in (
    # CoLA's TSV has no header: source, label, original mark, sentence.
    GlueSpec("cola", "CoLA", (3, None, 1), ("sentence", None), ("unacceptable", "acceptable"),
             ("matthews_correlation",), "matthews_correlation", has_header=False, num_columns=4),
    GlueSpec("sst2", "SST-2", ("sentence", None, "label"), ("sentence", None), ("negative", "positive"),
             ("accuracy",), "accuracy"),
    GlueSpec("mrpc", "MRPC", ("#1 String", "#2 String", "Quality"), ("sentence1", "sentence2"),
             ("not_equivalent", "equivalent"), ("accuracy", "f1"), "accuracy", similarity=True),
    GlueSpec("qqp", "QQP", ("question1", "question2", "is_duplicate"), ("question1", "question2"),
             ("not_duplicate", "duplicate"), ("accuracy", "f1"), "accuracy", similarity=True),
    GlueSpec("stsb", "STS-B", ("sentence1", "sentence2", "score"), ("sentence1", "sentence2"), None,
             ("pearson", "spearmanr"), "pearson", similarity=True),
    # MNLI is reported on matched dev (the LoRA table); mismatched dev is the extra split below.
    GlueSpec("mnli", "MNLI", ("sentence1", "sentence2", "gold_label"), ("premise", "hypothesis"),
             ("entailment", "neutral", "contradiction"), ("accuracy",), "accuracy",
             dev_files={"validation": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"},
             hub_splits={"validation": "validation_matched", "validation_mismatched": "validation_mismatched"}),
    GlueSpec("qnli", "QNLI", ("question", "sentence", "label"), ("question", "sentence"), NLI2,
             ("accuracy",), "accuracy"),
    GlueSpec("rte", "RTE", ("sentence1", "sentence2", "label"), ("sentence1", "sentence2"), NLI2,
             ("accuracy",), "accuracy"),
)}


class GlueTask(Task):
    """Columns: ``text_a``, ``text_b`` (None for CoLA/SST-2), ``label`` (class id, or STS-B's float score).

    Splits: ``train``; ``validation`` = dev; ``test`` = dev too, because GLUE's test labels are
    hidden and the papers report dev (best epoch). MNLI adds ``validation_mismatched``.
    """

    def __init__(self, spec: GlueSpec):
        super().__init__(f"glue/{spec.config}")
        self.spec = spec
        self.kind = "classification" if spec.label_names else "regression"
        self.num_labels = len(spec.label_names) if spec.label_names else 1
        self.label_names = spec.label_names
        self.metric_names = spec.metric_names
        self.primary_metric = spec.primary_metric
        self.similarity = spec.similarity
        self.label_range = None if spec.label_names else STSB_RANGE
        self.splits = ("train", *spec.dev_files, "test")

    def _local_files(self, split: str, data_dir: Path) -> list[str]:
        split = "validation" if split == "test" else split
        return [f"glue/{self.spec.folder}/{'train.tsv' if split == 'train' else self.spec.dev_files[split]}"]

    def _records(self, split: str, data_dir: Path | None) -> list[Record]:
        if data_dir is None:
            return self._hub_records("validation" if split == "test" else split)
        path = require_file(data_dir, self._local_files(split, data_dir)[0], "glue", LAYOUT)
        header = self.spec.tsv_columns if self.spec.has_header else None
        records = read_tsv(path, tuple(c for c in header if c is not None) if header else None, self.spec.num_columns)
        a, b, label = self.spec.tsv_columns
        return [(where, (row[a], None if b is None else row[b], row[label])) for where, row in records]

    def _hub_records(self, split: str) -> list[Record]:
        import datasets

        hub_split = "train" if split == "train" else self.spec.hub_splits[split]
        data = datasets.load_dataset("nyu-mll/glue", self.spec.config, split=hub_split)
        a, b = self.spec.hub_columns
        rows = ((row[a], None if b is None else row[b], row["label"]) for row in data)
        return with_locations(f"nyu-mll/glue:{self.spec.config} {hub_split}", rows)

    def _row(self, record: tuple[str, str | None, Any], where: str, split: str) -> dict[str, Any]:
        text_a, text_b, label = record
        return {"text_a": text_a, "text_b": text_b, "label": self._label(label, where)}

    def _label(self, value: Any, where: str) -> int | float:
        if self.label_names is None:
            return _score(value, where)
        if value in self.label_names:
            return self.label_names.index(value)
        ids = range(len(self.label_names))
        try:
            label = int(value)
        except (TypeError, ValueError):
            label = None
        if label not in ids:
            raise ValueError(f"{where}: label {value!r} is out of range for {self.name}; expected a class id in "
                             f"{list(ids)} or a name in {list(self.label_names)}. Fix or drop that row "
                             "(hub test splits carry label -1 because GLUE test labels are hidden: evaluate on dev).")
        return label


def _score(value: Any, where: str) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        score = float("nan")
    low, high = STSB_RANGE
    if not low <= score <= high:
        raise ValueError(f"{where}: STS-B score {value!r} is not a number in [{low}, {high}]; fix or drop that row.")
    return score


TASKS = {f"glue/{config}": (lambda spec=spec: GlueTask(spec)) for config, spec in SPECS.items()}
