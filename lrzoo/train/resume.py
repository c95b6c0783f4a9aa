"""Finding and reading a run's checkpoints: the newest intact one wins, a damaged one is named.

A checkpoint is ``<run dir>/checkpoints/step-N/trainer_state.pt``. :func:`read_trainer_state` turns
a truncated or garbled file into :class:`UnreadableCheckpoint` (naming the file) instead of torch's
zip or pickle error; :func:`resume_latest` walks the checkpoints newest first and resumes from the
first one that reads, warning about each one it skipped.

Reading a checkpoint never runs code from it: the file is unpickled by ``torch.load(weights_only=True)``,
which builds tensors, containers and plain values only, plus the few numpy types of numpy's RNG state
(:data:`SAFE_GLOBALS`). A file that names anything else (a crafted ``__reduce__`` calling ``os.system``...)
is refused with :class:`UnsafeCheckpoint` before anything in it runs, and skipped like a damaged one.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from typing import Any, Optional

import torch

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.pt"
#: what :meth:`lrzoo.train.checkpoint.CheckpointMixin.save_checkpoint` writes
STATE_KEYS = ("step", "config_hash", "world_size", "adapter", "trainable", "optimizer", "scheduler", "callbacks",
              "rng", "progress")


class UnreadableCheckpoint(RuntimeError):
    """A checkpoint whose ``trainer_state.pt`` is missing, cut short or not a trainer state."""

    def __init__(self, path: str, reason: str, message: Optional[str] = None):
        self.path, self.reason = path, reason
        super().__init__(message or (
            f"{path} is not a readable checkpoint ({reason}): it was cut short or damaged. Resume from another "
            "checkpoint (resume=<dir>, or resume=auto for the newest intact one) or start over with resume=never."))


class UnsafeCheckpoint(UnreadableCheckpoint):
    """A ``trainer_state.pt`` that asks to build or call something a trainer state never holds: refused, not run."""

    def __init__(self, path: str, names: str):
        self.names = names
        super().__init__(path, f"refused: loading it would run {names}", (
            f"{path} was refused: loading it would run {names}, which no lrzoo checkpoint holds, so it was not "
            "written by lrzoo or was altered since. Nothing in it ran. Delete it (or its step-N folder) if you do "
            "not know where it came from; resume=auto resumes from the newest checkpoint that loads safely, "
            "resume=never starts over."))


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint was unreadable; an older one was used."""


def checkpoint_dirs(run_dir: str) -> list[str]:
    """The ``<run_dir>/checkpoints/step-N`` directories, newest first."""
    root = os.path.join(run_dir, "checkpoints")
    steps = [(int(m.group(1)), name) for name in (os.listdir(root) if os.path.isdir(root) else [])
             if (m := CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(root, name))]
    return [os.path.join(root, name) for _, name in sorted(steps, reverse=True)]


def _numpy_rng_globals() -> list[Any]:
    """What ``np.random.get_state()`` pickles as, beyond plain values: an ``ndarray`` of ``uint32``."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


#: everything a trainer state holds that ``weights_only=True`` does not build by itself: the RNG state of numpy
#: (python's is plain ints; torch's, the optimizers', schedulers' and callbacks' states are tensors and values)
SAFE_GLOBALS = _numpy_rng_globals()
#: how torch's weights-only unpickler names what it refused (a global, a class to build, a function to call)
_BLOCKED_RE = re.compile(r"GLOBAL ([\w.]+)|got <class '([^']+)'>|unrecognized function ([\w.<>]+)")


def load_safely(file: str) -> Any:
    """``torch.load(file, weights_only=True)`` with :data:`SAFE_GLOBALS` allowed for this call only (the
    process-wide allow-list is left alone); a file that needs more raises :class:`UnsafeCheckpoint`."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = sorted({"".join(groups) for groups in _BLOCKED_RE.findall(str(err))})
        if not names:  # a bad opcode, a cut-short stream...: damaged, not refused
            raise
        raise UnsafeCheckpoint(file, ", ".join(names)) from None


def read_trainer_state(path: str) -> dict[str, Any]:
    """:func:`load_safely` of ``<path>/trainer_state.pt``, or :class:`UnreadableCheckpoint` (:class:`UnsafeCheckpoint`
    for a file that would run code)."""
    file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(file):
        raise UnreadableCheckpoint(file, "no such file")
    try:
        state = load_safely(file)
    except UnsafeCheckpoint:
        raise
    except Exception as err:  # truncated zip, garbage pickle, EOF...: all mean "damaged"
        raise UnreadableCheckpoint(file, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") \
            from err
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UnreadableCheckpoint(file, f"missing {', '.join(missing)}")
    return state


def resume_latest(trainer: Any, run_dir: str, *, verbose: bool = True) -> Optional[str]:
    """Load the newest intact checkpoint of ``run_dir`` into ``trainer``; return its path (``None``: none).

    Unreadable checkpoints (damaged, or refused as :class:`UnsafeCheckpoint`) are skipped with a
    :class:`CheckpointFallbackWarning` naming them and the one used. If there are checkpoints but none is intact, raises :class:`UnreadableCheckpoint`
    naming every file. Other errors (another configuration's checkpoint) are not skipped.
    """
    skipped: list[UnreadableCheckpoint] = []
    for path in checkpoint_dirs(run_dir):
        try:
            trainer.load_checkpoint(path)
        except UnreadableCheckpoint as err:
            skipped.append(err)
            continue
        if skipped and verbose:
            names = "; ".join(f"{err.path} ({err.reason})" for err in skipped)
            warnings.warn(f"Skipped unreadable checkpoint(s): {names}. Resuming from the newest intact one, "
                          f"{os.path.join(path, STATE_FILE)}.", CheckpointFallbackWarning, stacklevel=2)
        return path
    if skipped:
        names = "; ".join(f"{err.path} ({err.reason})" for err in skipped)
        root = os.path.join(run_dir, "checkpoints")
        raise UnreadableCheckpoint(root, "none intact", (
            f"No intact checkpoint to resume {run_dir} from: {names}. They were cut short, damaged or refused as "
            "unsafe; nothing in them ran. Start over "
            f"with resume=never (same command plus resume=never), or delete {root} and run again."))
    return None
