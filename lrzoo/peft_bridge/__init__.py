"""The one door to PEFT below its documented API (docs/architecture.md, "PEFT in one place").

Nothing else in lrzoo imports PEFT's submodules or private names; it calls this package, one module per concern:

* :mod:`.tuners` — how an lrzoo-native method becomes a PEFT tuner (its ``peft_type`` in PEFT's tables, the
  shared :class:`~.tuners.LrzooTuner`, the base-weight fingerprint check at wrap and load);
* :mod:`.internals` — PEFT's private methods, class swaps, PeftModel's key prefix, the PEFT classes lrzoo
  subclasses or recognises (``LoraLayer``, ``ModulesToSaveWrapper``...), and :data:`~.internals.PEFT_SYMBOLS`,
  every PEFT name the bridge relies on, checked against the installed PEFT;
* :mod:`.load_checks` — the checks on PEFT's load path, installed by :func:`install_load_hooks`, which
  ``import lrzoo`` calls once (idempotent; importing the module patches nothing);
* :mod:`.quantized` — bitsandbytes bases: dequantized weights, bnb's standard 4-bit layout;
* :mod:`.saved_config` — ``adapter_config.json`` with its set-valued fields (``target_modules``) sorted, whatever
  ``PYTHONHASHSEED``, by :func:`install_save_hooks` (``import lrzoo`` calls it once, as the load hooks).

``from lrzoo.peft_bridge import X`` works for every name below.
"""

from .internals import (
    PEFT_MODEL_PREFIX,
    PEFT_SYMBOLS,
    BaseTunerLayer,
    DoraLinearLayer,
    DoraLinearVariant,
    LoraLayer,
    ModulesToSaveWrapper,
    PeftLoraLinear,
    PeftRandLoraLinear,
    check_adapters_to_merge,
    default_targets_config,
    frozen_tensor_dict,
    init_tuner_layer_state,
    is_modules_to_save,
    move_adapter_to_base_device,
    peft_symbol_problems,
    stash,
    swap_layer_class,
    transpose,
    unstash,
    use_layer_classes,
)
from .load_checks import (
    CHECKED_PEFT_TYPES,
    PEFT_TYPE_PREFIX,
    UnverifiedBaseWeightsWarning,
    install_load_hooks,
    load_hooks_installed,
    unplaced_tensors_error,
)
from .quantized import dequantized_weight, keep_quantized_layout, refuse_repacked_base, repacked_4bit_layers
from .saved_config import install_save_hooks, save_hooks_installed
from .tuners import LrzooTuner, peft_type_for, register_native_method, unregister_native_method

__all__ = [
    "BaseTunerLayer", "CHECKED_PEFT_TYPES", "DoraLinearLayer", "DoraLinearVariant", "LoraLayer", "LrzooTuner",
    "ModulesToSaveWrapper", "PEFT_MODEL_PREFIX", "PEFT_SYMBOLS", "PEFT_TYPE_PREFIX", "PeftLoraLinear",
    "PeftRandLoraLinear", "UnverifiedBaseWeightsWarning", "check_adapters_to_merge", "default_targets_config",
    "dequantized_weight", "frozen_tensor_dict", "init_tuner_layer_state", "install_load_hooks", "install_save_hooks",
    "is_modules_to_save", "keep_quantized_layout", "load_hooks_installed", "move_adapter_to_base_device",
    "peft_symbol_problems", "peft_type_for", "refuse_repacked_base", "register_native_method", "repacked_4bit_layers",
    "save_hooks_installed", "stash", "swap_layer_class", "transpose", "unplaced_tensors_error",
    "unregister_native_method", "unstash", "use_layer_classes",
]
