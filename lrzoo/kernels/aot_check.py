"""``make kernels-check``: every Triton kernel compiled ahead of time for A100 (sm_80) and H100 (sm_90a), no GPU.

For each kernel of ``lrzoo/kernels/triton_*.py``, each specialisation the launchers really produce
(recorded by :mod:`lrzoo.kernels.launches`: dtypes, constexpr flags, unit strides, alignment hints, via
Triton's own binder), each autotune config the autotuner may pick on that target, and each target,
``triton.compile`` builds the cubin with the ptxas shipped in the triton wheel (no driver is needed).
Then per case: registers per thread and spill bytes (the ptxas ``-v`` log Triton prints on a cache miss,
or ptxas rerun on the kernel's PTX with Triton's flags for a cached kernel; registers cross-checked against
``cuobjdump`` on the cubin, which also gives the static shared memory), static + dynamic shared
memory against the target's per-block opt-in limit, and resident warps per SM (from registers, shared
memory and ``num_warps``; :func:`lrzoo.kernels.gpus.blocks_per_sm`).

The check fails (exit 1) on a compile error, shared memory over the limit, or spilled registers that
are not in :data:`ACCEPTED_SPILLS` (kernel, target, dtype -> reason); and when a ``@triton.jit``
function of the project is neither launched by a scenario nor called from a launched kernel (a new
kernel must be covered). Results are cached per compiled kernel (Triton's hash) and target under
``~/.cache/lrzoo/aot`` (``LRZOO_AOT_CACHE``), Triton's cache does the rest: a warm rerun takes seconds.

    python -m lrzoo.kernels.aot_check                 # the whole matrix (make kernels-check)
    python -m lrzoo.kernels.aot_check --subset        # one config per kernel and target (the make test case)
    python -m lrzoo.kernels.aot_check --docs docs/kernels.md   # also rewrite its generated block

``TRITON_INTERPRET`` must be unset: the interpreter replaces the kernels by Python functions.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional
from unittest import mock

from .docblocks import atomic_write, replace_block
from .gpus import GPUS, Gpu, blocks_per_sm

#: Spills accepted on purpose: (kernel name, target, dtype) -> why. Empty: every kernel compiles without
#: spilling; an entry here needs a reason a reviewer can check (a measured cost, a missing alternative).
ACCEPTED_SPILLS: dict[tuple[str, str, str], str] = {}


@dataclass
class Case:
    """One compile: a kernel specialisation, an autotune config (or the launch's own options), a target."""

    kernel: str  # short name, e.g. "_fused_mm_kernel"
    qualname: str
    scenario: str  # the first scenario that launched this specialisation
    dtype: str
    target: str
    config: str  # "BLOCK_M=128 BLOCK_N=128 BLOCK_K=64 w8 s3"
    flags: str  # the constexpr flags that are on, e.g. "HAS_LR HAS_BIAS BLOCK_R=16"
    key: str  # what makes the specialisation distinct (for de-duplication)
    source: Any = field(default=None, repr=False)  # (ASTSource, options dict) for triton.compile


@dataclass
class Result:
    kernel: str
    scenario: str
    dtype: str
    target: str
    config: str
    flags: str
    error: Optional[str] = None
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared_dynamic: int = 0
    shared_static: int = 0
    num_warps: int = 0
    blocks_per_sm: int = 0
    limiter: str = ""
    seconds: float = 0.0
    compiled: bool = False  # compiled by this run (False: Triton's cache had it)

    @property
    def shared(self) -> int:
        return self.shared_dynamic + self.shared_static

    @property
    def warps_per_sm(self) -> int:
        return self.blocks_per_sm * self.num_warps


# ---------------------------------------------------------------------------------------------------------
# building the cases


def refuse_interpreter() -> None:
    """A one-line exit when the Triton interpreter is on: it compiles nothing."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("kernels-check: TRITON_INTERPRET is set; unset it (the interpreter compiles nothing).")


@contextmanager
def _pretend_capability(gpu: Gpu) -> Iterator[None]:
    """Autotune prune hooks ask torch for the device's capability; answer with the target's."""
    major, minor = divmod(gpu.capability, 10)
    with mock.patch("torch.cuda.get_device_capability", return_value=(major, minor)):
        yield


def autotune_configs(autotuner, args: tuple, kwargs: dict, gpu: Gpu) -> list:
    """The configs the autotuner may pick for this launch on ``gpu``: its list after its own prune hook, as
    ``Autotuner.run`` computes it (which only prunes when there is more than one config)."""
    configs = list(autotuner.configs)
    if len(configs) > 1 and autotuner.early_config_prune is not None:
        with _pretend_capability(gpu):
            configs = list(autotuner.early_config_prune(configs, dict(zip(autotuner.arg_names, args)), **kwargs))
    return configs


def _config_label(options: dict, constexprs: dict) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in constexprs.items() if k.startswith("BLOCK"))
    return f"{blocks} w{options['num_warps']} s{options['num_stages']}"


def _flags_label(constexprs: dict) -> str:
    on = [k for k, v in constexprs.items() if k.isupper() and not k.startswith("BLOCK") and v is True]
    return " ".join(on + [f"BLOCK_R={constexprs['BLOCK_R']}"] if "BLOCK_R" in constexprs else on)


def build_cases(gpus: list[Gpu], subset: bool = False, exhaustive: bool = False, kernel_filter: str = "",
                dtypes: tuple = ()) -> tuple[list[Case], list[str]]:
    """Every distinct compile of the matrix, and the problems found on the way (uncovered kernels).

    Two launches are one case when they compile to the same kernel on the same target: same constexprs (flags,
    BLOCK_R, unit strides, tiles), pointer dtypes and options. Alignment hints (which sizes and strides are
    multiples of 16) are also part of Triton's key, but at model widths (multiples of 16) only a rank that is not a
    multiple of 16 drops some, which leaves a lighter kernel (no vectorised loads of the N×r operands): the default
    matrix keeps the first of those variants, ``exhaustive`` compiles them all. ``subset``: one case per kernel and
    target. ``kernel_filter`` (a substring of the qualified name) and ``dtypes`` restrict the launches.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from . import launches

    kernels = launches.project_kernels()
    recorded = [launch for launch in launches.record() if (not kernel_filter or kernel_filter in launch.kernel)
                and (not dtypes or launch.dtype in dtypes)]
    sources = {name: launches.jit_function(obj).src for name, obj in kernels.items()}
    problems = [] if (kernel_filter or dtypes) else uncovered(sources, {launch.kernel for launch in recorded})
    cases, seen = [], set()
    for gpu in gpus:
        backend = make_backend(GPUTarget("cuda", gpu.capability, 32))
        binders = {}
        per_kernel_done = set()
        for launch in recorded:
            obj = kernels[launch.kernel]
            fn = launches.jit_function(obj)
            if launch.kernel not in binders:
                binders[launch.kernel] = create_function_from_signature(fn.signature, fn.params, backend)
            is_autotuned = obj is not fn
            configs = autotune_configs(obj, launch.args, launch.kwargs, gpu) if is_autotuned else [None]
            if subset:
                if launch.kernel in per_kernel_done:
                    continue
                per_kernel_done.add(launch.kernel)
                configs = configs[:1]
            for config in configs:
                kwargs = {**launch.kwargs, **(config.all_kwargs() if config is not None else {})}
                bound, specialization, options = binders[launch.kernel](*launch.args, **kwargs)
                kind = specialization if exhaustive else [s if s[0] == "constexpr" else s[0] for s in specialization]
                key = f"{launch.kernel}|{gpu.target}|{kind}|{sorted(options.items())}"
                if key in seen:
                    continue
                seen.add(key)
                # the runtime's own packing: options parsed by the backend, constexprs and hints by path
                parsed, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
                named = {fn.arg_names[path[0]]: value for path, value in constexprs.items()}
                option_dict = {k: v for k, v in parsed.__dict__.items()}
                name = launch.kernel.removeprefix(f"{__package__}.").removeprefix("triton_")
                cases.append(Case(kernel=name, qualname=launch.kernel, scenario=launch.scenario, dtype=launch.dtype,
                                  target=gpu.target, config=_config_label(option_dict, named),
                                  flags=_flags_label(named), key=key,
                                  source=(ASTSource(fn, signature, constexprs, attrs), option_dict, gpu)))
    return cases, problems


def uncovered(sources: dict[str, str], launched: set) -> list[str]:
    """Problems for the project's jit functions (qualified name -> source) that no scenario launches and no launched
    kernel calls, directly or through another device function of the same module."""
    reached = set(launched)
    changed = True
    while changed:  # device functions called (by name) from what is reached
        changed = False
        for name in set(sources) - reached:
            short = name.rsplit(".", 1)[1]
            module = name.rsplit(".", 1)[0]
            if any(re.search(rf"\b{re.escape(short)}\s*\(", sources[r]) for r in reached if r.startswith(module)):
                reached.add(name)
                changed = True
    return [f"{name}: a @triton.jit function that no scenario launches and no launched kernel calls; add a scenario "
            f"to lrzoo/kernels/launches.py" for name in sorted(set(sources) - reached)]


# ---------------------------------------------------------------------------------------------------------
# compiling and reading resources


def _cache_dir() -> Path:
    from ..cache import cache_root

    explicit = os.environ.get("LRZOO_AOT_CACHE", "").strip()
    return Path(explicit).expanduser() if explicit else cache_root() / "aot"


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack, spill stores/loads and static smem from a ptxas ``-v`` log (the largest if several)."""
    found = {name: [int(v) for v in pattern.findall(log)] for name, pattern in _PTXAS.items()}
    return {name: max(values, default=0) for name, values in found.items()}


def ptxas_usage(ptx: str, capability: int, fp_fusion: bool) -> dict:
    """``parse_ptxas_log`` of ptxas ``-v`` rerun on ``ptx`` as Triton runs it (same binary and flags): for a kernel
    that came from Triton's cache, whose compile printed no log."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as scratch:
        src = Path(scratch) / "kernel.ptx"
        src.write_text(ptx)
        command = [get_ptxas(capability).path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v",
                   "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(capability)}", str(src),
                   "-o", str(Path(scratch) / "kernel.o")]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    return parse_ptxas_log(log)


def cubin_usage(cubin: bytes) -> dict:
    """``REG``, static ``SHARED``, ``LOCAL`` and ``STACK`` of the compiled binary (cuobjdump --dump-resource-usage)."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)], capture_output=True,
                              text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", text)}


def compile_case(case: Case) -> Result:
    """Compile one case (or read its cached result) and measure what it uses."""
    import triton

    src, options, gpu = case.source
    result = Result(kernel=case.kernel, scenario=case.scenario, dtype=case.dtype, target=case.target,
                    config=case.config, flags=case.flags, num_warps=options["num_warps"])
    started = time.perf_counter()
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    log, dump = io.StringIO(), knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v on a cache miss: no second ptxas run needed
    try:
        with redirect_stdout(log):  # (and on a ptxas failure it prints the whole PTX: keep that off the console)
            compiled = triton.compile(src, target=GPUTarget("cuda", gpu.capability, 32), options=options)
    except Exception as error:  # a compile error is a result, reported with its first line
        message = str(error).strip().splitlines()
        result.error = f"{type(error).__name__}: {message[0] if message else ''}"[:300]
        result.seconds = time.perf_counter() - started
        return result
    finally:
        knobs.nvidia.dump_ptxas_log = dump
    meta = compiled.metadata
    result.compiled = "registers" in log.getvalue()
    cached = _cache_dir() / f"{meta.hash}-{gpu.target}.json"
    try:
        usage = json.loads(cached.read_text())
    except (OSError, ValueError):
        usage = (parse_ptxas_log(log.getvalue()) if result.compiled else
                 ptxas_usage(compiled.asm["ptx"], gpu.capability, options.get("enable_fp_fusion", True)))
        binary = cubin_usage(compiled.asm["cubin"])
        if binary.get("REG") != usage["regs"]:
            raise RuntimeError(f"{case.kernel} on {gpu.target}: the ptxas log says {usage['regs']} registers, the cubin "
                               f"{binary.get('REG')}; the log no longer describes the binary Triton built")
        usage["shared_static"] = binary.get("SHARED", 0)
        atomic_write(cached, json.dumps(usage))
    result.regs, result.stack = usage["regs"], usage["stack"]
    result.spill_stores, result.spill_loads = usage["spill_stores"], usage["spill_loads"]
    result.shared_dynamic, result.shared_static = meta.shared, usage["shared_static"]
    result.num_warps = meta.num_warps
    result.blocks_per_sm, result.limiter = blocks_per_sm(gpu, result.regs, result.shared, meta.num_warps)
    result.seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------------------------------------
# verdict and report


def problems_of(result: Result, accepted: dict = ACCEPTED_SPILLS) -> list[str]:
    """Why this result fails the check (empty when it passes)."""
    gpu = GPUS[result.target]
    where = f"{result.kernel} [{result.dtype}, {result.target}, {result.config}; {result.flags or 'no flags'}; " \
            f"{result.scenario}]"
    if result.error:
        return [f"{where}: does not compile: {result.error}"]
    found = []
    if result.shared > gpu.smem_per_block_optin:
        found.append(f"{where}: {result.shared:,} B of shared memory > {gpu.smem_per_block_optin:,} B, the "
                     f"{gpu.name} per-block limit (prune this config for this target/dtype)")
    if result.blocks_per_sm == 0 and not found:
        found.append(f"{where}: no block fits on an SM ({result.limiter})")
    spilled = result.spill_stores + result.spill_loads
    if spilled and (result.kernel, result.target, result.dtype) not in accepted:
        found.append(f"{where}: spills {result.spill_stores} B stored / {result.spill_loads} B loaded at "
                     f"{result.regs} registers (prune the config, or add it to ACCEPTED_SPILLS with a reason)")
    return found


def table(results: list[Result]) -> str:
    """The results as a Markdown table, one row per case."""
    lines = ["| kernel | dtype | target | config | flags | regs | spills (st/ld B) | shared B (limit) | warps/SM | "
             "limited by |", "|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        gpu = GPUS[r.target]
        if r.error:
            lines.append(f"| {r.kernel} | {r.dtype} | {r.target} | {r.config} | {r.flags} | — | — | — | — | "
                         f"**compile error** |")
            continue
        spills = f"{r.spill_stores}/{r.spill_loads}" if r.spill_stores or r.spill_loads else "0"
        lines.append(f"| {r.kernel} | {r.dtype} | {r.target} | {r.config} | {r.flags} | {r.regs} | {spills} | "
                     f"{r.shared:,} ({gpu.smem_per_block_optin:,}) | {r.warps_per_sm} | {r.limiter} |")
    return "\n".join(lines)


def worst(results: list[Result]) -> list[str]:
    """Per target: the case with the most registers and the one with the most shared memory."""
    lines = []
    for target in sorted({r.target for r in results}):
        ok = [r for r in results if r.target == target and not r.error]
        if not ok:
            continue
        regs = max(ok, key=lambda r: (r.regs, r.shared))
        smem = max(ok, key=lambda r: (r.shared, r.regs))
        gpu = GPUS[target]
        lines.append(f"- {target} ({gpu.name}): most registers {regs.regs}/thread ({regs.kernel}, {regs.dtype}, "
                     f"{regs.config}, {regs.flags or 'no flags'}; {regs.warps_per_sm} warps/SM); most shared memory "
                     f"{smem.shared:,} B of {gpu.smem_per_block_optin:,} ({smem.kernel}, {smem.dtype}, {smem.config}, "
                     f"{smem.flags or 'no flags'}; {smem.warps_per_sm} warps/SM)")
    return lines


def summary_table(results: list[Result]) -> str:
    """Per kernel, dtype and target: the number of cases, the register and shared-memory range, the lowest occupancy."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.kernel, r.dtype, r.target), []).append(r)
    lines = ["| kernel | dtype | target | cases | registers | spills | shared memory B (limit) | warps/SM |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for (kernel, dtype, target), rs in sorted(groups.items()):
        ok = [r for r in rs if not r.error]
        errors = len(rs) - len(ok)
        gpu = GPUS[target]
        if not ok:
            lines.append(f"| {kernel} | {dtype} | {target} | {len(rs)} | — | — | — ({errors} compile errors) | — |")
            continue
        spills = sum(1 for r in ok if r.spill_stores or r.spill_loads)
        lines.append(f"| {kernel} | {dtype} | {target} | {len(rs)}{f' ({errors} errors)' if errors else ''} | "
                     f"{min(r.regs for r in ok)}–{max(r.regs for r in ok)} | {spills or 0} | "
                     f"{min(r.shared for r in ok):,}–{max(r.shared for r in ok):,} ({gpu.smem_per_block_optin:,}) | "
                     f"{min(r.warps_per_sm for r in ok)}–{max(r.warps_per_sm for r in ok)} |")
    return "\n".join(lines)


def report(results: list[Result], seconds: float, subset: bool) -> str:
    import torch
    import triton

    kernels = sorted({r.kernel for r in results})
    specs = len({(r.kernel, r.dtype, r.scenario, r.flags) for r in results})
    lines = [f"Checked {datetime.date.today().isoformat()} with triton {triton.__version__}, torch {torch.__version__}: "
             f"{len(results)} compiles ({'subset: one config per kernel and target' if subset else 'full matrix'}; "
             f"{len(kernels)} kernels, {specs} launch specialisations, targets "
             f"{', '.join(sorted({r.target for r in results}))}) in {seconds:.0f} s, "
             f"{sum(r.compiled for r in results)} of them compiled by this run (the rest from Triton's cache). "
             f"Accepted spills: {len(ACCEPTED_SPILLS) or 'none'}.", "", *worst(results), "",
             summary_table(results)]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrzoo.kernels.aot_check", description=__doc__.split("\n")[0])
    parser.add_argument("--subset", action="store_true", help="one config per kernel and target (fast)")
    parser.add_argument("--exhaustive", action="store_true",
                        help="also every alignment-hint variant (ranks that are not multiples of 16)")
    parser.add_argument("--kernel", default="", help="only kernels whose qualified name contains this")
    parser.add_argument("--dtypes", nargs="+", default=(), help="only launches of these activation dtypes")
    parser.add_argument("--targets", nargs="+", default=sorted(GPUS), choices=sorted(GPUS))
    parser.add_argument("--docs", help="rewrite the <!-- kernels-check:begin/end --> block of this Markdown file "
                                       "(docs/kernels.md) with the summary")
    parser.add_argument("--json", help="write every case's result (JSON) to this file")
    args = parser.parse_args(argv)
    refuse_interpreter()
    import warnings

    import torch

    # triton 3.9 warns once that fusion is on by default; the check compiles with the runtime's default, as launches do
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    torch.set_num_threads(1)  # the recording runs tiny torch ops; the compile itself is one process, one core
    started = time.perf_counter()
    try:
        cases, problems = build_cases([GPUS[t] for t in args.targets], subset=args.subset, exhaustive=args.exhaustive,
                                      kernel_filter=args.kernel, dtypes=tuple(args.dtypes))
    except (ImportError, AttributeError) as error:  # the binder and packing are Triton internals (written for 3.9)
        import triton

        raise SystemExit(f"kernels-check: triton {triton.__version__} lacks an internal it uses ({error}); it was "
                         f"written against triton 3.9's runtime.jit binder and _pack_args.") from error
    print(f"[kernels-check] {len(cases)} compiles", flush=True)
    results = []
    for index, case in enumerate(cases, 1):
        result = compile_case(case)
        results.append(result)
        found = problems_of(result)
        problems += found
        if found or index % 25 == 0 or index == len(cases):
            print(f"[kernels-check] {index}/{len(cases)} {time.perf_counter() - started:.0f} s"
                  + "".join(f"\n  FAIL {p}" for p in found), flush=True)
    seconds = time.perf_counter() - started
    text = report(results, seconds, args.subset)
    print("", table(results), "", text, sep="\n")
    if args.docs:
        replace_block(Path(args.docs), "kernels-check", text)
    if args.json:
        atomic_write(Path(args.json), json.dumps([asdict(r) for r in results], indent=1))
    if problems:
        print(f"\nkernels-check: {len(problems)} problem(s):", *problems, sep="\n  ", file=sys.stderr)
        return 1
    print("\nkernels-check: every case compiles, fits its target's shared memory and spills nothing unaccepted.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
