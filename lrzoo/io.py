"""Atomic writes: a crash mid-save never leaves a half-written checkpoint or export behind.

A process killed mid-write leaves its temporary sibling, ``.<name>.tmp-XXXXXXXX`` (or, between the
two renames of :func:`atomic_directory`, ``.<name>.old-XXXXXXXX``);
:func:`lrzoo.runs.lock.remove_leftovers` clears those from a run directory on its next start, and
:func:`remove_stale_siblings` those of one target (``export_lora`` calls it before each export). A writer
holds an OS lock (``flock``) on its temporary directory while it writes; the kernel drops it when the
writer dies in any way (``kill -9`` included), so a temporary directory nobody holds is stale.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    An existing ``path`` is moved aside first and removed only after the new one is in place. The new
    directory keeps the mode ``path`` had, or gets that of a plain ``mkdir`` (0777 less the umask), not
    ``mkdtemp``'s private 0700: a saved adapter or checkpoint stays readable by whoever could read its parent.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = _new_sibling_dir(path)
    lock = _hold(tmp)  # tells remove_stale_siblings that its writer is alive
    try:
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _release(lock)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success.

    The file keeps the permissions ``path`` had, or gets those of a plain ``open`` (0666 less the umask),
    not ``mkstemp``'s private 0600: a rewritten doc or result stays readable by whoever could read it.
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = _new_sibling(path)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _new_sibling(path: str) -> tuple[int, str]:
    """``(fd, name)`` of a new ``.<name>.tmp-XXXXXXXX`` beside ``path``, created as ``open`` would (0666 less
    the umask), then given ``path``'s own mode if it exists."""
    directory, base = os.path.split(path)
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.tmp-{secrets.token_hex(4)}")   # LEFTOVER_RE's 8 characters
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        except FileNotFoundError:
            pass
        return fd, tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def _new_sibling_dir(path: str) -> str:
    """A new ``.<name>.tmp-XXXXXXXX`` directory beside ``path``, made as ``mkdir`` would (0777 less the umask),
    then given ``path``'s own mode if it is a directory."""
    directory, base = os.path.split(path)
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.tmp-{secrets.token_hex(4)}")   # LEFTOVER_RE's 8 characters
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:
            continue
        if os.path.isdir(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def refuse_foreign_files(path: str, overwrite: bool, writes: tuple[str, ...], what: str) -> None:
    """Refuse to write ``what`` into a directory that already holds files, unless ``overwrite``.

    A user's ``export_lora(model, ".")`` must never empty their working directory: an existing
    non-empty ``path`` is an error naming what is there, and with ``overwrite=True`` only the
    files in ``writes`` are replaced (see :func:`replace_files_in`).
    """
    if not os.path.isdir(path) or overwrite:
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"{path!r} is a file; {what} needs a directory.")
        return
    present = sorted(os.listdir(path))
    if present:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise FileExistsError(
            f"{path!r} is not empty ({shown}); {what} would mix with it. Choose an empty or new directory, or pass "
            f"overwrite=True to replace only the files it writes ({', '.join(writes)})."
        )


@contextlib.contextmanager
def replace_files_in(path: str) -> Iterator[str]:
    """Yield a temporary sibling directory; on success move each file written there into ``path``.

    For an empty or new ``path`` this is :func:`atomic_directory`. Into a directory that holds other
    files, each written file replaces its namesake by one rename and nothing else is touched; a
    failure before the moves leaves ``path`` as it was.
    """
    if not os.path.isdir(path) or not os.listdir(path):
        with atomic_directory(path) as tmp:
            yield tmp
        return
    path = os.path.abspath(path)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    lock = _hold(tmp)
    try:
        yield tmp
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _release(lock)


def remove_stale_siblings(path: str) -> list[str]:
    """Delete the temporary siblings of ``path`` that interrupted writes left (``.<name>.tmp-XXXXXXXX``, and
    ``.<name>.old-XXXXXXXX`` once ``path`` exists again); return their paths.

    Only directories no live process holds are touched: each writer of :func:`atomic_directory` and
    :func:`replace_files_in` keeps a ``flock`` on its own, so a concurrent write to ``path`` keeps its
    directory; one from a killed writer (or from an lrzoo that took no lock) is removed.
    """
    path = os.path.abspath(path)
    parent, base = os.path.split(path)
    pattern = re.compile(rf"^\.{re.escape(base)}\.(tmp|old)-[a-z0-9_]{{8}}$")
    try:
        names = sorted(os.listdir(parent))
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        match = pattern.match(name)
        sibling = os.path.join(parent, name)
        if not match or os.path.islink(sibling) or not os.path.isdir(sibling):
            continue
        if match.group(1) == "old" and not os.path.isdir(path):  # killed between the two renames: the old copy
            continue                                              # is the only complete one; leave it
        lock = _hold(sibling)
        if lock is None:  # a live writer holds it (or the filesystem cannot tell): leave it
            continue
        try:
            shutil.rmtree(sibling, ignore_errors=True)
        finally:
            _release(lock)
        removed.append(sibling)
    return removed


def _hold(directory: str):
    """An exclusive ``flock`` on ``directory`` (its open descriptor), or ``None`` where another holds it or the
    filesystem has no such locks."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        return None
    return fd


def _release(fd) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor drops its flock
