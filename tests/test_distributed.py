"""Data-parallel training: 2 CPU ranks (torchrun, gloo) give the same adapter as one process with the
same global batch, in one run directory written by rank 0 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lrzoo.cli.train import run_recipe
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_sst2

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]

# Dropout off: each rank draws its own masks, so only a dropout-free run can match bit for bit.
NO_DROPOUT = ["+model.config_overrides.hidden_dropout_prob=0.0",
              "+model.config_overrides.attention_probs_dropout_prob=0.0"]


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # accelerate's `--cpu` multi-process launch goes through mpirun; `--multi_gpu` is its torchrun path,
    # which also runs on CPU-only machines (the trainer then uses gloo).
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_cpu_ranks_match_one_process_with_the_same_global_batch(tmp_path, launcher):
    data = write_sst2(tmp_path / "data")
    overrides = tiny_run_overrides(data, tmp_path / "two", *NO_DROPOUT, "trainer.max_steps=6")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [*LAUNCHERS[launcher], "-m", "lrzoo.cli.train", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-4000:]

    cfg_one = compose(tiny_run_overrides(data, tmp_path / "one", *NO_DROPOUT, "trainer.max_steps=6"))
    single = run_recipe(cfg_one, run_dir_of(cfg_one))

    two_dir = Path(run_dir_of(compose(overrides)))
    # One run directory, no per-rank copies; results say both ranks took part.
    assert sorted(p.name for p in (tmp_path / "two").rglob("results.json")) == ["results.json"]
    distributed = json.loads((two_dir / "results.json").read_text())
    assert distributed["world_size"] == 2 and single["world_size"] == 1
    assert distributed["steps"] == single["steps"] == 6

    weights_two = load_file(two_dir / "adapter" / "adapter_model.safetensors")
    weights_one = load_file(Path(run_dir_of(cfg_one)) / "adapter" / "adapter_model.safetensors")
    assert weights_two.keys() == weights_one.keys()
    for name in weights_one:
        # Same rows per step; only the order of the float reduction differs.
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-4, atol=1e-5, msg=name)
    assert distributed["metrics"] == pytest.approx(single["metrics"])


_CLI_IN_A_PROCESS_GROUP = """
import sys, tempfile
import torch.distributed as dist
from lrzoo.cli.train import main

dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
sys.argv = ["lrzoo-train", *sys.argv[1:]]
try:
    main()
except SystemExit as stop:
    print("exit", stop.code)
print("process group left behind:", dist.is_initialized())
"""


@pytest.mark.parametrize("outcome", ["finished", "refused"])
def test_the_cli_destroys_the_process_group_before_exit(tmp_path, outcome):
    """A rank that leaves gloo's group to interpreter shutdown can abort (SIGABRT, "terminate called without
    an active exception") after a run that succeeded; the CLI tears the group down itself, also when the
    run fails."""
    data = write_sst2(tmp_path / "data")
    overrides = tiny_run_overrides(data, tmp_path / "out", "trainer.max_steps=1")
    if outcome == "refused":
        overrides.append("adapter.r=100000")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CLI_IN_A_PROCESS_GROUP, *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert ("exit 1" in done.stdout) == (outcome == "refused"), done.stdout + done.stderr[-2000:]
    assert "process group left behind: False" in done.stdout, done.stdout + done.stderr[-2000:]
