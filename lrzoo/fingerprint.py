"""Fingerprints of base weights: an adapter made on one set of weights must not load silently onto another.

Used by :mod:`lrzoo.peft_bridge` (written at wrap time into ``base_weights_hash``, checked at load).

Two formats, told apart by their text, so checkpoints saved by older lrzoo keep loading:

* ``v2-<32 hex>`` (written since): XXH3-128 over the names, shapes and **every value** of the
  targeted weights. Guarantee: every bit of every targeted weight (as float32; a quantized layer by its
  dequantized values) takes part, so a change to any entry, or a renamed, added, removed or reshaped
  targeted layer, gives another fingerprint unless XXH3-128 collides (a chance of about 2⁻¹²⁸ for
  weights not built to collide: XXH3 is fast, not cryptographic; it guards against mistakes, not
  against someone forging a base).
* ``<32 hex>`` (before): sha256 over names, shapes and a strided sample of at most 65,536 values per
  weight. It is still checked by that rule (:func:`fingerprint_as`): a weight with more entries than that was
  compared on a sample only, so a change confined to unsampled entries passes it. Such a checkpoint keeps
  its old fingerprint when re-saved (a sampled check cannot vouch for every value); an adapter wrapped
  with this version gets the v2 one.

Cost of v2 (every value): one float32 pass per weight. Measured on SmolLM2-135M, one thread of a shared
2-core CPU, best of 5: its default targets (q/v, 60 tensors, 53 MB as float32) 3 ms, all 211 linear layers
(538 MB) 86 ms, less than the old sampled rule (17 ms and 205 ms); the same layers in bf16 0.84 s (the
conversion to float32 dominates). A 7B model with every linear layer targeted (~26 GB as float32) takes
seconds, one layer at a time (never more than one float32 copy of a weight in memory).
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch
import xxhash

#: prefix of the current format
VERSION = "v2-"


def weights_fingerprint(named_weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    """XXH3-128 over names, shapes and every value (as float32) of ``named_weights``: ``"v2-<32 hex>"``.

    Values are hashed as float32 so an fp32 and a bf16/fp16 copy of the same values agree (an upcast
    bf16 model keeps its adapters); a weight on a GPU is copied to the CPU one tensor at a time.
    """
    digest = xxhash.xxh3_128()
    for name, weight in named_weights:
        values = weight.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)
        _update(digest, name, weight.shape)
        digest.update(memoryview(values.numpy()).cast("B"))  # no copy: the tensor's own bytes
    return VERSION + digest.hexdigest()


def fingerprint_as(recorded: str, named_weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The fingerprint of ``named_weights`` in the format of ``recorded`` (to compare the two)."""
    return (sampled_fingerprint if is_sampled(recorded) else weights_fingerprint)(named_weights)


def is_sampled(recorded: str) -> bool:
    """Whether ``recorded`` is in the old, sampled format (see the module docstring)."""
    return not recorded.startswith(VERSION)


def sampled_fingerprint(named_weights: Iterable[tuple[str, torch.Tensor]], samples_per_layer: int = 1 << 16) -> str:
    """The format before v2, kept only to check checkpoints that carry it: a sha256 over names, shapes
    and a strided sample of at most ``samples_per_layer`` values (as float32) of each weight."""
    digest = hashlib.sha256()
    for name, weight in named_weights:
        flat = weight.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_layer)
        sample = flat[::step][:samples_per_layer].to(device="cpu", dtype=torch.float32).contiguous()
        _update(digest, name, weight.shape)
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def _update(digest, name: str, shape: torch.Size) -> None:
    digest.update(name.encode())
    digest.update(str(tuple(shape)).encode())
