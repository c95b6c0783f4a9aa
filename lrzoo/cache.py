"""Where lrzoo keeps what it can rebuild: converted models, trained tokenizers, data-file hashes, kernel verdicts
and compiled kernels. One root, so that one variable moves (or isolates) all of them.

``$LRZOO_CACHE`` when set, else ``$XDG_CACHE_HOME/lrzoo``, else ``~/.cache/lrzoo``. The older per-cache variables
(``LRZOO_CACHE_DIR`` for data hashes, ``LRZOO_KERNEL_VERDICTS`` for kernel verdicts, ``LRZOO_AOT_CACHE``) still
take precedence for their own cache, so existing set-ups keep working.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The root of every lrzoo cache (read on each call, so a test or a user can point it elsewhere)."""
    explicit = os.environ.get("LRZOO_CACHE", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return Path(xdg or Path.home() / ".cache").expanduser() / "lrzoo"
