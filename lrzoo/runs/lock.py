"""One writer per run directory, and no leftovers from an interrupted one.

* :class:`RunLock` takes an OS advisory lock (``fcntl.flock``) on ``<run dir>/run.lock`` and writes
  its PID there. A second process on the same directory is refused at once, with the holder's PID.
  The kernel drops the lock when its holder exits in any way (``kill -9`` included), so a lock file
  that still names a PID but is not locked is stale: it is taken over, with a note.
* :func:`remove_leftovers` deletes what a process killed inside :func:`lrzoo.io.atomic_directory`
  or :func:`lrzoo.io.atomic_file` leaves behind (``.<name>.tmp-XXXXXXXX``, ``.<name>.old-XXXXXXXX``):
  only in the run directory and its ``checkpoints/``, only names of that pattern, and only to be
  called while holding the lock.
* :func:`live_holder` tells, without taking the lock, whether a live process holds a run directory
  (``lrzoo-sweep`` skips such runs, so two sweeps of one plan share the work).
* A lock can be claimed by one process and handed to the process it launches: ``lrzoo-sweep`` takes a run's
  lock before it starts ``lrzoo-train`` (whose imports take seconds), so a second sweep looking at the same
  moment sees the run taken and starts the next one; the child inherits the locked descriptor
  (:meth:`RunLock.handover_env`, ``pass_fds``) and :meth:`RunLock.acquire` adopts it instead of being refused.
* :func:`check_shared` (several processes): every rank must see the one run directory rank 0 writes. On
  several machines a relative or node-local ``output_root`` gives each node its own folder, and a resume would
  then restart the other nodes from step 0 beside a resumed rank 0 (a hang, or weights that differ per rank).
* :func:`read_results` reads ``results.json`` (:data:`RESULTS_FILE`, whose presence marks a run finished); a
  damaged one is moved aside (``results.json.damaged-<time>``) with a note naming it, and the run is unfinished.

Only rank 0 of a distributed job takes the lock: the other ranks are the same job.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from typing import Any, Optional

LOCK_NAME = "run.lock"
#: a finished run's scores and configuration, written last (``lrzoo.train.evaluation``): its presence marks the
#: run finished for ``lrzoo-train`` (nothing to do), ``lrzoo-sweep`` and ``lrzoo-report``
RESULTS_FILE = "results.json"
#: the descriptor of a lock claimed for this process by the one that launched it (:meth:`RunLock.handover_env`)
HANDOVER_ENV = "LRZOO_RUN_LOCK_FD"
#: what a damaged results file is renamed to: ``results.json.damaged-<time>`` (kept for a look, read by nobody)
DAMAGED_SUFFIX = ".damaged-"
#: ``tempfile``'s names: a prefix, then 8 characters of ``[a-z0-9_]``.
LEFTOVER_RE = re.compile(r"^\..+\.(tmp|old)-[a-z0-9_]{8}$")
#: how long :meth:`RunLock.acquire` retries a lock it found taken before refusing: :func:`live_holder` takes it
#: shared for microseconds, and a run must not be refused because a sweep looked at its directory then
ACQUIRE_RETRY_S = 0.5
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


class RunDirNotShared(RuntimeError):
    """The ranks of one distributed run do not see the same run directory."""


class RunDirInUse(RuntimeError):
    """Another live process holds the run directory's lock."""

    def __init__(self, run_dir: str, holder: dict[str, str]):
        self.run_dir, self.holder = run_dir, holder
        pid = holder.get("pid", "unknown")
        where = f" on {holder['host']}" if holder.get("host") and holder["host"] != socket.gethostname() else ""
        since = f", since {holder['started']}" if holder.get("started") else ""
        super().__init__(
            f"{run_dir} is in use by process {pid}{where}{since} ({os.path.join(run_dir, LOCK_NAME)}); one "
            "process writes a run directory at a time. Wait for it to finish (a finished run is then skipped), "
            f"stop it (kill {pid}; running the command again resumes from its last checkpoint), or train into "
            "another directory (run_name=... or output_root=...)."
        )


def _read_holder(path: str) -> dict[str, str]:
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError:
        return {}
    holder = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if value:
            holder[key.strip()] = value.strip()
    return holder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """``with RunLock(run_dir): ...`` holds ``run_dir`` for this process (a no-op when not ``enabled``).

    Raises :class:`RunDirInUse` when another process holds it. On exit the lock file is emptied
    and unlocked (never deleted: a process waiting on the old file would lock a different one).
    """

    def __init__(self, run_dir: str, enabled: bool = True):
        self.run_dir, self.enabled = run_dir, enabled
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.fd: Optional[int] = None
        #: the stale holder taken over, if any (``{"pid": ..., ...}``)
        self.taken_over: dict[str, str] = {}

    def acquire(self) -> None:
        if not self.enabled or self.fd is not None:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        fd = self._handed_over()
        if fd is None:
            fd = self._lock()
        record = (f"pid={os.getpid()}\nhost={socket.gethostname()}\n"
                  f"started={time.strftime('%Y-%m-%d %H:%M:%S')}\ncommand={' '.join(sys.argv)}\n")
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self.fd = fd

    def _lock(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        give_up = time.monotonic() + ACQUIRE_RETRY_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno in _BUSY and time.monotonic() < give_up:
                    time.sleep(0.02)
                    continue
                os.close(fd)
                if err.errno in _BUSY:
                    raise RunDirInUse(self.run_dir, _read_holder(self.path)) from None
                raise
        previous = _read_holder(self.path)
        if previous.get("pid"):
            # A clean exit empties the file: a PID left in an unlocked file is from a killed process.
            self.taken_over = previous
            pid = previous["pid"]
            state = ("no longer running" if pid.isdigit() and not _pid_alive(int(pid)) else
                     "no longer holding it")
            print(f"[lrzoo] {self.path} was left by process {pid} ({state}, killed?): taking over {self.run_dir}",
                  file=sys.stderr)
        return fd

    def _handed_over(self) -> Optional[int]:
        """The inherited descriptor of this very lock file, already locked for this process by its launcher
        (:data:`HANDOVER_ENV`), or None. Read once: a lock of another directory is not used."""
        value = os.environ.pop(HANDOVER_ENV, None)
        if value is None:
            return None
        try:
            fd = int(value)
            inherited, here = os.fstat(fd), os.stat(self.path)
            if (inherited.st_dev, inherited.st_ino) != (here.st_dev, here.st_ino):
                return None
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already (same open file): a no-op that checks it
        except (ValueError, OSError):
            return None
        os.set_inheritable(fd, False)
        return fd

    def handover_env(self) -> dict[str, str]:
        """The environment that hands this held lock to a child started with ``pass_fds=(lock.fd,)``: the child's
        :meth:`acquire` adopts it. The lock then lasts until both have let go of it: the child's exit (or
        :meth:`release`), and this process's :meth:`release` once the child has exited."""
        if self.fd is None:
            raise RuntimeError(f"{self.path} is not held: nothing to hand over")
        return {HANDOVER_ENV: str(self.fd)}

    def release(self) -> None:
        if self.fd is None:
            return
        # The record is this process's to clear. After a hand-over it is the child's: cleared by its own exit, or
        # left by a kill -9 to be reported as stale by the next run.
        if _read_holder(self.path).get("pid") in (None, str(os.getpid())):
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def live_holder(run_dir: str) -> Optional[dict[str, str]]:
    """The lock record (``{"pid": ..., "host": ..., ...}``; empty if not written yet) of the live process that
    holds ``run_dir``, or None when nobody does. Never blocks and never takes the lock over: a shared lock
    held for an instant tells it (an exclusive holder makes it fail), so a stale file of a killed process
    and a reused PID both read as free.
    """
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in _BUSY:
                return _read_holder(path)
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def remove_leftovers(run_dir: str) -> list[str]:
    """Delete interrupted atomic writes in ``run_dir`` and ``run_dir/checkpoints``; return their paths.

    Call it only while holding :class:`RunLock`: the files of a live writer look the same.
    """
    removed = []
    for folder in (run_dir, os.path.join(run_dir, "checkpoints")):
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if not LEFTOVER_RE.match(name):
                continue
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            removed.append(path)
    return removed


def read_results(run_dir: str, move_damaged: bool = True) -> Optional[dict[str, Any]]:
    """``run_dir``'s :data:`RESULTS_FILE` (a dict), or None when there is none or it is damaged.

    A file that is not a JSON object (cut short, garbled, not UTF-8) would stop every later attempt at the run
    with a bare ``JSONDecodeError``; instead, with ``move_damaged`` (the lock holder: rank 0 of the run), it is
    renamed to ``results.json.damaged-<time>`` beside it, with a note on stderr naming both files, and the run
    counts as unfinished (it resumes from its newest checkpoint, or starts over).
    """
    path = os.path.join(run_dir, RESULTS_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = f"{type(err).__name__}: {err}"
    else:
        if isinstance(results, dict):
            return results
        reason = f"a JSON {type(results).__name__}, not an object"
    if move_damaged:
        aside = f"{path}{DAMAGED_SUFFIX}{time.strftime('%Y%m%d-%H%M%S')}"
        while os.path.exists(aside):
            aside += "x"
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, aside)
            print(f"[lrzoo] {path} is damaged ({reason}): moved to {aside}; the run counts as unfinished and "
                  "resumes from its newest checkpoint (or starts over)", file=sys.stderr)
    return None


def check_shared(run_dir: str, rank: int, world: int) -> None:
    """Raise :class:`RunDirNotShared` on every rank unless all ``world`` ranks see the one ``run_dir``: rank 0
    writes a token file there, each rank reads it back (a collective: every rank calls it, in a process group)."""
    import secrets as _secrets

    import torch.distributed as dist

    probe = [f".ranks.tmp-{_secrets.token_hex(4)}", _secrets.token_hex(8)]   # a leftover if killed: cleared
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, probe[0]), "w") as handle:
            handle.write(probe[1])
    dist.broadcast_object_list(probe, src=0)  # rank 0's file name and token, after it has written them
    try:  # in this rank's own run_dir: a relative output_root resolves per node
        with open(os.path.join(run_dir, probe[0])) as handle:
            seen = handle.read() == probe[1]
    except OSError:
        seen = False
    views: list[Any] = [None] * world
    dist.all_gather_object(views, (seen, socket.gethostname(), os.getcwd()))
    if rank == 0:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, probe[0]))
    blind = [(r, host, cwd) for r, (ok, host, cwd) in enumerate(views) if not ok]
    if blind:
        shown = "; ".join(f"rank {r} on {host} (working directory {cwd})" for r, host, cwd in blind)
        raise RunDirNotShared(
            f"{os.path.abspath(run_dir)} is not one directory for all {world} ranks: {shown} cannot see what rank 0 "
            f"on {views[0][1]} writes there. Every node of a run must write to the same folder: set output_root to "
            "an absolute path on a filesystem all nodes mount (a relative one is resolved in each node's working "
            "directory).")
