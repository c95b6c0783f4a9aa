"""How lrzoo-native methods become PEFT tuners.

PEFT 0.21's ``register_peft_method`` only accepts names already in its ``PeftType`` enum, so a
third-party method cannot use it. What does work (and is what PEFT itself does inside
``register_peft_method``) is to give the method its own ``str``-valued enum member as
``peft_type`` and insert it into PEFT's three lookup tables:

* ``PEFT_TYPE_TO_CONFIG_MAPPING``: ``adapter_config.json["peft_type"]`` -> config class,
* ``PEFT_TYPE_TO_TUNER_MAPPING``: config -> tuner (``BaseTuner``) class,
* ``PEFT_TYPE_TO_PREFIX_MAPPING``: tuner -> parameter-name prefix.

A ``str`` enum member hashes and compares like its value, so the JSON string ``"LRZOO_LORA_XS"``
finds the entry, and ``peft_type.value`` (used by transformers' ``load_adapter``) works. After
``import lrzoo``, ``PeftModel.from_pretrained`` and ``model.load_adapter`` therefore load lrzoo
checkpoints; without the import they fail with ``KeyError: 'LRZOO_...'`` (nothing can fix that from
the checkpoint side: use :func:`lrzoo.export_lora` for stock-PEFT consumers).
"""

from __future__ import annotations

import enum

import torch.nn as nn
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from .layer import weights_fingerprint
from .targets import DEFAULT_TARGET_MODULES

PEFT_TYPE_PREFIX = "LRZOO_"


def peft_type_for(name: str) -> enum.Enum:
    """The ``peft_type`` enum member of an lrzoo method, e.g. ``LRZOO_LORA_XS``.

    Each method gets a one-member ``str`` enum of its own, so third-party methods registered after
    import get one too (an ``Enum`` cannot grow after it is created).
    """
    value = PEFT_TYPE_PREFIX + name.upper()
    member_enum = enum.Enum(f"LrzooPeftType_{name}", {value: value}, type=str)
    return member_enum[value]


class LrzooTuner(BaseTuner):
    """The one PEFT tuner behind every lrzoo-native method.

    A method-specific subclass (made by :func:`register_native_method`) only sets ``prefix`` and
    ``tuner_layer_cls``; finding targets, replacing modules, merging and saving are shared.
    """

    prefix: str = "lrzoo_"
    tuner_layer_cls: type = BaseTunerLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _pre_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        self._check_base_weights(model, config)
        # Methods with frozen tensors shared across layers (RandLoRA, TeRA) build them here, on the
        # tuner, so they are saved once rather than per layer.
        self.tuner_layer_cls.prepare_shared(self, model, config, adapter_name)

    def _check_base_weights(self, model: nn.Module, config) -> None:
        """Fingerprint the targeted base weights at wrap time; refuse a different base at load time.

        Adapters whose frozen factors come from W (SVD, LU) or that rewrite W are only correct on
        the exact weights they were made from; loading them elsewhere would be silently wrong.
        """
        if config.target_modules is None:
            return
        named = [
            (name, module.weight)
            for name, module in model.named_modules()
            if isinstance(module, self.tuner_layer_cls.supported_layer_types)
            and self._check_target_module_exists(config, name)
        ]
        fingerprint = weights_fingerprint(named)
        if config.base_weights_hash is None:
            config.base_weights_hash = fingerprint
        elif config.base_weights_hash != fingerprint:
            raise ValueError(
                f"This {config.lrzoo_method} adapter was made for different base weights (fingerprint "
                f"{config.base_weights_hash}, this model's targeted weights give {fingerprint}). Load it on the "
                "base model it was trained on (same checkpoint, not merged), or re-train it for this one."
            )

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        if peft_config.target_modules is None:
            targets = self.target_module_mapping.get(model_config.get("model_type"))
            if targets is None:
                raise ValueError(
                    f"No default target modules for model type {model_config.get('model_type')!r}; "
                    "pass target_modules=[...] (the names of the nn.Linear modules to adapt)."
                )
            peft_config.target_modules = set(targets)
        return peft_config

    def _create_and_replace(
        self, config, adapter_name, target, target_name, parent, current_key, *, parameter_name=None
    ) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, tuner=self, key=current_key)
            return
        new_module = self.tuner_layer_cls(target, adapter_name, config, tuner=self, key=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


def register_native_method(name: str, config_cls: type, layer_cls: type) -> None:
    """Give an lrzoo method a ``peft_type`` and a tuner, and insert both into PEFT's tables."""
    peft_type = peft_type_for(name)
    prefix = layer_cls.prefix
    tuner_cls = type(
        f"{layer_cls.__name__.removesuffix('Layer')}Model",
        (LrzooTuner,),
        {"prefix": prefix, "tuner_layer_cls": layer_cls, "__module__": layer_cls.__module__},
    )
    config_cls.lrzoo_method = name
    config_cls.peft_type_member = peft_type
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
