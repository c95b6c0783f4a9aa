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
import os
import warnings

import torch.nn as nn
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import CONFIG_NAME

from ..fingerprint import fingerprint_as, weights_fingerprint
from ..targets import DEFAULT_TARGET_MODULES, is_quantized
from .load_checks import LOADING, PEFT_TYPE_PREFIX, UnverifiedBaseWeightsWarning, file_keys, unplaced_keys, \
    unplaced_tensors_error
from .quantized import dequantized_weight


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

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # Per-adapter preparation lives here, not in _pre_injection_hook: PEFT calls that hook only from
        # BaseTuner.__init__, while PeftModel.add_adapter (and so load_adapter of a second adapter) goes
        # straight to inject_adapter. Both paths pass here exactly once per adapter.
        config = self.peft_config[adapter_name]
        self._check_base_weights(model, config, adapter_name)
        # Methods with frozen tensors shared across layers (TeRA) build them here, on the tuner, so
        # they are saved once rather than per layer.
        self.tuner_layer_cls.prepare_shared(self, model, config, adapter_name)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception:  # PEFT rolls back peft_config; drop the shared tensors built above too
            for module in self.children():
                if isinstance(module, BufferDict) and adapter_name in module:
                    del module[adapter_name]
            self._undo_injection(model, adapter_name)
            raise

    def _undo_injection(self, model: nn.Module, adapter_name: str) -> None:
        """Leave ``model`` as it was before a failed injection (a zero LU pivot in the 5th layer, say).

        Layers injected before the failure would otherwise keep a half-added adapter (a second adapter)
        or stay replaced by adapter layers (the user's model, for a first one). A layer that holds only
        this adapter gives its base layer back to its parent; one that holds others drops this one.
        """
        for name, module in list(model.named_modules()):
            if not isinstance(module, self.tuner_layer_cls) or adapter_name not in module.adapter_config:
                continue
            if module.adapter_names == [adapter_name]:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
            else:
                module.discard_adapter(adapter_name)

    def targeted_base_layers(self, model: nn.Module, config) -> list[tuple[str, nn.Module]]:
        """``(name, base layer)`` of every layer ``config`` targets, in model order.

        Sees through adapter layers already in the model, so a second adapter fingerprints (and TeRA
        sizes its shared tensors for) the same weights, under the same names, as the first.
        """
        found, inside = [], None
        for name, module in model.named_modules():  # pre-order: a layer's children follow it
            if inside is not None and name.startswith(inside):
                continue
            if isinstance(module, BaseTunerLayer):
                inside, module = name + ".", module.get_base_layer()
            if isinstance(module, self.tuner_layer_cls.supported_layer_types) and \
                    self._check_target_module_exists(config, name):
                found.append((name, module))
        return found

    def _check_base_weights(self, model: nn.Module, config, adapter_name: str) -> None:
        """Fingerprint the targeted base weights at wrap time; refuse a different base at load time.

        Adapters whose frozen factors come from W (SVD, LU) or that rewrite W are only correct on
        the exact weights they were made from; loading them elsewhere would be silently wrong.
        """
        # Resolve target_modules=None to the architecture default first (inject_adapter would do it
        # later), so no config leaves here without a fingerprint.
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        layers = self.targeted_base_layers(model, config)

        def named():  # a quantized layer is hashed by its dequantized values, one layer's copy at a time
            for name, layer in layers:
                yield name, dequantized_weight(layer) if is_quantized(layer) else layer.weight

        source = LOADING.get()
        if config.base_weights_hash is None:
            if source is None and not config.inference_mode:  # wrap time: record it
                config.base_weights_hash = weights_fingerprint(named())
                return
            # A checkpoint without a fingerprint (older lrzoo, or a hand-made config) cannot be
            # checked. Warn rather than raise: it is unverified, not known to be wrong, and raising
            # would strand it. The hash is left empty so a re-save does not vouch for this base.
            warnings.warn(
                f"{os.path.join(source, CONFIG_NAME) if source else 'This checkpoint'}: no base_weights_hash, so "
                f"lrzoo cannot check that this model has the base weights the {config.lrzoo_method} adapter was "
                "made on (on other weights it is silently wrong). Re-save it from a model wrapped with this lrzoo "
                "version on its base; to make this an error, warnings.simplefilter('error', "
                "lrzoo.peft_bridge.UnverifiedBaseWeightsWarning).",
                UnverifiedBaseWeightsWarning,
                stacklevel=2,
            )
            return
        fingerprint = fingerprint_as(config.base_weights_hash, named())
        if config.base_weights_hash == fingerprint:
            return
        # Tensors for layers this model does not have (or does not target) are the more precise
        # diagnosis: another depth, or target_modules/layers_to_transform edited in the config.
        unplaced = unplaced_keys(file_keys(source), [name for name, _ in layers],
                                  getattr(config, "modules_to_save", None)) if source else []
        if unplaced:
            raise unplaced_tensors_error(source, adapter_name, unplaced)
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
    if getattr(layer_cls, "shares_state_across_layers", False):
        # Tensors shared by all layers live on the tuner, which PEFT's inject_adapter_in_model (layers
        # without a tuner) cannot build: PEFT checks this flag and refuses that path.
        tuner_cls.uses_shared_state = True
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix


def unregister_native_method(name: str) -> None:
    """Undo :func:`register_native_method`: take the method's ``peft_type`` out of PEFT's three tables
    (the ``str`` enum member hashes and compares like its value) and mark its config class unregistered."""
    value = PEFT_TYPE_PREFIX + name.upper()
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.pop(value, None)
    PEFT_TYPE_TO_TUNER_MAPPING.pop(value, None)
    PEFT_TYPE_TO_PREFIX_MAPPING.pop(value, None)
    if config_cls is not None and "peft_type_member" in vars(config_cls):
        del config_cls.peft_type_member  # building its config fails with "not registered" again
