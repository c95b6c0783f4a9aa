"""ReLoRA (Lialin et al., arXiv 2307.05695; Guitaricet/relora): high-rank training from low-rank cycles.

Within a cycle the layer is plain LoRA, ``W' = W + s·B A`` (s = α/r, A Kaiming-uniform(a=√5), B = 0).
Every T steps (``relora_steps``) the update is merged, ``W ← W + s·B A``, and A, B are re-initialised,
so after k cycles ``W_k = W_0 + Σ_c s·B_c A_c``: a sum of rank-r updates whose total rank grows.
Every parameter that is not an adapted weight matrix (embeddings, norms, biases, lm_head) is trained
in full, as in the paper's code.

This file holds the layer side (native PEFT ``LORA`` layers, :func:`merge_and_reinit`,
:func:`train_non_adapter_parameters`); the procedure (when to reset, optimizer-state pruning, the
jagged cosine schedule, an HF ``TrainerCallback``) is :mod:`lrzoo.train.relora`.

Checkpoints: ``save_pretrained`` writes the current cycle's LoRA (a native LORA adapter), which is only
meaningful on top of the merged base. The artifact of a ReLoRA run is the full model:
``peft_model.merge_and_unload().save_pretrained(...)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from ..registry import register_adapter
from .lora import LORA_ALIASES, build_lora_config

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
    return len(layers)


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


def _post_wrap(peft_model: PeftModel, adapter_name: str) -> None:
    train_non_adapter_parameters(peft_model)


register_adapter(
    "relora",
    build_config=build_lora_config,
    aliases=LORA_ALIASES,
    training_defaults=RELORA_TRAINING_DEFAULTS,
    post_wrap=_post_wrap,
    summary="ReLoRA: LoRA merged into W and re-initialised every T steps; all other parameters trained.",
)
