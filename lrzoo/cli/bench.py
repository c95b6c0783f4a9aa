"""``lrzoo-bench``: per-layer adapter cost relative to a frozen ``F.linear``, against eager PEFT.

For each method and shape it times one adapted ``nn.Linear`` in training mode (input needing a
gradient, frozen base) and prints:

* fwd and fwd+bwd time as a ratio to a frozen ``F.linear`` timed in the same run;
* the speed-up over eager PEFT where PEFT has the method (LoRA, DoRA, RandLoRA): the median over
  rounds of PEFT's time ÷ lrzoo's in the same round;
* saved-activation bytes per layer: every tensor autograd saves during the forward
  (``torch.autograd.graph.saved_tensors_hooks``), deduplicated by storage, parameters and buffers
  excluded.

Three modes, and only one of them judges:

* ``--quick`` (``make bench``): one small shape, timings only. It ends with "no verdict": a few
  rounds of a 256-wide layer cannot tell a 5% difference from noise on a shared CPU.
* the default: the full table, timings only, also "no verdict".
* ``--check`` (``make bench-check``): issue 5's torch-path targets (:data:`TORCH_TARGETS`) at the
  configuration they were set for (:data:`TARGET_SHAPE`, r=16, fp32, no dropout), ≥ 20 rounds. Each
  time verdict comes from the per-round lrzoo/PEFT ratios (the two are timed back to back in every
  round) and the 95% interval of their median: PASS when the whole interval is within the bound,
  FAIL when all of it is beyond, UNDECIDED otherwise, or when a candidate's forward was timed
  longer than its forward + backward (the timings contradict themselves). Exit status 0: every
  target PASS; 1: a FAIL; 3: no FAIL but something UNDECIDED.

``--model NAME`` (a built-in such as ``smollm2_135m`` or ``minilm``, or a local path) switches to the
whole-model mode of :mod:`lrzoo.bench.model`: one training step of the whole model for every
registered adapter (and full fine-tuning) against stock PEFT, step time and saved bytes.

Protocol (docs/benchmarks.md, "Protocol"): candidates timed round-robin, the order reversed every
other round; on CUDA, CUDA events, ≥100 warm-up and ≥200 timed rounds, the L2 cache flushed before
each call, median and IQR; on CPU, ``perf_counter`` with fewer rounds. The backend is whatever
``LRZOO_BACKEND`` selects (auto: Triton on CUDA, torch on CPU).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ..bench.layers import CHECK_MIN_ITERS, EXIT_FAIL, EXIT_UNDECIDED, METHODS, TARGET_R, TARGET_SHAPE, TORCH_TARGETS, \
    bench_layers
from ..bench.model import bench_model
from .errors import entry_point

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lrzoo-bench", description=__doc__.split("\n")[0],
                                     epilog="The protocol, the three modes and how --check decides: docs/benchmarks.md.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="one small shape, few methods, timings only: no verdict (smoke test, < 1 min)")
    mode.add_argument("--check", action="store_true",
                      help=f"assert issue 5's torch-path targets at {TARGET_SHAPE[0]} {TARGET_SHAPE[1]} "
                           f"{TARGET_SHAPE[2]}, r={TARGET_R}, fp32 with ≥ {CHECK_MIN_ITERS} rounds; "
                           f"exit {EXIT_FAIL} on a FAIL, {EXIT_UNDECIDED} when noise leaves one undecided")
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {', '.join(METHODS)}")
    parser.add_argument("--shape", nargs=3, type=int, action="append", metavar=("N", "D_IN", "D_OUT"),
                        help="tokens, d_in, d_out (repeatable); default: the protocol's shapes on CUDA "
                             "(docs/benchmarks.md#protocol), 2048 1024 1024 on CPU")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    parser.add_argument("--iters", type=int, default=None, help="timed rounds (each times every candidate once)")
    model = parser.add_argument_group("whole-model mode (--model)")
    model.add_argument("--model", default=None,
                       help="one training step of this model (built-in: smollm2_135m, minilm, tiny_llama, tiny_bert; "
                            "or a local path) for every registered adapter, full fine-tuning and stock PEFT; "
                            "--methods then picks members (adapter names and 'full')")
    model.add_argument("--batch", type=int, default=2)
    model.add_argument("--seq-len", type=int, default=256)
    model.add_argument("--task", choices=("generation", "classification"), default=None,
                       help="the model's head: causal LM or sequence classification (default: from the model)")
    args = parser.parse_args(argv)
    _check_args(args)
    if args.check:
        _refuse_check_overrides(parser, args)
    return args


def _refuse_check_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--check`` judges one configuration; anything that changes it would judge the wrong thing."""
    from lrzoo.kernels import requested_backend

    changed = [flag for flag, value, default in (("--model", args.model, None), ("--shape", args.shape, None),
                                                  ("--r", args.r, TARGET_R), ("--dropout", args.dropout, 0.0))
               if value != default]
    if args.dtype not in (None, "float32"):
        changed.append("--dtype")
    if changed:
        parser.error(f"--check measures the configuration its targets were set for; drop {', '.join(changed)} "
                     "(or leave out --check for timings only)")
    if args.iters is not None and args.iters < CHECK_MIN_ITERS:
        parser.error(f"--check needs --iters ≥ {CHECK_MIN_ITERS} for a verdict (got {args.iters})")
    backend = requested_backend()
    if backend == "triton" or (backend == "auto" and args.device != "cpu"):
        parser.error("--check's targets are for the torch path; use --device cpu or LRZOO_BACKEND=torch")
    unjudged = set(args.methods or ()) - set(TORCH_TARGETS)
    if args.methods and unjudged == set(args.methods):
        parser.error(f"--check has targets only for {', '.join(TORCH_TARGETS)}")


def _check_args(args: argparse.Namespace) -> None:
    """Refuse values that would end in a traceback mid-benchmark: one line (:class:`lrzoo.errors.UserError`)."""
    from lrzoo.errors import UserError

    for flag, value, least in (("--r", args.r, 1), ("--iters", args.iters, 1), ("--warmup", args.warmup, 0),
                               ("--batch", args.batch, 1), ("--seq-len", args.seq_len, 1)):
        if value is not None and value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if any(size < 1 for shape in args.shape or () for size in shape):
        raise UserError(f"--shape sizes must be positive, got {args.shape}")
    if not 0.0 <= args.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device here (torch.cuda.is_available() is False); use "
                        "--device cpu")
    if args.model is not None and not os.path.isdir(args.model):
        from lrzoo.models import BUILTIN_MODELS

        if args.model not in BUILTIN_MODELS and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
            raise UserError(f"--model {args.model}: not a built-in ({', '.join(BUILTIN_MODELS)}) nor a local "
                            "directory (and the Hub is offline)")


@entry_point("lrzoo-bench")  # a user error (lrzoo.errors.UserError...) is one line; --debug: the traceback
def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" and not args.check else "float32"))
    if args.model is not None:
        return bench_model(args, device, dtype)
    return bench_layers(args, device, dtype)


if __name__ == "__main__":
    sys.exit(main())
