"""Helpers every kernel family shares, torch side (no triton import here).

* reshaping and dropout on the flattened activation (``flatten``, ``dropout_mask``, ``apply_mask``);
* the trained-bias contract of every autograd Function (``remember_bias`` in forward, ``bias_grad``
  in backward);
* ``base_out``: the frozen base product ``x Wᵀ + b`` in one GEMM (LoRA, DoRA, TeRA's low-rank form);
* ``materialize_wins``: whether building ``W' = W + ΔW`` beats two thin GEMMs (RandLoRA, TeRA);
* ``DORA_EPS``, the floor of DoRA's row norm (also read by the DoRA layer and the PEFT export);
* ``check_tensors``: seeded random tensors for the families' kernel-check problems.
"""

from __future__ import annotations

from typing import Optional

import torch

#: Floor of DoRA's row norm; an all-zero row of W (+ΔW) gives g = m / eps instead of 0/0 = NaN.
DORA_EPS = 1e-6


def flatten(x: torch.Tensor) -> torch.Tensor:
    """``(..., d) -> (N, d)``."""
    return x.reshape(-1, x.shape[-1])


def dropout_mask(x2: torch.Tensor, p: float, training: bool) -> Optional[torch.Tensor]:
    """The torch path's keep-mask of ``x2`` (boolean, drawn with ``torch.rand_like``), or ``None`` without dropout."""
    if p <= 0.0 or not training:
        return None
    return torch.rand_like(x2, dtype=torch.float32) >= p


def apply_mask(x2: torch.Tensor, mask: Optional[torch.Tensor], p: float) -> torch.Tensor:
    """Inverted dropout with a given mask: ``x2 ⊙ mask / (1 - p)`` (``x2`` itself when ``mask`` is ``None``)."""
    if mask is None:
        return x2
    return x2 * mask.to(x2.dtype) * (1.0 / (1.0 - p))


def remember_bias(ctx, bias: Optional[torch.Tensor]) -> None:
    """Record what :func:`bias_grad` needs: whether there is a bias and its dtype (the tensor is not saved)."""
    ctx.bias_dtype = None if bias is None else bias.dtype


def bias_grad(ctx, dy: torch.Tensor, index: int = 2) -> Optional[torch.Tensor]:
    """``∂b = Σ_N dy`` (accumulated in fp32, returned in the bias dtype) when the bias trains.

    A base bias trains under PEFT's ``bias="all"``/``"lora_only"`` and under ReLoRA, so the kernels
    take it undetached and return its gradient; ``index`` is the bias's position in ``forward``.
    """
    if ctx.bias_dtype is None or not ctx.needs_input_grad[index]:
        return None
    return dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)


def base_out(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x Wᵀ + b`` for a flattened ``x2``, the bias added inside the GEMM (``addmm``)."""
    if bias is not None:
        return torch.addmm(bias.to(x2.dtype), x2, weight.t())
    return x2 @ weight.t()


def materialize_wins(tokens: int, d_in: int, d_out: int, num_products: int, training: bool,
                     rebuilds: bool = False) -> bool:
    """Whether building ΔW beats the two thin GEMMs, by multiply-add count.

    ``num_products`` is the inner size P of ``ΔW = Bf·Af`` (the rank of the update); the counts are
    derived in :mod:`lrzoo.kernels.randlora`'s docstring. TeRA uses the same rule with P = R^K.
    ``rebuilds``: the merged path builds ΔW a second time in the backward instead of keeping ``W'``
    (the torch RandLoRA path and both Triton merged paths do, to save memory), one more ``D·d·P`` on its
    side of the scale.
    """
    d, D, P = min(d_in, d_out), max(d_in, d_out), num_products
    if training:
        builds = 3 if rebuilds else 2  # ΔW forward, ∂factors from ∂ΔW (+ the rebuild for ∂x)
        return builds * D * d * P + tokens * D * d < tokens * P * (2 * (d_in + d_out) + d)
    return D * d * P < tokens * P * (d_in + d_out)


def check_tensors(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """``rand(*shape, scale=1.0, dtype=None)``: seeded normal tensors on ``device`` (in ``dtype`` unless told),
    for the small problems a family's kernel is checked on (:mod:`lrzoo.kernels.verify`)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, dtype_: Optional[torch.dtype] = None) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype_ or dtype)

    return rand
