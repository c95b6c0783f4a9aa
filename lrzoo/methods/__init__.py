"""One module per adapter; importing this package registers them all.

Every module in this package is a method and is imported here (discovered, not listed), in
alphabetical order; a method built on another (LoRA+ and ReLoRA on LoRA) imports it itself, so the
order does not matter. Adding a method is adding a file.
"""

import pkgutil
from importlib import import_module

METHOD_MODULES = tuple(sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")))

for _module in METHOD_MODULES:
    import_module(f"{__name__}.{_module}")
