"""``lrzoo.wrap``: one call from a Hugging Face model to a ``peft.PeftModel`` with any adapter."""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Union

import torch.nn as nn
from peft import PeftConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .peft_bridge import keep_quantized_layout, refuse_repacked_base
from .registry import AdapterSpec, adapter_defaults, get_adapter, ignored_options, record_training_options
from .targets import LINEAR_TYPES, TargetSpec, default_targets, is_quantized, resolve_targets, weight_shape

#: model class-name suffix -> PEFT task type. The task type picks PEFT's model class, which
#: handles labels, generation and (for heads) saving the head with the adapter.
_TASK_SUFFIXES = {
    "ForSequenceClassification": TaskType.SEQ_CLS,
    "ForTokenClassification": TaskType.TOKEN_CLS,
    "ForQuestionAnswering": TaskType.QUESTION_ANS,
    "ForCausalLM": TaskType.CAUSAL_LM,
}
#: Tasks whose output head is created fresh for fine-tuning, so it must be trained and saved.
_HEAD_TASKS = (TaskType.SEQ_CLS, TaskType.TOKEN_CLS, TaskType.QUESTION_ANS)
#: Model class-name suffixes of every transformers task family with a freshly initialised head, text or
#: not. PEFT has task types only for the text ones; the others keep ``task_type=None`` (the plain
#: ``PeftModel``, as PEFT's image-classification guide does) but their head is trained and saved all the same.
_HEAD_SUFFIXES = (
    "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice",
    "ForImageClassification", "ForAudioClassification", "ForAudioFrameClassification", "ForVideoClassification",
)


def infer_task_type(model: nn.Module) -> Optional[TaskType]:
    """PEFT's task type for ``model`` from its class name, ``None`` where PEFT has no task class for it.

    PEFT's classification/QA classes call the model with ``input_ids=...``; a model fed something
    else (``pixel_values``, ``input_values``, ``input_features``: Wav2Vec2ForSequenceClassification,
    say) gets ``None``, the plain ``PeftModel`` that passes its inputs through unchanged.
    """
    name = type(model).__name__
    for suffix, task in _TASK_SUFFIXES.items():
        if name.endswith(suffix):
            if task in _HEAD_TASKS and getattr(model, "main_input_name", "input_ids") != "input_ids":
                return None
            return task
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "generate"):
        return TaskType.SEQ_2_SEQ_LM
    return None


def has_task_head(model: nn.Module) -> bool:
    """Whether ``model`` is a task model whose head is created fresh (classification, QA, multiple choice)."""
    return type(model).__name__.endswith(_HEAD_SUFFIXES)


def task_head_modules(model: nn.Module) -> list[str]:
    """Top-level modules with parameters outside the pretrained backbone: the task head.

    Reading the structure instead of guessing names catches heads PEFT's default list
    (``classifier``, ``score``) misses, e.g. DistilBERT's ``pre_classifier`` or the ``projector`` of
    the audio classifiers; a head left out of ``modules_to_save`` is re-initialised at random on
    reload (peft#577, #876, #1070). The backbone is the ``base_model_prefix`` child or any child
    that is itself a pretrained model (WhisperForAudioClassification's ``encoder``).
    """
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return [
        name
        for name, child in model.named_children()
        if child is not backbone and not isinstance(child, PreTrainedModel) and any(True for _ in child.parameters())
    ]


def wrap(
    model: nn.Module,
    method: str,
    r: Optional[int] = None,
    alpha: Optional[float] = None,
    target_modules: TargetSpec = None,
    *,
    adapter_name: str = "default",
    task_type: Union[TaskType, str, None] = "auto",
    modules_to_save: Union[list[str], str, None] = "auto",
    **kwargs: Any,
) -> PeftModel:
    """Wrap ``model`` with adapter ``method`` and return a ``peft.PeftModel``.

    Args:
        model: a transformers model (or any ``nn.Module``; pass ``target_modules`` then).
        method: a name from :func:`lrzoo.list_adapters`, e.g. ``"lora"``, ``"dora"``, ``"lora_xs"``.
        r: rank (its meaning per method is on the method's docs page), a positive integer (numpy
            integers and integral floats such as ``8.0`` are accepted; ``True``, ``1.5``, ``"8"`` are not).
            ``None``: the method's default.
        alpha: scale numerator (``s = alpha / r`` for most methods), a positive number; ``None``: the
            method's default.
        target_modules: module names (suffix match, each must match), a regex over full module
            paths, or ``None`` for the architecture's default (``q_proj``/``v_proj``, ``query``/``value``...).
        adapter_name: name of the adapter; wrapping a ``PeftModel`` again adds a second adapter.
        task_type: PEFT task type; ``"auto"`` infers it from the model class (``None`` for image and
            audio models, for which PEFT has no task type).
        modules_to_save: modules trained in full and saved with the adapter; ``"auto"`` picks the
            task head of classification/QA/multiple-choice models, text, image or audio.
        **kwargs: method-specific options (see ``adapters/<method>.yaml``), e.g. ``dropout``,
            ``loraplus_lr_ratio`` or ``use_rslora``.

    Defaults: every option not given (``r`` and ``alpha`` included) takes the value in the method's
    ``adapters/<method>.yaml``, the file the Hydra recipes load as ``adapter=<method>``, so
    ``wrap(model, "relora")`` and ``lrzoo-train adapter=relora`` build the same adapter (r=128, α=32,
    dropout 0.1 there). Each key is a default on its own: ``wrap(model, "randlora", r=8)`` keeps the file's
    α=64, as ``adapter=randlora adapter.r=8`` does; pass ``alpha`` too to keep a ratio. Explicit values
    always win. :func:`lrzoo.adapter_defaults` shows a method's defaults.

    Raises:
        ValueError: a rank or alpha that is not a positive number (alpha = 0 would train nothing), a
            rank larger than a targeted layer allows, targets that match nothing or only part,
            base weights on the meta device, or a 4-bit base that bitsandbytes repacked for its CPU
            inference kernel (an eval-mode forward before ``wrap``; reload it), or an ``alpha`` for a
            method without a scale (SALT, SVFit), which would change nothing.
        TypeError: integer/quantized base weights, or an option the method does not have.

    Returns:
        The ``PeftModel``. Its :class:`lrzoo.registry.TrainingRecord` (``peft_model.lrzoo_record``, read with
        :func:`lrzoo.registry.record_of`) holds the method and its training-procedure options: the trainer reads
        them once to build the run's procedure (:func:`lrzoo.train.procedures.procedure_for`), and
        :func:`lrzoo.make_optimizer` builds the method's optimizer (LoRA+'s groups, LoRA-Pro's) from them.
    """
    spec = get_adapter(method)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    defaults = adapter_defaults(spec.name)
    given = dict(kwargs)
    if r is not None:
        given["r"] = r
    if alpha is not None:
        given["alpha"] = alpha
    ignored = [key for key in ignored_options(spec.name) if given.get(key) is not None]
    if ignored:  # accepted and ignored, it would only mislead (and split run hashes): say so
        raise ValueError(f"{spec.name} has no scale, so {', '.join(f'{k}={given[k]!r}' for k in ignored)} would change "
                         f"nothing: leave {' and '.join(ignored)} out (docs/adapters/{spec.name}.md).")
    options = {**_canonical(spec, defaults), **_canonical(spec, given)}
    rank_source = None if "r" in given else f"the {spec.name!r} default, from adapters/{spec.name}.yaml"
    r = _as_rank(options.pop("r", 8), spec.name, rank_source)  # 8: PEFT's default, for methods without one
    alpha_key = spec.aliases.get("alpha", "alpha")
    if options.get(alpha_key) is not None:
        options[alpha_key] = _as_alpha(options[alpha_key], spec.name, defaults.get("alpha"))
    if target_modules is None:
        target_modules = options.pop("target_modules", None)

    if task_type == "auto":
        task_type = infer_task_type(base)
    head = task_head_modules(base) if task_type in _HEAD_TASKS or has_task_head(base) else []
    if modules_to_save == "auto":
        modules_to_save = head or None
    elif isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]

    supported = getattr(spec.layer_cls, "supported_layer_types", LINEAR_TYPES)
    requested = default_targets(base) if target_modules is None else target_modules
    targets = resolve_targets(base, requested, supported, exclude=modules_to_save or ())
    _check_base_weights(base, targets, modules_to_save or (), spec.name)
    refuse_repacked_base(base, f"lrzoo.wrap(..., {spec.name!r})")  # bnb's CPU repacking: nothing would train
    _check_quantized_base(spec, base, targets)
    _check_rank(targets, r, rank_source)

    config_kwargs = options
    training = {key: config_kwargs.pop(key, default) for key, default in spec.training_defaults.items()}
    if spec.layer_cls is None and all(isinstance(m, Conv1D) for m in targets.values()):
        # GPT-2 style Conv1D stores Wᵀ. The flag is per layer in lrzoo's layers (and PEFT's default
        # dispatch fixes it per layer too); setting it when every target is Conv1D only spares stock
        # PEFT its "Setting fan_in_fan_out to True" warning when it loads the checkpoint.
        config_kwargs.setdefault("fan_in_fan_out", True)
    config = _build_config(spec, r=r, target_modules=requested, modules_to_save=modules_to_save,
                           task_type=task_type, **config_kwargs)

    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    record_training_options(peft_model, {"method": method, **training})
    _match_training_mode(peft_model)
    keep_quantized_layout(peft_model)  # bnb's CPU repacking would make W unreadable (peft_bridge)
    if spec.post_wrap is not None:
        spec.post_wrap(peft_model, adapter_name)
    return peft_model


def _match_training_mode(peft_model: PeftModel) -> None:
    """Give every adapted layer its base layer's train/eval mode.

    PEFT creates the adapter's modules (its dropout above all) in training mode whatever mode the
    model is in, so a model wrapped after ``.eval()`` (``from_pretrained`` returns one) would apply
    adapter dropout at inference. The model's own mode holds until ``.train()``/``.eval()``.
    """
    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            module.train(module.get_base_layer().training)


def _build_config(spec: AdapterSpec, **kwargs: Any) -> PeftConfig:
    try:
        return spec.build_config(**kwargs)
    except TypeError as error:  # an unknown keyword: name the method's options
        fields = getattr(spec.build_config, "__dataclass_fields__", None)
        known = f" Known options: {', '.join(sorted(fields))}." if fields else ""
        raise TypeError(f"lrzoo.wrap(..., {spec.name!r}): {error}.{known}") from error


def _canonical(spec: AdapterSpec, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``wrap``'s names mapped to the config's (``alpha`` -> ``lora_alpha``...), so a
    default under one name and a user value under the other meet in one key (the user's wins)."""
    return {spec.aliases.get(key, key): value for key, value in options.items()}


def _as_rank(r: Any, method: str, source: Optional[str] = None) -> int:
    """``r`` as a Python int, or lrzoo's error (not a torch/PEFT one deep inside the layer)."""
    integral = isinstance(r, numbers.Integral) or (
        isinstance(r, numbers.Real) and math.isfinite(r) and float(r).is_integer()
    )
    if isinstance(r, bool) or not integral:
        raise ValueError(
            f"lrzoo.wrap(..., {method!r}): r must be a positive integer (the rank), got {r!r} "
            f"({type(r).__name__}). Pass e.g. r=8."
        )
    if r <= 0:
        raise ValueError(f"lrzoo.wrap(..., {method!r}): r must be a positive integer (the rank), got {r!r}.")
    return int(r)


def _as_alpha(alpha: Any, method: str, default: Any) -> Union[int, float]:
    """A positive, finite ``alpha`` as a Python number; otherwise lrzoo's error with the reason."""
    hint = f" Pass a positive alpha, or leave it out for the method's default ({default!r})."
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"lrzoo.wrap(..., {method!r}): alpha must be a positive number, got {alpha!r}.{hint}")
    if alpha <= 0:
        raise ValueError(
            f"lrzoo.wrap(..., {method!r}): alpha must be > 0, got {alpha!r}. alpha scales the update "
            f"(s = alpha/r for most methods): alpha = 0 makes ΔW and the gradients of the trained "
            f"tensors zero, so nothing would train, and a negative alpha only flips the update's sign.{hint}"
        )
    return int(alpha) if isinstance(alpha, numbers.Integral) else float(alpha)


def _check_base_weights(model: nn.Module, targets: dict[str, nn.Module], head: Any, method: str) -> None:
    """Refuse base weights an adapter cannot be built on: meta tensors (no values) and integer ones."""
    tensors = [(f"{name}.weight", getattr(module, "weight", None)) for name, module in targets.items()]
    tensors += [
        (name, param) for name, param in model.named_parameters()
        if any(f".{h}." in f".{name}" for h in head)  # a module_to_save's name matches whole path components
    ]
    meta = [name for name, tensor in tensors if tensor is not None and tensor.is_meta]
    if meta:
        raise ValueError(
            f"lrzoo.wrap(..., {method!r}): {len(meta)} targeted or trained tensor(s) are on the meta device "
            f"(shapes without values), e.g. {meta[0]}, so the adapter has nothing to start from. Materialise "
            f"the model first: load it with from_pretrained without device_map='meta', init_empty_weights or "
            f"disk/CPU offload, or call model.to_empty(device=...) and load its weights."
        )
    quantized = {f"{name}.weight" for name, module in targets.items() if is_quantized(module)}
    integer = [(name, tensor.dtype) for name, tensor in tensors
               if tensor is not None and not tensor.dtype.is_floating_point and name not in quantized]
    if integer:
        name, dtype = integer[0]
        raise TypeError(
            f"lrzoo.wrap(..., {method!r}): {len(integer)} targeted layer(s) have integer weights, e.g. {name} "
            f"({dtype}) that are not a bitsandbytes quantization; lrzoo adapters need a floating-point or a "
            f"bitsandbytes (nf4/fp4/int8) base. Dequantize the model (load it without that quantization_config, "
            f"or model.dequantize()), or load it with transformers' BitsAndBytesConfig."
        )


def _check_quantized_base(spec: AdapterSpec, model: nn.Module, targets: dict[str, nn.Module]) -> None:
    """Refuse a quantized base the method cannot train on, with the method's reason and alternative."""
    refusal = spec.quantized_base_refusal
    if not refusal:
        return
    if isinstance(refusal, str):
        reason = refusal if any(is_quantized(m) for m in model.modules()) else ""
    else:
        reason = next((r for r in (refusal(m) for m in targets.values() if is_quantized(m)) if r), "")
    if reason:
        raise ValueError(f"lrzoo.wrap(..., {spec.name!r}) on a bitsandbytes-quantized model: {reason}")


def _check_rank(targets: dict[str, nn.Module], r: int, source: Optional[str] = None) -> None:
    too_small = {}
    for name, module in targets.items():
        if hasattr(module, "weight") and module.weight is not None and module.weight.dim() >= 2:
            limit = min(weight_shape(module))
            if r > limit:
                too_small[name] = limit
    if too_small:
        name, limit = next(iter(too_small.items()))
        what = f"r={r} ({source})" if source else f"r={r}"
        raise ValueError(
            f"{what} is larger than {len(too_small)} targeted layer(s) allow, e.g. {name} (rank at most {limit}). "
            f"Lower r to {min(too_small.values())} or less, or leave those layers out of target_modules."
        )
