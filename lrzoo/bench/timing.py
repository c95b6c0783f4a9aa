"""Timing on a shared machine: candidates timed round-robin (every round times each once, the order reversed every
other round; CUDA events after an L2 flush on a GPU), medians and IQRs, paired ratios round by round with a
distribution-free interval for their median, and the bytes autograd saves for a backward. Used by the
per-layer (:mod:`lrzoo.bench.layers`) and whole-model (:mod:`lrzoo.bench.model`) benchmarks.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

#: the confidence of ``--check``'s intervals
CONFIDENCE = 0.95


@dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    #: every timed round in order (ms); round i of one candidate ran next to round i of the others
    samples: tuple[float, ...] = field(default=(), repr=False)


def quantiles(samples: list[float]) -> Timing:
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return Timing(q[1], q[2] - q[0], tuple(samples))


def time_round_robin(fns: list[Callable[[], None]], device: torch.device, warmup: int, iters: int) -> list[Timing]:
    """Median and IQR (ms) of each of ``fns``, timed in turn within every round.

    Interleaving puts every candidate under the same machine load (a shared CPU drifts over
    seconds), so the ratios stay meaningful when the absolute times do not. Every other round runs
    the candidates in reverse order, so none always runs right after the same neighbour (whose
    leftovers in the caches, or whose garbage, it would otherwise always pay for). On CUDA each
    sample is bracketed by CUDA events after an L2 flush.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    for round_ in range(iters):
        order = list(zip(fns, samples))
        for fn, out in order if round_ % 2 == 0 else reversed(order):
            if flush is not None:
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                out.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
    return [quantiles(s) for s in samples]


def saved_activation_bytes(forward: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes autograd keeps for the backward of ``forward()``, one count per storage, minus ``exclude``.

    A storage saved by several ops, or through several views, counts once (keyed by its data pointer).
    The graph built here is only counted, never back-propagated: the pack hook hands autograd a
    placeholder and keeps the tensor in a list until the count is done. Returning the tensor itself
    would make every op that saves its own output (exp, softmax, SDPA...) hold itself through its
    graph node, a cycle the garbage collector cannot break: the whole forward's activations leaked
    on every call (0.7–1.3 GB per SmolLM2-135M forward at 2×256 tokens). The list also keeps every
    saved storage alive for the whole forward, as autograd would, so no address is reused and
    counted twice as one.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}
    alive: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        alive.append(t)

    def unpack(_: None) -> torch.Tensor:
        raise RuntimeError("saved_activation_bytes only counts: its graph cannot be back-propagated.")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = forward()
    del out
    alive.clear()
    return sum(storages.values())


def paired_ratios(a: Timing, b: Timing) -> list[float]:
    """a ÷ b round by round (the two were timed back to back in each round, under the same load)."""
    return [x / y for x, y in zip(a.samples, b.samples)]


def paired_ratio(a: Timing, b: Timing) -> float:
    """The median of :func:`paired_ratios`: the table's speed-up and ``--check`` use this one estimate."""
    ratios = paired_ratios(a, b)
    return statistics.median(ratios) if ratios else a.median_ms / b.median_ms


def median_interval(samples: list[float], confidence: float = CONFIDENCE) -> Optional[tuple[float, float]]:
    """A distribution-free interval for the median of ``samples`` (order statistics; scipy's
    ``quantile_test``), or ``None`` when there are too few samples for one (fewer than 6 at 95%)."""
    from scipy.stats import quantile_test

    if len(samples) < 2:
        return None
    interval = quantile_test(samples, q=statistics.median(samples), p=0.5).confidence_interval(confidence)
    low, high = float(interval.low), float(interval.high)
    return None if low != low or high != high else (low, high)  # NaN: too few samples
