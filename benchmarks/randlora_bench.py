"""RandLoRA layer, forward + backward: PEFT's eager layer vs lrzoo's torch path (time and saved bytes).

    python benchmarks/randlora_bench.py --tokens 2048 --dim 1024 --rank 16 --iters 5

The input needs a gradient (a layer inside a network); W is frozen; λ and γ train. Reports the median
time per iteration and the bytes autograd saves for backward (non-parameter tensors).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import RandLoraConfig, get_peft_model
from peft.tuners.randlora.layer import Linear as PeftRandLoraLinear

from lrzoo.methods.randlora import FastRandLoraLinear


def saved_bytes(fn) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        if not isinstance(tensor, torch.nn.Parameter):
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def timed(step, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--dim-out", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    d_out = args.dim_out or args.dim
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(args.dim, d_out)),
                           RandLoraConfig(r=args.rank, target_modules=["0"], init_weights=False))
    layer = model.base_model.model[0]
    x = torch.randn(args.tokens, args.dim, requires_grad=True)
    dy = torch.randn(args.tokens, d_out)
    results = {}
    for name, cls in (("peft", PeftRandLoraLinear), ("lrzoo", FastRandLoraLinear)):
        layer.__class__ = cls

        def step():
            layer(x).backward(dy)

        results[name] = (timed(step, args.iters), saved_bytes(lambda: layer(x)))
    (t_peft, b_peft), (t_ours, b_ours) = results["peft"], results["lrzoo"]
    print(f"tokens={args.tokens} d_in={args.dim} d_out={d_out} r={args.rank} threads={torch.get_num_threads()}")
    print(f"peft : {t_peft * 1e3:8.1f} ms fwd+bwd, saved {b_peft / 2**20:7.2f} MiB")
    print(f"lrzoo: {t_ours * 1e3:8.1f} ms fwd+bwd, saved {b_ours / 2**20:7.2f} MiB")
    print(f"time ratio lrzoo/peft = {t_ours / t_peft:.2f}, saved-bytes ratio = {b_ours / b_peft:.2f}")


if __name__ == "__main__":
    main()
