"""``make gpu-check``: a clear refusal without CUDA, and a summary that names the device and every step."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO
from lrzoo.cli import gpu_check


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
