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
from lrzoo.train.resume import STATE_KEYS, CheckpointFallbackWarning, UnreadableCheckpoint, UnsafeCheckpoint, \
    read_trainer_state
from lrzoo.runs.files import LOCK_NAME
from lrzoo.runs.lock import RunDirInUse, RunLock, live_holder, remove_leftovers
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_sst2

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


def _stopped_run(data: Path, output_root: Path, extra: list[str], step: int) -> Path:
    """The run directory of a tiny run of ``extra`` stopped (trainer.stop_after) at ``step``, checkpoints kept."""
    cfg = compose(tiny_run_overrides(data, output_root, *extra, f"trainer.stop_after={step}"))
    run_dir = Path(run_dir_of(cfg))
    assert run_recipe(cfg, str(run_dir)) is None
    return run_dir


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    data = write_sst2(tmp_path / "data")
    extra = ["trainer.save_every=2", "trainer.eval_every=100", "trainer.keep_checkpoints=1"]
    run_dir = _stopped_run(data, tmp_path / "runs", extra, 2)
    state = run_dir / "checkpoints" / "step-0000002" / "trainer_state.pt"
    state.write_bytes(b"garbage, not a torch file")
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs", *extra))
    with pytest.raises(UnreadableCheckpoint, match="No intact checkpoint") as error:
        run_recipe(cfg, str(run_dir))
    assert str(state) in str(error.value) and "resume=never" in str(error.value)
    # the named fix works
    assert run_recipe(compose([*tiny_run_overrides(data, tmp_path / "runs", *extra), "resume=never"]),
                      str(run_dir))["steps"] == 8


class _Payload:
    """What a hostile checkpoint holds: unpickling it runs a shell command (here: creating a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant_payload(state_file: Path, marker: Path) -> None:
    """Replace ``state_file`` by a well-formed trainer state (every key) whose progress runs the payload."""
    torch.save({**{key: None for key in STATE_KEYS}, "progress": _Payload(marker)}, state_file)


def test_a_checkpoint_that_would_run_code_is_refused_and_the_older_one_resumed(tmp_path):
    data = write_sst2(tmp_path / "data")
    extra = ["adapter.dropout=0.1", "trainer.save_every=2", "trainer.eval_every=100"]
    run_dir = _stopped_run(data, tmp_path / "runs", extra, 6)
    newest = run_dir / "checkpoints" / "step-0000006" / "trainer_state.pt"
    marker = tmp_path / "payload-ran"
    _plant_payload(newest, marker)

    # resume=<that checkpoint>: refused with its path and what it would have run; nothing ran
    explicit = compose([*tiny_run_overrides(data, tmp_path / "runs", *extra), f"resume={newest.parent}"])
    with pytest.raises(UnsafeCheckpoint) as refused:
        run_recipe(explicit, str(run_dir))
    assert str(newest) in str(refused.value) and "posix.system" in str(refused.value)
    assert not marker.exists()

    # resume=auto: the same refusal is a fallback to the previous (safe) checkpoint, and the run finishes
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs", *extra))
    with pytest.warns(CheckpointFallbackWarning) as warned:
        resumed = run_recipe(cfg, str(run_dir))
    (message,) = [str(w.message) for w in warned if issubclass(w.category, CheckpointFallbackWarning)]
    assert str(newest) in message and "refused" in message and "posix.system" in message
    assert str(run_dir / "checkpoints" / "step-0000004" / "trainer_state.pt") in message
    assert resumed["steps"] == 8 and not marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_reading_a_hostile_state_file_runs_nothing(tmp_path, how):
    import pickle

    marker = tmp_path / "payload-ran"
    folder = tmp_path / "step-0000002"
    folder.mkdir()
    if how == "torch.save":
        _plant_payload(folder / "trainer_state.pt", marker)
    else:  # a bare pickle, not torch's zip format
        (folder / "trainer_state.pt").write_bytes(pickle.dumps({"rng": _Payload(marker)}, protocol=2))
    with pytest.raises(UnsafeCheckpoint, match="was refused: loading it would run posix.system"):
        read_trainer_state(str(folder))
    assert not marker.exists()


def test_rng_state_round_trips_through_a_checkpoint_file(tmp_path):
    """python's and numpy's RNG states are the non-tensor parts of a checkpoint: both load back exactly under
    weights_only (numpy's through the allow-list) and continue the same streams."""
    import random

    import numpy as np

    from lrzoo.train.checkpoint import rng_state, set_rng_state

    random.seed(3)
    np.random.seed(3)
    np.random.standard_normal()  # numpy's cached Gaussian is part of its state
    torch.manual_seed(3)
    folder = tmp_path / "step-0000001"
    folder.mkdir()
    torch.save({**{key: None for key in STATE_KEYS}, "rng": [rng_state()]}, folder / "trainer_state.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    set_rng_state(read_trainer_state(str(folder))["rng"][0])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


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


def test_atomic_directory_respects_the_umask_and_keeps_an_existing_mode(tmp_path):
    """mkdtemp makes 0700 folders: adapters, checkpoints and exports written through atomic_directory get 0777
    less the umask, as mkdir would give them, and a replaced folder keeps its mode."""
    from lrzoo.io import atomic_directory

    umask = os.umask(0o022)
    try:
        fresh = tmp_path / "adapter"
        with atomic_directory(str(fresh)) as tmp:
            Path(tmp, "adapter_config.json").write_text("{}")
        assert fresh.stat().st_mode & 0o777 == 0o755
        fresh.chmod(0o750)
        with atomic_directory(str(fresh)) as tmp:
            Path(tmp, "adapter_config.json").write_text("{}")
        assert fresh.stat().st_mode & 0o777 == 0o750
        os.umask(0o077)
        private = tmp_path / "private"
        with atomic_directory(str(private)):
            pass
        assert private.stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(umask)


# Resumes the run with the disk "full" from the moment the metrics logger starts: no file may grow past 64 bytes
# (RLIMIT_FSIZE; SIGXFSZ ignored, so such a write fails with EFBIG as it would with ENOSPC).
DISK_FULL = textwrap.dedent("""
    import json, resource, signal, sys
    sys.path.insert(0, {tests!r})
    from recipe_helpers import compose, run_dir_of
    from lrzoo.cli.train import run_recipe
    from lrzoo.train.callbacks import CSVLogger

    begin = CSVLogger.on_train_begin
    def disk_full_from_here(self, trainer):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))
        begin(self, trainer)
    CSVLogger.on_train_begin = disk_full_from_here
    cfg = compose(json.loads(sys.argv[1]))
    run_recipe(cfg, run_dir_of(cfg))
""")


def _metric_rows(path: Path) -> list[tuple[int, str]]:
    import csv

    with open(path, newline="") as handle:
        return [(int(row["step"]), row["name"]) for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_metrics_csv_keeps_every_row_when_a_resume_cannot_write(tmp_path):
    data = write_sst2(tmp_path / "data")
    extra = ["trainer.save_every=4", "trainer.eval_every=100", "trainer.log_every=1"]
    run_dir = _stopped_run(data, tmp_path / "runs", extra, 4)
    metrics = run_dir / "metrics.csv"
    # what a run killed at step 6, after its checkpoint at 4, leaves: rows the resume must drop (a rewrite)
    with open(metrics, "a", newline="") as handle:
        handle.write("5,train/loss,0.5\r\n5,train/lr,0.001\r\n6,train/loss,0.4\r\n")
    before = metrics.read_text()
    assert len(before) > 64 and [s for s, _ in _metric_rows(metrics)].count(4) == 2

    overrides = tiny_run_overrides(data, tmp_path / "runs", *extra)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    full = subprocess.run([sys.executable, "-c", DISK_FULL.format(tests=str(REPO / "tests")), json.dumps(overrides)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode != 0 and "File too large" in full.stderr, full.stderr[-2000:]
    assert metrics.read_text() == before  # the failed rewrite left the file as it was

    resumed = run_recipe(compose(overrides), str(run_dir))  # space again: the resume drops steps 5-6 and goes on
    assert resumed["steps"] == 8
    rows = _metric_rows(metrics)
    assert [s for s, name in rows if name == "train/loss"] == list(range(1, 9)) and len(rows) == len(set(rows))
    assert not any(p.name.startswith(".metrics.csv") for p in run_dir.iterdir())


def test_a_resume_appends_to_metrics_csv_and_drops_a_row_cut_short(tmp_path):
    from types import SimpleNamespace

    from lrzoo.train.callbacks import CSVLogger

    logger = CSVLogger(str(tmp_path))
    logger.on_train_begin(SimpleNamespace(start_step=0))
    logger.on_log(2, {"train/loss": 0.75})
    path = tmp_path / "metrics.csv"
    inode = path.stat().st_ino
    logger.on_train_begin(SimpleNamespace(start_step=2))   # nothing past the checkpoint: the file is not rewritten
    assert path.stat().st_ino == inode
    with open(path, "a") as handle:
        handle.write("4,train/loss,0.6")                   # killed mid-row: the value itself may be cut
    logger.on_train_begin(SimpleNamespace(start_step=4))
    logger.on_log(6, {"train/loss": 0.5})
    assert _metric_rows(path) == [(2, "train/loss"), (6, "train/loss")] and path.stat().st_ino != inode


# A child handed its launcher's claim on a run directory: it takes the lock (adopts it), says so, waits for "go".
ADOPTER = textwrap.dedent("""
    import os, sys
    from lrzoo.runs.lock import HANDOVER_ENV, RunLock
    with RunLock(sys.argv[1]) as lock:
        print("adopted", HANDOVER_ENV in os.environ, flush=True)
        sys.stdin.readline()
""")


def test_a_claimed_run_dir_is_handed_to_the_process_launched_for_it(tmp_path):
    run_dir = str(tmp_path / "run")
    claim = RunLock(run_dir)
    claim.acquire()
    assert live_holder(run_dir)["pid"] == str(os.getpid())   # claimed: another sweep's look sees it taken
    child = subprocess.Popen([sys.executable, "-c", ADOPTER, run_dir], env={**os.environ, **claim.handover_env()},
                             pass_fds=(claim.fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().split() == ["adopted", "False"]   # not refused; the variable is used up
        assert live_holder(run_dir)["pid"] == str(child.pid)
        with pytest.raises(RunDirInUse, match=f"in use by process {child.pid}"):
            RunLock(run_dir).acquire()                                       # anyone else is still refused
        child.communicate("go\n", timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0
    claim.release()
    assert live_holder(run_dir) is None and (tmp_path / "run" / LOCK_NAME).read_text() == ""
    # without the hand-over the child is refused, as any other process would be
    claim.acquire()
    refused = subprocess.run([sys.executable, "-c", ADOPTER, run_dir], capture_output=True, text=True, input="go\n")
    claim.release()
    assert refused.returncode != 0 and "RunDirInUse" in refused.stderr


def test_a_damaged_results_json_is_moved_aside_and_the_run_finished_again(tmp_path, capfd):
    from lrzoo.lab.table import collect

    data = write_sst2(tmp_path / "data")
    extra = ["trainer.save_every=4", "trainer.eval_every=100"]
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs", *extra))
    run_dir = Path(run_dir_of(cfg))
    first = run_recipe(cfg, str(run_dir))
    results = run_dir / "results.json"
    damaged = results.read_bytes()[:40]                      # cut short (a copy interrupted, a disk error)
    results.write_bytes(damaged)
    capfd.readouterr()
    assert collect(tmp_path / "runs") == []                  # lrzoo-report: skipped, named
    assert f"skipping {results}" in capfd.readouterr().err

    again = run_recipe(cfg, str(run_dir))                   # not a bare JSONDecodeError: redone from step 4
    err = capfd.readouterr().err
    (aside,) = run_dir.glob("results.json.damaged-*")
    assert aside.read_bytes() == damaged
    assert f"{results} is damaged (JSONDecodeError" in err and f"moved to {aside}" in err
    assert json.loads(results.read_text())["metrics"] == first["metrics"] == again["metrics"]
    assert len(collect(tmp_path / "runs")) == 1
