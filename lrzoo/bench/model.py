"""``lrzoo-bench --model NAME``: one training step of a whole model, every member of the zoo against stock PEFT.

Each member is the model wrapped by :func:`lrzoo.wrap` (every registered adapter, rank ``--r``, on every
linear layer of the repeated blocks: the attention and MLP projections), plus full fine-tuning as a
reference row and stock PEFT (``peft.get_peft_model`` with the config of the method's ``AdapterSpec.peft_reference``,
no lrzoo layer in it) for the methods PEFT has. One step is forward, loss and backward on a fixed random
batch (``--batch`` × ``--seq-len`` tokens), gradients dropped after each; no optimizer step (the same
for every member of a family, and not what the kernels change). All candidates are timed round-robin
in one run (:func:`lrzoo.bench.timing.time_round_robin`), so their ratios hold on a loaded machine.

Saved-activation bytes are counted with the per-layer counter (:func:`lrzoo.bench.timing.saved_activation_bytes`):
every tensor autograd saves during the forward and loss, one count per storage (a tensor saved by
several ops, or viewed by several, is stored once), the model's parameters and buffers excluded.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
import os
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .reference import bench_options, has_peft_reference, peft_reference_config
from .timing import Timing, saved_activation_bytes, time_round_robin

#: the full fine-tuning reference row's member name.
FULL = "full"
_BLOCK_CHILD = re.compile(r"\.\d+\.(.+)$")


@dataclass
class ModelRow:
    member: str
    impl: str  # "lrzoo", "peft" or "torch" (full fine-tuning)
    trainable: int
    step: Timing
    saved_bytes: int


def task_kind_of(source: str) -> str:
    """``"generation"`` for a decoder, ``"classification"`` for an encoder (built-ins); generation otherwise."""
    from ..models import BUILTIN_MODELS

    family = BUILTIN_MODELS.get(source, (None, "decoder"))[1]
    return "classification" if family == "encoder" else "generation"


def block_linear_targets(model: nn.Module) -> list[str]:
    """The linear layers of the model's repeated blocks, as suffixes after the block index.

    ``self_attn.q_proj … mlp.down_proj`` for Llama, ``attention.self.query … output.dense`` for BERT:
    every attention and MLP projection, never the embeddings, the LM head, a pooler or a task head.
    """
    targets: dict[str, None] = {}
    for name, module in model.named_modules():
        match = _BLOCK_CHILD.search(name)
        if match and isinstance(module, nn.Linear):
            targets[match.group(1)] = None
    if not targets:
        raise ValueError(f"{type(model).__name__} has no linear layer inside numbered blocks to adapt.")
    return list(targets)


def shared_copy(base: nn.Module) -> nn.Module:
    """A deep copy of ``base`` whose parameters are new ``Parameter`` objects on the *same storage*.

    Every member gets its own modules, flags and gradients, but the frozen weights exist once, not
    once per member (18 copies of SmolLM2-135M would take ~10 GB). Nothing in a training step
    without an optimizer writes a weight; :func:`weight_sums` checks that wrapping did not either.
    """
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in base.parameters()}
    return copy.deepcopy(base, memo)


def weight_sums(model: nn.Module) -> list[float]:
    """A checksum per parameter (float64 sums), to tell that the shared weights were left untouched."""
    with torch.no_grad():
        return [p.double().sum().item() for p in model.parameters()]


def _peft_task_type(task_kind: str) -> str:
    return "CAUSAL_LM" if task_kind == "generation" else "SEQ_CLS"


def build_member(base: nn.Module, member: str, impl: str, r: int, targets: list[str], dropout: float,
                 task_kind: str) -> nn.Module:
    """A copy of ``base`` (:func:`shared_copy`) set up as ``member``: lrzoo-wrapped, stock PEFT, or fully
    trainable (``FULL``)."""
    import lrzoo

    model = shared_copy(base)
    if member == FULL:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model.train()
    if impl == "peft":
        from peft import get_peft_model

        # lrzoo's α for the method (adapters/<name>.yaml), so both rows train the same function
        config = peft_reference_config(member, r=r, alpha=lrzoo.adapter_defaults(member).get("alpha"),
                                       target_modules=targets, dropout=dropout, task_type=_peft_task_type(task_kind))
        # lrzoo classes the base already has (a pooled head, lrzoo.heads) are the model, not PEFT's doing: only an
        # lrzoo class that wrapping brought in would make the row something other than stock PEFT
        own = {type(m) for m in model.modules()}
        wrapped = get_peft_model(model, config)
        foreign = [name for name, m in wrapped.named_modules()
                   if type(m).__module__.startswith("lrzoo") and type(m) not in own]
        if foreign:
            raise RuntimeError(f"stock PEFT {member} holds lrzoo layers ({foreign[0]}, ...): not a stock baseline.")
        return wrapped.train()
    # bench_options: an untrained adapter doing a trained one's work (LoRA's B ≠ 0), as per layer
    return lrzoo.wrap(model, member, r=r, target_modules=targets, dropout=dropout, **bench_options(member)).train()


def model_batch(model: nn.Module, task_kind: str, batch: int, seq_len: int, device, seed: int = 0) -> dict:
    """A fixed random batch: token ids, a full attention mask and labels (next tokens or a class)."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task_kind == "generation":
        inputs["labels"] = ids.clone()
    else:
        inputs["labels"] = torch.randint(0, max(config.num_labels, 1), (batch,), generator=generator)
    return {key: value.to(device) for key, value in inputs.items()}


def step_fns(model: nn.Module, inputs: dict) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """(the forward to the loss, one training step: forward, loss, backward, gradients dropped)."""
    def forward() -> torch.Tensor:
        return model(**inputs).loss

    def step() -> None:
        forward().backward()
        model.zero_grad(set_to_none=True)

    return forward, step


def run_model(source: str, members: list[str], r: int, batch: int, seq_len: int, device: torch.device,
              dtype: torch.dtype, dropout: float, warmup: int, iters: int, task_kind: Optional[str] = None,
              config_overrides: Optional[dict] = None, log: Callable[[str], None] = lambda _: None) -> list[ModelRow]:
    """Build every member on ``source`` and time one training step of each, round-robin.

    ``members``: registered adapter names and/or ``FULL``; a method whose spec has a ``peft_reference`` (stock
    PEFT has it: lora, dora, randlora) also gets a stock PEFT row.
    """
    from ..models import load_model

    task_kind = task_kind or task_kind_of(source)
    base, _ = load_model(source, task_kind, num_labels=2, config_overrides=config_overrides)
    base = base.to(device=device, dtype=dtype)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    targets = block_linear_targets(base)
    log(f"# targets ({len(targets)} per block): {', '.join(targets)}")
    inputs = model_batch(base, task_kind, batch, seq_len, device)
    labels, models = [], []
    sums = weight_sums(base)
    for member in members:
        impls = ("torch",) if member == FULL else ("lrzoo", "peft") if has_peft_reference(member) else ("lrzoo",)
        for impl in impls:
            labels.append((member, impl))
            models.append(build_member(base, member, impl, r, targets, dropout, task_kind))
            if weight_sums(base) != sums:
                raise RuntimeError(f"building {member} ({impl}) changed the base weights the members share.")
    del base
    steps, saved, trainable = [], [], []
    for model in models:
        forward, step = step_fns(model, inputs)
        saved.append(saved_activation_bytes(forward, [*model.parameters(), *model.buffers()]))
        trainable.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
        steps.append(step)
    timings = time_round_robin(steps, device, warmup, iters)
    return [ModelRow(m, i, n, t, s) for (m, i), n, t, s in zip(labels, trainable, timings, saved)]


def peft_ratios(rows: list[ModelRow]) -> dict[str, tuple[float, float]]:
    """member -> (step time, saved bytes) of lrzoo over stock PEFT, for the members with both rows."""
    by_key = {(row.member, row.impl): row for row in rows}
    ratios = {}
    for (member, impl), row in by_key.items():
        peft = by_key.get((member, "peft"))
        if impl == "lrzoo" and peft is not None:
            ratios[member] = (row.step.median_ms / peft.step.median_ms, row.saved_bytes / max(peft.saved_bytes, 1))
    return ratios


def format_model_table(rows: list[ModelRow]) -> str:
    """One row per candidate: step time (median, IQR), ×full fine-tuning, lrzoo/PEFT ratios, saved MiB."""
    full = next((row for row in rows if row.member == FULL), None)
    ratios = peft_ratios(rows)
    lines = ["| member | impl | trainable params | step ms (IQR) | step ×full FT | step lrzoo/PEFT | saved MiB "
             "| saved lrzoo/PEFT |", "|" + "---|" * 8]
    for row in rows:
        vs_full = f"{row.step.median_ms / full.step.median_ms:.2f}" if full else "–"
        t_ratio, b_ratio = ratios.get(row.member, (None, None)) if row.impl == "lrzoo" else (None, None)
        lines.append(
            f"| {row.member} | {row.impl} | {row.trainable:,} | {row.step.median_ms:.1f} ({row.step.iqr_ms:.1f}) "
            f"| {vs_full} | {f'{t_ratio:.2f}×' if t_ratio else '–'} | {row.saved_bytes / 2**20:.1f} "
            f"| {f'{b_ratio:.2f}×' if b_ratio else '–'} |")
    return "\n".join(lines)


def bench_model(args: Any, device: torch.device, dtype: torch.dtype) -> int:
    """``lrzoo-bench --model`` (``args``: its parsed options): the step-time and saved-bytes table, then one
    lrzoo/PEFT line per PEFT method; returns the exit status."""
    import lrzoo

    from ..kernels import requested_backend

    known = [FULL, *lrzoo.list_adapters()]
    members = args.methods or known
    unknown = set(members) - set(known)
    if unknown:
        raise SystemExit(f"lrzoo-bench --model: unknown member(s) {sorted(unknown)}; choose from {', '.join(known)}.")
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    iters = args.iters if args.iters is not None else (50 if cuda else 5)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"
    print(f"# lrzoo-bench --model {args.model} on {name}; {dtype}; batch {args.batch}×{args.seq_len} tokens; r={args.r} "
          f"on every attention/MLP projection; dropout={args.dropout}; LRZOO_BACKEND={requested_backend()}; one step = "
          f"forward + loss + backward (no optimizer step); warm-up {warmup}, timed {iters}, round-robin; median (IQR) ms"
          f"{'; L2 flushed' if cuda else ''}")
    rows = run_model(args.model, members, args.r, args.batch, args.seq_len, device, dtype, args.dropout, warmup,
                     iters, task_kind=args.task, log=print)
    print(format_model_table(rows))
    for member, (t_ratio, b_ratio) in peft_ratios(rows).items():
        print(f"{member}: lrzoo/PEFT step time {t_ratio:.2f}×, saved bytes {b_ratio:.2f}×")
    return 0
