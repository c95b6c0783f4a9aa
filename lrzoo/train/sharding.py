"""``trainer.strategy=fsdp``: shard the frozen base over the ranks with torch's FSDP2 (``fully_shard``).

What is sharded and what is not:

* **Sharded:** every frozen parameter of the base model (the memory of an 8B model), one FSDP unit
  per transformer block (the model's ``_no_split_modules``: ``LlamaDecoderLayer``, ``BertLayer``...)
  plus the root (embeddings, final norm, head). A unit's weights are all-gathered for its forward and
  backward and freed again.
* **Replicated on every rank, like DDP:** the trainable parameters (adapters, a trained task head),
  every tensor the adapter file holds (so ``get_peft_model_state_dict`` and the checkpoint's trainable
  state see whole tensors on rank 0 without a gather), and 0-d parameters (``fully_shard`` refuses
  scalars, e.g. LoLDU's σ). Their gradients are averaged over the ranks at the end of each backward
  (one flat all-reduce per dtype), so the optimizer, gradient clipping, the non-finite guard and the
  checkpoints work on plain tensors exactly as in a single process, and an N-rank run gives the same
  adapter as one process with the same global batch.

This is torch's FSDP2 called directly rather than accelerate's ``FullyShardedDataParallelPlugin``:
accelerate only enables FSDP on accelerators (on a CPU it silently falls back to DDP), so the
plugin could not be tested here, and FSDP2 handles a frozen base next to trainable adapters per
parameter. It runs on CPUs (gloo) and GPUs (NCCL) alike; ``tests/train/test_distributed.py`` trains on 2
CPU ranks. Mixed precision is accelerate's autocast, as without FSDP (``trainer.precision``).

Full fine-tuning (every parameter trainable) is therefore replicated, not sharded: FSDP buys nothing
there, and a warning says so.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

#: Above this share of trainable parameters, trainer=fsdp warns that little is sharded.
REPLICATED_WARNING_SHARE = 0.5


def block_class_names(model: nn.Module) -> set[str]:
    """Class names of the modules that become their own FSDP unit: the base model's ``_no_split_modules``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(getattr(base, "_no_split_modules", None) or ())


def replicated_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters kept whole on every rank: trainable ones, 0-d ones, and those in the adapter file."""
    saved: set[int] = set()
    if hasattr(model, "peft_config"):
        from peft.utils import get_peft_model_state_dict

        # keep_vars: the selected values are the Parameter objects themselves (PEFT only filters).
        for name in model.peft_config:
            selected = get_peft_model_state_dict(model, state_dict=model.state_dict(keep_vars=True), adapter_name=name)
            saved.update(id(value) for value in selected.values())
    return [(name, p) for name, p in model.named_parameters()
            if p.requires_grad or p.dim() == 0 or id(p) in saved]


class ReplicatedGradients:
    """Averages the gradients of the replicated parameters over the ranks at the end of every backward.

    A post-accumulate-grad hook queues one autograd final callback per backward; the callback
    all-reduces the gradients (flattened per dtype) and divides by the world size. Reducing after
    every micro-batch is exact: the all-reduce is linear and the part accumulated before is already
    identical on every rank.
    """

    def __init__(self, params: Sequence[nn.Parameter], world: int):
        self.params = [p for p in params if p.requires_grad]
        self.world = world
        self._queued = False
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, _param: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.reduce)

    def reduce(self) -> None:
        self._queued = False
        buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for p in self.params:
            if p.grad is not None:
                buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in buckets.values():
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat.div_(self.world)
            for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                grad.copy_(reduced)


def check_supported(callbacks: Sequence[Any]) -> None:
    """Refuse procedures that rewrite the (sharded) base weights during training: a callback that cannot
    run sharded says why in its ``sharding_refusal`` (ReLoRA's :class:`lrzoo.methods.relora.ReLoRAHook`)."""
    for cb in callbacks:
        reason = getattr(cb, "sharding_refusal", "")
        if reason:
            raise ValueError(reason)


def shard_model(model: nn.Module, device: torch.device, callbacks: Sequence[Any] = ()) -> nn.Module:
    """Apply FSDP2 to ``model`` in place over all ranks of the default process group and return it.

    Must be called on every rank, after the process group exists and before the optimizer is built
    (FSDP2 replaces the sharded parameters). The replicated parameters (adapters, heads: the randomly
    initialised part) are broadcast from rank 0, as DDP does; each rank keeps its own slice of the
    frozen base, which every rank loads identically.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    check_supported(callbacks)
    world = dist.get_world_size()
    replicated = replicated_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if total and trainable / total > REPLICATED_WARNING_SHARE and dist.get_rank() == 0:
        warnings.warn(f"trainer.strategy=fsdp shards only frozen parameters, and {100 * trainable / total:.0f}% of this "
                      "model is trainable: it stays replicated on every rank (as with trainer=ddp).", stacklevel=2)
    ignored = {p for _, p in replicated}
    mesh = init_device_mesh(device.type, (world,))
    blocks = block_class_names(model)
    # Children before parents (FSDP2's rule); the root last, holding what no block holds.
    for module in reversed(list(model.modules())):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    with torch.no_grad():
        for _, p in replicated:  # fully_shard leaves ignored parameters where they are
            if p.device != device:
                p.data = p.data.to(device)
        _broadcast([p.data for _, p in replicated])
    model._lrzoo_replicated_gradients = ReplicatedGradients([p for _, p in replicated], world)
    return model


def _broadcast(tensors: Sequence[torch.Tensor]) -> None:
    """Give every rank rank 0's values (one flat broadcast per dtype)."""
    buckets: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        buckets.setdefault(tensor.dtype, []).append(tensor)
    for group in buckets.values():
        flat = torch._utils._flatten_dense_tensors(group)
        dist.broadcast(flat, src=0)
        for tensor, value in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
            tensor.copy_(value)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered_root(model: nn.Module) -> Iterator[None]:
    """Keep the root unit's weights (embeddings, final norm, LM head) unsharded inside the block.

    ``generate`` calls the inner transformers model directly, past the hooks FSDP put on the root
    (the ``PeftModel``); the blocks still gather their own weights through their hooks.
    """
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def full_state_dict(model: nn.Module, *, keep: bool = True) -> dict[str, torch.Tensor]:
    """The model's state dict with every sharded tensor gathered, on the CPU (a collective: every rank
    calls it). ``keep=False`` (ranks that do not write) returns an empty dict."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, value in model.state_dict().items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if keep:
            out[key] = value.detach().cpu()
    return out
