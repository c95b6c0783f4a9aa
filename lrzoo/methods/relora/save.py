"""ReLoRA's save format: the full merged model, not an adapter.

After a reset the base weights are no longer the ones the model was loaded with, and the non-adapter
parameters are trained from the first step, so a LoRA adapter file (which holds only the current cycle's A, B
and any task head) cannot reproduce the model. ``post_wrap`` therefore replaces the wrapped model's
``save_pretrained`` with :func:`save_full_model`: it writes the merged model in Hugging Face format (loads with
``AutoModelFor*.from_pretrained(dir)``, no lrzoo or PEFT needed) plus ``relora.json`` describing the run, and
leaves the live model untouched so training can go on. :func:`lrzoo.export_lora` refuses a ReLoRA model once a
reset happened or a non-adapter parameter changed (:func:`lora_export_problem`, the spec's ``export_problem``
hook); :func:`lrzoo.load` pointed at such a folder says how to load it (:func:`full_model_error`, the spec's
``foreign_folder`` hook).

What it remembers about the wrapped model (the fingerprints of the non-adapter values at wrap, the adapter's
name, the training options for ``relora.json``) is the method's ``method_state`` in the model's
:class:`lrzoo.registry.TrainingRecord`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
import torch.nn as nn
from peft import PeftModel
from transformers import PreTrainedModel

from ...peft_bridge import PEFT_MODEL_PREFIX, BaseTunerLayer, LoraLayer, is_modules_to_save, transpose
from ...registry import record_of
from .layer import resets_done

#: Written next to the merged weights by :func:`save_full_model`; its presence marks the format.
RELORA_ARTIFACT = "relora.json"
RELORA_FORMAT = "lrzoo-relora-full-model"
#: PEFT task type -> the transformers auto class that loads the saved model.
_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}


def _outside_the_adapter(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters a LORA adapter file does not hold: everything but the LoRA tensors, the task-head
    copies PEFT saves (``modules_to_save``) and their frozen originals."""
    skip = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                container = getattr(module, attr, None)
                if isinstance(container, nn.Module):
                    skip.update(id(p) for p in container.parameters())
        elif is_modules_to_save(module):
            skip.update(id(p) for p in module.parameters())
    return [(name, p) for name, p in model.named_parameters() if id(p) not in skip]


def _fingerprint(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], int]:
    """dtype, shape and the integer sum of the tensor's bit patterns.

    Integer addition is exact and order-free, so the value is the same on any device and for any
    reduction order, while any update of any element changes it (barring an exact cancellation).
    """
    if tensor.is_meta:
        return str(tensor.dtype), tuple(tensor.shape), 0
    flat = tensor.detach().contiguous().reshape(-1)
    view = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int32}[flat.element_size()])
    total = sum(int(chunk.to(torch.int64).sum()) for chunk in view.split(1 << 22))
    return str(tensor.dtype), tuple(tensor.shape), total


def record_wrapped_values(peft_model: PeftModel, adapter_name: str) -> None:
    """Remember, in the model's record, what :func:`lora_export_problem` and :func:`save_full_model` compare with."""
    record = record_of(peft_model)
    options = dict(record.options)  # wrap's options, read once: relora.json reports them
    record.method_state.update({
        "adapter_name": adapter_name,
        "wrapped_values": {name: _fingerprint(p) for name, p in _outside_the_adapter(peft_model)},
        "training": options,
    })


def changed_since_wrap(peft_model: PeftModel) -> list[str]:
    """Names of the non-adapter parameters whose values differ from those at ``lrzoo.wrap``."""
    recorded = record_of(peft_model).method_state["wrapped_values"]
    now = dict(_outside_the_adapter(peft_model))
    return sorted(name for name in set(recorded) | set(now)
                  if name not in now or name not in recorded or _fingerprint(now[name]) != recorded[name])


def lora_export_problem(peft_model: nn.Module, adapter_name: str) -> Optional[str]:
    """Why ``adapter_name`` of this ReLoRA model cannot be written as a LoRA adapter, or ``None``.

    A LoRA file is applied to the *original* base: it cannot carry the cycles merged into W by
    resets, nor the trained embeddings/norms/biases/lm_head ReLoRA updates in full.
    """
    info = record_of(peft_model).method_state
    if info.get("adapter_name") != adapter_name or "wrapped_values" not in info:
        return None
    reasons = []
    resets = resets_done(peft_model, adapter_name)
    if resets:
        reasons.append(f"{resets} reset(s) merged earlier cycles into the base weights")
    changed = changed_since_wrap(peft_model)
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        reasons.append(f"{len(changed)} non-adapter parameter(s) changed since lrzoo.wrap ({shown})")
    if not reasons:
        return None
    return (f"This ReLoRA model cannot be written as a LoRA adapter: {'; '.join(reasons)}; a LoRA file holds "
            "only the current cycle's A and B (and task heads), applied to the original base. Save the full model "
            f"instead: peft_model.save_pretrained(dir) writes it in Hugging Face format with {RELORA_ARTIFACT}; "
            f"load it with {_load_hint(peft_model).replace(chr(39) + '<dir>' + chr(39), 'dir')}.")


def _load_hint(peft_model: PeftModel) -> str:
    """How to load what :func:`save_full_model` writes for this model, with ``<dir>`` for the folder."""
    base = peft_model.get_base_model()
    if not isinstance(base, PreTrainedModel):
        return f"{type(base).__name__}().load_state_dict(safetensors.torch.load_file('<dir>/model.safetensors'))"
    task = getattr(peft_model.peft_config[peft_model.active_adapter], "task_type", None)
    # No task type (e.g. audio classifiers): the model's own class, which the saved config names too.
    loader = _AUTO_CLASSES.get(str(getattr(task, "value", task)), type(base).__name__)
    return f"transformers.{loader}.from_pretrained('<dir>')"


def merged_state_dict(peft_model: PeftModel, adapter_name: str = "default",
                      state_dict: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The state dict of the plain model equal to the live ReLoRA model, without changing it.

    Adapted weights are ``W + s·B A`` (W already holds every earlier cycle); every other tensor is
    taken as it is (trained or not), task heads from PEFT's trained copy; keys are those of the
    unwrapped transformers model. ``state_dict``: the PeftModel's full state dict to read instead of
    the live modules (FSDP gathers one; the HF Trainer may pass one).
    """
    base = peft_model.get_base_model()
    if state_dict is None:
        source = base.state_dict()
    else:
        prefix = PEFT_MODEL_PREFIX
        source = {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state_dict.items()}
    tuners = {name: m for name, m in base.named_modules() if isinstance(m, BaseTunerLayer)}
    heads = {name for name, m in base.named_modules() if is_modules_to_save(m)}
    merged: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        parts = key.split(".")
        owner = next((i for i in range(1, len(parts)) if ".".join(parts[:i]) in tuners or ".".join(parts[:i]) in heads),
                     None)
        if owner is None:
            merged[key] = value
            continue
        path, rest = ".".join(parts[:owner]), parts[owner:]
        if path in heads:
            if rest[0] == "original_module":
                continue  # the frozen pre-training head; the trained copy below replaces it
            if rest[:2] != ["modules_to_save", adapter_name]:
                raise ValueError(f"Cannot write the full ReLoRA model: {key!r} belongs to another adapter. "
                                 "Save a model that holds only the ReLoRA adapter.")
            merged[".".join([path, *rest[2:]])] = value
            continue
        layer = tuners[path]
        if rest[0] == "base_layer":
            plain = ".".join([path, *rest[1:]])
            if rest[1:] == ["weight"] and adapter_name not in layer.merged_adapters:
                merged[plain] = _merged_weight(layer, path, value, source, adapter_name)
            else:
                merged[plain] = value
        elif rest not in (["lora_A", adapter_name, "weight"], ["lora_B", adapter_name, "weight"]):
            # A LoRA bias, a DoRA magnitude, another adapter's tensors: not part of W + s·B A, so the
            # written model would silently lack them.
            raise ValueError(f"Cannot write the full ReLoRA model: {key!r} is not part of W + s·B A. "
                             "Save a model that holds only a plain ReLoRA adapter.")
    return merged


def _merged_weight(layer: BaseTunerLayer, path: str, weight: torch.Tensor, source: dict[str, torch.Tensor],
                   adapter_name: str) -> torch.Tensor:
    if not isinstance(layer, LoraLayer) or adapter_name in getattr(layer, "lora_variant", {}):
        raise ValueError(f"Cannot write the full ReLoRA model: {path!r} is not a plain LoRA layer.")
    A = source[f"{path}.lora_A.{adapter_name}.weight"].float()
    B = source[f"{path}.lora_B.{adapter_name}.weight"].float()
    delta = transpose(B @ A, layer.fan_in_fan_out) * layer.scaling[adapter_name]
    return (weight.float() + delta.to(weight.device)).to(weight.dtype)


def _config_json(value: Any) -> Any:
    return sorted(value) if isinstance(value, (set, frozenset)) else value


def save_full_model(peft_model: PeftModel, save_directory: str, safe_serialization: bool = True,
                    selected_adapters: Optional[list[str]] = None, save_embedding_layers: Any = "auto",
                    is_main_process: bool = True, path_initial_model_for_weight_conversion: Optional[str] = None,
                    state_dict: Optional[dict[str, torch.Tensor]] = None, **kwargs: Any) -> None:
    """``save_pretrained`` of a ReLoRA model: the merged full model plus ``relora.json``.

    Same signature as ``PeftModel.save_pretrained`` so the HF Trainer and lrzoo's trainer call it
    unchanged; ``state_dict`` (the PeftModel's own, e.g. gathered by FSDP) is used when given, other
    keywords go to the base model's ``save_pretrained``. The live model is not modified.
    ``safe_serialization`` and ``save_embedding_layers`` are accepted and moot: the model is written
    as safetensors, embeddings included.
    """
    info = record_of(peft_model).method_state
    adapter = info.get("adapter_name", "default")
    if set(peft_model.peft_config) != {adapter}:
        raise ValueError(f"A ReLoRA model is saved as one full model; this one holds adapters "
                         f"{sorted(peft_model.peft_config)}. Delete the others first (peft_model.delete_adapter).")
    if selected_adapters not in (None, [adapter]):
        raise ValueError(f"selected_adapters={selected_adapters}: a ReLoRA model saves its single adapter, merged.")
    if path_initial_model_for_weight_conversion is not None:
        raise ValueError("path_initial_model_for_weight_conversion does not apply to ReLoRA's full-model save.")
    if not is_main_process:
        return
    # transformers loads a folder holding adapter_config.json as that adapter, not as the model written
    # beside it; the file is not ours to delete, so refuse.
    if os.path.isfile(os.path.join(save_directory, "adapter_config.json")):
        raise ValueError(f"{str(save_directory)!r} holds an adapter (adapter_config.json), which transformers would "
                         "load instead of the full ReLoRA model; save into another folder or remove it.")
    merged = merged_state_dict(peft_model, adapter, state_dict)
    base = peft_model.get_base_model()
    os.makedirs(save_directory, exist_ok=True)
    if isinstance(base, PreTrainedModel):
        base.save_pretrained(save_directory, state_dict=merged, **kwargs)
    else:  # a plain nn.Module: its state dict, loadable with load_state_dict
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous().clone() for k, v in merged.items()},
                  os.path.join(save_directory, "model.safetensors"), metadata={"format": "pt"})
    config = peft_model.peft_config[adapter]
    training = dict(info.get("training", {}))
    record = {
        "format": RELORA_FORMAT,
        "format_version": 1,
        "method": "relora",
        "contents": "full model: W_0 + every merged cycle + the current cycle's s·B·A in each adapted weight; "
                    "every other parameter as trained",
        "load_with": _load_hint(peft_model),
        "resets": resets_done(peft_model, adapter),
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "target_modules": _config_json(config.target_modules),
        "training": training,
        "model_class": type(base).__name__,
        "base_model_name_or_path": config.base_model_name_or_path,
    }
    with open(os.path.join(save_directory, RELORA_ARTIFACT), "w") as handle:
        json.dump(record, handle, indent=2)


def full_model_error(path: str) -> Optional[str]:
    """The message for an adapter loader pointed at a ReLoRA full-model folder, or ``None``."""
    artifact = os.path.join(path, RELORA_ARTIFACT)
    if not os.path.isfile(artifact):
        return None
    with open(artifact) as handle:
        load_with = json.load(handle).get("load_with", "transformers.AutoModel.from_pretrained('<dir>')")
    return (f"{str(path)!r} holds a full ReLoRA model ({RELORA_ARTIFACT}), not an adapter: load it without lrzoo "
            f"or PEFT, with {load_with.replace('<dir>', str(path))}.")
