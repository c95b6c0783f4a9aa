"""``lrzoo.load``: load any adapter lrzoo or PEFT saved, with lrzoo's fast layers where it has them.

``PeftModel.from_pretrained`` works too once ``lrzoo`` is imported; the difference is only that a
plain LORA (or RANDLORA) checkpoint loaded that way uses PEFT's own layers instead of lrzoo's faster ones.
"""

from __future__ import annotations

import os

import torch.nn as nn
from peft import LoraConfig, PeftConfig, PeftModel, RandLoraConfig

from .methods import randlora
from .methods.lora import attach_fast_layers
from .methods.relora import full_model_error


def load(model: nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False, **kwargs) -> PeftModel:
    """Load the adapter saved in ``path`` onto ``model`` and return the ``PeftModel``.

    Args:
        model: the base model the adapter was trained on.
        path: a directory written by ``save_pretrained`` (or :func:`lrzoo.export_lora`).
        adapter_name: the name to give the loaded adapter.
        is_trainable: load for further training instead of inference.
    """
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        if full_model_error(path):  # ReLoRA saves a full transformers model, not an adapter
            raise ValueError(full_model_error(path))
        raise FileNotFoundError(
            f"{path!r} has no adapter_config.json; point lrzoo.load at the directory save_pretrained wrote."
        )
    config = PeftConfig.from_pretrained(path)
    if isinstance(config, LoraConfig):
        attach_fast_layers(config)
    peft_model = PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable,
                                           config=config, **kwargs)
    if isinstance(config, RandLoraConfig):  # PEFT builds its own layers; give them lrzoo's forward
        randlora.attach_fast_layers(peft_model)
    return peft_model
