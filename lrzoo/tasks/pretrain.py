"""Language-model pre-training on WikiText-2 (Merity et al. 2016), scored by perplexity.

The CPU-scale analogue of the low-rank pre-training papers' C4 protocol (GaLore, SLTrain, APOLLO,
Q-GaLore: a LLaMA trained from random init, validation perplexity; docs/recipes.md, "Pre-training from scratch"):

* ``train``: the non-empty lines of ``wikitext-2/valid.txt`` (paragraphs and `` = Heading = `` lines, 2,461
  rows, about 268k BPE tokens), one row each, in file order. A recipe holds some out with
  ``task.heldout_size`` for choosing the learning rate, as the GLUE protocol does.
* ``test``: the non-empty lines of ``wikitext-2/test.txt``, the perplexity set (never trained on).

WikiText-2's train split is not in ../shared/data; its valid split is the largest English text there that
is disjoint from the test split and of the same kind (Wikipedia prose, the same tokenisation with ``<unk>``),
which the other sets' questions and passages are not: they would add a distribution the test set does not
score. Rows are kind ``language_modeling`` (a ``text`` column): the trainer tokenises them, joins them with
the end-of-text token and cuts fixed-length blocks (:mod:`lrzoo.train.lm`); the metrics are the mean
negative log-likelihood per predicted token (``loss``, nats), ``perplexity`` = exp(loss), and the primary
``neg_loss`` = −loss (higher is better, as every lrzoo score; the held-out slice's picks the rate).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .base import Record, Task, require_file
from .files import not_utf8

LAYOUT = "wikitext-2/valid.txt and wikitext-2/test.txt (the raw WikiText-2 files, one paragraph per line)"
FILES = {"train": "wikitext-2/valid.txt", "test": "wikitext-2/test.txt"}


class WikiTextPretrainTask(Task):
    """Causal language modelling on WikiText-2 (train: valid.txt, scored: test.txt)."""

    kind = "language_modeling"
    num_labels = 0
    metric_names = ("neg_loss", "loss", "perplexity")
    primary_metric = "neg_loss"
    splits = ("train", "test")

    def _local_files(self, split: str, data_dir: Path) -> list[str]:
        return [FILES[split]]

    def _records(self, split: str, data_dir: Path | None) -> list[Record]:
        if data_dir is None:
            raise ValueError(f"{self.name} reads the local WikiText-2 files only: set task.data_dir to a folder with "
                             f"{LAYOUT} (e.g. ../shared/data).")
        path = require_file(data_dir, FILES[split], "wikitext-2", LAYOUT)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise not_utf8(path) from None
        return [(f"{path} line {number}", line.strip()) for number, line in enumerate(lines, start=1) if line.strip()]

    def _row(self, record: Any, where: str, split: str) -> dict[str, Any]:
        return {"text": record}

    def compute_metrics(self, predictions: Sequence, references: Sequence) -> dict[str, float]:
        """``predictions``: each block's summed token NLL (nats); ``references``: its number of predicted tokens."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} NLL sums for {len(references)} token counts.")
        tokens = sum(references)
        if tokens == 0:
            raise ValueError(f"{self.name}: no predicted token to score (every block is one token long).")
        loss = sum(predictions) / tokens
        return {"neg_loss": -loss, "loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}


TASKS = {"pretrain/wikitext2": lambda: WikiTextPretrainTask("pretrain/wikitext2")}
