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

Importing this module also wraps PEFT's load path once (:func:`_install_load_checks`), so that an
lrzoo checkpoint (``LRZOO_*``, and the ``LORA``/``RANDLORA`` ones lrzoo's lora, dora and randlora
save) with a missing, unplaced (no place in the model) or non-finite tensor, a missing weights file,
an ``r`` that is not a positive integer or an unknown ``LRZOO_*`` type fails loudly, naming the file
and the fix, instead of loading half-initialised; and no load goes into a 4-bit base that bitsandbytes
already repacked for its CPU kernel (:func:`refuse_repacked_base`).
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import json
import os
import warnings
from typing import Optional

import torch
import torch.nn as nn
from peft import PeftModel
from peft.config import PeftConfigMixin
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners._buffer_dict import BufferDict
# PEFT layer classes lrzoo subclasses (LoRA/DoRA/RandLoRA keep PEFT's checkpoint format; lrzoo only changes
# their forward), imported here so that where PEFT keeps them is knowledge of this module alone.
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.variants import DoraLinearVariant
from peft.tuners.randlora.layer import Linear as PeftRandLoraLinear
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, get_peft_model_state_dict
from peft.utils.other import transpose  # W or Wᵀ for fan_in_fan_out layers

__all__ = ["DoraLinearLayer", "DoraLinearVariant", "PeftLoraLinear", "PeftRandLoraLinear", "transpose"]

from .fingerprint import fingerprint_as, weights_fingerprint
from .targets import DEFAULT_TARGET_MODULES, is_quantized

PEFT_TYPE_PREFIX = "LRZOO_"
#: PEFT's own types that lrzoo's lora/loraplus/dora/relora and randlora save; loads of these get
#: lrzoo's checks too once lrzoo is imported.
CHECKED_PEFT_TYPES = ("LORA", "RANDLORA")

#: The checkpoint directory being loaded, while PEFT's load path runs (None otherwise).
_LOADING: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("lrzoo_loading", default=None)


class UnverifiedBaseWeightsWarning(UserWarning):
    """An lrzoo checkpoint without ``base_weights_hash`` was loaded: its base weights could not be checked."""


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

        source = _LOADING.get()
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
        unplaced = _unplaced_keys(_file_keys(source), [name for name, _ in layers],
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


# ----------------------------------------------------------------------------- PEFT internals, one place
# Everything below reaches into PEFT below its documented API. The rest of lrzoo calls these small
# functions instead, so a PEFT release that moves one of them breaks here, and PEFT_SYMBOLS (checked by
# tests/test_peft_symbols.py against the installed PEFT) names what moved.

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


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight of ``layer`` as a float32 ``(d_out, d_in)`` tensor (a fresh copy for a quantized layer).

    One layer at a time: a method that reads W (an SVD, an LU, DoRA's norm, a fingerprint) never holds
    more than one layer's float copy. Uses PEFT's dequantization, the same its QLoRA layers use.
    """
    from peft.utils.integrations import dequantize_module_weight

    if not is_quantized(layer):
        return layer.weight.detach().float()
    if getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False):
        raise ValueError(
            "bitsandbytes has repacked this layer's 4-bit weight for its CPU inference kernel (it does so in place on "
            "the first eval-mode forward), and its unpacking is lossy in bitsandbytes 0.50, so W cannot be read back "
            "exactly. Reload the quantized model and wrap it (or load the adapter) before running it in eval mode; "
            "lrzoo then keeps the layers it adapts in bitsandbytes' standard layout."
        )
    return dequantize_module_weight(layer).detach().float()


def repacked_4bit_layers(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes 4-bit layers of ``model`` already repacked for bnb's CPU inference kernel."""
    return [name for name, module in model.named_modules()
            if is_quantized(module) and getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False)]


def refuse_repacked_base(model: nn.Module, what: str) -> None:
    """Refuse a 4-bit base that bitsandbytes has repacked for its CPU inference kernel (wrap and every load).

    bitsandbytes 0.50 repacks a 4-bit weight in place on the first eval-mode, no-grad forward on a CPU with
    AVX512-bf16 (a quick look at the model). A repacked layer computes through a kernel without a backward:
    the loss's gradient reaches no adapter tensor, so a run "succeeds" and trains nothing. Nor can it be
    undone exactly: unpacking keeps the block scales rounded to bf16, and it happens in place on the next
    ``state_dict()``, which every PEFT load and save calls (measured: weights move by up to 0.03, logits by
    0.2), so even an inference load would run on another base. The only fix is a fresh load of the base.
    """
    packed = repacked_4bit_layers(model)
    if packed:
        raise ValueError(
            f"{what}: {len(packed)} bitsandbytes 4-bit layer(s) (e.g. {packed[0]}) were repacked in place for "
            "bitsandbytes' CPU inference kernel by an eval-mode forward without gradients before lrzoo saw the model; "
            "that kernel has no backward (nothing would train) and the repacking cannot be undone exactly (loading or "
            "saving would change the base weights in place). Reload the quantized model and wrap it (or load the "
            "adapter) before any eval-mode forward: from then on lrzoo keeps bitsandbytes' standard layout, so "
            "looking at the model after that is safe."
        )


def keep_quantized_layout(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` in bnb's standard layout; returns how many were switched.

    On a CPU with AVX512-bf16, bitsandbytes 0.50 repacks a 4-bit weight in place on the first eval-mode
    forward (for a bf16 kernel), and every later ``state_dict()`` (each ``save_pretrained``) unpacks it
    again in place, lossily; a repacked layer also has no backward (:func:`refuse_repacked_base`, which
    wrap and every load call first). lrzoo turns that repacking off on every 4-bit layer of a model it
    wraps or loads into: bnb takes its fp32 dequantize-then-matmul path in eval too (exact; slower on
    CPU; GPUs are unaffected).
    """
    count = 0
    for module in model.modules():
        if is_quantized(module) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def default_targets_config(tuner: BaseTuner, config, model: nn.Module):
    """``config`` with ``target_modules=None`` resolved to the architecture's default, as injection will."""
    return tuner._prepare_adapter_config(config, tuner.get_model_config(model))


# ----------------------------------------------------------------------------- load-time checks
def _type_name(peft_type) -> str:
    return str(getattr(peft_type, "value", peft_type))


def _is_checked(peft_type) -> bool:
    name = _type_name(peft_type)
    return name.startswith(PEFT_TYPE_PREFIX) or name in CHECKED_PEFT_TYPES


def _local_peft_type(path: str) -> Optional[str]:
    """``peft_type`` from a local ``adapter_config.json``, or ``None`` (not local: PEFT resolves it)."""
    try:
        with open(os.path.join(path, CONFIG_NAME)) as file:
            return json.load(file).get("peft_type")
    except (OSError, ValueError):
        return None


def _weights_file(path: str) -> str:
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return path  # a Hub id: PEFT resolved the file itself


def _require_weights_file(path: str) -> None:
    # Without this PEFT takes a local directory that lacks its weights for a Hub repo id and fails
    # with an unrelated "Repo id must be in the form ..." error.
    if os.path.isfile(os.path.join(path, CONFIG_NAME)) and _weights_file(path) == path:
        raise FileNotFoundError(
            f"{os.path.join(path, SAFETENSORS_WEIGHTS_NAME)} is missing: {path!r} has an adapter_config.json but no "
            f"weights ({SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}). Point at the directory save_pretrained wrote "
            "(adapters other than 'default' are in a subfolder named after the adapter), or re-save the adapter."
        )


def _file_key(key: str, adapter_name: str) -> str:
    """A model key as the checkpoint names it: without the adapter name (its last occurrence, as
    ``layers.0`` may equal an adapter called ``"0"``)."""
    parts = key.split(".")
    if adapter_name in parts:
        del parts[len(parts) - 1 - parts[::-1].index(adapter_name)]
    return ".".join(parts)


def _file_keys(path: str) -> list[str]:
    """The tensor names in the local weights file of ``path`` (none for a Hub id), without reading the tensors."""
    file = _weights_file(path)
    try:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as handle:
                return list(handle.keys())
        if file.endswith(".bin"):
            return list(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # noqa: BLE001 - only a finer diagnosis is lost; the caller's own error still stands
        return []
    return []


def _unplaced_keys(keys: list[str], layer_names: list[str], modules_to_save) -> list[str]:
    """The keys of an lrzoo-native file that belong to no targeted layer and no ``modules_to_save`` module.

    Such a file names a layer's tensors ``base_model.model.<layer path>.<tensor>``; tensors shared by
    all layers (TeRA's) are ``base_model.<tensor>`` and always have their place on the tuner.
    """
    unplaced = []
    for key in keys:
        if not key.startswith(PEFT_MODEL_PREFIX):
            continue
        path = key[len(PEFT_MODEL_PREFIX):]
        if any(path.startswith(name + ".") for name in layer_names):
            continue
        if any(f".{module}." in f".{path}" for module in modules_to_save or ()):
            continue
        unplaced.append(key)
    return unplaced


def unplaced_tensors_error(path: str, adapter_name: str, keys: list[str], config=None) -> ValueError:
    """The one-line error for checkpoint tensors that have no place in the model they are loaded into."""
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    if getattr(config, "use_dora", None) is False and any("lora_magnitude_vector" in key for key in keys):
        why = ("it holds DoRA magnitudes (lora_magnitude_vector) but its adapter_config.json does not say "
               "use_dora: true; set it back to true")
    else:
        why = ("it was saved from a model with other layers or targets (another depth or architecture, or "
               "target_modules/layers_to_transform edited in its adapter_config.json); load it onto the model it "
               "was trained on, with the adapter_config.json it was saved with")
    return ValueError(
        f"{_weights_file(path)}: {len(keys)} tensor(s) of adapter {adapter_name!r} have no place in this model and "
        f"would be dropped silently ({shown}): {why}."
    )


def _check_loaded(model: PeftModel, adapter_name: str, path: str, load_result) -> None:
    """Refuse a load that did not account for every tensor: adapter tensors the checkpoint lacked (left
    at init), tensors of the checkpoint that found no place in the model (dropped), NaN/Inf values."""
    source = _weights_file(path)
    # PEFT already kept only this adapter's own tensors; name them as the file does (no adapter name).
    missing = [_file_key(key, adapter_name) for key in load_result.missing_keys]
    if missing:
        raise ValueError(
            f"{source} lacks {len(missing)} tensor(s) of adapter {adapter_name!r}, which would stay at their "
            f"initial values: {missing[:8]}{' ...' if len(missing) > 8 else ''}. Re-save the adapter with "
            "save_pretrained from the trained model (and load it onto the same architecture and target_modules)."
        )
    if load_result.unexpected_keys:  # PEFT's load_state_dict(strict=False) skips them without a word
        raise unplaced_tensors_error(source, adapter_name, list(load_result.unexpected_keys),
                                     model.peft_config.get(adapter_name))
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    bad = [key for key, tensor in state.items()
           if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(
            f"{source} holds NaN/Inf values in {len(bad)} tensor(s) of adapter {adapter_name!r}: "
            f"{bad[:8]}{' ...' if len(bad) > 8 else ''}. The training run diverged or the file is damaged; "
            "re-save from an earlier (finite) checkpoint or retrain with a lower learning rate."
        )


def _check_rank_field(path_json_file: str, r) -> None:
    """An ``adapter_config.json`` whose ``r`` is not a positive integer (``"4"``, a string) fails here, with the
    file, instead of as a TypeError deep inside PEFT's layer construction."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(
            f"{path_json_file}: r must be a positive integer (the rank), got {r!r} ({type(r).__name__}). Write it "
            'as a JSON number, e.g. "r": 8.'
        )


@contextlib.contextmanager
def _loading(path: str):
    token = _LOADING.set(path)
    try:
        yield
    finally:
        _LOADING.reset(token)


def _install_load_checks() -> None:
    """Wrap ``PeftModel.from_pretrained``/``load_adapter`` and ``PeftConfig.from_json_file`` once.

    ``load_adapter`` is the one function every PEFT load goes through (``from_pretrained`` and
    ``lrzoo.load`` call it), so the checks sit there; ``from_pretrained`` is wrapped only to mark
    the tuner's construction as a load (for the fingerprint check), and ``from_json_file`` is where
    every config read (``PeftConfig.from_pretrained``, ``_get_peft_type``) sees the type first.
    """
    if getattr(PeftModel.load_adapter, "_lrzoo_checked", False):
        return
    load_adapter = PeftModel.load_adapter
    from_pretrained = PeftModel.from_pretrained.__func__
    from_json_file = PeftConfigMixin.from_json_file.__func__

    def checked_load_adapter(self, model_id, adapter_name, *args, **kwargs):
        path = os.path.join(str(model_id), kwargs["subfolder"]) if kwargs.get("subfolder") else str(model_id)
        refuse_repacked_base(self, f"load_adapter({path!r})")
        known = self.peft_config.get(adapter_name)
        checked = _is_checked(known.peft_type if known is not None else _local_peft_type(path))
        if checked:
            _require_weights_file(path)
        added = known is None
        with _loading(path):
            result = load_adapter(self, model_id, adapter_name, *args, **kwargs)
        keep_quantized_layout(self)
        if checked:
            try:
                _check_loaded(self, adapter_name, path, result)
            except Exception:
                if added:  # do not leave a broken adapter on a model the caller keeps
                    self.delete_adapter(adapter_name)
                raise
        return result

    def checked_from_pretrained(cls, model, model_id, *args, **kwargs):
        path = os.path.join(str(model_id), kwargs["subfolder"]) if kwargs.get("subfolder") else str(model_id)
        refuse_repacked_base(model, f"PeftModel.from_pretrained(model, {path!r})")  # before PEFT touches the model
        with _loading(path):
            return from_pretrained(cls, model, model_id, *args, **kwargs)

    def checked_from_json_file(cls, path_json_file, **kwargs):
        loaded = from_json_file(cls, path_json_file, **kwargs)
        peft_type = loaded.get("peft_type") if isinstance(loaded, dict) else None
        if isinstance(peft_type, str) and _is_checked(peft_type) and "r" in loaded:
            _check_rank_field(path_json_file, loaded["r"])
        if isinstance(peft_type, str) and peft_type.startswith(PEFT_TYPE_PREFIX) \
                and peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
            known = sorted(name for name in map(_type_name, PEFT_TYPE_TO_CONFIG_MAPPING)
                           if name.startswith(PEFT_TYPE_PREFIX))
            raise ValueError(
                f"{path_json_file}: peft_type {peft_type!r} is not an lrzoo method this installation knows "
                f"(known: {', '.join(known)}). Upgrade lrzoo to the version that saved it, or import the module "
                "that registers the method (lrzoo.register_adapter) after `import lrzoo` and before loading."
            )
        return loaded

    checked_load_adapter._lrzoo_checked = True
    PeftModel.load_adapter = checked_load_adapter
    PeftModel.from_pretrained = classmethod(checked_from_pretrained)
    PeftConfigMixin.from_json_file = classmethod(checked_from_json_file)
    for new, old in ((checked_load_adapter, load_adapter), (checked_from_pretrained, from_pretrained),
                     (checked_from_json_file, from_json_file)):
        new.__doc__, new.__wrapped__ = old.__doc__, old


_install_load_checks()


def unregister_native_method(name: str) -> None:
    """Undo :func:`register_native_method`: take the method's ``peft_type`` out of PEFT's three tables
    (the ``str`` enum member hashes and compares like its value) and mark its config class unregistered."""
    value = PEFT_TYPE_PREFIX + name.upper()
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.pop(value, None)
    PEFT_TYPE_TO_TUNER_MAPPING.pop(value, None)
    PEFT_TYPE_TO_PREFIX_MAPPING.pop(value, None)
    if config_cls is not None and "peft_type_member" in vars(config_cls):
        del config_cls.peft_type_member  # building its config fails with "not registered" again
