"""Asymmetric group-wise integer quantization (Q-GaLore's INT8 weights and INT4 projection matrices).

A tensor is flattened row-major and cut into groups of ``group_size`` consecutive elements; each group gets

    s = max(max − min, 1e-5) / (2ᵇ − 1),   z = clamp(−round(min / s), 0, 2ᵇ − 1)
    q = clamp(round(w / s) + z, 0, 2ᵇ − 1)                (round to nearest)
    q = clamp(⌊w / s⌋ + 1[u < frac(w / s)] + z, 0, 2ᵇ − 1) (stochastic rounding, u ~ U[0, 1))
    w ≈ s · (q − z)

Codes are stored one per uint8 (INT4 codes too: 0..15, not packed two to a byte, as in the official code);
``s`` and ``z`` are fp32 columns (one row per group). Stochastic rounding is unbiased: E[s·(q − z)] = w inside
the group's range, so updates far below one step s still move the weight on average.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Quantized(NamedTuple):
    """Codes (uint8, the tensor's shape), and per-group scales and zero points (fp32, groups × 1)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


def check_group_size(owner: str, what: str, numel: int, group_size: int) -> None:
    """Refuse a group size that does not split ``numel`` elements into whole groups."""
    if numel % group_size:
        raise ValueError(f"{owner}: {what} has {numel} elements, not a multiple of the quantization group size "
                         f"{group_size}; choose a group size that divides it (a power of two ≤ its width).")


def quantize(weight: torch.Tensor, group_size: int, bits: int,
             generator: Optional[torch.Generator] = None) -> Quantized:
    """``weight`` in ``bits``-bit codes over groups of ``group_size``: round to nearest, or stochastic rounding
    drawing u from ``generator`` (one uniform number per element, in row-major order)."""
    groups = weight.reshape(-1, group_size)
    top = 2 ** bits - 1
    high = groups.amax(dim=1, keepdim=True)
    low = groups.amin(dim=1, keepdim=True)
    scales = (high - low).clamp(min=1e-5) / top
    zeros = (-torch.round(low / scales)).clamp_(0, top)
    scaled = groups / scales
    if generator is None:
        rounded = torch.round(scaled)
    else:
        down = torch.floor(scaled)
        fraction = scaled - down
        draw = torch.rand(fraction.shape, generator=generator, dtype=fraction.dtype, device=fraction.device)
        rounded = torch.where(draw < fraction, torch.ceil(scaled), down)
    codes = torch.clamp(rounded + zeros, 0, top).reshape(weight.shape).to(torch.uint8)
    return Quantized(codes, scales, zeros)


def dequantize(quantized: Quantized, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """s·(q − z) in ``dtype``, in the codes' shape."""
    codes, scales, zeros = quantized
    values = codes.to(dtype).reshape(-1, group_size)
    return ((values - zeros) * scales).reshape(codes.shape)


def nbytes(quantized: Quantized) -> int:
    """Bytes held: the codes and the per-group scales and zero points."""
    return sum(t.numel() * t.element_size() for t in quantized)
