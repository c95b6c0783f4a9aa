"""PEFT below its documented API, in one module: private methods, class swaps, PeftModel's key prefix, and the
PEFT names lrzoo relies on (:data:`PEFT_SYMBOLS`, checked against the installed PEFT by tests/test_architecture.py).

It also hands the rest of lrzoo the PEFT classes and helpers that live in PEFT's submodules (``peft.tuners.lora``,
``peft.utils.other``...), so where PEFT keeps them is knowledge of this package alone.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn
from peft.tuners._buffer_dict import BufferDict
# PEFT layer classes lrzoo subclasses or recognises (LoRA/DoRA/RandLoRA keep PEFT's checkpoint format; lrzoo only
# changes their forward).
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.variants import DoraLinearVariant
from peft.tuners.randlora.layer import Linear as PeftRandLoraLinear
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils.other import ModulesToSaveWrapper, transpose  # transpose: W or Wᵀ for fan_in_fan_out layers


def is_modules_to_save(module: nn.Module) -> bool:
    """Whether ``module`` is PEFT's wrapper of a fully trained module (``modules_to_save``: a task head)."""
    return isinstance(module, ModulesToSaveWrapper)


#: How a PeftModel's state dict names the wrapped model's modules (``base_model.model.<path>``).
PEFT_MODEL_PREFIX = "base_model.model."

#: Every PEFT name lrzoo relies on, "module:attribute[.member]" -> the parameter names lrzoo calls it with
#: (``None``: a class or value that must exist). An upgrade of PEFT is checked against this table first.
PEFT_SYMBOLS: dict[str, Optional[tuple[str, ...]]] = {
    "peft.tuners.tuners_utils:BaseTuner.inject_adapter": ("self", "model", "adapter_name"),
    "peft.tuners.tuners_utils:BaseTuner._create_and_replace": (
        "self", "peft_config", "adapter_name", "target", "target_name", "parent", "current_key"),
    "peft.tuners.tuners_utils:BaseTuner._replace_module": ("self", "parent", "child_name", "new_module", "child"),
    "peft.tuners.tuners_utils:BaseTuner._prepare_adapter_config": ("peft_config", "model_config"),
    "peft.tuners.tuners_utils:BaseTuner._check_target_module_exists": ("peft_config", "key"),
    "peft.tuners.tuners_utils:BaseTuner.get_model_config": ("model",),
    "peft.tuners.tuners_utils:BaseTunerLayer._move_adapter_to_device_of_base_layer": ("self", "adapter_name"),
    "peft.tuners.lora.layer:LoraLayer._cache_store": ("self", "key", "value"),
    "peft.tuners.lora.layer:LoraLayer._cache_pop": ("self", "key"),
    "peft.tuners.tuners_utils:BaseTunerLayer.set_adapter": ("self", "adapter_names"),
    "peft.tuners.tuners_utils:check_adapters_to_merge": ("module", "adapter_names"),
    "peft.tuners._buffer_dict:BufferDict": None,
    "peft.tuners.lora.config:LoraConfig._register_custom_module": ("self", "mapping"),
    "peft.tuners.lora.layer:Linear": None,
    "peft.tuners.lora.layer:Linear.update_layer": ("self", "adapter_name", "r", "lora_alpha"),
    "peft.tuners.lora.dora:DoraLinearLayer.get_weight_norm": ("self", "weight", "lora_weight", "scaling"),
    "peft.tuners.lora.variants:DoraLinearVariant.merge_safe": ("module", "active_adapter", "orig_weight"),
    "peft.tuners.lora.variants:DoraLinearVariant.merge_unsafe": ("module", "active_adapter", "orig_weight"),
    "peft.tuners.lora.variants:DoraLinearVariant.unmerge": ("module", "active_adapter", "orig_weight"),
    "peft.tuners.randlora.layer:Linear": None,
    "peft.utils.other:transpose": ("weight", "fan_in_fan_out"),
    "peft.mapping:PEFT_TYPE_TO_CONFIG_MAPPING": None,
    "peft.mapping:PEFT_TYPE_TO_TUNER_MAPPING": None,
    "peft.mapping:PEFT_TYPE_TO_PREFIX_MAPPING": None,
    "peft.peft_model:PeftModel.load_adapter": ("self", "model_id", "adapter_name"),
    "peft.peft_model:PeftModel.from_pretrained": ("model", "model_id"),
    "peft.config:PeftConfigMixin.from_json_file": ("path_json_file",),
    "peft.config:PeftConfigMixin.save_pretrained": ("self", "save_directory"),
    "peft.utils.integrations:dequantize_module_weight": ("module",),
}


def peft_symbol_problems() -> list[str]:
    """What in :data:`PEFT_SYMBOLS` the installed PEFT lacks or calls differently (empty when all is well)."""
    import importlib
    import inspect

    problems = []
    for path, params in PEFT_SYMBOLS.items():
        module_name, _, attrs = path.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for attr in attrs.split("."):
                obj = inspect.getattr_static(obj, attr) if inspect.isclass(obj) else getattr(obj, attr)
        except (ImportError, AttributeError) as error:
            problems.append(f"{path}: missing in peft {_peft_version()} ({error})")
            continue
        if params is None:
            continue
        function = obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj
        function = getattr(function, "__wrapped__", function)  # lrzoo's own load-check wrappers
        names = tuple(inspect.signature(function).parameters)
        if names[:len(params)] != params and not set(params) <= set(names):
            problems.append(f"{path}: lrzoo calls it with {params}, peft {_peft_version()} has {names}")
    return problems


def _peft_version() -> str:
    import peft

    return peft.__version__


def frozen_tensor_dict(persistent: bool) -> nn.Module:
    """A per-adapter dict of frozen tensors held as buffers (PEFT's ``BufferDict``), saved when ``persistent``."""
    return BufferDict(persistent=persistent)


def init_tuner_layer_state(layer: nn.Module, adapter_name: str) -> None:
    """The state PEFT's ``BaseTunerLayer`` keeps in private attributes, for a layer lrzoo builds itself."""
    layer._disable_adapters = False
    layer._active_adapter = adapter_name


def move_adapter_to_base_device(layer: nn.Module, adapter_name: str) -> None:
    """Put ``adapter_name``'s tensors of ``layer`` on the device (and float dtype) of its base layer."""
    layer._move_adapter_to_device_of_base_layer(adapter_name)


def stash(layer: nn.Module, key: str, value) -> None:
    """Keep ``value`` on a LoRA ``layer`` under ``key`` until :func:`unstash` (PEFT's per-layer cache)."""
    layer._cache_store(key, value)


def unstash(layer: nn.Module, key: str):
    return layer._cache_pop(key)


def use_layer_classes(config, mapping: dict[type, type]) -> None:
    """Make a ``LoraConfig`` build ``mapping[type(target)]`` layers (not written to adapter_config.json)."""
    config._register_custom_module(mapping)


def swap_layer_class(module: nn.Module, cls: type) -> None:
    """Give ``module`` the forward of ``cls``, a subclass of its class that adds no state.

    A class swap, not a copy: parameters, buffers, hooks and the state dict are untouched (how lrzoo
    gives PEFT-built RandLoRA layers and DoRA magnitude modules its own forward).
    """
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} is not a subclass of {type(module).__name__}; refusing the class swap.")
    module.__class__ = cls


def default_targets_config(tuner: BaseTuner, config, model: nn.Module):
    """``config`` with ``target_modules=None`` resolved to the architecture's default, as injection will."""
    return tuner._prepare_adapter_config(config, tuner.get_model_config(model))


#: what the rest of lrzoo takes from here (through ``lrzoo.peft_bridge``), PEFT's classes included
__all__ = ["PEFT_MODEL_PREFIX", "PEFT_SYMBOLS", "BaseTunerLayer", "DoraLinearLayer", "DoraLinearVariant", "LoraLayer",
           "ModulesToSaveWrapper", "PeftLoraLinear", "PeftRandLoraLinear", "check_adapters_to_merge",
           "default_targets_config", "frozen_tensor_dict", "init_tuner_layer_state", "is_modules_to_save",
           "move_adapter_to_base_device", "peft_symbol_problems", "stash", "swap_layer_class", "transpose", "unstash",
           "use_layer_classes"]
