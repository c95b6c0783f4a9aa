"""``lrzoo.load``: load any adapter lrzoo or PEFT saved, with lrzoo's fast layers where it has them.

``PeftModel.from_pretrained`` works too once ``lrzoo`` is imported; the difference is only that a
plain LORA (or RANDLORA) checkpoint loaded that way uses PEFT's own layers instead of lrzoo's faster ones.
What a method does around a load is its spec's hooks (``foreign_folder``, ``before_load``, ``after_load``:
:class:`lrzoo.registry.AdapterSpec`); this module asks every method and names none.
"""

from __future__ import annotations

import os

import torch.nn as nn
from peft import PeftConfig, PeftModel

from .registry import adapter_specs


def load(model: nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False, **kwargs) -> PeftModel:
    """Load the adapter saved in ``path`` onto ``model`` and return the ``PeftModel``.

    Args:
        model: the base model the adapter was trained on.
        path: a directory written by ``save_pretrained`` (or :func:`lrzoo.export_lora`).
        adapter_name: the name to give the loaded adapter.
        is_trainable: load for further training instead of inference.
    """
    specs = adapter_specs()
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        for spec in specs:  # a method that saves something else than an adapter (ReLoRA's full model) says so
            problem = spec.foreign_folder(path) if spec.foreign_folder is not None else None
            if problem:
                raise ValueError(problem)
        raise FileNotFoundError(
            f"{path!r} has no adapter_config.json; point lrzoo.load at the directory save_pretrained wrote."
        )
    config = PeftConfig.from_pretrained(path)
    for spec in specs:
        if spec.before_load is not None:
            spec.before_load(config)
    peft_model = PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable,
                                           config=config, **kwargs)
    for spec in specs:
        if spec.after_load is not None:
            spec.after_load(peft_model, config)
    return peft_model
