"""lrzoo: a parameter-efficient fine-tuning adapter zoo for Hugging Face models, built on PEFT.

>>> import lrzoo
>>> peft_model = lrzoo.wrap(model, "dora", r=8, alpha=16)      # doctest: +SKIP
"""

from . import offline_notices  # noqa: F401  (before PEFT imports bitsandbytes)
from . import methods  # noqa: F401  (registers every adapter)
from . import peft_bridge
from .export import export_lora
from .kernels.backend import requested_backend as get_backend
from .layer import AdapterConfig, AdapterLayer
from .load import load
from .methods.lora_sb import init_lora_sb
from .optimizers import list_optimizers
from .registry import adapter_defaults, get_adapter, list_adapters, register_adapter
from .train.optim import make_optimizer
from .wrap import wrap

peft_bridge.install_load_hooks()  # lrzoo's checks on PEFT's load path, explicitly and once (docs/architecture.md)
peft_bridge.install_save_hooks()  # adapter_config.json in one order, whatever PYTHONHASHSEED

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterLayer",
    "adapter_defaults",
    "export_lora",
    "get_adapter",
    "get_backend",
    "init_lora_sb",
    "list_adapters",
    "list_optimizers",
    "load",
    "make_optimizer",
    "register_adapter",
    "wrap",
]
