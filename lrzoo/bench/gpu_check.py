"""What ``make gpu-check`` (:mod:`lrzoo.cli.gpu_check`) runs: every check that needs a CUDA device, each step in its
own process under a time limit, and the summary (with :mod:`lrzoo.kernels.roofline`'s predicted-vs-measured table).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from ..kernels import roofline
from ..kernels.gpus import gpu_for_capability

NO_DEVICE_STATUS = 2
#: the protocol's shapes (docs/benchmarks.md#protocol; tokens, d_in, d_out): d = 4096 at N ∈ {2048, 8192, 16384}
#: and the Llama-8B k/v, gate/up and down projections at 8192; the roofline predicts the same ones.
H100_SHAPES = roofline.SHAPES
BENCH_METHODS = roofline.METHODS
BENCH_RANK = 16
#: the kernels' on-device check (issue 29 item 3), run when the installed lrzoo has it
VERIFY_MODULE = "lrzoo.kernels.verify"
VERIFY_CODE = ("import sys; from lrzoo.kernels import verify; v = verify.verify_kernels('cuda', refresh=True); "
               "print(verify.format_verdicts(v)); sys.exit(0 if all(x.ok for x in v) else 1)")


def _run(name: str, command: list[str], timeout: int, cwd: Optional[Path]) -> dict:
    """Run one step; its status, wall time, the last lines of its output and the lines to summarise."""
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        output, status = result.stdout + result.stderr, "passed" if result.returncode == 0 else "FAILED"
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        status = f"TIMED OUT after {timeout} s"
    return {"name": name, "command": " ".join(command), "status": status, "seconds": time.perf_counter() - started,
            "output": output}


def _pytest_line(output: str) -> str:
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return lines[-1].strip("= ") if lines else "(no pytest summary line)"


def _bench_lines(output: str) -> list[str]:
    kept = ("#", "|", "PASS", "FAIL", "UNDECIDED", "verdict", "note", "no verdict")
    return [line for line in output.splitlines() if line.startswith(kept)]


def bench_measurements(output: str) -> dict:
    """``(method, impl, (N, d_in, d_out)) -> (fwd+bwd ms, fwd+bwd ×frozen)`` from lrzoo-bench's table, read by its
    header names (so a new column does not shift them)."""
    rows = [line for line in output.splitlines() if line.startswith("|")]
    header = next((r for r in rows if "method" in r and "impl" in r), None)
    if header is None:
        return {}
    names = [cell.strip() for cell in header.strip("|").split("|")]

    def column(prefix: str) -> int:
        return next(i for i, name in enumerate(names) if name.startswith(prefix))

    at = {key: column(prefix) for key, prefix in (("method", "method"), ("impl", "impl"), ("shape", "N, d_in"),
                                                   ("ms", "fwd+bwd ms"), ("ratio", "fwd+bwd ×frozen"))}
    found = {}
    for row in rows[rows.index(header) + 1:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        match = re.fullmatch(r"(\d+), (\d+)→(\d+)", cells[at["shape"]]) if len(cells) == len(names) else None
        if match is None:
            continue
        try:
            ms, ratio = float(cells[at["ms"]].split()[0]), float(cells[at["ratio"]].rstrip("×"))
        except ValueError:
            continue
        found[(cells[at["method"]], cells[at["impl"]], tuple(int(g) for g in match.groups()))] = (ms, ratio)
    return found


def predicted_vs_measured(capability: int, measured: dict, r: int = BENCH_RANK, dtype: str = "bf16") -> str:
    """The roofline's prediction for the GPU model of ``capability`` beside lrzoo-bench's measurements."""
    gpu = gpu_for_capability(capability)
    lines = [f"Predicted for {gpu.name} peaks ({roofline.__name__}, {dtype}, r = {r}); measured by lrzoo-bench on "
             f"this device. Each cell is predicted / measured; ×frozen is fwd+bwd time over the frozen F.linear's.", "",
             "| method | N, d_in→d_out | lrzoo ×frozen | eager/PEFT ×frozen | speed-up vs PEFT |", "|---|---|---|---|---|"]

    def cell(value: Optional[float], fmt: str = "{:.2f}") -> str:
        return "–" if value is None else fmt.format(value)

    for method in BENCH_METHODS:
        for shape in H100_SHAPES:
            p = roofline.predict(method, shape, gpu, r, dtype)
            mine = measured.get((method, "lrzoo", shape))
            peft = measured.get((method, "peft", shape))
            speedup = peft[0] / mine[0] if mine and peft else None
            n, i, o = shape
            lines.append(f"| {method} (vs {roofline.EAGER_LABEL[method]}) | {n}, {i}→{o} | "
                         f"{p.lrzoo_ms / p.frozen_ms:.2f} / {cell(mine and mine[1])} | "
                         f"{p.eager_ms / p.frozen_ms:.2f} / {cell(peft and peft[1])} | "
                         f"{p.speedup:.2f}× / {cell(speedup, '{:.2f}×')} |")
    return "\n".join(lines)


def summary(device: str, versions: str, steps: list[dict], capability: Optional[int] = None) -> str:
    lines = [f"## gpu-check on {device}", "", versions, ""]
    for step in steps:
        lines.append(f"- **{step['name']}**: {step['status']} in {step['seconds']:.0f} s (`{step['command']}`)")
        if step["name"] not in ("bench", "kernel checks"):
            lines.append(f"  - {_pytest_line(step['output'])}")
    checks = next((s for s in steps if s["name"] == "kernel checks"), None)
    if checks is not None:
        lines += ["", "### kernel checks (lrzoo.kernels.verify)", "",
                  *[line for line in checks["output"].splitlines() if line.startswith(("#", "|"))]]
    bench = next((s for s in steps if s["name"] == "bench"), None)
    if bench is not None:
        lines += ["", "### lrzoo-bench (the protocol's shapes, docs/benchmarks.md#protocol)", "",
                  *_bench_lines(bench["output"])]
        if capability is not None:
            lines += ["", "### predicted (roofline) vs measured", "",
                      predicted_vs_measured(capability, bench_measurements(bench["output"]))]
    failed = [s for s in steps if s["status"] != "passed"]
    for step in failed:
        lines += ["", f"### {step['name']}: last output", "```", *step["output"].splitlines()[-40:], "```"]
    lines += ["", "All steps passed." if not failed else f"{len(failed)} step(s) did not pass."]
    return "\n".join(lines)


def steps_plan(python: str) -> list[tuple[str, list[str], float]]:
    """(name, command, share of the time budget) of each step, in order; the kernel checks only where the installed
    lrzoo has them (``lrzoo.kernels.verify``)."""
    plan = [
        ("gpu-marked tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"], 0.25),
        ("triton vs torch", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_kernels_triton.py"], 0.15),
        ("bench", [python, "-m", "lrzoo.cli.bench", "--r", str(BENCH_RANK), "--methods", *BENCH_METHODS,
                   *[arg for shape in H100_SHAPES for arg in ("--shape", *map(str, shape))]], 0.5),
    ]
    if importlib.util.find_spec(VERIFY_MODULE) is not None:
        plan.insert(0, ("kernel checks", [python, "-c", VERIFY_CODE], 0.1))
    return plan


def run_gpu_check(repo: str = ".", budget: int = 450, out: Optional[str] = None) -> int:
    """Every step within ``budget`` seconds, from ``repo`` (the checkout holding tests/); print the summary and
    write it to ``out`` when given; returns the exit status."""
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device (torch.cuda.is_available() is False); nothing was checked. "
              "Run it on a machine with an NVIDIA GPU.", file=sys.stderr)
        return NO_DEVICE_STATUS
    import triton

    device = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    versions = (f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}, "
                f"{torch.cuda.device_count()} device(s), compute capability {major}.{minor}")
    repo = Path(repo).resolve()
    deadline = time.monotonic() + budget
    plan = steps_plan(sys.executable)
    steps = []
    for index, (name, command, share) in enumerate(plan):
        # each step gets its share of the time left, so what a fast step saves goes to the later ones
        remaining_share = sum(s for _, _, s in plan[index:])
        timeout = max(30, int((deadline - time.monotonic()) * share / remaining_share))
        print(f"[gpu-check] {name} (limit {timeout} s)", flush=True)
        steps.append(_run(name, command, timeout, repo))
    text = summary(device, versions, steps, capability=10 * major + minor)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return 0 if all(step["status"] == "passed" for step in steps) else 1

