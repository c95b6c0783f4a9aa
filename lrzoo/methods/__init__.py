"""One module per adapter; importing this package registers them all.

Order is the registry's only dependency: methods built on LoRA import ``lora`` themselves.
"""

from importlib import import_module

METHOD_MODULES = (
    "lora",
    "lora_xs",
    "lora_sb",
    "loldu",
    "svfit",
    "flora",
    "randlora",
    "relora",
    "tera",
)

for _module in METHOD_MODULES:
    import_module(f"{__name__}.{_module}")
