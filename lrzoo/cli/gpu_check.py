"""``make gpu-check``: everything that needs a CUDA device, in one run with one summary (< 8 minutes).

1. the GPU-marked tests (``pytest -m gpu``: bf16/fp16 error against torch's own, autocast on CUDA...);
2. the Triton-vs-torch kernel comparisons, on the GPU (``tests/test_kernels_triton.py``, fp32/fp16/bf16);
3. ``lrzoo-bench`` at the H100 shapes of the protocol (docs/benchmarks.md#protocol; bf16, r=16), on the kernel methods.

Each step runs in its own process under a time limit, so a hang or a crash in one still leaves the
others' results. The summary names the device, the versions and each step's outcome; it is printed
and, with ``--out FILE``, written as Markdown for docs/benchmarks.md. Without a CUDA device it exits
at once with status 2 and says so: nothing was checked, and that must not read as a pass.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

NO_DEVICE_STATUS = 2
#: the protocol's shapes (docs/benchmarks.md#protocol; tokens, d_in, d_out): the d=4096 square at 8192 tokens
#: and the Llama-8B k/v, gate/up and down projections; the full N sweep is ``lrzoo-bench`` without --shape.
H100_SHAPES = ((8192, 4096, 4096), (8192, 4096, 1024), (8192, 4096, 14336), (8192, 14336, 4096))
BENCH_METHODS = ("lora", "dora", "lora_xs", "randlora", "tera")


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


def summary(device: str, versions: str, steps: list[dict]) -> str:
    lines = [f"## gpu-check on {device}", "", versions, ""]
    for step in steps:
        lines.append(f"- **{step['name']}**: {step['status']} in {step['seconds']:.0f} s (`{step['command']}`)")
        if step["name"] != "bench":
            lines.append(f"  - {_pytest_line(step['output'])}")
    bench = next((s for s in steps if s["name"] == "bench"), None)
    if bench is not None:
        lines += ["", "### lrzoo-bench (the protocol's shapes, docs/benchmarks.md#protocol)", "",
                  *_bench_lines(bench["output"])]
    failed = [s for s in steps if s["status"] != "passed"]
    for step in failed:
        lines += ["", f"### {step['name']}: last output", "```", *step["output"].splitlines()[-40:], "```"]
    lines += ["", "All steps passed." if not failed else f"{len(failed)} step(s) did not pass."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lrzoo-gpu-check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the summary (Markdown) to this file")
    parser.add_argument("--repo", default=".", help="repository root holding tests/ (default: the current directory)")
    parser.add_argument("--budget", type=int, default=450, help="seconds for all steps together (default 450)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device (torch.cuda.is_available() is False); nothing was checked. "
              "Run it on a machine with an NVIDIA GPU.", file=sys.stderr)
        return NO_DEVICE_STATUS
    import triton

    device = torch.cuda.get_device_name(0)
    versions = (f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}, "
                f"{torch.cuda.device_count()} device(s)")
    repo = Path(args.repo).resolve()
    python = sys.executable
    deadline = time.monotonic() + args.budget
    plan = [
        ("gpu-marked tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"], 0.35),
        ("triton vs torch", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_triton.py"], 0.2),
        ("bench", [python, "-m", "lrzoo.cli.bench", "--r", "16", "--methods", *BENCH_METHODS,
                   *[arg for shape in H100_SHAPES for arg in ("--shape", *map(str, shape))]], 0.45),
    ]
    steps = []
    for index, (name, command, share) in enumerate(plan):
        # each step gets its share of the time left, so what a fast step saves goes to the later ones
        remaining_share = sum(s for _, _, s in plan[index:])
        timeout = max(30, int((deadline - time.monotonic()) * share / remaining_share))
        print(f"[gpu-check] {name} (limit {timeout} s)", flush=True)
        steps.append(_run(name, command, timeout, repo))
    text = summary(device, versions, steps)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if all(step["status"] == "passed" for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
