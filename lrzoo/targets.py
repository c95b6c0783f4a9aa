"""Which modules an adapter replaces: per-architecture defaults and strict validation.

PEFT silently adapts whatever matches; "target modules not found" and partial matches across
architectures (``query`` vs ``q_proj`` vs ``c_attn``) are among its most reported confusions. lrzoo
resolves the targets before injection and refuses a request that is not matched in full.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Union

import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # public: in peft.utils.__all__
from transformers.pytorch_utils import Conv1D

#: model_type -> default target module names. PEFT's table (the LoRA paper's q/v choice) with
#: families PEFT does not list yet.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    "distilbert": ["q_lin", "v_lin"],
    "modernbert": ["Wqkv"],
    "qwen2_moe": ["q_proj", "v_proj"],
    "qwen3_moe": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "olmo": ["q_proj", "v_proj"],
    "olmo2": ["q_proj", "v_proj"],
    "smollm3": ["q_proj", "v_proj"],
    "granite": ["q_proj", "v_proj"],
    # Vision transformers (transformers 5 names their attention projections q_proj/k_proj/v_proj;
    # releases that still say query/value fall back via LEGACY_TARGET_MODULES).
    **{vision: ["q_proj", "v_proj"] for vision in ("vit", "deit", "beit", "dinov2", "swin", "vit_msn", "vit_mae")},
    "audio-spectrogram-transformer": ["q_proj", "v_proj"],
    # Speech encoders (audio classification) and Whisper.
    **{speech: ["q_proj", "v_proj"] for speech in ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "whisper")},
}

#: model_type -> the target names older transformers releases used, tried when the defaults above
#: match nothing in the model at hand.
LEGACY_TARGET_MODULES: dict[str, list[str]] = {
    legacy: ["query", "value"]
    for legacy in ("vit", "deit", "beit", "dinov2", "swin", "vit_msn", "vit_mae", "audio-spectrogram-transformer")
}

#: Layer types an adapter can replace unless the method says otherwise.
LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D)

TargetSpec = Union[str, Iterable[str], None]


def model_type_of(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def default_targets(model: nn.Module) -> list[str]:
    """The default target names for ``model``'s architecture; a clear error if there are none."""
    model_type = model_type_of(model)
    targets = DEFAULT_TARGET_MODULES.get(model_type)
    if targets is None:
        raise ValueError(
            f"lrzoo has no default target modules for model type {model_type!r}. Pass "
            f"target_modules=[...]; the linear layers of this model are named: "
            f"{', '.join(leaf_names(model, LINEAR_TYPES)) or '(none)'}."
        )
    legacy = LEGACY_TARGET_MODULES.get(model_type)
    if legacy is not None:
        names = set(leaf_names(model, LINEAR_TYPES))
        if not set(targets) <= names and set(legacy) <= names:
            return list(legacy)
    return list(targets)


def input_embedding_parameter_ids(model: nn.Module) -> Optional[set[int]]:
    """The ids of the trainable parameters of the input embeddings, ``get_input_embeddings()`` of the base model
    under any PEFT wrapper: the token embedding matrix (not position embeddings or a norm), its ``modules_to_save``
    copy, the tensors an adapter put on it. ``None``: the model has no ``get_input_embeddings``."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    try:
        embeddings = base.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(embeddings, nn.Module):
        return None
    return {id(param) for param in embeddings.parameters() if param.requires_grad}


def leaf_names(model: nn.Module, types: tuple[type, ...]) -> list[str]:
    """Distinct last name components of the modules of the given types (``query``, ``dense``...)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, types)})


def matches(key: str, target: str) -> bool:
    """PEFT's rule for a list entry: the full module path equals it or ends with ``.target``."""
    return key == target or key.endswith("." + target)


def resolve_targets(
    model: nn.Module,
    target_modules: TargetSpec,
    supported_types: tuple[type, ...] = LINEAR_TYPES,
    exclude: Iterable[str] = (),
) -> dict[str, nn.Module]:
    """Map a ``target_modules`` request to the modules it selects, or raise.

    Args:
        model: the base model (not yet wrapped).
        target_modules: ``None`` (architecture default), a list of names (each must match at least
            one module), or a regular expression matched against full module paths.
        supported_types: the layer types the method can adapt.
        exclude: module paths never to adapt (the trained task head, say).

    Returns:
        ``{module path: module}`` of the selected modules, in model order.
    """
    if target_modules is None:
        target_modules = default_targets(model)
    named = _candidate_modules(model, tuple(exclude))
    available = ", ".join(sorted({n.rsplit(".", 1)[-1] for n, m in named if isinstance(m, supported_types)})) or "(none)"

    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        selected = {name: m for name, m in named if pattern.fullmatch(name)}
        if not selected:
            raise ValueError(
                f"target_modules regex {target_modules!r} matches no module. "
                f"Adaptable layers in this model are named: {available}."
            )
    else:
        requested = list(dict.fromkeys(target_modules))
        selected, unmatched = {}, []
        for target in requested:
            hits = {name: m for name, m in named if matches(name, target)}
            if not hits:
                unmatched.append(target)
            selected.update(hits)
        if unmatched:
            what = "none" if len(unmatched) == len(requested) else "only part"
            raise ValueError(
                f"target_modules matched {what} of what was asked: {unmatched} match no module in "
                f"this {model_type_of(model) or type(model).__name__} model. Adaptable layers are "
                f"named: {available}. Fix target_modules (or pass None for the architecture default)."
            )
        selected = {name: m for name, m in named if name in selected}

    wrong_type = {name: type(m).__name__ for name, m in selected.items() if not isinstance(m, supported_types)}
    if wrong_type:
        sample = ", ".join(f"{n} ({t})" for n, t in list(wrong_type.items())[:5])
        raise ValueError(
            f"target_modules selects modules this adapter cannot replace: {sample}. Supported layer "
            f"types: {', '.join(t.__name__ for t in supported_types)}. Name the layers inside them instead "
            f"(adaptable layers are named: {available})."
        )
    return selected


def _candidate_modules(model: nn.Module, excluded: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` pairs a target can name; an already adapted layer stands for its base layer
    (so a second adapter can target it) and its internals are hidden."""
    candidates, hidden = [], []
    for name, module in model.named_modules():
        if not name or any(name == e or name.startswith(e + ".") for e in excluded + tuple(hidden)):
            continue
        if isinstance(module, BaseTunerLayer):
            hidden.append(name)
            module = module.get_base_layer()
        candidates.append((name, module))
    return candidates


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a linear-like layer: the logical shape, never the storage's.

    transformers' ``Conv1D`` stores ``(d_in, d_out)``; a bitsandbytes 4-bit layer stores packed bytes
    of another shape, so a linear layer is read from ``out_features``/``in_features``.
    """
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return d_out, d_in
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.weight.shape[0], module.weight[0].numel()


#: weight classes of bitsandbytes-quantized layers (their ``weight`` is packed storage, not W).
QUANTIZED_WEIGHT_CLASSES = ("Params4bit", "Int8Params")


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer`` is a bitsandbytes-quantized linear layer (4-bit nf4/fp4 or 8-bit)."""
    return type(getattr(layer, "weight", None)).__name__ in QUANTIZED_WEIGHT_CLASSES


def quantization_of(layer: nn.Module) -> Optional[str]:
    """``"nf4"``, ``"fp4"``, ``"int8"`` for a bitsandbytes layer, ``None`` for a full-precision one."""
    if not is_quantized(layer):
        return None
    if type(layer.weight).__name__ == "Int8Params":
        return "int8"
    return getattr(layer.weight, "quant_type", "4bit")
