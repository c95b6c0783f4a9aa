"""How much a decoder forgot: the change of its loss on general text the task never trains on.

``eval.forgetting: {data: wikitext-2, tokens: N}`` (the commonsense presets): the first ``N`` tokens of
WikiText-2's test file (``<task.data_dir>/wikitext-2/test.txt``), cut into windows of ``trainer.max_length``
tokens, each scored on its own (every token but a window's first is predicted from the ones before it in the
window). The figure is the mean token negative log-likelihood (nats) of the trained model minus that of the
checkpoint as loaded, both measured in the same process, on the same device, without autocast:

* the base is measured before the model is wrapped (:meth:`Forgetting.measure_base`), so it is the checkpoint
  itself for every method, including those that rewrite the base weights (PiSSA's residual, ReLoRA's merges),
  where an adapter-disabled model would not be; a resumed run measures it again from the checkpoint;
* the trained one after the last evaluation (:meth:`Forgetting.results`).

Positive: the model got worse at general text. The cost is two forwards over ``N`` tokens: SmolLM2-135M on one
loaded CPU thread took 27 s per 2,048 tokens, so the presets score 1,024 (~25 s a run, both passes).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

#: ``eval.forgetting.data`` -> the file under ``task.data_dir`` (../shared/data/SOURCES.md)
DATASETS = {"wikitext-2": os.path.join("wikitext-2", "test.txt")}
DEFAULT_TOKENS = 1024
KEYS = ("data", "tokens")


@dataclass(frozen=True)
class ForgettingSpec:
    data: str = "wikitext-2"
    tokens: int = DEFAULT_TOKENS

    @classmethod
    def parse(cls, value: Any) -> Optional["ForgettingSpec"]:
        """``eval.forgetting`` (null: off) checked: a ValueError names what to change."""
        if value is None:
            return None
        if not isinstance(value, dict) or set(value) - set(KEYS):
            raise ValueError(f"eval.forgetting={value!r}: must be null or {{data: wikitext-2, tokens: N}} (keys "
                             f"{', '.join(KEYS)})")
        spec = cls(**value)
        if spec.data not in DATASETS:
            raise ValueError(f"eval.forgetting.data={spec.data!r}: must be one of {sorted(DATASETS)}")
        if isinstance(spec.tokens, bool) or not isinstance(spec.tokens, int) or spec.tokens < 2:
            raise ValueError(f"eval.forgetting.tokens={spec.tokens!r}: must be an integer >= 2 (the first N tokens "
                             "of the text are scored)")
        return spec


def text_tokens(spec: ForgettingSpec, data_dir: str, tokenizer: Any) -> tuple[list[int], str]:
    """The first ``spec.tokens`` token ids of the data file and the SHA-256 of the text they come from (only as
    much of the file is read and tokenised as they need)."""
    path = os.path.join(data_dir, DATASETS[spec.data])
    if not os.path.isfile(path):
        raise ValueError(f"eval.forgetting.data={spec.data}: {path} not found; it ships in ../shared/data "
                         "(SOURCES.md), or set eval.forgetting=null")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    chars = 8 * spec.tokens
    while True:
        part = text[:chars]
        ids = tokenizer(part, add_special_tokens=False)["input_ids"]
        # one token more than needed: the last one of a cut may be a piece of a longer word
        if len(ids) > spec.tokens or chars >= len(text):
            break
        chars *= 2
    if len(ids) < spec.tokens:
        raise ValueError(f"eval.forgetting.tokens={spec.tokens}: {path} has only {len(ids)} tokens")
    return ids[:spec.tokens], hashlib.sha256(part.encode()).hexdigest()


@torch.no_grad()
def mean_nll(model: nn.Module, ids: list[int], window: int, device: Any) -> float:
    """Mean next-token negative log-likelihood (nats) of ``ids`` cut into windows of ``window`` tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(ids), window):
            chunk = ids[start:start + window]
            if len(chunk) < 2:
                continue
            inputs = torch.tensor([chunk], device=device)
            logits = model(input_ids=inputs).logits[0, :-1].float()
            total += float(nn.functional.cross_entropy(logits, inputs[0, 1:], reduction="sum"))
            count += len(chunk) - 1
    finally:
        model.train(was_training)
    return total / count


class Forgetting:
    """One run's forgetting measurement: the tokens, the base model's loss, then the trained model's."""

    def __init__(self, spec: ForgettingSpec, data_dir: str, tokenizer: Any, window: int):
        self.spec, self.window = spec, window
        self.ids, self.digest = text_tokens(spec, data_dir, tokenizer)
        self.base: Optional[float] = None

    @staticmethod
    def device_of(model: nn.Module) -> torch.device:
        return next(model.parameters()).device

    def measure_base(self, model: nn.Module, device: Any) -> None:
        """The checkpoint's loss, on the device the run trains on (the model is left there)."""
        if self.device_of(model) != torch.device(device):
            model.to(device)
        self.base = mean_nll(model, self.ids, self.window, device)

    def results(self, model: nn.Module) -> dict[str, Any]:
        """``results.json``'s ``forgetting``: ``delta_nll`` (trained minus base), both losses, what was scored."""
        trained = mean_nll(model, self.ids, self.window, self.device_of(model))
        delta = trained - self.base if self.base is not None else math.nan
        return {"forgetting": {"data": self.spec.data, "tokens": len(self.ids), "window": self.window,
                               "text_sha256": self.digest, "base_nll": self.base, "nll": trained,
                               "delta_nll": delta}}
