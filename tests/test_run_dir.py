"""Runs you can trust (issue 12, items 3 and 4): one writer per run directory, a stale lock is taken over,
interrupted writes are cleared on the next start, and a damaged checkpoint falls back to the previous one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from lrzoo.cli.train import run_recipe
from lrzoo.train.resume import CheckpointFallbackWarning, UnreadableCheckpoint
from lrzoo.train.run_dir import LOCK_NAME, RunDirInUse, RunLock, live_holder, remove_leftovers
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_sst2

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# A run that writes its checkpoint at step 4, says so, and then hangs (a slow step): it holds the run dir.
HOLDER = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {tests!r})
    from recipe_helpers import compose, run_dir_of
    from lrzoo.cli.train import run_recipe
    from lrzoo.train.trainer import Trainer

    save = Trainer.save_checkpoint
    def save_then_hang(self, step):
        save(self, step)
        print("checkpointed", step, flush=True)
        time.sleep(600)
    Trainer.save_checkpoint = save_then_hang
    cfg = compose(json.loads(sys.argv[1]))
    run_recipe(cfg, run_dir_of(cfg))
""")


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _assert_same_run(run_a: Path, results_a: dict, run_b: Path, results_b: dict) -> None:
    weights_a, weights_b = _weights(run_a), _weights(run_b)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=0, msg=name)
    assert results_a["metrics"] == results_b["metrics"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.slow
def test_a_second_process_on_a_run_in_use_is_refused_then_resumes_after_kill_9(tmp_path, capfd):
    data = write_sst2(tmp_path / "data")
    overrides = tiny_run_overrides(data, tmp_path / "runs", "adapter.dropout=0.1", "trainer.save_every=4",
                                   "trainer.eval_every=100")
    cfg = compose(overrides)
    run_dir = Path(run_dir_of(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "holder.err"
    with open(log, "w") as err:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(tests=str(REPO / "tests")),
                                   json.dumps(overrides)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err,
                                  text=True)
    try:
        for line in holder.stdout:  # until the checkpoint is written (or the process died)
            if line.startswith("checkpointed"):
                break
        assert line.strip() == "checkpointed 4", log.read_text()[-3000:]
        in_flight = run_dir / "checkpoints" / ".step-0000008.tmp-abcd1234"  # what a live writer has open
        in_flight.mkdir()

        started = time.perf_counter()
        with pytest.raises(RunDirInUse) as refused:
            run_recipe(cfg, str(run_dir))
        message = str(refused.value)
        assert f"in use by process {holder.pid}" in message and str(run_dir) in message
        assert f"kill {holder.pid}" in message and "run_name=" in message
        assert time.perf_counter() - started < 5  # at once: no model loaded, nothing resumed
        assert in_flight.is_dir() and not (run_dir / "results.json").exists()  # the holder's files untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()

    # kill -9 released the lock; the lock file still names the dead process: taken over, leftovers cleared.
    capfd.readouterr()
    resumed = run_recipe(cfg, str(run_dir))
    err = capfd.readouterr().err
    assert f"left by process {holder.pid}" in err and "taking over" in err
    assert not in_flight.exists()
    assert (run_dir / LOCK_NAME).read_text() == ""  # released on exit

    straight_cfg = compose(tiny_run_overrides(data, tmp_path / "straight", "adapter.dropout=0.1",
                                              "trainer.save_every=4", "trainer.eval_every=100"))
    straight = run_recipe(straight_cfg, run_dir_of(straight_cfg))
    _assert_same_run(run_dir, resumed, Path(run_dir_of(straight_cfg)), straight)


def test_lock_refuses_while_held_and_takes_over_a_dead_pid(tmp_path, capfd):
    run_dir = str(tmp_path / "run")
    with RunLock(run_dir):
        assert f"pid={os.getpid()}" in (tmp_path / "run" / LOCK_NAME).read_text()
        with pytest.raises(RunDirInUse, match=f"in use by process {os.getpid()}"):
            RunLock(run_dir).acquire()  # another open file description: as another process would see it
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""
    with RunLock(run_dir):  # released: free again, and no note
        pass
    assert "taking over" not in capfd.readouterr().err

    dead = _dead_pid()
    (tmp_path / "run" / LOCK_NAME).write_text(f"pid={dead}\nhost=x\nstarted=then\n")
    with RunLock(run_dir) as lock:
        assert lock.taken_over["pid"] == str(dead)
        assert f"pid={os.getpid()}" in (tmp_path / "run" / LOCK_NAME).read_text()
    err = capfd.readouterr().err
    assert f"left by process {dead} (no longer running" in err and "taking over" in err


def test_live_holder_names_a_live_holder_only_and_a_look_never_refuses_a_run(tmp_path):
    import fcntl

    run_dir = str(tmp_path / "run")
    assert live_holder(run_dir) is None                     # no lock file yet
    with RunLock(run_dir):
        assert live_holder(run_dir)["pid"] == str(os.getpid())
    assert live_holder(run_dir) is None                     # released
    (tmp_path / "run" / LOCK_NAME).write_text(f"pid={os.getpid()}\nhost=x\n")
    assert live_holder(run_dir) is None                     # a stale record (kill -9, or a reused PID) is free

    # A look holds the lock shared for an instant; a run starting just then waits it out instead of being refused.
    look = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDONLY)
    fcntl.flock(look, fcntl.LOCK_SH)
    threading.Timer(0.1, lambda: (fcntl.flock(look, fcntl.LOCK_UN), os.close(look))).start()
    with RunLock(run_dir):
        pass


def test_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    data = write_sst2(tmp_path / "data")
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs", "trainer.max_steps=2"))
    with RunLock(run_dir_of(cfg)):
        monkeypatch.setenv("RANK", "1")  # another rank of the holder's job: not refused
        assert run_recipe(cfg, run_dir_of(cfg))["steps"] == 2


def test_leftovers_of_interrupted_writes_are_removed_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    leftovers = [run / ".adapter.tmp-ab_12cd3", run / ".adapter.old-zz9_ab12",
                 run / "checkpoints" / ".step-0000008.tmp-q1w2e3r4"]
    for path in leftovers:
        (path / "x").mkdir(parents=True)
    (run / ".results.json.tmp-k2j3h4g5").write_text("{")  # an interrupted atomic_file
    kept = [run / ".adapter.tmp-short", run / "notes.tmp-abcd1234", run / "keep" / ".x.tmp-abcd1234",
            run / "checkpoints" / "step-0000004", run / "adapter"]
    for path in kept:
        path.mkdir(parents=True)
    removed = remove_leftovers(str(run))
    assert sorted(removed) == sorted(map(str, [*leftovers, run / ".results.json.tmp-k2j3h4g5"]))
    assert all(not p.exists() for p in leftovers) and all(p.exists() for p in kept)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    data = write_sst2(tmp_path / "data")
    extra = ["adapter.dropout=0.1", "trainer.save_every=2", "trainer.eval_every=100"]
    cfg = compose(tiny_run_overrides(data, tmp_path / "a", *extra, "trainer.stop_after=6"))
    assert cfg.trainer.keep_checkpoints == 2  # the default: the previous checkpoint is there to fall back to
    run_dir = Path(run_dir_of(cfg))
    assert run_recipe(cfg, str(run_dir)) is None
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000004", "step-0000006"]
    state = checkpoints / "step-0000006" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # cut short, as by a crash or a full disk
    # and what a kill -9 inside save_checkpoint / _save_adapter / results.json leaves behind
    (checkpoints / ".step-0000008.tmp-abcd1234").mkdir()
    (checkpoints / ".step-0000008.tmp-abcd1234" / "trainer_state.pt").write_bytes(b"\x00" * 10)
    (run_dir / ".adapter.tmp-abcd1234").mkdir()
    (run_dir / ".results.json.tmp-abcd1234").write_text("{")

    cfg = compose(tiny_run_overrides(data, tmp_path / "a", *extra))
    with pytest.warns(CheckpointFallbackWarning) as warned:
        resumed = run_recipe(cfg, str(run_dir))
    (message,) = [str(w.message) for w in warned if issubclass(w.category, CheckpointFallbackWarning)]
    assert str(state) in message and str(checkpoints / "step-0000004" / "trainer_state.pt") in message
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".") and p.name != ".hydra") == []
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000004", "step-0000006"]  # 6 rewritten

    straight_cfg = compose(tiny_run_overrides(data, tmp_path / "b", *extra))
    straight = run_recipe(straight_cfg, run_dir_of(straight_cfg))
    _assert_same_run(run_dir, resumed, Path(run_dir_of(straight_cfg)), straight)


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    data = write_sst2(tmp_path / "data")
    extra = ["trainer.save_every=2", "trainer.eval_every=100", "trainer.keep_checkpoints=1"]
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs", *extra, "trainer.stop_after=2"))
    run_dir = Path(run_dir_of(cfg))
    run_recipe(cfg, str(run_dir))
    state = run_dir / "checkpoints" / "step-0000002" / "trainer_state.pt"
    state.write_bytes(b"garbage, not a torch file")
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs", *extra))
    with pytest.raises(UnreadableCheckpoint, match="No intact checkpoint") as error:
        run_recipe(cfg, str(run_dir))
    assert str(state) in str(error.value) and "resume=never" in str(error.value)
    # the named fix works
    assert run_recipe(compose([*tiny_run_overrides(data, tmp_path / "runs", *extra), "resume=never"]),
                      str(run_dir))["steps"] == 8


def test_atomic_file_keeps_the_permissions_a_plain_write_would_have(tmp_path):
    """mkstemp creates 0600 files; a file rewritten through atomic_file keeps its mode, a new one gets 0666 less
    the umask, as open() would give it (docs rewritten by make results-docs stay readable)."""
    from lrzoo.io import atomic_file

    umask = os.umask(0o022)
    try:
        existing = tmp_path / "page.md"
        existing.write_text("old")
        existing.chmod(0o640)
        with atomic_file(str(existing)) as handle:
            handle.write("new")
        assert existing.read_text() == "new" and existing.stat().st_mode & 0o777 == 0o640
        fresh = tmp_path / "results.json"
        with atomic_file(str(fresh)) as handle:
            handle.write("{}")
        assert fresh.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)
