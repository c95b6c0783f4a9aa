"""``adapter_config.json`` written in one order: the same adapter saved twice gives the same bytes.

PEFT keeps ``target_modules`` (and ``exclude_modules``) as a ``set`` and ``PeftConfig.save_pretrained`` writes
it as ``list(set)``, whose order follows the string hashes, i.e. ``PYTHONHASHSEED``: two saves of one adapter
in two processes differ, which breaks byte-level reproducibility, diffs and content hashes of adapters.
:func:`install_save_hooks` (called once by ``import lrzoo``, like the load hooks) wraps that one method, which
every PEFT save of a config goes through (``PeftModel.save_pretrained``, ``export_lora``, a config saved by
hand): after PEFT has written the file, each value that was a set in the config is rewritten sorted, atomically,
in PEFT's own layout (indent 2, sorted keys). The file stays what stock PEFT reads (a JSON list, made a set
again on load); importing this module changes nothing in PEFT.
"""

from __future__ import annotations

import json
import os
from typing import Any

from peft.config import PeftConfigMixin
from peft.utils import CONFIG_NAME

from ..io import atomic_file


def save_hooks_installed() -> bool:
    """Whether :func:`install_save_hooks` has wrapped ``PeftConfigMixin.save_pretrained``."""
    return getattr(PeftConfigMixin.save_pretrained, "_lrzoo_sorted", False)


def install_save_hooks() -> bool:
    """Make ``PeftConfigMixin.save_pretrained`` write set-valued fields sorted, once (a second call wraps nothing).
    Returns whether it wrapped."""
    if save_hooks_installed():
        return False
    save_pretrained = PeftConfigMixin.save_pretrained

    def sorted_save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        save_pretrained(self, save_directory, **kwargs)
        sort_set_fields(os.path.join(save_directory, CONFIG_NAME),
                        [key for key, value in self.to_dict().items() if isinstance(value, (set, frozenset))])

    sorted_save_pretrained._lrzoo_sorted = True
    sorted_save_pretrained.__doc__, sorted_save_pretrained.__wrapped__ = save_pretrained.__doc__, save_pretrained
    PeftConfigMixin.save_pretrained = sorted_save_pretrained
    return True


def sort_set_fields(path: str, keys: list[str]) -> None:
    """Rewrite the lists under ``keys`` of the JSON file ``path`` sorted (atomically; untouched when they are)."""
    if not keys:
        return
    with open(path, encoding="utf-8") as handle:
        written = json.load(handle)
    ordered = {key: sorted(written[key], key=_order) for key in keys if isinstance(written.get(key), list)}
    if all(written[key] == value for key, value in ordered.items()):
        return
    written.update(ordered)
    with atomic_file(path) as handle:
        handle.write(json.dumps(written, indent=2, sort_keys=True))  # PEFT's layout: only the order changes


def _order(value: Any) -> tuple[str, str]:
    # module names are strings; the type name keeps any other JSON scalar from comparing against them
    return type(value).__name__, str(value)
