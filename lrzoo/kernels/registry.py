"""The dispatch table. Each kernel family declares its operation beside its code, by keyword::

    register(KernelEntry(op="lora_linear", reference=lora_linear, triton="triton_lora:lora_linear", check=_lora_check))

* ``reference``: the torch path (any device), and the operation's signature: ``x`` first, the
  operation's tensors and scalars, then ``dropout_p`` and ``training`` (read here by name).
* ``triton``: the Triton implementation with the same signature, as ``"module:function"`` under
  ``lrzoo.kernels``, or ``None``. It is only a name: the module (which imports triton) is imported
  on the first Triton call. ``TRITON_INTERPRET=1`` only takes effect if it is set before triton is
  imported, and ``import lrzoo`` must not decide that for the user.
* ``limits``: the family's own limits, ``(x, dropout_p, training) -> reason or None``, on top of the
  checks every kernel shares (:func:`uncovered`).
* ``check``: ``(device, dtype) -> [CheckCase, ...]``, small problems that reach the Triton kernel (not a
  silent torch fallback inside it), on which :mod:`lrzoo.kernels.verify` compares it with ``reference``,
  forward and backward, before ``LRZOO_BACKEND=auto`` trusts it on a CUDA device. Required with ``triton``.

A call the Triton kernel does not cover runs the reference instead, with a one-time warning naming
the reason. Which backend runs at all is :mod:`lrzoo.kernels.backend`'s rule.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from importlib import import_module
from typing import Callable, Optional

import torch

from ..registry_table import Table
from .backend import warn_once

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class CheckCase:
    """One problem of a kernel's check: the op's keyword arguments and the inputs whose gradients are compared."""

    name: str
    kwargs: dict
    grads: tuple[str, ...]


@dataclass(frozen=True)
class KernelEntry:
    """One operation of the dispatch table (see the module docstring)."""

    op: str
    reference: Callable
    triton: Optional[str] = None
    limits: Optional[Callable[[torch.Tensor, float, bool], Optional[str]]] = None
    check: Optional[Callable[[torch.device, torch.dtype], list[CheckCase]]] = None

    def __post_init__(self):
        if self.triton is not None and self.triton.count(":") != 1:
            raise ValueError(f"{self.op}: triton={self.triton!r} is not 'module:function'.")
        if self.triton is not None and self.check is None:
            raise ValueError(f"{self.op}: a Triton kernel needs check cases (check=...) before auto may trust it.")
        names = list(inspect.signature(self.reference).parameters)
        if names[-2:] != ["dropout_p", "training"]:
            raise ValueError(f"{self.op}: the reference must end with (dropout_p, training), not {names}.")

    def resolve_triton(self) -> Optional[Callable]:
        """The Triton implementation, importing its module (and triton) now; ``None`` if there is none."""
        if self.triton is None:
            return None
        module, name = self.triton.split(":")
        return getattr(import_module(f"{__package__}.{module}"), name)


#: op name -> its entry, in registration order.
KERNELS: Table[KernelEntry] = Table("kernel op")
#: op name -> a callable with the reference's signature that checks coverage and runs the Triton
#: implementation (or the reference, warning once). Only ops with a declared Triton side are here.
TRITON_OPS: Table[Callable] = Table("Triton kernel op")


def register(entry: KernelEntry) -> KernelEntry:
    """Add ``entry`` to the table (a module re-imported replaces its own entry; another module's is refused)."""
    known = KERNELS.get(entry.op)
    if known is not None and known.reference.__module__ != entry.reference.__module__:
        raise ValueError(f"{entry.op} is already declared by {known.reference.__module__}.")
    KERNELS.add(entry.op, entry, replace=True)  # the same module again (a reload): its new entry
    if entry.triton is not None:
        TRITON_OPS.add(entry.op, _triton_call(entry), replace=True)
    else:
        TRITON_OPS.pop(entry.op, None)
    return entry


def uncovered(entry: KernelEntry, x: torch.Tensor, tensors: list, dropout_p: float, training: bool) -> Optional[str]:
    """Why the Triton kernel of ``entry`` cannot serve this call, or ``None`` if it can."""
    if x.dtype not in KERNEL_DTYPES:
        return f"activation dtype {x.dtype} (kernels take float32/float16/bfloat16)"
    if x.shape[-1] == 0 or x.numel() == 0:
        return "an empty input"
    if any(t is not None and t.device != x.device for t in tensors):
        return "adapter tensors on another device than the input"
    if entry.limits is not None:
        return entry.limits(x, dropout_p, training)
    return None


def _triton_call(entry: KernelEntry) -> Callable:
    """The ``TRITON_OPS`` value of ``entry``: check coverage, then run the lazily imported Triton side."""
    params = inspect.signature(entry.reference).parameters
    after_x = list(params)[1:]
    p_at, training_at = after_x.index("dropout_p"), after_x.index("training")
    p_default, training_default = params["dropout_p"].default, params["training"].default

    def run(x, *args, **kwargs):
        dropout_p = kwargs.get("dropout_p", args[p_at] if len(args) > p_at else p_default)
        training = kwargs.get("training", args[training_at] if len(args) > training_at else training_default)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        reason = uncovered(entry, x, tensors, dropout_p, training)
        if reason is not None:
            warn_once(f"LRZOO_BACKEND: the Triton {entry.op} kernel does not cover {reason}; using the torch path.")
            return entry.reference(x, *args, **kwargs)
        return entry.resolve_triton()(x, *args, **kwargs)

    run.__name__ = run.__qualname__ = f"triton_{entry.op}"
    return run
