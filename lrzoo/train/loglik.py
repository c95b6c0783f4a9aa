"""Likelihood scoring of multiple-choice items (``eval.mode=loglik``), by lm-evaluation-harness 0.4's rules.

An item is ``(context, continuations, gold)`` (:meth:`lrzoo.tasks.base.Task.choice_request`). Each option
is encoded as lm-eval's ``_encode_pair`` does: whitespace at the end of the context moves to the front of
the continuation, context + continuation are tokenised together (with the tokenizer's special tokens, as
in training) and the continuation is the tail after ``len(encode(context))``; the whole is cut on the left
to ``max_length + 1`` tokens (the last token is only predicted). An option's score LL is the summed
log-softmax (fp32) of its tokens. ``acc`` picks the argmax of LL, ``acc_norm`` of LL / characters of the
option (without the delimiter space, lm-eval's ``target_delimiter``); ties go to the first option.

All options of an item run in the same forward, several items per batch up to ``eval_batch_size``
sequences (an item with more options than that runs alone). With ``shared_prefix`` (outside FSDP) the
tokens an item's options share run once and their key/value cache is reused by the options, which gives
the plain path's scores up to float rounding.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..tasks.metrics import modal_share

#: ``modal_share``: the share of items given the most frequent option (by acc's choice), near 1 for a model that
#: answers by the label prior, whatever its accuracy; logged at every evaluation, so a budget curve shows when a
#: model stops doing that
METRICS = ("accuracy", "acc_norm", "modal_share")


def encode_items(task: Any, rows: Sequence[dict], tokenizer: Any, max_length: int, choices: str) -> list[dict]:
    """Features of ``rows`` for :func:`score_items`: per item the options' tokens (``options``), how many of
    each are the continuation (``scored``), the options' lengths in characters (``chars``) and ``gold``."""
    requests = [task.choice_request(row, choices) for row in rows]
    contexts = [context.rstrip() for context, _, _ in requests]
    wholes = [context + option for context, options, _ in requests for option in options]
    context_ids = tokenizer(contexts)["input_ids"] if contexts else []
    whole_ids = iter(tokenizer(wholes)["input_ids"] if wholes else [])
    items = []
    for (context, options, gold), n_context in zip(requests, map(len, context_ids)):
        item = {"options": [], "scored": [], "chars": [], "gold": gold}
        for option in options:
            ids = next(whole_ids)
            scored = len(ids) - n_context
            if scored < 1 or scored > max_length:
                raise ValueError(f"{task.name}: the option {option!r} has {scored} token(s) after its context; "
                                 f"likelihood scoring needs 1 to trainer.max_length={max_length}.")
            item["options"].append(ids[-(max_length + 1):])
            item["scored"].append(scored)
            item["chars"].append(len(option) - option.startswith(" "))  # the delimiter is not counted
        items.append(item)
    return items


def pack(indices: Sequence[int], items: Sequence[dict], max_sequences: int) -> list[list[int]]:
    """Batches of ``indices`` (longest items first, fewer pads) with at most ``max_sequences`` options each,
    an item never split (one with more options than that is a batch of its own)."""
    order = sorted(indices, key=lambda i: -max(map(len, items[i]["options"])))
    batches: list[list[int]] = []
    size = 0
    for i in order:
        width = len(items[i]["options"])
        if not batches or size + width > max_sequences:
            batches.append([])
            size = 0
        batches[-1].append(i)
        size += width
    return batches


def choose(scores: Sequence[float], chars: Sequence[int]) -> tuple[int, int]:
    """``(acc, acc_norm)`` choices: the first argmax of LL and of LL / characters."""
    normed = [s / max(c, 1) for s, c in zip(scores, chars)]
    return _first_argmax(scores), _first_argmax(normed)


def _first_argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def metrics(chosen: Sequence[int], chosen_norm: Sequence[int], gold: Sequence[int]) -> dict[str, float]:
    n = max(len(gold), 1)
    return {"accuracy": sum(c == g for c, g in zip(chosen, gold)) / n,
            "acc_norm": sum(c == g for c, g in zip(chosen_norm, gold)) / n,
            "modal_share": modal_share(chosen) if chosen else 0.0}


def score_items(model: nn.Module, items: Sequence[dict], *, pad_id: int, device: Any,
                autocast: Callable[[], AbstractContextManager], shared_prefix: bool = False) -> list[list[float]]:
    """LL of every option of ``items`` (one batch), per item."""
    sequences = [ids for item in items for ids in item["options"]]
    scored = [n for item in items for n in item["scored"]]
    inputs = [ids[:-1] for ids in sequences]
    flat = None
    if shared_prefix:
        flat = _score_with_prefix(model, items, inputs, sequences, scored, pad_id, device, autocast)
    if flat is None:
        ids, mask, positions = _left_padded(inputs, pad_id, device)
        with autocast():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           **_keep_kwargs(model, max(scored))).logits
        flat = _gather(logits, sequences, scored)
    out, k = [], 0
    for item in items:
        out.append(flat[k:k + len(item["options"])])
        k += len(item["options"])
    return out


def _score_with_prefix(model, items, inputs, sequences, scored, pad_id, device, autocast):
    """The options' LL with each item's common token prefix run once (its cache reused by the options);
    ``None`` when an item has no prefix to share."""
    prefixes, owners, rests, k = [], [], [], 0
    for n_item, item in enumerate(items):
        mine = inputs[k:k + len(item["options"])]
        # the prefix ends before the first scored position: every option keeps >= 1 token of its own
        limit = min(len(x) - n for x, n in zip(mine, scored[k:k + len(mine)]))
        length = 0
        while length < limit and all(x[length] == mine[0][length] for x in mine):
            length += 1
        if length == 0:
            return None
        prefixes.append(mine[0][:length])
        owners += [n_item] * len(mine)
        rests += [x[length:] for x in mine]
        k += len(mine)
    ids, mask, positions = _left_padded(prefixes, pad_id, device)
    cache_key = _cache_keyword(model)
    with autocast():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **_keep_kwargs(model, 1))
    cache = getattr(out, "cache", None)
    cache = out.past_key_values if cache is None else cache  # transformers 4.x
    owner = torch.tensor(owners, device=device)
    cache.batch_select_indices(owner)  # one copy of its item's prefix per option
    rest_ids, rest_mask, rest_positions = _left_padded(rests, pad_id, device)
    offsets = torch.tensor([len(prefixes[i]) for i in owners], device=device)[:, None]
    with autocast():
        logits = model(input_ids=rest_ids, attention_mask=torch.cat([mask[owner], rest_mask], dim=1),
                       position_ids=rest_positions + offsets, use_cache=True, **{cache_key: cache},
                       **_keep_kwargs(model, max(scored))).logits
    return _gather(logits, sequences, scored)


def _left_padded(sequences: Sequence[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, ...]:
    """Input ids, attention mask and position ids (0 at each row's first token), padded on the left so
    that every row ends at the last column."""
    width = max(map(len, sequences))
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _gather(logits: torch.Tensor, sequences: Sequence[list[int]], scored: Sequence[int]) -> list[float]:
    """Sum of the fp32 log-softmax of each row's last ``scored`` tokens, read from the last columns of
    ``logits`` (the positions that predict them; rows are left-padded)."""
    width = max(scored)
    logprobs = logits[:, -width:].float().log_softmax(-1)
    targets = torch.tensor([[0] * (width - n) + list(s[-n:]) for s, n in zip(sequences, scored)],
                           device=logits.device)
    picked = logprobs.gather(-1, targets[..., None]).squeeze(-1)
    starts = width - torch.tensor(scored, device=logits.device)[:, None]
    counted = torch.arange(width, device=logits.device)[None] >= starts
    return torch.where(counted, picked, torch.zeros_like(picked)).sum(-1).tolist()


def _base_forward(model: nn.Module) -> Any:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(inner.forward).parameters


def _keep_kwargs(model: nn.Module, n: int) -> dict[str, int]:
    """``logits_to_keep=n`` when the model takes it (only the last n positions go through the LM head)."""
    return {"logits_to_keep": n} if "logits_to_keep" in _base_forward(model) else {}


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5 names the key/value cache argument ``cache``, 4.x ``past_key_values``."""
    return "cache" if "cache" in _base_forward(model) else "past_key_values"
