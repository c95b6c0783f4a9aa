"""Step time of LoRA-Pro's optimizer against AdamW on the same LoRA factors (docs/adapters/lora_pro.md).

    python -m lrzoo.methods.lora_pro.bench --ranks 8 16 64 128 --width 128 --layers 2

Each of ``layers`` adapted ``width``×``width`` matrices holds a LoRA pair (A: r×width, B: width×r, both
non-zero, as after the first steps); every step gets fresh random gradients. The optimizer step alone is timed
(median over ``repeats`` after ``warmup`` steps), for :class:`~lrzoo.methods.lora_pro.optimizer.LoraProAdamW` and for
``torch.optim.AdamW`` over the same tensors. A benchmark, not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Optional, Sequence

import torch

from .optimizer import LoraProAdamW


def _median_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], repeats: int, warmup: int,
                 generator: torch.Generator) -> float:
    times = []
    for i in range(warmup + repeats):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-2
        start = time.perf_counter()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_times(rank: int, width: int = 128, layers: int = 2, repeats: int = 20, warmup: int = 3,
               seed: int = 0) -> dict[str, float]:
    """Median seconds per optimizer step of LoRA-Pro and of AdamW, and their ratio, at LoRA rank ``rank``."""
    if not 0 < rank <= width:
        raise ValueError(f"rank must be in 1..width={width}, got {rank}.")
    g = torch.Generator().manual_seed(seed)
    result = {"rank": rank}
    for name in ("lora_pro", "adamw"):
        pairs = [(torch.nn.Parameter(torch.randn(rank, width, generator=g) / width ** 0.5),
                  torch.nn.Parameter(torch.randn(width, rank, generator=g) * 1e-2), 2.0) for _ in range(layers)]
        params = [t for A, B, _ in pairs for t in (A, B)]
        optimizer = (LoraProAdamW(params, pairs, lr=1e-4) if name == "lora_pro"
                     else torch.optim.AdamW(params, lr=1e-4))
        result[f"{name}_s"] = _median_step(optimizer, params, repeats, warmup, g)
    result["ratio"] = result["lora_pro_s"] / result["adamw_s"]
    return result


def machine() -> str:
    """One line: CPU, cores, torch and its thread count."""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64, 128])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared CPU)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        print(f"LoRA-Pro vs AdamW optimizer step, {args.layers} LoRA pairs on {args.width}×{args.width} weights; "
              f"{machine()}")
        print("| r | LoRA-Pro step | AdamW step | ratio |\n|---|---|---|---|")
        for rank in args.ranks:
            t = step_times(rank, args.width, args.layers, args.repeats)
            print(f"| {rank} | {t['lora_pro_s'] * 1e3:.2f} ms | {t['adamw_s'] * 1e3:.3f} ms | {t['ratio']:.0f}× |")
    finally:
        torch.set_num_threads(threads)  # a caller's process (a test) keeps its own setting


if __name__ == "__main__":
    main()
