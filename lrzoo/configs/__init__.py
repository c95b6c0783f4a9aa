"""Hydra config trees shipped with the package.

In the repository they live at the top level (``adapters/``, ``recipes/``); ``pyproject.toml`` maps
them to ``lrzoo/configs/{adapters,recipes}`` inside the wheel, so an installed lrzoo has them too.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def config_dir(name: str) -> Path:
    """Filesystem path of the ``adapters`` or ``recipes`` config tree (checkout or installed wheel)."""
    for candidate in (_PACKAGE.parent.parent / name, _PACKAGE / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"lrzoo's {name}/ config tree is missing (looked beside the package and inside it).")
