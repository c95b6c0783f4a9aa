"""Fingerprints of base weights: an adapter made on one set of weights must not load silently onto another.

Used by :mod:`lrzoo.peft_bridge` (written at wrap time into ``base_weights_hash``, checked at load).
"""

from __future__ import annotations

import hashlib

import torch


def weights_fingerprint(named_weights: list[tuple[str, torch.Tensor]], samples_per_layer: int = 1 << 16) -> str:
    """A sha256 over names, shapes and a strided sample of each weight (as float32).

    Hashing every byte of a 7B model takes tens of seconds; a strided sample of 65k values per
    layer still catches a different checkpoint, a fine-tuned copy or a merged model, which is what
    the check is for. The sample is taken in float32 so fp32/bf16 copies of the same values agree.
    """
    digest = hashlib.sha256()
    for name, weight in named_weights:
        flat = weight.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_layer)
        sample = flat[::step][:samples_per_layer].to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(weight.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]
