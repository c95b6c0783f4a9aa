"""Adapter matmuls: one entry point per operation, dispatching to Triton or the torch reference.

Callers (the adapter layers) never choose an implementation themselves; see
:mod:`lrzoo.kernels.backend` for the rule, and :mod:`lrzoo.kernels.verify` for the check a kernel passes
on a CUDA device before ``auto`` uses it (:func:`verify_kernels` runs them all, for ``make gpu-check``).
Each kernel family declares its operation beside its code (:mod:`lrzoo.kernels.registry`): ``lora.py``,
``randlora.py`` and ``tera.py`` hold the torch path and the entry, ``triton_<family>.py`` the Triton side,
imported on the first Triton call.
"""

from __future__ import annotations

import torch

from . import lora, randlora, tera  # importing a family registers its entry
from .backend import requested_backend, use_triton
from .registry import KERNELS, TRITON_OPS, KernelEntry
from .verify import KernelCheckError, Verdict, format_verdicts, trusted, verify_kernels


def _dispatch(op: str, x, *args, **kwargs):
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast does not reach inside a custom autograd Function (its in-place adds and casts would
        # mix dtypes), so apply its rule for linear layers here: the activation runs in the autocast
        # dtype, and every product inside follows it. Adapter tensors keep their own dtype (fp32) and
        # get their gradients in it, as under PEFT's eager forward.
        with torch.autocast(device_type, enabled=False):
            return _dispatch(op, x.to(torch.get_autocast_dtype(device_type)), *args, **kwargs)
    if use_triton(op, x, op in TRITON_OPS) and trusted(op, x):
        return TRITON_OPS[op](x, *args, **kwargs)
    return KERNELS[op].reference(x, *args, **kwargs)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False):
    """``x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ``; see :func:`lrzoo.kernels.lora.lora_linear`."""
    return _dispatch("lora_linear", x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, training=False):
    """DoRA linear; see :func:`lrzoo.kernels.lora.dora_linear`."""
    return _dispatch("dora_linear", x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training)


def core_linear(x, weight, bias, lora_A, core, lora_B, scaling, dropout_p=0.0, training=False):
    """``x Wᵀ + b + s·((drop(x) Aᵀ) Cᵀ) Bᵀ``: :func:`lora_linear` with ``B' = B C``; see
    :func:`lrzoo.kernels.lora.core_linear`."""
    with torch.autocast(x.device.type, enabled=False):  # B' = B C in the adapter's dtype, not bf16
        folded = lora.fold_core(lora_B, core)
    return lora_linear(x, weight, bias, lora_A, folded, scaling, dropout_p, training)


def randlora_linear(x, weight, bias, basis_A, basis_B, lam, gamma, scaling, dropout_p=0.0, training=False):
    """RandLoRA linear ``x (W + ΔW)ᵀ + b``; see :func:`lrzoo.kernels.randlora.randlora_linear`."""
    return _dispatch("randlora_linear", x, weight, bias, basis_A, basis_B, lam, gamma, scaling, dropout_p, training)


def tera_linear(x, weight, bias, factors, core, lam, modes, scaling, dropout_p=0.0, training=False):
    """TeRA linear ``x (W + ΔW)ᵀ + b`` with ``ΔW = s·T·Rcᵀ`` of rank ≤ R^K; see :mod:`lrzoo.kernels.tera`."""
    return _dispatch("tera_linear", x, weight, bias, factors, core, lam, tuple(modes), scaling, dropout_p, training)


__all__ = ["KERNELS", "KernelCheckError", "KernelEntry", "TRITON_OPS", "Verdict", "core_linear", "dora_linear",
           "format_verdicts", "lora", "lora_linear", "randlora", "randlora_linear", "requested_backend", "tera",
           "tera_linear", "verify_kernels"]
