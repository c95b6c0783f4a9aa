"""``make gpu-check``: a clear refusal without CUDA, and a summary that names the device and every step."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO
from lrzoo.bench import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu-check would run")
def test_without_cuda_it_exits_non_zero_and_says_why():
    result = subprocess.run(["make", "-s", "gpu-check", f"PYTHON={sys.executable}", f"PY={sys.executable}"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no CUDA device" in result.stderr and "nothing was checked" in result.stderr


def test_summary_names_the_device_each_step_and_the_failures():
    steps = [
        {"name": "gpu-marked tests", "command": "pytest -m gpu", "status": "passed", "seconds": 12.0,
         "output": "...\n14 passed, 2 skipped in 11.9s\n"},
        {"name": "bench", "command": "lrzoo-bench", "status": "FAILED", "seconds": 3.0,
         "output": "# lrzoo-bench on NVIDIA H200\n| lora | ... |\nTraceback: boom\n"},
    ]
    text = gpu_check.summary("NVIDIA H200", "torch 2.13.0", steps)
    assert "gpu-check on NVIDIA H200" in text
    assert "14 passed, 2 skipped" in text
    assert "| lora | ... |" in text and "boom" in text
    assert "1 step(s) did not pass." in text


def _bench_rows():
    from lrzoo.bench.layers import Row
    from lrzoo.bench.timing import Timing

    shape = (8192, 4096, 4096)
    return [Row("frozen F.linear", "torch", shape, Timing(0.30, 0.01), Timing(0.60, 0.02), 0),
            Row("lora", "lrzoo", shape, Timing(0.33, 0.01), Timing(0.72, 0.02), 2**20),
            Row("lora", "peft", shape, Timing(0.40, 0.01), Timing(0.90, 0.02), 2**21),
            Row("tera", "lrzoo", shape, Timing(0.35, 0.01), Timing(0.75, 0.02), 2**20)]


def test_the_benchmarks_table_is_read_by_its_header_names():
    from lrzoo.bench.layers import format_table

    measured = gpu_check.bench_measurements("# lrzoo-bench on X\n" + format_table(_bench_rows()) + "\nPASS lora\n")
    assert measured[("lora", "lrzoo", (8192, 4096, 4096))] == (0.72, 1.2)
    assert measured[("lora", "peft", (8192, 4096, 4096))] == (0.90, 1.5)
    assert ("tera", "peft", (8192, 4096, 4096)) not in measured
    assert gpu_check.bench_measurements("Traceback: no table") == {}


def test_predicted_and_measured_sit_side_by_side_for_every_method_and_shape():
    from lrzoo.bench.layers import format_table
    from lrzoo.kernels import roofline

    measured = gpu_check.bench_measurements(format_table(_bench_rows()))
    text = gpu_check.predicted_vs_measured(90, measured)
    assert "Predicted for H100 SXM" in text
    p = roofline.predict("lora", (8192, 4096, 4096), roofline.H100)
    row = next(line for line in text.splitlines() if line.startswith("| lora ") and "8192, 4096→4096" in line)
    # predicted / measured in each cell: ×frozen of lrzoo and of PEFT, then the speed-up (0.90 / 0.72 = 1.25×)
    assert f"{p.lrzoo_ms / p.frozen_ms:.2f} / 1.20" in row and f"{p.eager_ms / p.frozen_ms:.2f} / 1.50" in row
    assert f"{p.speedup:.2f}× / 1.25×" in row
    # no PEFT TeRA: its measured speed-up is missing, its prediction is not
    tera = next(line for line in text.splitlines() if line.startswith("| tera ") and "8192, 4096→4096" in line)
    assert tera.endswith("/ – |") and "/ 1.25 |" in tera
    lines = [line for line in text.splitlines() if line.startswith("| ") and "×frozen" not in line]
    assert len(lines) == len(roofline.METHODS) * len(roofline.SHAPES)


def test_the_kernel_check_runs_first_when_lrzoo_has_it(monkeypatch):
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name, *a: object() if name == gpu_check.VERIFY_MODULE else real(name, *a))
    plan = gpu_check.steps_plan("python")
    assert plan[0][0] == "kernel checks" and "verify_kernels('cuda', refresh=True)" in plan[0][1][-1]
    assert sum(share for _, _, share in plan) == pytest.approx(1.0)
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name, *a: None if name == gpu_check.VERIFY_MODULE else real(name, *a))
    assert [name for name, _, _ in gpu_check.steps_plan("python")] == ["gpu-marked tests", "triton vs torch", "bench"]
    steps = [{"name": "kernel checks", "command": "verify", "status": "passed", "seconds": 3.0,
              "output": "# kernel checks on H100\n| kernel | dtype | verdict |\n| lora_linear | bf16 | ok |\n"}]
    assert "| lora_linear | bf16 | ok |" in gpu_check.summary("H100", "torch", steps)
