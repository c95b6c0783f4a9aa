"""Finding and reading a run's checkpoints: the newest intact one wins, a damaged one is named.

A checkpoint is ``<run dir>/checkpoints/step-N/trainer_state.pt``. :func:`read_trainer_state` turns
a truncated or garbled file into :class:`UnreadableCheckpoint` (naming the file) instead of torch's
zip or pickle error; :func:`resume_latest` walks the checkpoints newest first and resumes from the
first one that reads, warning about each one it skipped.
"""

from __future__ import annotations

import os
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


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint was unreadable; an older one was used."""


def checkpoint_dirs(run_dir: str) -> list[str]:
    """The ``<run_dir>/checkpoints/step-N`` directories, newest first."""
    root = os.path.join(run_dir, "checkpoints")
    steps = [(int(m.group(1)), name) for name in (os.listdir(root) if os.path.isdir(root) else [])
             if (m := CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(root, name))]
    return [os.path.join(root, name) for _, name in sorted(steps, reverse=True)]


def read_trainer_state(path: str) -> dict[str, Any]:
    """``torch.load`` of ``<path>/trainer_state.pt``, or :class:`UnreadableCheckpoint`."""
    file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(file):
        raise UnreadableCheckpoint(file, "no such file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, garbage pickle, EOF...: all mean "damaged"
        raise UnreadableCheckpoint(file, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") \
            from err
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UnreadableCheckpoint(file, f"missing {', '.join(missing)}")
    return state


def resume_latest(trainer: Any, run_dir: str, *, verbose: bool = True) -> Optional[str]:
    """Load the newest intact checkpoint of ``run_dir`` into ``trainer``; return its path (``None``: none).

    Unreadable checkpoints are skipped with a :class:`CheckpointFallbackWarning` naming them and the
    one used. If there are checkpoints but none is intact, raises :class:`UnreadableCheckpoint`
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
            f"No intact checkpoint to resume {run_dir} from: {names}. They were cut short or damaged. Start over "
            f"with resume=never (same command plus resume=never), or delete {root} and run again."))
    return None
