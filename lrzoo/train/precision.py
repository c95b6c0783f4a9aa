"""``trainer.precision``: which values it takes, where each one runs, and what a run really used.

* ``no``: float32 (or the model's own dtype), no autocast.
* ``bf16``: ``torch.autocast`` to bfloat16 on CPU and CUDA (forward and evaluation); weights,
  gradients and optimizer state stay in the parameters' dtype.
* ``fp16``: autocast to float16 with a GradScaler, **CUDA only**. On a CPU, accelerate accepts
  ``mixed_precision="fp16"`` and then trains in float32 without saying so (it autocasts only bf16
  on CPU, and fp16 loss scaling is a GPU feature), so lrzoo refuses it.

The trainer probes the autocast dtype it actually gets and writes ``precision`` and
``autocast_dtype`` into ``results.json``; a run asked to autocast that does not is an error.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

#: trainer.precision -> the autocast dtype it stands for.
PRECISIONS: dict[str, Optional[torch.dtype]] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(value: Any, *, cuda: Optional[bool] = None) -> str:
    """The normalised ``trainer.precision`` (``"no"``, ``"bf16"`` or ``"fp16"``), or a ValueError that
    says why not. YAML's bare ``no`` (parsed as ``False``) and ``null`` mean ``"no"``. ``cuda``: whether
    the run has a CUDA device (default: ``torch.cuda.is_available()``); fp16 needs one."""
    if value is None or value is False:
        value = "no"
    precision = value.lower() if isinstance(value, str) else value
    if precision not in PRECISIONS:
        hint = " (float32 is 'no')" if str(precision).lower() in ("fp32", "float32", "32") else ""
        raise ValueError(f"trainer.precision must be one of {list(PRECISIONS)}, got {value!r}{hint}.")
    if cuda is None:
        cuda = torch.cuda.is_available()
    if precision == "fp16" and not cuda:
        raise ValueError(
            "trainer.precision=fp16 needs a CUDA GPU, and this run has none: on a CPU accelerate accepts fp16 and "
            "then trains in float32 without autocast (CPU autocast is bfloat16-only there, and fp16 loss scaling is "
            "a GPU feature). Use trainer.precision=bf16 (autocast on the CPU) or trainer.precision=no.")
    return precision


def use_precision(precision: str) -> None:
    """Let this process build an ``Accelerator`` with ``precision`` even if an earlier run in it used
    another one: accelerate keeps one process-wide ``AcceleratorState`` and refuses to change its mixed
    precision (in-process sweeps, tests). The process group (``PartialState``) is kept."""
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def autocast_dtype(accelerator: Any) -> Optional[str]:
    """The dtype a matmul gets under ``accelerator.autocast()`` (``"bfloat16"``, ``"float16"``), or
    ``None`` when it does not autocast: what the run really does, not what it was asked."""
    probe = torch.ones(2, 2, device=accelerator.device)
    with accelerator.autocast():
        dtype = (probe @ probe).dtype
    return None if dtype == probe.dtype else str(dtype).removeprefix("torch.")


def check_autocast(precision: str, dtype: Optional[str]) -> None:
    """Refuse a run whose autocast is not the one asked for (a silent fp32 run)."""
    expected = PRECISIONS[precision]
    if (None if expected is None else str(expected).removeprefix("torch.")) != dtype:
        raise RuntimeError(f"trainer.precision={precision} asks for autocast to {expected}, but accelerate's autocast "
                           f"gives {dtype or 'none (float32)'} on this device. Use trainer.precision=no or bf16.")
