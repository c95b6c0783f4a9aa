"""The memory a run holds while it trains, sampled after every optimizer step: ``results.json``'s ``memory``.

``peak_memory_mb`` says the most a run ever held; a method that needs a lot for a moment (an SVD at
initialisation, GaLore's projector refresh) and one that holds it all along read the same there. The mean of
per-step samples separates them. On CUDA a sample is ``torch.cuda.memory_allocated`` (tensors alive between
steps: weights, gradients' buffers, optimizer state); on CPU the process's resident set size now (it includes
the model, the data and Python, as ``cpu_max_rss`` does). The sums travel in checkpoints, so a resumed run
averages over all its steps.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def memory_kind() -> str:
    return "cuda_allocated" if torch.cuda.is_available() else "cpu_rss"


def current_mb() -> Optional[float]:
    """Memory held now (MB): CUDA's allocated bytes, else this process's resident set (``/proc/self/statm``);
    None where neither can be read (a platform without ``/proc``)."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/statm") as handle:
            resident_pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * _PAGE / 2**20


class MemoryTrace:
    """A trainer callback: one memory sample per optimizer step, their mean and largest value."""

    def __init__(self, sample: Any = current_mb):
        self.sample = sample
        self.total, self.count, self.peak = 0.0, 0, 0.0

    def on_step_end(self, step: int, model: Any, optimizer: Any, scheduler: Any) -> None:
        value = self.sample()
        if value is not None:
            self.total += value
            self.count += 1
            self.peak = max(self.peak, value)

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "count": self.count, "peak": self.peak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self.count, self.peak = float(state["total"]), int(state["count"]), float(state["peak"])

    def results(self) -> dict[str, Any]:
        """``results.json``'s ``memory``: ``kind``, ``mean_mb`` and ``peak_mb`` of the samples (null without any:
        a run that trains nothing), ``samples``."""
        mean = round(self.total / self.count, 1) if self.count else None
        return {"memory": {"kind": memory_kind(), "mean_mb": mean,
                           "peak_mb": round(self.peak, 1) if self.count else None, "samples": self.count}}
