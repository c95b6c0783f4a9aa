"""``make gpu-check``: everything that needs a CUDA device, in one run with one summary (< 8 minutes).

1. the kernels' check on this device (``lrzoo.kernels.verify.verify_kernels``, refreshed), when the installed
   lrzoo has it: the verdicts ``LRZOO_BACKEND=auto`` trusts;
2. the GPU-marked tests (``pytest -m gpu``: bf16/fp16 error against torch's own, autocast on CUDA...);
3. the Triton-vs-torch kernel comparisons, on the GPU (``tests/kernels/test_kernels_triton.py``, fp32/fp16/bf16);
4. ``lrzoo-bench`` at the protocol's shapes (docs/benchmarks.md#protocol; bf16, r=16) on the kernel methods,
   then the predicted-vs-measured table: each shape's lrzoo and eager (PEFT) time as a multiple of the frozen
   linear and lrzoo's speed-up over PEFT, predicted by :mod:`lrzoo.kernels.roofline` for this GPU's
   model (the nearest modelled one: H100 for sm_90, A100 for sm_80) beside what the benchmark measured.

Each step runs in its own process under a time limit, so a hang or a crash in one still leaves the
others' results. The summary names the device, the versions and each step's outcome; it is printed
and, with ``--out FILE``, written as Markdown for docs/benchmarks.md. Without a CUDA device it exits
at once with status 2 and says so: nothing was checked, and that must not read as a pass.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..bench.gpu_check import run_gpu_check


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lrzoo-gpu-check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the summary (Markdown) to this file")
    parser.add_argument("--repo", default=".", help="repository root holding tests/ (default: the current directory)")
    parser.add_argument("--budget", type=int, default=450, help="seconds for all steps together (default 450)")
    args = parser.parse_args(argv)
    return run_gpu_check(args.repo, args.budget, args.out)


if __name__ == "__main__":
    sys.exit(main())
