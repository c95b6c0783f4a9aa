"""README's "In one call" snippet runs as written, twice in a row (issue 26 item 7)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def one_call_snippet() -> str:
    section = (REPO / "README.md").read_text().split("## In one call", 1)[1]
    return re.search(r"^```python\n(.*?)^```", section, re.S | re.M).group(1)


def test_the_snippet_defines_everything_it_uses():
    assert re.search(r"^model\b.*=", one_call_snippet(), re.M), "the snippet must define `model`"


def test_the_snippet_runs_twice(tmp_path):
    """The first run used an undefined `model`; a second run then refused out-lora/ while silently replacing out/."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}  # this checkout's lrzoo
    inodes = []
    for run in (1, 2):
        result = subprocess.run([sys.executable, "-c", one_call_snippet()], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"run {run} failed:\n{result.stderr[-3000:]}"
        assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
        inodes.append((tmp_path / "out-lora" / "adapter_model.safetensors").stat().st_ino)
    assert inodes[0] != inodes[1]  # the second run wrote a new export, it did not keep the first
    assert sorted(os.listdir(tmp_path / "out-lora")) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "export_report.json"]
