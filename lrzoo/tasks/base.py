"""The Task contract shared by every benchmark: load a split as a validated ``datasets.Dataset``,
extract answers from generations, and score predictions.

Each family (glue.py, commonsense.py, math.py) supplies where a split's records come from
(``_records``) and how one raw record becomes a row of the family's columns (``_row``); loading,
``limit``, split checks and metric dispatch live here once. Tasks know nothing about adapters.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets

from . import metrics

SPLITS = ("train", "validation", "test")

# One raw record and where it came from ("glue/SST-2/dev.tsv line 12"), for error messages.
Record = tuple[str, Any]

COLUMNS = {
    "classification": datasets.Features(
        {"text_a": datasets.Value("string"), "text_b": datasets.Value("string"), "label": datasets.Value("int64")}),
    "regression": datasets.Features(
        {"text_a": datasets.Value("string"), "text_b": datasets.Value("string"), "label": datasets.Value("float32")}),
    "generation": datasets.Features(
        {"prompt": datasets.Value("string"), "target": datasets.Value("string"), "answer": datasets.Value("string")}),
    # pre-training text (lrzoo.tasks.pretrain): the trainer joins the rows and cuts token blocks
    "language_modeling": datasets.Features({"text": datasets.Value("string")}),
}


class Task:
    """One benchmark task: ``name`` is the public id (``"glue/sst2"``), the rest is its protocol.

    Attributes:
        kind: ``"classification"`` | ``"regression"`` | ``"generation"`` | ``"language_modeling"``.
        num_labels: classes (classification), 1 (regression), 0 (generation).
        metric_names: keys of :meth:`compute_metrics`' result (evaluate-compatible names).
        primary_metric: the metric runs are reported and selected on.
        splits: the splits :meth:`load_split` accepts for this task.
        eval_tasks: the task names to evaluate after training on this one (itself, except
            ``commonsense/all``, which trains on the union and is evaluated on each of the 8).
        generation_config: keyword arguments for ``model.generate`` (generation tasks only).
        multiple_choice: whether :meth:`choice_request` turns a row into options to score by likelihood
            (the commonsense tasks; ``eval.mode=loglik``).
        similarity: whether the label says how alike a row's two sentences are (STS-B, MRPC, QQP), so that a
            bi-encoder (the cosine of two sentence embeddings) can score it.
        label_range: ``(low, high)`` of a regression label (STS-B: 0 to 5); ``None`` otherwise.
    """

    kind: str
    num_labels: int
    metric_names: tuple[str, ...]
    primary_metric: str
    splits: tuple[str, ...] = SPLITS
    generation_config: dict[str, Any] = {}
    multiple_choice = False
    similarity = False
    label_range: tuple[float, float] | None = None

    def __init__(self, name: str):
        self.name = name
        self.eval_tasks: tuple[str, ...] = (name,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # ---- data -------------------------------------------------------------------------------

    def load_split(self, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> datasets.Dataset:
        """Rows of ``split`` with every row validated (so bad data fails before training starts).

        ``data_dir=None`` reads the public source (hub id or pinned URL, needs network);
        otherwise the local layout of ``../shared/data`` under ``data_dir``. ``limit`` keeps the
        first N rows of the split, in file order.
        """
        self._check_split(split)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be a non-negative int or None, got {limit!r}.")
        root = None if data_dir is None else _existing_dir(data_dir)
        records = self._records(split, root)
        if limit is not None:
            records = records[:limit]
        rows = [self._row(record, where, split) for where, record in records]
        if not rows:  # from_list([]) fails on the features ("Keys mismatch"): an empty split is a valid answer
            return datasets.Dataset.from_dict({name: [] for name in COLUMNS[self.kind]}, features=COLUMNS[self.kind])
        return datasets.Dataset.from_list(rows, features=COLUMNS[self.kind])

    def data_files(self, split: str, data_dir: str | Path) -> list[Path]:
        """The local files :meth:`load_split` ``(split, data_dir)`` reads, whether they exist or not: what a run's
        data fingerprint covers (:mod:`lrzoo.tasks.data_identity`)."""
        self._check_split(split)
        root = Path(data_dir).expanduser()
        return [root / relative for relative in self._local_files(split, root)]

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            elsewhere = f" It is evaluated through eval_tasks {list(self.eval_tasks)}." if self.eval_tasks != (self.name,) else ""
            raise ValueError(f"{self.name} has no split {split!r}; choose one of {list(self.splits)}.{elsewhere}")

    def _local_files(self, split: str, data_dir: Path) -> list[str]:
        """The files of ``split`` under ``data_dir`` (relative paths), in the order :meth:`_records` reads them."""
        raise NotImplementedError

    def _records(self, split: str, data_dir: Path | None) -> list[Record]:
        """All raw records of ``split`` in source order, each with its location."""
        raise NotImplementedError

    def _row(self, record: Any, where: str, split: str) -> dict[str, Any]:
        """One raw record -> a row of this kind's columns; ValueError naming ``where`` if malformed."""
        raise NotImplementedError

    # ---- evaluation -------------------------------------------------------------------------

    def extract_answer(self, generated: str) -> str:
        raise TypeError(f"{self.name} is a {self.kind} task: it predicts labels, it has no answers to extract "
                        "from generated text. Pass class ids / scores to compute_metrics instead.")

    def is_correct(self, extracted: str, answer: str) -> bool:
        raise TypeError(f"{self.name} is a {self.kind} task: compare labels with compute_metrics instead.")

    def choice_request(self, row: dict[str, Any], choices: str = "label") -> tuple[str, list[str], int]:
        """A row as ``(context, continuations, gold index)`` for likelihood scoring (multiple-choice tasks)."""
        raise TypeError(f"{self.name} is not a multiple-choice task: it has no options to score by likelihood.")

    def compute_metrics(self, predictions: Sequence, references: Sequence) -> dict[str, float]:
        """Scores keyed by :attr:`metric_names`. Generation tasks take extracted answers (strings)."""
        if self.kind == "generation":
            metrics.check_lengths(predictions, references)
            hits = [self.is_correct(str(p), str(r)) for p, r in zip(predictions, references)]
            return {"accuracy": sum(hits) / len(hits)}
        return metrics.compute(self.metric_names, predictions, references)


def _existing_dir(data_dir: str | Path) -> Path:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {str(root)!r} is not a directory. Pass the folder that holds glue/, "
                                "commonsense/, gsm8k/ and math/ (the layout of ../shared/data), or data_dir=None "
                                "(task.data_dir=null) to read the public hub copies.")
    return root


def require_file(root: Path, relative: str, family: str, layout: str) -> Path:
    """``root/relative`` if it exists; otherwise a FileNotFoundError that says what layout is expected
    and, when ``root`` looks like the family folder itself, that its parent should be passed instead."""
    path = root / relative
    if path.is_file():
        return path
    hint = ""
    if not (root / family).is_dir():
        hint = f" {str(root)!r} has no {family}/ folder."
        if (root.parent / relative).is_file() or root.name == family:
            hint += f" It looks like the {family}/ folder itself: pass its parent, data_dir={str(root.parent)!r}."
    raise FileNotFoundError(f"missing data file {str(path)!r}.{hint} Expected layout under data_dir: {layout}.")


def with_locations(label: str, items: Iterable[Any]) -> list[Record]:
    """Tag items from one source with ``"<label> row <i>"`` (0-based, as in a Dataset)."""
    return [(f"{label} row {i}", item) for i, item in enumerate(items)]
