"""Which implementation computes the adapter matmuls: ``LRZOO_BACKEND=auto|torch|triton``.

* ``torch``: the pure-PyTorch path of each family (``lora.py``, ``randlora.py``, ``tera.py``; any device).
* ``triton``: the fused Triton kernels; on a CPU tensor they need ``TRITON_INTERPRET=1`` (set
  before triton is imported), which is only useful for testing.
* ``auto`` (default): Triton for CUDA tensors when triton imports, a kernel exists for the
  operation and it has passed its check on this device and stack (:mod:`lrzoo.kernels.verify`; a
  failed check runs the torch path with one warning), the torch path otherwise.

A forced ``triton`` falls back to ``torch`` with a one-time warning for cases a kernel does not
cover (no kernel for the method yet, an unsupported dtype, ...), and raises
(:class:`lrzoo.kernels.verify.KernelCheckError`) for a kernel that failed its check on the device.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "LRZOO_BACKEND"


def requested_backend() -> str:
    """The backend named by ``LRZOO_BACKEND`` (read on every call, so tests can change it)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; use one of {', '.join(BACKENDS)}.")
    return value


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def kernel_device(tensor: torch.Tensor) -> bool:
    """Whether Triton compiles kernels for ``tensor``'s device (CUDA), as opposed to interpreting them on CPU.

    On such a device a kernel runs only once it has passed its check there (:mod:`lrzoo.kernels.verify`);
    the tests replace this function to run that gate on CPU, under the interpreter.
    """
    return tensor.is_cuda


def use_triton(op: str, tensor: torch.Tensor, has_kernel: bool) -> bool:
    """Decide for one call whether the Triton kernel of ``op`` runs on ``tensor`` (before its check's verdict)."""
    backend = requested_backend()
    if backend == "torch":
        return False
    on_cuda = kernel_device(tensor)
    if backend == "auto":
        return has_kernel and on_cuda and triton_available()
    # backend == "triton": forced
    reason = None
    if not has_kernel:
        reason = f"no Triton kernel for {op} yet"
    elif not triton_available():
        reason = "triton is not installed (pip install 'lrzoo[triton]')"
    elif not on_cuda and not interpreter_on():
        reason = "the tensor is on CPU and TRITON_INTERPRET=1 is not set"
    if reason:
        warn_once(f"{ENV_VAR}=triton: {reason}; using the torch path for {op}.")
        return False
    return True
