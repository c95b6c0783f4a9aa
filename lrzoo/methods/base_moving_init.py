"""Saving a LoRA whose init moved the base weight (PiSSA, OLoRA): as the plain LoRA adapter of its update against
the original weight. Its own module because every LoRA-family method needs it (``init_lora_weights="pissa"`` given
to any of them) and PiSSA's registration builds on :mod:`lrzoo.methods.lora`: one place that both import.

After training the model is ``W_res + s·B A``. An adapter file holding B and A is right only on ``W_res``, which a
user loading it does not have: PEFT writes ``init_lora_weights="pissa"`` into the config, so stock PEFT recomputes
the SVD of the base it is given at load (a different ``W_res`` on any other base, a randomized one for
``pissa_niter_K``), and its own conversion (``path_initial_model_for_weight_conversion``) drops the task head
(``modules_to_save``) from the converted file. So a model wrapped with such an init saves the update against the
*original* weight, ``ΔW = s(B A − B0 A0) = s·[B | −B0] [A ; A0]``: a plain LoRA adapter of rank 2r at the same
scale (``r`` and ``lora_alpha`` doubled; with rsLoRA, ``s = α/√r``, α times √2), ``init_lora_weights=True``, the
head kept. It loads on the untouched base with stock PEFT, merges and stacks like any LoRA adapter.
``export_lora`` uses the same factors (:func:`initial_factors`).
"""
from __future__ import annotations

import json
import math
import os
import types
from typing import Any, Optional

import torch
from peft import PeftModel
from safetensors.torch import load_file, save

from ..io import atomic_file
from ..peft_bridge import LoraLayer

BASE_MOVING_INITS = ("pissa", "olora")
#: the attribute of a LoRA layer that holds ``{adapter: (A0, B0)}``, the factors right after such an init
INITIAL_FACTORS = "lrzoo_initial_factors"


def moves_base(config: Any) -> bool:
    """Whether a ``LoraConfig``'s init replaces the base weight by a residual (PiSSA, OLoRA)."""
    return str(getattr(config, "init_lora_weights", "")).lower().startswith(BASE_MOVING_INITS)


def initial_factors(layer: Any, adapter: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(A0, B0)`` of ``layer``'s adapter right after a base-moving init, or ``None`` (any other init)."""
    return getattr(layer, INITIAL_FACTORS, {}).get(adapter)


def record_initial_factors(peft_model: PeftModel, adapter_name: str) -> None:
    """``post_wrap`` of the LoRA family: when ``adapter_name``'s init moved the base weight, keep each layer's
    initial (A0, B0) and make ``save_pretrained`` write the plain-LoRA conversion (module docstring)."""
    config = peft_model.peft_config[adapter_name]
    if not moves_base(config):
        return
    if config.use_dora:
        raise ValueError(f"init_lora_weights={config.init_lora_weights!r} with DoRA: the update against the original "
                         "weight is not a low-rank product then, so no adapter file could hold it; use PiSSA with "
                         "plain LoRA (adapter=pissa), or DoRA with the default init.")
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            store = module.__dict__.setdefault(INITIAL_FACTORS, {})  # not a buffer: no state-dict or device change
            store[adapter_name] = (module.lora_A[adapter_name].weight.detach().clone(),
                                   module.lora_B[adapter_name].weight.detach().clone())
    # Per instance, so only these models change and every caller (HF Trainer, lrzoo's trainer, user code) saves
    # the conversion; a bound method survives copy.deepcopy.
    peft_model.save_pretrained = types.MethodType(save_against_original_base, peft_model)


def save_against_original_base(self: PeftModel, save_directory: str, safe_serialization: bool = True,
                               selected_adapters: Optional[list[str]] = None, **kwargs: Any) -> None:
    """``PeftModel.save_pretrained``, then each base-moving adapter rewritten as the plain LoRA adapter of its
    update against the original weight (module docstring). Same signature, so every caller uses it unchanged."""
    if kwargs.get("path_initial_model_for_weight_conversion") is not None:
        raise ValueError("lrzoo already saves this adapter against the original base weight (a plain LoRA adapter "
                         "of rank 2r, the task head kept); drop path_initial_model_for_weight_conversion.")
    PeftModel.save_pretrained(self, save_directory, safe_serialization=safe_serialization,
                              selected_adapters=selected_adapters, **kwargs)
    if not kwargs.get("is_main_process", True):
        return
    for adapter in selected_adapters or list(self.peft_config):
        if moves_base(self.peft_config[adapter]):
            folder = save_directory if adapter == "default" else os.path.join(save_directory, adapter)
            _convert_folder(self, adapter, folder, safe_serialization)


def _convert_folder(model: PeftModel, adapter: str, folder: str, safe_serialization: bool) -> None:
    weights = os.path.join(folder, "adapter_model.safetensors" if safe_serialization else "adapter_model.bin")
    state = load_file(weights) if safe_serialization else torch.load(weights, weights_only=True)
    for name, module in model.named_modules():
        factors = initial_factors(module, adapter) if isinstance(module, LoraLayer) else None
        if factors is None:
            continue
        A0, B0 = factors
        key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        if key_a not in state or key_b not in state:
            raise KeyError(f"{weights} has no {key_a}/{key_b}; cannot rewrite {name} against the original weight.")
        A, B = state[key_a], state[key_b]
        state[key_a] = torch.cat([A, A0.to(A.device, A.dtype)], dim=0).contiguous()
        state[key_b] = torch.cat([B, -B0.to(B.device, B.dtype)], dim=1).contiguous()
    config_path = os.path.join(folder, "adapter_config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise ValueError("saving a PiSSA/OLoRA adapter with rsLoRA and rank_pattern/alpha_pattern is not supported: "
                         "the per-layer scale of the rank-2r conversion cannot be written; drop the patterns.")
    # rank 2r at the same scale: α/r -> 2α/2r; rsLoRA's α/√r -> √2·α/√(2r)
    alpha_factor = math.sqrt(2) if config.get("use_rslora") else 2
    config.update(r=2 * config["r"], lora_alpha=alpha_factor * config["lora_alpha"], init_lora_weights=True,
                  rank_pattern={k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
                  alpha_pattern={k: alpha_factor * v for k, v in (config.get("alpha_pattern") or {}).items()})
    with atomic_file(weights, "wb") as handle:
        if safe_serialization:
            handle.write(save(state, metadata={"format": "pt"}))
        else:
            torch.save(state, handle)
    with atomic_file(config_path) as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
