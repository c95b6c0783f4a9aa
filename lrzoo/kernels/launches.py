"""Every Triton launch the adapter kernels make, recorded on CPU without running a kernel.

The ahead-of-time check (:mod:`lrzoo.kernels.aot_check`) must compile each kernel exactly as the
runtime launcher would specialise it: which constexpr flags a call site sets, which strides are 1
(Triton turns an int equal to 1 into a constexpr), which sizes are multiples of 16 (alignment hints),
each pointer's dtype. A hand-written list of those would drift from the code without anyone noticing,
so this module runs the real Triton-side autograd Functions on small CPU tensors with every kernel
object in ``lrzoo.kernels.triton_*`` replaced by a recorder: each ``kernel[grid](*args, **kwargs)``
is stored instead of launched (outputs stay uninitialised, which the launchers never read).

The scenarios are what the dispatcher sends a kernel (``registry.uncovered`` and each entry's
``limits`` are applied): every activation dtype of ``registry.KERNEL_DTYPES``; adapters in the
activation dtype, in fp32 beside a half-precision base (PEFT's ``autocast_adapter_dtype``) or with an
fp32 base under autocast; dropout on and off; LoRA, DoRA, the r×r-core family (A frozen), RandLoRA
and TeRA in both of their forms (low-rank and merged, both signs of ``d_in - d_out``); ranks whose
``BLOCK_R`` differs (16, 32, 64) and one that is not a multiple of 16. Sizes are small but keep the
divisibility of real model widths (multiples of 16), which is all the specialisation looks at.

Triton is imported by :func:`record`, never at module import (``TRITON_INTERPRET`` must be decided
before that; see :mod:`lrzoo.kernels.aot_check`).
"""

from __future__ import annotations

import importlib
import pkgutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from . import registry

#: ranks of the scenarios: 8 is not a multiple of 16 (no alignment hint on N×r strides); 16, 32 and 64
#: give the three values of the fused GEMM's BLOCK_R (16, 32, 64).
RANKS = (8, 16, 32, 64)
TOKENS = 128
#: (d_in, d_out): square, widening and narrowing (the merged RandLoRA path transposes when d_in > d_out).
#: Small, so that recording takes seconds, and large enough that RandLoRA and TeRA take their merged form.
SHAPES = ((64, 64), (64, 128), (128, 64))
#: RandLoRA ranks: with d = 64, r = 4 gives n = 16 bases (λ's row stride a multiple of 16, as at d = 4096,
#: r = 16) and r = 16 gives n = 4 (no alignment hint, as on SmolLM2's d = 576).
RANDLORA_RANKS = (4, 16)
DROPOUT = (0.0, 0.1)
#: how the tensors arrive: all in the activation dtype; fp32 adapter tensors beside a half base (PEFT's
#: autocast_adapter_dtype); an fp32 base and fp32 adapters with the activation cast by autocast.
PRECISIONS = ("same", "fp32 adapters", "autocast")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""

    kernel: str  # "<module>.<name>", e.g. "lrzoo.kernels.triton_common._fused_mm_kernel"
    scenario: str
    dtype: str  # the scenario's activation dtype: "fp32", "fp16", "bf16" ("int8" for the mask kernel)
    args: tuple
    kwargs: dict = field(default_factory=dict)


def triton_modules() -> list:
    """The ``lrzoo.kernels.triton_*`` modules, imported (this imports triton)."""
    package = importlib.import_module(__package__)
    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name.startswith("triton_"))
    return [importlib.import_module(f"{__package__}.{name}") for name in names]


def jit_function(obj: Any):
    """The ``JITFunction`` under ``obj`` (an autotuner or heuristics wrapper), or ``None`` if it is not a kernel."""
    from triton.runtime.jit import JITFunction, KernelInterface

    seen = 0
    while isinstance(obj, KernelInterface) and not isinstance(obj, JITFunction) and seen < 8:
        obj, seen = getattr(obj, "fn", None), seen + 1
    return obj if isinstance(obj, JITFunction) else None


def project_kernels() -> dict[str, Any]:
    """Every ``@triton.jit`` object defined at module level in ``lrzoo/kernels/triton_*.py``: qualified name -> object
    (the autotuner for an autotuned kernel). Device functions (called from kernels, never launched) are included."""
    found = {}
    for module in triton_modules():
        for name, obj in vars(module).items():
            fn = jit_function(obj)
            if fn is not None and fn.module == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
    return found


class _Recorder:
    def __init__(self, qualname: str, sink: list, scenario: list):
        self.qualname, self.sink, self.scenario = qualname, sink, scenario

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            name, dtype = self.scenario
            self.sink.append(Launch(self.qualname, name, dtype, args, dict(kwargs)))
        return launch


@contextmanager
def _recording(sink: list, scenario: list) -> Iterator[None]:
    kernels = project_kernels()
    modules = {m.__name__: m for m in triton_modules()}
    try:
        for qualname in kernels:
            module, name = qualname.rsplit(".", 1)
            setattr(modules[module], name, _Recorder(qualname, sink, scenario))
        yield
    finally:
        for qualname, obj in kernels.items():
            module, name = qualname.rsplit(".", 1)
            setattr(modules[module], name, obj)


def _rand(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _dtypes(dtype: torch.dtype, precision: str) -> tuple[torch.dtype, torch.dtype]:
    """(base weight/bias dtype, adapter dtype) for a precision variant."""
    if precision == "same" or dtype == torch.float32:
        return dtype, dtype
    if precision == "fp32 adapters":
        return dtype, torch.float32
    return torch.float32, torch.float32


def _run(op: str, inputs: dict, trained: tuple[str, ...], dropout_p: float, training: bool) -> bool:
    """Forward (and backward, when something trains) through the Triton side of ``op``, if the dispatcher would
    send this call there; False when it would not."""
    entry = registry.KERNELS[op]
    x = inputs["x"]
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    if registry.uncovered(entry, x, tensors, dropout_p, training) is not None:
        return False
    leaves = {k: (v.detach().clone().requires_grad_(k in trained) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    fn = entry.resolve_triton()
    with torch.set_grad_enabled(bool(trained)):
        out = fn(**leaves, dropout_p=dropout_p, training=training)
    if trained:
        out.backward(torch.ones_like(out))
    return True


def _lora_inputs(dtype, precision, d_in, d_out, r):
    base, adapter = _dtypes(dtype, precision)
    return dict(x=_rand(2, TOKENS // 2, d_in, dtype=dtype), weight=_rand(d_out, d_in, dtype=base, seed=1),
                bias=_rand(d_out, dtype=base, seed=2), lora_A=_rand(r, d_in, dtype=adapter, seed=3),
                lora_B=_rand(d_out, r, dtype=adapter, seed=4), scaling=2.0)


def _scenarios(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], bool]]]:
    """(name, thunk) for one activation dtype; each thunk runs one call (forward + backward) and says whether the
    dispatcher would have sent it to Triton."""
    for precision in PRECISIONS if dtype != torch.float32 else PRECISIONS[:1]:
        base, adapter = _dtypes(dtype, precision)
        tag = f"{DTYPE_NAMES[dtype]}, {precision}"
        for p in DROPOUT:
            for r in RANKS:
                d_in, d_out = SHAPES[0]
                lora = _lora_inputs(dtype, precision, d_in, d_out, r)
                yield (f"lora r={r} p={p} ({tag})",
                       lambda i=lora, p=p: _run("lora_linear", i, ("x", "lora_A", "lora_B", "bias"), p, True))
                # the r×r-core family: A frozen, the core folded into B (x is not saved, no ∂A)
                yield (f"core r={r} p={p} ({tag})",
                       lambda i=lora, p=p: _run("lora_linear", i, ("x", "lora_B"), p, True))
                dora = {**lora, "magnitude": _rand(d_out, dtype=adapter, seed=5).abs() + 0.5}
                yield (f"dora r={r} p={p} ({tag})",
                       lambda i=dora, p=p: _run("dora_linear", i, ("x", "lora_A", "lora_B", "magnitude", "bias"),
                                                p, True))
            yield (f"lora inference p={p} ({tag})",
                   lambda i=_lora_inputs(dtype, precision, *SHAPES[0], 16), p=p: _run("lora_linear", i, (), p,
                                                                                      False))
            for (d_in, d_out), r in ((s, r) for s in SHAPES for r in RANDLORA_RANKS):
                yield (f"randlora r={r} {d_in}->{d_out} p={p} ({tag})",
                       lambda d_in=d_in, d_out=d_out, r=r, p=p: _run(
                           "randlora_linear", _randlora_inputs(dtype, base, adapter, d_in, d_out, r),
                           ("x", "lam", "gamma", "bias"), p, True))
            for rank in (8, 4):  # Q = 64 = the width: merged form; Q = 16: the low-rank (LoRA kernel) form
                yield (f"tera R={rank} p={p} ({tag})",
                       lambda rank=rank, p=p: _run("tera_linear", _tera_inputs(dtype, base, adapter, rank),
                                                   ("x", "lam", "bias"), p, True))


def _randlora_inputs(dtype, base, adapter, d_in, d_out, r):
    d, D = min(d_in, d_out), max(d_in, d_out)
    n = -(-d // r)
    max_d = max(min(shape) for shape in SHAPES)  # PEFT's shared bases are sized for the largest layer
    max_D = max(max(shape) for shape in SHAPES)
    return dict(x=_rand(2, TOKENS // 2, d_in, dtype=dtype), weight=_rand(d_out, d_in, dtype=base, seed=1),
                bias=_rand(d_out, dtype=base, seed=2), basis_A=_rand(r, 1, max_d, dtype=adapter, seed=3),
                basis_B=_rand(max_D, -(-max_d // r), r, dtype=adapter, seed=4), lam=_rand(r, n, dtype=adapter, seed=5),
                gamma=_rand(n, d, dtype=adapter, seed=6), scaling=0.5)


def _tera_inputs(dtype, base, adapter, rank):
    modes = (8, 8, 8, 8)  # d_out = d_in = 64, K = 2: Q = rank²
    return dict(x=_rand(2, TOKENS // 2, 64, dtype=dtype), weight=_rand(64, 64, dtype=base, seed=1),
                bias=_rand(64, dtype=base, seed=2), factors=_rand(4, 8, rank, dtype=adapter, seed=3),
                core=_rand(*(rank,) * 4, dtype=adapter, seed=4), lam=_rand(4, rank, dtype=adapter, seed=5),
                modes=modes, scaling=0.5)


def _mask_scenario() -> bool:
    """``dropout_keep_mask`` (tests and debugging only: the kernels rebuild masks inline) is a kernel too."""
    from .triton_common import dropout_keep_mask

    dropout_keep_mask(TOKENS, 64, seed=1234, p=0.1, device=torch.device("cpu"))
    return True


def record() -> list[Launch]:
    """Every launch of every scenario, in order (duplicates included; the caller deduplicates per target)."""
    sink: list[Launch] = []
    scenario = ["", ""]
    torch.manual_seed(0)  # dropout seeds come from torch's generator
    with _recording(sink, scenario):
        for dtype in registry.KERNEL_DTYPES:
            for name, thunk in _scenarios(dtype):
                scenario[:] = name, DTYPE_NAMES[dtype]
                thunk()
        scenario[:] = "dropout_keep_mask", "int8"
        _mask_scenario()
    return sink
