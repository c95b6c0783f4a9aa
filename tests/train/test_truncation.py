"""The share of rows max_length cuts: measured at data load for the training and every eval set, saved in
results.json (``truncated``), for joint and separately encoded pairs; on tiny hand-written data sets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from lrzoo.models import char_tokenizer
from lrzoo.train.data import truncated_share

from recipe_helpers import compose, run_dir_of, write_sst2


def test_truncated_share_counts_rows_longer_than_max_length():
    tokenizer = char_tokenizer(pair_template=True)   # one token per character, plus [CLS] ... [SEP] ( [SEP])
    rows = [{"text_a": "abcd", "text_b": "ef", "label": 0},       # joint 4+2+3 = 9, alone 6 and 4
            {"text_a": "abcdefgh", "text_b": "ij", "label": 1},   # joint 13, alone 10 and 4
            {"text_a": "a", "text_b": "b", "label": 0}]           # joint 5
    assert truncated_share(rows, "classification", tokenizer, 9) == 1 / 3
    assert truncated_share(rows, "classification", tokenizer, 12) == 1 / 3
    assert truncated_share(rows, "classification", tokenizer, 13) == 0.0
    assert truncated_share(rows, "classification", tokenizer, 8) == 2 / 3
    assert truncated_share(rows, "classification", tokenizer, 9, "separate") == 1 / 3   # "abcdefgh" alone is 10
    assert truncated_share(rows, "classification", tokenizer, 10, "separate") == 0.0
    single = [{"text_a": "abc", "text_b": None, "label": 0}, {"text_a": "abcdef", "text_b": None, "label": 1}]
    assert truncated_share(single, "classification", tokenizer, 6) == 1 / 2
    assert truncated_share([], "classification", tokenizer, 6) is None
    decoder = char_tokenizer(pair_template=False)   # <s> + text (+ </s> when training)
    gen = [{"prompt": "abc", "target": "de", "answer": "de"}]
    assert truncated_share(gen, "generation", decoder, 6) == 1.0                         # 1 + 5 + eos = 7
    assert truncated_share(gen, "generation", decoder, 7) == 0.0
    assert truncated_share(gen, "generation", decoder, 4, scoring="generation") == 0.0   # the prompt alone: 4
    assert truncated_share(gen, "generation", decoder, 3, scoring="generation") == 1.0
    assert truncated_share(gen, "generation", decoder, 3, scoring="loglik") is None


def test_results_json_states_the_truncated_share_of_each_set(tmp_path):
    from lrzoo.cli.train import run_recipe

    data = write_sst2(tmp_path / "data", train=64, dev=16)
    cfg = compose(["model=tiny_bert", "task=glue/sst2", f"task.data_dir={data}", f"output_root={tmp_path / 'runs'}",
                   "trainer.batch_size=8", "trainer.max_steps=2", "trainer.progress=false", "logger=none",
                   "trainer.max_length=17", "+task.heldout_size=8"])
    results = run_recipe(cfg, run_dir_of(cfg))

    def expected(split, keep=None):
        with open(data / "glue" / "SST-2" / f"{split}.tsv") as handle:
            sentences = [row["sentence"] for row in csv.DictReader(handle, delimiter="\t")]
        lengths = [len(s) + 2 for s in sentences]   # characters + [CLS] and [SEP]
        if keep is not None:
            lengths = [lengths[i] for i in keep]
        return sum(n > 17 for n in lengths) / len(lengths)

    import numpy as np

    from lrzoo.train.recipe import HELDOUT_SEED

    order = np.random.default_rng(HELDOUT_SEED).permutation(64)   # the held-out slice split_heldout takes
    truncated = results["truncated"]
    assert results["max_length"] == 17
    assert truncated["glue/sst2"] == expected("dev") and 0 < truncated["glue/sst2"] < 1
    assert truncated["heldout/glue/sst2"] == expected("train", sorted(order[:8].tolist()))
    assert truncated["train"] == expected("train", sorted(order[8:].tolist()))
    saved = json.loads((Path(run_dir_of(cfg)) / "results.json").read_text())
    assert saved["truncated"] == truncated
