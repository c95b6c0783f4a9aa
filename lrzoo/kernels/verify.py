"""Kernels are checked before they are trusted: one verdict per kernel, dtype, device and software stack.

Triton kernels are tested under the interpreter on CPU, which checks numerics but not what the GPU's
compiler makes of them. So on a CUDA device ``LRZOO_BACKEND=auto`` runs a kernel only after it has
passed a check there (:func:`trusted`, called by the dispatcher for every Triton call):

* **The check** (:func:`check_kernel`): the family's small problems (``KernelEntry.check``) through the
  Triton implementation and through the torch reference, forward and every listed gradient. The
  error against an fp32 run of the reference must stay within 4× the torch path's own error in that
  dtype, or within a floor relative to the output's size (:data:`FLOORS`) — whichever is larger. An
  exception (a compile error, an out-of-resources launch) fails the check with its message.
* **The verdict** is cached on disk, in JSON (:func:`cache_path`: ``$LRZOO_KERNEL_VERDICTS``, else
  ``$XDG_CACHE_HOME/lrzoo/kernel-verdicts.json``, else ``~/.cache/lrzoo/...``), written atomically, keyed
  by the device name and compute capability, the driver, and the torch, triton and lrzoo versions (lrzoo's
  with a digest of the kernel sources, so an edited kernel is checked again). A passed check is not
  repeated; a failed one neither, until the file is deleted. The file is only ever parsed as JSON; a
  file that does not parse, or has another layout, is ignored and rewritten.
* **On failure** ``auto`` runs the torch path for that kernel and dtype, with one warning naming the
  kernel; ``LRZOO_BACKEND=triton`` raises :class:`KernelCheckError` instead of falling back.

:func:`verify_kernels` runs every check for a device at once (``make gpu-check``). On CPU it needs
``TRITON_INTERPRET=1`` and checks the interpreter, which is how the tests exercise this module; the
dispatcher only consults verdicts where :func:`lrzoo.kernels.backend.kernel_device` says Triton compiles
for the tensor's device (CUDA).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..io import atomic_file
from . import backend
from .registry import KERNEL_DTYPES, KERNELS, CheckCase, KernelEntry

CACHE_ENV = "LRZOO_KERNEL_VERDICTS"
CACHE_FORMAT = 1
#: error floor per dtype, relative to the largest |value| of the fp32 result; a kernel within it passes
#: even where the torch path happens to be exact (fp32: a summation order; fp16/bf16: an input rounding).
FLOORS = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}
#: how much larger than the torch path's own error (against fp32) the kernel's may be.
ERROR_FACTOR = 4.0


class KernelCheckError(RuntimeError):
    """A Triton kernel failed its check on this device and ``LRZOO_BACKEND=triton`` forbids falling back."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of one kernel's check in one dtype: ``max_error`` is the worst error relative to the
    largest |value| of the fp32 result over the outputs and gradients compared; ``reason`` says why it failed."""

    op: str
    dtype: str
    ok: bool
    max_error: Optional[float]
    seconds: float
    reason: Optional[str] = None
    checked_at: str = ""


def cache_path() -> Path:
    """Where verdicts are kept (read on every call, so a test or a user can point it elsewhere)."""
    explicit = os.environ.get(CACHE_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    from ..cache import cache_root

    return cache_root() / "kernel-verdicts.json"


@functools.lru_cache(maxsize=None)
def _sources_digest() -> str:
    """A digest of the kernel sources: a verdict holds for the code that was checked, not for a later edit."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _lrzoo_version() -> str:
    try:
        version = metadata.version("lrzoo")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"{version}+kernels.{_sources_digest()}"


def _driver_version() -> str:
    """The NVIDIA driver (``/proc/driver/nvidia/version``), else the CUDA version the driver supports."""
    try:
        line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        return " ".join(word for word in line.split() if word[:1].isdigit() and "." in word)[:40] or line[:80]
    except (OSError, IndexError):
        pass
    try:
        import ctypes

        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"cuda {version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return "unknown"


@functools.lru_cache(maxsize=None)
def stack_identity(device: str) -> dict:
    """What a verdict is valid for: device name and capability, driver, torch, triton and lrzoo versions."""
    dev = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed or broken: the check itself will fail and say so
        triton_version = "none"
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        name, capability, driver = torch.cuda.get_device_name(dev), f"{major}.{minor}", _driver_version()
    else:
        name, capability, driver = f"{dev.type} (TRITON_INTERPRET=1)", "none", "none"
    return {"device": name, "capability": capability, "driver": driver, "torch": torch.__version__,
            "triton": triton_version, "lrzoo": _lrzoo_version()}


def _stack_key(identity: dict) -> str:
    return " | ".join(f"{field} {identity[field]}" for field in sorted(identity))


def _read_cache(path: Path) -> dict:
    """The cached verdicts ``{stack key: {"stack": identity, "verdicts": {"op/dtype": {...}}}}``, or ``{}``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable or not JSON: checked again and rewritten
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("stacks"), dict):
        return {}
    return data["stacks"]


def _verdict_from(op: str, dtype: str, record) -> Optional[Verdict]:
    if not isinstance(record, dict) or not isinstance(record.get("ok"), bool):
        return None
    error = record.get("max_error")
    return Verdict(op=op, dtype=dtype, ok=record["ok"],
                   max_error=float(error) if isinstance(error, (int, float)) else None,
                   seconds=float(record.get("seconds", 0.0)) if isinstance(record.get("seconds"), (int, float)) else 0.0,
                   reason=str(record["reason"]) if record.get("reason") is not None else None,
                   checked_at=str(record.get("checked_at", "")))


def _write_verdicts(path: Path, identity: dict, verdicts: Sequence[Verdict]) -> None:
    """Merge ``verdicts`` into the file, atomically (a crash leaves the old file or the new one)."""
    stacks = _read_cache(path)
    key = _stack_key(identity)
    entry = stacks.get(key) if isinstance(stacks.get(key), dict) else None
    entry = entry if entry is not None and isinstance(entry.get("verdicts"), dict) else {"stack": identity, "verdicts": {}}
    for verdict in verdicts:
        record = asdict(verdict)
        del record["op"], record["dtype"]
        entry["verdicts"][f"{verdict.op}/{verdict.dtype}"] = record
    stacks[key] = entry
    try:
        with atomic_file(str(path)) as handle:
            json.dump({"format": CACHE_FORMAT, "stacks": stacks}, handle, indent=1, sort_keys=True)
    except OSError as error:  # a read-only home: the verdict still holds for this process
        backend.warn_once(f"could not write kernel verdicts to {path} ({error}); set {CACHE_ENV} to a writable file.")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _run(fn, case: CheckCase, cast: Optional[torch.dtype] = None):
    """``(out, {name: grad})`` of ``fn(**case.kwargs)`` with fresh leaves (cast to ``cast`` if given)."""
    leaves = {}
    for name, value in case.kwargs.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().to(cast) if cast is not None else value.detach().clone()
            value.requires_grad_(name in case.grads)
        leaves[name] = value
    out = fn(**leaves)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out)
    grads = torch.autograd.grad(out, [leaves[name] for name in case.grads], grad_out, allow_unused=True)
    return out.detach(), dict(zip(case.grads, grads))


def _relative_error(got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> tuple[float, bool]:
    """``(error of got relative to max|exact|, within bounds)``; non-finite values fail."""
    exact = exact.float()
    scale = exact.abs().max().clamp_min(1e-12)
    err_got = ((got.float() - exact).abs().max() / scale).item()
    err_want = ((want.float() - exact).abs().max() / scale).item()
    ok = bool(torch.isfinite(got).all()) and err_got <= max(ERROR_FACTOR * err_want, FLOORS[dtype])
    return err_got, ok


def check_kernel(entry: KernelEntry, device, dtype: torch.dtype) -> Verdict:
    """Run ``entry``'s check cases on ``device`` in ``dtype``: its Triton implementation against its reference."""
    device = torch.device(device)
    start = time.perf_counter()
    worst, failure = 0.0, None
    try:
        triton_fn = entry.resolve_triton()
        devices = [device] if device.type == "cuda" else []
        # the first call may come from an eval loop (no_grad, inference_mode) or under autocast: none of it
        # may reach the check, whose verdict is kept on disk
        with torch.random.fork_rng(devices=devices), torch.autocast(device.type, enabled=False), \
                torch.inference_mode(False), torch.enable_grad():
            for case in entry.check(device, dtype):
                got = _run(triton_fn, case)
                want = _run(entry.reference, case)
                exact = want if dtype == torch.float32 else _run(entry.reference, case, cast=torch.float32)
                pairs = [("output", got[0], want[0], exact[0])]
                pairs += [(f"∂{name}", got[1][name], want[1][name], exact[1][name]) for name in case.grads]
                for what, g, w, e in pairs:
                    if g is None or g.shape != e.shape:
                        failure = f"{case.name}: {what} is {'missing' if g is None else tuple(g.shape)}"
                        break
                    err, ok = _relative_error(g, w, e, dtype)
                    worst = max(worst, err)
                    if not ok and failure is None:
                        failure = f"{case.name}: {what} off by {err:.2e} of its largest value"
                if failure:
                    break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        raise  # the device is full, which says nothing about the kernel (verdict_for does not keep it)
    except Exception as error:  # compile errors, launch failures, wrong shapes: all mean "do not trust"
        message = str(error).strip().splitlines()
        failure = f"raised {type(error).__name__}: {message[0][:300] if message else ''}"
        worst = None
    return Verdict(op=entry.op, dtype=_dtype_name(dtype), ok=failure is None, max_error=worst,
                   seconds=round(time.perf_counter() - start, 3), reason=failure,
                   checked_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


#: (cache file, device, op, dtype) -> verdict: the disk is read once per process and kernel.
_MEMO: dict[tuple[str, str, str, str], Verdict] = {}


def verdict_for(op: str, device, dtype: torch.dtype, refresh: bool = False, check: bool = True) -> Optional[Verdict]:
    """The verdict of ``op`` in ``dtype`` on ``device``: remembered, else cached on disk, else checked now
    (``check=False``: ``None`` instead of checking)."""
    device = _device(device)
    path = cache_path()
    memo_key = (str(path), str(device), op, _dtype_name(dtype))
    if not refresh and memo_key in _MEMO:
        return _MEMO[memo_key]
    identity = stack_identity(str(device))
    verdict = None
    if not refresh:
        entry = _read_cache(path).get(_stack_key(identity))
        if isinstance(entry, dict) and isinstance(entry.get("verdicts"), dict):
            verdict = _verdict_from(op, _dtype_name(dtype), entry["verdicts"].get(f"{op}/{_dtype_name(dtype)}"))
    if verdict is None:
        if not check:
            return None
        try:
            verdict = check_kernel(KERNELS[op], device, dtype)
        except torch.cuda.OutOfMemoryError:
            return Verdict(op=op, dtype=_dtype_name(dtype), ok=False, max_error=None, seconds=0.0,
                           reason="the device ran out of memory during the check (not kept; checked again next call)")
        _write_verdicts(path, identity, [verdict])
    _MEMO[memo_key] = verdict
    return verdict


def trusted(op: str, x: torch.Tensor) -> bool:
    """Whether the Triton kernel of ``op`` may run on ``x`` (the dispatcher asks once it chose Triton).

    Only where Triton compiles for the device (CUDA) is there anything to check; calls the kernel does not
    cover (another dtype) are sent to the torch path by the registry itself.
    """
    if not backend.kernel_device(x) or x.dtype not in KERNEL_DTYPES:
        return True
    # a check cannot launch its kernels inside a CUDA graph capture: without a verdict, the graph records the torch path
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    verdict = verdict_for(op, x.device, x.dtype, check=not capturing)
    if verdict is None:
        backend.warn_once(f"LRZOO_BACKEND: the Triton {op} kernel is not checked yet and a CUDA graph is being "
                          f"captured; the graph uses the torch path (call lrzoo.kernels.verify_kernels() before capturing).")
        return False
    if verdict.ok:
        return True
    device = stack_identity(str(_device(x.device)))["device"]
    what = f"the Triton {op} kernel failed its check on {device} in {verdict.dtype} ({verdict.reason})"
    if backend.requested_backend() == "triton":
        raise KernelCheckError(f"LRZOO_BACKEND=triton: {what}; unset LRZOO_BACKEND to run the torch path instead "
                               f"(delete {cache_path()} to check again after changing the stack).")
    backend.warn_once(f"LRZOO_BACKEND=auto: {what}; using the torch path for it (verdict cached in {cache_path()}; "
                      f"delete it to check again).")
    return False


def _device(device) -> torch.device:
    """``cuda`` means the current CUDA device: verdicts are per device, and ``cuda`` and ``cuda:0`` are one."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def verify_kernels(device="cuda", dtypes: Optional[Sequence[torch.dtype]] = None, ops: Optional[Sequence[str]] = None,
                   refresh: bool = False) -> list[Verdict]:
    """Every Triton kernel's verdict on ``device``, checking (and caching) what has no verdict yet.

    ``dtypes``: default fp32, fp16 and bf16 on CUDA, fp32 on CPU (where the interpreter must be on, and
    computes bf16 wrongly). ``refresh``: check again even where a verdict is cached. For ``make gpu-check``:
    ``print(format_verdicts(verify_kernels("cuda", refresh=True)))``.
    """
    device = _device(device)
    if device.type == "cpu" and not backend.interpreter_on():
        raise ValueError("verify_kernels on CPU runs the Triton interpreter: set TRITON_INTERPRET=1 before triton "
                         "is imported (or pass a CUDA device).")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("verify_kernels: no CUDA device here; pass device='cpu' with TRITON_INTERPRET=1.")
    if dtypes is None:
        dtypes = KERNEL_DTYPES if device.type == "cuda" else (torch.float32,)
    names = list(ops) if ops is not None else [op for op, entry in KERNELS.items() if entry.triton is not None]
    unknown = [op for op in names if op not in KERNELS or KERNELS[op].triton is None]
    if unknown:
        raise ValueError(f"verify_kernels: no Triton kernel for {unknown}; known: "
                         f"{[op for op, e in KERNELS.items() if e.triton is not None]}.")
    return [verdict_for(op, device, dtype, refresh=refresh) for op in names for dtype in dtypes]


def format_verdicts(verdicts: Sequence[Verdict], device="cuda") -> str:
    """A markdown table of ``verdicts``, headed by the stack they hold for."""
    identity = stack_identity(str(torch.device(device)))
    lines = ["# kernel checks on " + ", ".join(f"{k} {v}" for k, v in identity.items()),
             "| kernel | dtype | verdict | max error (rel.) | s | reason |", "|---|---|---|---|---|---|"]
    for v in verdicts:
        error = "–" if v.max_error is None else f"{v.max_error:.1e}"
        lines.append(f"| {v.op} | {v.dtype} | {'PASS' if v.ok else 'FAIL'} | {error} | {v.seconds:.2f} | {v.reason or ''} |")
    return "\n".join(lines)
