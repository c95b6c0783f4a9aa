"""The Triton entries of ``TRITON_OPS``, loaded lazily, with the checks that send a call back to torch.

Importing triton is deferred to the first Triton call: ``TRITON_INTERPRET=1`` only takes effect if
it is set before triton is imported, and ``import lrzoo`` must not decide that for the user.
A call the kernels do not cover runs the torch reference instead, with a one-time warning naming
the reason.
"""

from __future__ import annotations

from importlib import import_module
from typing import Callable, Optional

import torch

from . import randlora_ref, reference, tera_ref
from .backend import warn_once

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def uncovered(op: str, x: torch.Tensor, tensors: list, dropout_p: float, training: bool) -> Optional[str]:
    """Why the Triton kernel of ``op`` cannot serve this call, or ``None`` if it can."""
    if x.dtype not in KERNEL_DTYPES:
        return f"activation dtype {x.dtype} (kernels take float32/float16/bfloat16)"
    if x.shape[-1] == 0 or x.numel() == 0:
        return "an empty input"
    if any(t is not None and t.device != x.device for t in tensors):
        return "adapter tensors on another device than the input"
    if op == "randlora_linear" and dropout_p > 0 and training:
        return "dropout (the fused RandLoRA kernel merges ΔW into W, which dropout on x forbids)"
    return None


def _lazy(op: str, module: str, name: str, reference_fn: Callable, training_at: int) -> Callable:
    """A ``TRITON_OPS`` entry: check coverage, import ``lrzoo.kernels.<module>`` on first use, run it.

    ``training_at`` is the index (in the arguments after x) of ``training``; ``dropout_p`` precedes it.
    """

    def run(x, *args):
        dropout_p, training = (args[training_at - 1], args[training_at]) if len(args) > training_at else (0.0, False)
        reason = uncovered(op, x, [a for a in args if isinstance(a, torch.Tensor)], dropout_p, training)
        if reason is not None:
            warn_once(f"LRZOO_BACKEND: the Triton {op} kernel does not cover {reason}; using the torch path.")
            return reference_fn(x, *args)
        return getattr(import_module(f"{__package__}.{module}"), name)(x, *args)

    run.__name__ = run.__qualname__ = f"triton_{op}"
    return run


TRITON_ENTRIES: dict[str, Callable] = {
    "lora_linear": _lazy("lora_linear", "triton_lora", "lora_linear", reference.lora_linear, 6),
    "dora_linear": _lazy("dora_linear", "triton_lora", "dora_linear", reference.dora_linear, 7),
    "randlora_linear": _lazy("randlora_linear", "triton_randlora", "randlora_linear", randlora_ref.randlora_linear, 8),
    "tera_linear": _lazy("tera_linear", "triton_tera", "tera_linear", tera_ref.tera_linear, 8),
}
