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

Only rank 0 of a distributed job takes the lock: the other ranks are the same job.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import sys
import time
from typing import Optional

from .files import LOCK_NAME

#: the descriptor of a lock claimed for this process by the one that launched it (:meth:`RunLock.handover_env`)
HANDOVER_ENV = "LRZOO_RUN_LOCK_FD"
#: ``tempfile``'s names: a prefix, then 8 characters of ``[a-z0-9_]``.
LEFTOVER_RE = re.compile(r"^\..+\.(tmp|old)-[a-z0-9_]{8}$")
#: how long :meth:`RunLock.acquire` retries a lock it found taken before refusing: :func:`live_holder` takes it
#: shared for microseconds, and a run must not be refused because a sweep looked at its directory then
ACQUIRE_RETRY_S = 0.5
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


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
