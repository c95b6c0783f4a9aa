"""Checks on PEFT's load path: an lrzoo checkpoint (``LRZOO_*``, and the ``LORA``/``RANDLORA`` ones lrzoo's lora,
dora and randlora save) with a missing, unplaced (no place in the model) or non-finite tensor, a missing weights
file, an ``r`` that is not a positive integer or an unknown ``LRZOO_*`` type fails loudly, naming the file and
the fix, instead of loading half-initialised; and no load goes into a 4-bit base that bitsandbytes already
repacked for its CPU kernel (:func:`lrzoo.peft_bridge.refuse_repacked_base`).

They wrap PEFT's load functions, which is done by one explicit call, :func:`install_load_hooks`, made by
``import lrzoo`` (``lrzoo/__init__.py``); it is idempotent (a second call wraps nothing again), and
importing this module changes nothing in PEFT.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from typing import Optional

import torch
from peft import PeftModel
from peft.config import PeftConfigMixin
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, get_peft_model_state_dict

from .internals import PEFT_MODEL_PREFIX
from .quantized import keep_quantized_layout, refuse_repacked_base

PEFT_TYPE_PREFIX = "LRZOO_"
#: PEFT's own types that lrzoo's lora/loraplus/dora/relora and randlora save; loads of these get
#: lrzoo's checks too once lrzoo is imported.
CHECKED_PEFT_TYPES = ("LORA", "RANDLORA")

#: The checkpoint directory being loaded, while PEFT's load path runs (None otherwise).
LOADING: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("lrzoo_loading", default=None)


class UnverifiedBaseWeightsWarning(UserWarning):
    """An lrzoo checkpoint without ``base_weights_hash`` was loaded: its base weights could not be checked."""


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


def file_keys(path: str) -> list[str]:
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


def unplaced_keys(keys: list[str], layer_names: list[str], modules_to_save) -> list[str]:
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
    token = LOADING.set(path)
    try:
        yield
    finally:
        LOADING.reset(token)


def load_hooks_installed() -> bool:
    """Whether :func:`install_load_hooks` has wrapped PEFT's load functions (all three carry the mark)."""
    return all(getattr(function, "_lrzoo_checked", False) for function in
               (PeftModel.load_adapter, PeftModel.from_pretrained.__func__, PeftConfigMixin.from_json_file.__func__))


def install_load_hooks() -> bool:
    """Wrap ``PeftModel.from_pretrained``/``load_adapter`` and ``PeftConfig.from_json_file`` with lrzoo's checks,
    once: a second call (a reload of lrzoo, a plugin calling it again) wraps nothing. Returns whether it wrapped.

    ``load_adapter`` is the one function every PEFT load goes through (``from_pretrained`` and
    ``lrzoo.load`` call it), so the checks sit there; ``from_pretrained`` is wrapped only to mark
    the tuner's construction as a load (for the fingerprint check), and ``from_json_file`` is where
    every config read (``PeftConfig.from_pretrained``, ``_get_peft_type``) sees the type first.
    """
    if load_hooks_installed():
        return False
    if any(getattr(function, "_lrzoo_checked", False) for function in
           (PeftModel.load_adapter, PeftModel.from_pretrained.__func__, PeftConfigMixin.from_json_file.__func__)):
        raise RuntimeError("lrzoo's PEFT load hooks are installed on some of PEFT's load functions only (something "
                           "replaced the others after `import lrzoo`); restart the interpreter.")
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

    for checked in (checked_load_adapter, checked_from_pretrained, checked_from_json_file):
        checked._lrzoo_checked = True
    PeftModel.load_adapter = checked_load_adapter
    PeftModel.from_pretrained = classmethod(checked_from_pretrained)
    PeftConfigMixin.from_json_file = classmethod(checked_from_json_file)
    for new, old in ((checked_load_adapter, load_adapter), (checked_from_pretrained, from_pretrained),
                     (checked_from_json_file, from_json_file)):
        new.__doc__, new.__wrapped__ = old.__doc__, old
    return True
