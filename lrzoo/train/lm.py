"""Language-model data and scoring for pre-training tasks (kind ``language_modeling``, :mod:`lrzoo.tasks.pretrain`).

Rows are tokenised without special tokens, each followed by the end-of-text token, concatenated in order and
cut into consecutive blocks of ``max_length`` tokens (the last block may be shorter): the GaLore/SLTrain
C4 scripts' packing, on a fixed file. A block is trained on every position (``labels = input_ids``, the model
shifts them), and scored by its summed next-token NLL over its ``len - 1`` predicted tokens; the set's
perplexity is exp(Σ NLL / Σ tokens) over all blocks (non-overlapping windows, so each block starts without
context: the usual "stride = length" perplexity).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F


def lm_blocks(rows: Sequence[dict], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """The rows' ``text`` as consecutive blocks of ``max_length`` token ids, each with ``labels`` = its ids."""
    if max_length < 2:
        raise ValueError(f"trainer.max_length={max_length}: a language-model block needs at least 2 tokens.")
    separator = tokenizer.eos_token_id
    if separator is None:
        raise ValueError("a language-modelling task joins its rows with the tokenizer's end-of-text token, and this "
                         "tokenizer has no eos_token.")
    stream: list[int] = []
    texts = [row["text"] for row in rows]
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
        stream.extend(ids)
        stream.append(separator)
    blocks = [stream[start:start + max_length] for start in range(0, len(stream), max_length)]
    return [{"input_ids": block, "labels": list(block)} for block in blocks if len(block) >= 2]


@torch.no_grad()
def block_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[list[float], list[int]]:
    """Each block's summed next-token NLL (float64 sum of fp32 terms) and its count of predicted tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets.clamp_min(0), reduction="none")
    mask = targets.ne(-100)
    sums = (nll * mask).double().sum(-1)
    return sums.tolist(), mask.sum(-1).tolist()
