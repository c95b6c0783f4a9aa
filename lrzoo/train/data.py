"""The trainer's data: task rows to token features, padding, and which rows each optimizer step takes.

The data order is a pure function of ``(seed, epoch)`` (:func:`epoch_order`), the same on every rank:
optimizer step ``s`` takes the next ``batch_size`` rows of its epoch's permutation and gives rank ``k``
the ``k``-th contiguous slice (:func:`step_rows`), split into micro-batches of ``micro_batch_size`` for
gradient accumulation (:func:`batch_layout`). So N ranks see exactly the rows one process would, and a
resumed run replays the batches an uninterrupted one sees.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from ..heads import PAIR_PREFIX
from .config import TrainerConfig
from .lm import lm_blocks

IGNORE_INDEX = -100  # label of positions that do not count in the loss (prompt tokens, padding)


PAIR_ENCODINGS = ("joint", "separate")


def encode_rows(rows: Sequence[dict], kind: str, tokenizer: PreTrainedTokenizerBase, max_length: int,
                *, for_generation: bool = False, pairs: str = "joint") -> list[dict[str, Any]]:
    """Tokenise task rows (the Task API's columns) into model features, as plain lists.

    Classification/regression: ``input_ids`` (+ ``token_type_ids``) of ``(text_a, text_b)`` and
    ``labels``; with ``pairs="separate"`` (a bi-encoder, :func:`lrzoo.heads.pair_encoding`) ``text_a`` and
    ``text_b`` are encoded alone, each truncated to ``max_length``, ``text_b`` as ``pair_input_ids``
    (+ ``pair_token_type_ids``). Generation training: ``prompt + target + eos`` with the prompt's positions labelled
    ``IGNORE_INDEX`` (truncated on the right to ``max_length``, as LLM-Adapters' cutoff_len).
    Generation evaluation (``for_generation``): the prompt's ids only (truncated on the left, so
    the question's end and "### Response:" survive), with the gold ``answer``.
    """
    if pairs not in PAIR_ENCODINGS:
        raise ValueError(f"pairs={pairs!r}: choose one of {PAIR_ENCODINGS}.")
    if kind == "language_modeling":  # pre-training text: packed blocks, not one feature per row (lrzoo.train.lm)
        return lm_blocks(rows, tokenizer, max_length)
    if kind in ("classification", "regression"):
        text_a = [row["text_a"] for row in rows]
        text_b = [row["text_b"] for row in rows]
        has_pairs = any(b is not None for b in text_b)
        if pairs == "separate":
            if not has_pairs or any(b is None for b in text_b):
                raise ValueError("a bi-encoder (model.similarity_head=bi_encoder) needs two sentences in every row.")
            first = tokenizer(text_a, truncation=True, max_length=max_length)
            second = tokenizer(text_b, truncation=True, max_length=max_length)
            keys = [k for k in ("input_ids", "token_type_ids") if k in first]
            return [{**{k: first[k][i] for k in keys}, **{PAIR_PREFIX + k: second[k][i] for k in keys},
                     "labels": rows[i]["label"]} for i in range(len(rows))]
        encoded = tokenizer(text_a, [b or "" for b in text_b] if has_pairs else None, truncation=True,
                            max_length=max_length)
        keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
        return [{**{k: encoded[k][i] for k in keys}, "labels": rows[i]["label"]} for i in range(len(rows))]

    prompts = tokenizer([row["prompt"] for row in rows])["input_ids"]
    if for_generation:
        return [{"input_ids": ids[-max_length:], "answer": row["answer"]} for ids, row in zip(prompts, rows)]
    full = tokenizer([row["prompt"] + row["target"] for row in rows])["input_ids"]
    features = []
    for prompt_ids, ids in zip(prompts, full):
        ids = (ids + [tokenizer.eos_token_id])[:max_length]
        n_prompt = min(len(prompt_ids), len(ids))
        features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    return features


def truncated_share(rows: Sequence[dict], kind: str, tokenizer: PreTrainedTokenizerBase, max_length: int,
                    pairs: str = "joint", *, scoring: Optional[str] = None) -> Optional[float]:
    """The share of ``rows`` whose encoding :func:`encode_rows` cuts at ``max_length`` (``None`` for no rows, or
    for sets scored by option likelihood, ``scoring="loglik"``, whose cut is on the left of each option).

    ``scoring`` is how the set is used: ``None`` (training rows) or an eval set's kind (a generation eval
    set's prompts are cut, not prompt + target). Rows are tokenised without truncation, as encode_rows
    sees them before it cuts: a pair counts as cut when the joint sequence (or, encoded separately, either
    sentence) is longer than ``max_length``."""
    if not rows or scoring == "loglik" or kind == "language_modeling":  # packed text: blocks, nothing is cut
        return None
    if kind in ("classification", "regression"):
        text_a = [row["text_a"] for row in rows]
        text_b = [row["text_b"] for row in rows]
        if pairs == "separate":
            lengths = [max(a, b) for a, b in zip(_lengths(tokenizer, text_a), _lengths(tokenizer, text_b))]
        elif any(b is not None for b in text_b):
            lengths = _lengths(tokenizer, text_a, [b or "" for b in text_b])
        else:
            lengths = _lengths(tokenizer, text_a)
    elif scoring == "generation":
        lengths = _lengths(tokenizer, [row["prompt"] for row in rows])
    else:
        lengths = [n + 1 for n in _lengths(tokenizer, [row["prompt"] + row["target"] for row in rows])]  # + eos
    return sum(n > max_length for n in lengths) / len(lengths)


def _lengths(tokenizer: PreTrainedTokenizerBase, texts: list, pairs: Optional[list] = None) -> list[int]:
    # verbose=False: a row longer than the model's limit is what is being counted, not a mistake to warn about
    return [len(ids) for ids in tokenizer(texts, pairs, truncation=False, verbose=False)["input_ids"]]


def collate(features: Sequence[dict], pad_id: int, *, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad a list of features to the longest; labels that are sequences are padded with -100. A bi-encoder's
    second sentence (``pair_input_ids``) is padded on its own, with its ``pair_attention_mask``."""
    batch = {}
    for prefix in ("", PAIR_PREFIX) if PAIR_PREFIX + "input_ids" in features[0] else ("",):
        ids = [f[prefix + "input_ids"] for f in features]
        width = max(map(len, ids))
        batch[prefix + "input_ids"] = torch.tensor([_pad(seq, pad_id, width, left) for seq in ids])
        batch[prefix + "attention_mask"] = torch.tensor([_pad([1] * len(seq), 0, width, left) for seq in ids])
        if prefix + "token_type_ids" in features[0]:
            batch[prefix + "token_type_ids"] = torch.tensor([_pad(f[prefix + "token_type_ids"], 0, width, left)
                                                             for f in features])
    if "labels" in features[0]:
        labels = [f["labels"] for f in features]
        width = max(len(f["input_ids"]) for f in features)
        batch["labels"] = (torch.tensor([_pad(l, IGNORE_INDEX, width, left) for l in labels])
                           if isinstance(labels[0], list) else torch.tensor(labels))
    return batch


def _pad(seq: list, value: Any, width: int, left: bool) -> list:
    filler = [value] * (width - len(seq))
    return filler + list(seq) if left else list(seq) + filler


def planned_steps(num_rows: int, config: TrainerConfig) -> int:
    """Optimizer steps of a run: ``max_steps``, else ``epochs`` over full global batches."""
    per_epoch = num_rows // config.batch_size
    if per_epoch == 0:
        raise ValueError(f"The training split has {num_rows} rows, fewer than one batch "
                         f"(batch_size={config.batch_size}). Lower trainer.batch_size or raise train_limit.")
    return config.max_steps if config.max_steps is not None else math.ceil(config.epochs * per_epoch)


def epoch_order(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The row permutation of ``epoch``: a pure function of (seed, epoch), identical on all ranks."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=generator)


def batch_layout(config: TrainerConfig, world: int) -> tuple[int, int]:
    """``(micro-batch rows, accumulation steps)`` of one process for the global ``config.batch_size``."""
    c = config
    if c.batch_size % world:
        raise ValueError(f"trainer.batch_size={c.batch_size} (the global batch) must be divisible by the "
                         f"number of processes ({world}).")
    per_rank = c.batch_size // world
    micro = c.micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(f"trainer.micro_batch_size={micro} must divide the per-process batch {per_rank} "
                         f"(batch_size {c.batch_size} / {world} processes).")
    return micro, per_rank // micro


def step_rows(order: torch.Tensor, position: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Rank ``rank``'s rows of the step at ``position`` in an epoch whose permutation is ``order``."""
    rows = order[position * batch_size:(position + 1) * batch_size]
    per_rank = batch_size // world
    return rows[rank * per_rank:(rank + 1) * per_rank].tolist()
