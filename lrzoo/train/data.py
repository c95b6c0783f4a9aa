"""The trainer's data: task rows to token features, padding, and which rows each optimizer step takes.

The data order is a pure function of ``(seed, epoch)`` (:func:`epoch_order`), the same on every rank:
optimizer step ``s`` takes the next ``batch_size`` rows of its epoch's permutation and gives rank ``k``
the ``k``-th contiguous slice (:func:`step_rows`), split into micro-batches of ``micro_batch_size`` for
gradient accumulation (:func:`batch_layout`). So N ranks see exactly the rows one process would, and a
resumed run replays the batches an uninterrupted one sees.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .config import TrainerConfig

IGNORE_INDEX = -100  # label of positions that do not count in the loss (prompt tokens, padding)


def encode_rows(rows: Sequence[dict], kind: str, tokenizer: PreTrainedTokenizerBase, max_length: int,
                *, for_generation: bool = False) -> list[dict[str, Any]]:
    """Tokenise task rows (the Task API's columns) into model features, as plain lists.

    Classification/regression: ``input_ids`` (+ ``token_type_ids``) of ``(text_a, text_b)`` and
    ``labels``. Generation training: ``prompt + target + eos`` with the prompt's positions labelled
    ``IGNORE_INDEX`` (truncated on the right to ``max_length``, as LLM-Adapters' cutoff_len).
    Generation evaluation (``for_generation``): the prompt's ids only (truncated on the left, so
    the question's end and "### Response:" survive), with the gold ``answer``.
    """
    if kind in ("classification", "regression"):
        text_a = [row["text_a"] for row in rows]
        text_b = [row["text_b"] for row in rows]
        pairs = any(b is not None for b in text_b)
        encoded = tokenizer(text_a, [b or "" for b in text_b] if pairs else None, truncation=True, max_length=max_length)
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


def collate(features: Sequence[dict], pad_id: int, *, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad a list of features to the longest; labels that are sequences are padded with -100."""
    width = max(len(f["input_ids"]) for f in features)

    def pad(seq: list, value: Any) -> list:
        filler = [value] * (width - len(seq))
        return filler + list(seq) if left else list(seq) + filler

    batch = {"input_ids": torch.tensor([pad(f["input_ids"], pad_id) for f in features]),
             "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features])}
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = torch.tensor([pad(f["token_type_ids"], 0) for f in features])
    if "labels" in features[0]:
        labels = [f["labels"] for f in features]
        batch["labels"] = (torch.tensor([pad(l, IGNORE_INDEX) for l in labels]) if isinstance(labels[0], list)
                           else torch.tensor(labels))
    return batch


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
