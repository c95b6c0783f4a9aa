"""Data-parallel training: 2 CPU ranks (torchrun, gloo) give the same adapter as one process with the
same global batch, in one run directory written by rank 0 only."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

from lrzoo.cli.train import run_recipe
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_sst2

pytestmark = pytest.mark.slow

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


def launch_log(done: subprocess.CompletedProcess) -> str:
    """What a failed launch shows: the launcher's own traceback fills the end of stderr, so keep more of it, and
    stdout, which tells how far each rank got (a rank that printed its result and then aborted died at exit)."""
    return f"--- stdout ---\n{done.stdout[-2000:]}\n--- stderr ---\n{done.stderr[-10000:]}"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_cpu_ranks_match_one_process_with_the_same_global_batch(tmp_path, launcher):
    data = write_sst2(tmp_path / "data")
    overrides = tiny_run_overrides(data, tmp_path / "two", *NO_DROPOUT, "trainer.max_steps=6")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [*LAUNCHERS[launcher], "-m", "lrzoo.cli.train", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launch_log(launched)

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
import atexit, sys, tempfile
import torch.distributed as dist
from lrzoo.cli.train import main

dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
atexit.register(lambda: print("at exit, process group left behind:", dist.is_initialized()))
sys.argv = ["lrzoo-train", *sys.argv[1:]]
main()
print("main returned")
"""


@pytest.mark.parametrize("outcome", ["finished", "refused"])
def test_a_rank_leaves_the_process_group_and_skips_interpreter_finalization(tmp_path, outcome):
    """A gloo rank left to interpreter finalization can abort (SIGABRT, "terminate called without an active
    exception") after a run that succeeded (lrzoo.train.teardown). The CLI destroys the group and ends the
    rank with os._exit, with the run's status, after what an ordinary exit runs first: the atexit handlers and
    flushing stdout (a pipe here, so block-buffered: the summary line would be lost without the flush)."""
    data = write_sst2(tmp_path / "data")
    overrides = tiny_run_overrides(data, tmp_path / "out", "trainer.max_steps=1")
    if outcome == "refused":
        overrides.append("adapter.r=100000")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CLI_IN_A_PROCESS_GROUP, *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    shown = done.stdout + done.stderr[-2000:]
    assert done.returncode == (2 if outcome == "refused" else 0), shown  # a refusal exits 2 (lrzoo.cli.errors)
    assert "at exit, process group left behind: False" in done.stdout, shown
    assert "main returned" not in done.stdout, shown
    if outcome == "finished":
        assert "[lrzoo] " in done.stdout and "accuracy = " in done.stdout, shown
    else:
        assert "lrzoo-train: error:" in done.stderr, shown


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_nodes(overrides: list[str], cwd: Path, cwd_1: Optional[Path] = None, timeout: int = 400) -> list[str]:
    """``torchrun --nnodes 2`` as on two machines, both on this host: one launcher per node (one rank each),
    meeting at a c10d rendezvous on the loopback; node 1 works in ``cwd_1`` if given (its own disk). Returns
    the nodes' output; fails unless both succeed."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(node), "--rdzv_backend", "c10d",
                               "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"lrzoo-{port}",
                               "-m", "lrzoo.cli.train", *overrides],
                              cwd=cwd if node == 0 or cwd_1 is None else cwd_1, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for node in (0, 1)]
    try:
        logs = [node.communicate(timeout=timeout)[0] for node in nodes]
    finally:
        for node in nodes:  # the launcher and its worker: a rank left waiting on the other must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
            node.wait()
    assert [node.returncode for node in nodes] == [0, 0], "\n=====\n".join(log[-3000:] for log in logs)
    return logs


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_nodes_of_one_rank_match_one_node_of_two(tmp_path, strategy):
    """The run does not depend on how its ranks are spread over machines: global rank 0 writes the run directory
    (each node has a local rank 0), the data of a step is split by global rank, and the result equals the
    single-node run's."""
    data = write_sst2(tmp_path / "data")
    extra = [*NO_DROPOUT, "trainer.max_steps=6", "trainer.save_every=3"]
    if strategy == "fsdp":
        extra += ["trainer=fsdp", "trainer.precision=no"]
    one_node = tiny_run_overrides(data, tmp_path / "one_node", *extra)
    two_nodes = tiny_run_overrides(data, tmp_path / "two_nodes", *extra)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launched = subprocess.run([*LAUNCHERS["torchrun"], "-m", "lrzoo.cli.train", *one_node], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=400)
    assert launched.returncode == 0, launch_log(launched)
    _two_nodes(two_nodes, tmp_path)

    runs = {}
    for name, overrides in (("one", one_node), ("two", two_nodes)):
        run_dir = Path(run_dir_of(compose(overrides)))
        runs[name] = (run_dir, json.loads((run_dir / "results.json").read_text()))
    assert sorted(p.name for p in (tmp_path / "two_nodes").rglob("results.json")) == ["results.json"]
    (one_dir, one), (two_dir, two) = runs["one"], runs["two"]
    assert two["world_size"] == one["world_size"] == 2 and two["steps"] == one["steps"] == 6
    assert two["parallelism"] == one["parallelism"] == strategy
    assert sorted(p.name for p in (two_dir / "checkpoints").iterdir()) == ["step-0000003"]
    weights_one = load_file(one_dir / "adapter" / "adapter_model.safetensors")
    weights_two = load_file(two_dir / "adapter" / "adapter_model.safetensors")
    assert weights_two.keys() == weights_one.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-5, atol=1e-6, msg=name)
    assert two["metrics"] == pytest.approx(one["metrics"])


def test_nodes_that_do_not_share_the_run_directory_are_refused_at_once(tmp_path):
    """A relative output_root on two machines is two folders: node 1 would restart from step 0 beside a resumed
    rank 0 (it hung until gloo's 30-minute timeout). Every rank refuses, naming the folder and the fix."""
    data = write_sst2(tmp_path / "data")
    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    overrides = [o if not o.startswith("output_root=") else "output_root=runs"
                 for o in tiny_run_overrides(data, tmp_path, *NO_DROPOUT, "trainer.max_steps=6")]
    with pytest.raises(AssertionError) as failed:
        _two_nodes(overrides, tmp_path / "node0", tmp_path / "node1", timeout=240)
    logs = str(failed.value)
    assert logs.count("RunDirNotShared") >= 2 and "is not one directory for all 2 ranks" in logs, logs[-3000:]
    assert f"working directory {tmp_path / 'node1'}" in logs and "absolute path on a filesystem all nodes mount" in logs
    assert not list((tmp_path / "node0").rglob("checkpoints")) and not list(tmp_path.rglob("results.json"))
