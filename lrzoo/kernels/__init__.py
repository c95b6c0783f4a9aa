"""Adapter matmuls: one entry point per operation, dispatching to Triton or the torch reference.

Callers (the adapter layers) never choose an implementation themselves; see
:mod:`lrzoo.kernels.backend` for the rule. Kernel families register themselves in ``TRITON_OPS``.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import randlora_ref, reference, tera_ref
from .backend import requested_backend, use_triton
from .triton_ops import TRITON_ENTRIES

#: op name -> Triton implementation with the same signature as the reference function.
TRITON_OPS: dict[str, Callable] = dict(TRITON_ENTRIES)


def _dispatch(op: str, reference_fn: Callable, x, *args, **kwargs):
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast does not reach inside a custom autograd Function (its in-place adds and casts would
        # mix dtypes), so apply its rule for linear layers here: the activation runs in the autocast
        # dtype, and every product inside follows it. Adapter tensors keep their own dtype (fp32) and
        # get their gradients in it, as under PEFT's eager forward.
        with torch.autocast(device_type, enabled=False):
            return _dispatch(op, reference_fn, x.to(torch.get_autocast_dtype(device_type)), *args, **kwargs)
    if use_triton(op, x, op in TRITON_OPS):
        return TRITON_OPS[op](x, *args, **kwargs)
    return reference_fn(x, *args, **kwargs)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False):
    """``x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ``; see :func:`lrzoo.kernels.reference.lora_linear`."""
    return _dispatch("lora_linear", reference.lora_linear, x, weight, bias, lora_A, lora_B, scaling,
                     dropout_p, training)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, training=False):
    """DoRA linear; see :func:`lrzoo.kernels.reference.dora_linear`."""
    return _dispatch("dora_linear", reference.dora_linear, x, weight, bias, lora_A, lora_B, magnitude,
                     scaling, dropout_p, training)


def core_linear(x, weight, bias, lora_A, core, lora_B, scaling, dropout_p=0.0, training=False):
    """``x Wᵀ + b + s·((drop(x) Aᵀ) Cᵀ) Bᵀ``: :func:`lora_linear` with ``B' = B C``; see
    :func:`lrzoo.kernels.reference.core_linear`."""
    with torch.autocast(x.device.type, enabled=False):  # B' = B C in the adapter's dtype, not bf16
        folded = reference.fold_core(lora_B, core)
    return lora_linear(x, weight, bias, lora_A, folded, scaling, dropout_p, training)


def randlora_linear(x, weight, bias, basis_A, basis_B, lam, gamma, scaling, dropout_p=0.0, training=False):
    """RandLoRA linear ``x (W + ΔW)ᵀ + b``; see :func:`lrzoo.kernels.randlora_ref.randlora_linear`."""
    return _dispatch("randlora_linear", randlora_ref.randlora_linear, x, weight, bias, basis_A, basis_B, lam, gamma,
                     scaling, dropout_p, training)


def tera_linear(x, weight, bias, factors, core, lam, modes, scaling, dropout_p=0.0, training=False):
    """TeRA linear ``x (W + ΔW)ᵀ + b`` with ``ΔW = s·T·Rcᵀ`` of rank ≤ R^K; see :mod:`lrzoo.kernels.tera_ref`."""
    return _dispatch("tera_linear", tera_ref.tera_linear, x, weight, bias, factors, core, lam, tuple(modes), scaling,
                     dropout_p, training)


__all__ = ["TRITON_OPS", "core_linear", "dora_linear", "lora_linear", "randlora_linear", "randlora_ref", "reference",
           "requested_backend", "tera_linear", "tera_ref"]
