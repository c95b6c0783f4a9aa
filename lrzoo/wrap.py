"""``lrzoo.wrap``: one call from a Hugging Face model to a ``peft.PeftModel`` with any adapter."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch.nn as nn
from peft import PeftConfig, PeftModel, TaskType, get_peft_model
from transformers.pytorch_utils import Conv1D

from .registry import AdapterSpec, get_adapter
from .targets import LINEAR_TYPES, TargetSpec, default_targets, resolve_targets, weight_shape

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


def infer_task_type(model: nn.Module) -> Optional[TaskType]:
    name = type(model).__name__
    for suffix, task in _TASK_SUFFIXES.items():
        if name.endswith(suffix):
            return task
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "generate"):
        return TaskType.SEQ_2_SEQ_LM
    return None


def task_head_modules(model: nn.Module) -> list[str]:
    """Top-level modules with parameters outside the pretrained backbone: the task head.

    Reading the structure instead of guessing names catches heads PEFT's default list
    (``classifier``, ``score``) misses, e.g. DistilBERT's ``pre_classifier``; a head left out of
    ``modules_to_save`` is re-initialised at random on reload (peft#577, #876, #1070).
    """
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return [
        name
        for name, child in model.named_children()
        if child is not backbone and any(True for _ in child.parameters())
    ]


def wrap(
    model: nn.Module,
    method: str,
    r: int = 8,
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
        r: rank (its meaning per method is on the method's docs page).
        alpha: scale numerator (``s = alpha / r`` for most methods); ``None`` keeps the method's default.
        target_modules: module names (suffix match, each must match), a regex over full module
            paths, or ``None`` for the architecture's default (``q_proj``/``v_proj``, ``query``/``value``...).
        adapter_name: name of the adapter; wrapping a ``PeftModel`` again adds a second adapter.
        task_type: PEFT task type; ``"auto"`` infers it from the model class.
        modules_to_save: modules trained in full and saved with the adapter; ``"auto"`` picks the
            task head of classification/QA models.
        **kwargs: method-specific options (see ``adapters/<method>.yaml``), e.g. ``dropout``,
            ``loraplus_lr_ratio`` or ``use_rslora``.

    Returns:
        The ``PeftModel``. ``peft_model.lrzoo_training`` holds the method's training-procedure
        options (used by :func:`lrzoo.make_optimizer` and the trainer).
    """
    spec = get_adapter(method)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if task_type == "auto":
        task_type = infer_task_type(base)
    head = task_head_modules(base) if task_type in _HEAD_TASKS else []
    if modules_to_save == "auto":
        modules_to_save = head or None
    elif isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]

    supported = getattr(spec.layer_cls, "supported_layer_types", LINEAR_TYPES)
    requested = default_targets(base) if target_modules is None else target_modules
    targets = resolve_targets(base, requested, supported, exclude=modules_to_save or ())
    _check_rank(targets, r)

    config_kwargs = {**spec.defaults, **kwargs}
    training = {key: config_kwargs.pop(key, default) for key, default in spec.training_defaults.items()}
    if alpha is not None:
        config_kwargs["alpha"] = alpha
    config_kwargs = {spec.aliases.get(key, key): value for key, value in config_kwargs.items()}
    if spec.layer_cls is None and any(isinstance(m, Conv1D) for m in targets.values()):
        config_kwargs.setdefault("fan_in_fan_out", True)  # GPT-2 style Conv1D stores Wᵀ
    config = _build_config(spec, r=r, target_modules=requested, modules_to_save=modules_to_save,
                           task_type=task_type, **config_kwargs)

    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    peft_model.lrzoo_training = {"method": method, **training}
    if spec.post_wrap is not None:
        spec.post_wrap(peft_model, adapter_name)
    return peft_model


def _build_config(spec: AdapterSpec, **kwargs: Any) -> PeftConfig:
    try:
        return spec.build_config(**kwargs)
    except TypeError as error:  # an unknown keyword: name the method's options
        fields = getattr(spec.build_config, "__dataclass_fields__", None)
        known = f" Known options: {', '.join(sorted(fields))}." if fields else ""
        raise TypeError(f"lrzoo.wrap(..., {spec.name!r}): {error}.{known}") from error


def _check_rank(targets: dict[str, nn.Module], r: int) -> None:
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}.")
    too_small = {}
    for name, module in targets.items():
        if hasattr(module, "weight") and module.weight is not None and module.weight.dim() >= 2:
            limit = min(weight_shape(module))
            if r > limit:
                too_small[name] = limit
    if too_small:
        name, limit = next(iter(too_small.items()))
        raise ValueError(
            f"r={r} is larger than {len(too_small)} targeted layer(s) allow, e.g. {name} (rank at most {limit}). "
            f"Lower r to {min(too_small.values())} or less, or leave those layers out of target_modules."
        )
