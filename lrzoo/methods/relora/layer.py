"""ReLoRA's layer side: plain PEFT ``LORA`` layers, merged into W and re-initialised at each reset
(:func:`merge_and_reinit`), the reset count they carry, and every non-adapter parameter trained in full
(:func:`train_non_adapter_parameters`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ...peft_bridge import LoraLayer

#: ``wrap`` options of the ReLoRA procedure (paper code defaults; see adapters/relora.yaml).
RELORA_TRAINING_DEFAULTS = {
    "relora_steps": 5000,  # T, the reset interval (paper: 5k for the 250M/1.3B runs)
    "optimizer_pruning": "reset",  # reset | random | magnitude
    "optimizer_pruning_ratio": 0.999,  # the code implements "reset" as random pruning at 0.999
    "restart_warmup_steps": 100,
    "min_lr_ratio": 0.1,
}


def lora_layers(model: nn.Module, adapter_name: str = "default") -> list[LoraLayer]:
    """The LoRA layers of ``model`` that hold ``adapter_name``."""
    return [m for m in model.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]


@torch.no_grad()
def merge_and_reinit(model: nn.Module, adapter_name: str = "default") -> int:
    """``W ← W + s·B A`` in every LoRA layer, then A Kaiming-uniform(a=√5) and B = 0 again.

    The model's function is unchanged by the call (the update moves from B A into W). Returns the
    number of layers reset.
    """
    layers = lora_layers(model, adapter_name)
    for layer in layers:
        if layer.merged:
            raise RuntimeError("merge_and_reinit needs unmerged LoRA layers; call model.unmerge_adapter() first.")
        base = layer.get_base_layer()
        base.weight += layer.get_delta_weight(adapter_name).to(base.weight.dtype)
        layer.reset_lora_parameters(adapter_name, init_lora_weights=True)
        # Counted on the layer whose W absorbed the update, so the count travels with the weights
        # whatever object (PeftModel, base model, trainer) drove the reset.
        set_resets_done(layer, resets_done(layer, adapter_name) + 1, adapter_name)
    return len(layers)


def resets_done(model: nn.Module, adapter_name: str = "default") -> int:
    """How many merge-and-reinit resets the LoRA layers of ``model`` have absorbed."""
    layers = [model] if isinstance(model, LoraLayer) else lora_layers(model, adapter_name)
    return max((getattr(layer, "relora_resets", {}).get(adapter_name, 0) for layer in layers), default=0)


def set_resets_done(model: nn.Module, count: int, adapter_name: str = "default") -> None:
    """Set the reset count (also on resume: the trainer restores the merged weights themselves)."""
    for layer in [model] if isinstance(model, LoraLayer) else lora_layers(model, adapter_name):
        layer.relora_resets = {**getattr(layer, "relora_resets", {}), adapter_name: count}


def adapted_base_weights(model: nn.Module) -> set[int]:
    """``id`` of every frozen base weight under a LoRA layer (merged into, never trained directly)."""
    return {id(layer.get_base_layer().weight) for layer in model.modules() if isinstance(layer, LoraLayer)}


def train_non_adapter_parameters(model: nn.Module) -> int:
    """Make every parameter except the adapted base weights trainable; returns how many elements.

    The frozen originals PEFT keeps of ``modules_to_save`` heads stay frozen (their trained copy is used).
    """
    frozen = adapted_base_weights(model)
    count = 0
    for name, param in model.named_parameters():
        if ".original_module." in name:
            continue
        if id(param) not in frozen and not param.requires_grad:
            param.requires_grad_(True)
            count += param.numel()
    return count
