"""Generated blocks of docs/kernels.md: the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` is
replaced by a command's output (``kernels-check``, ``roofline``), the prose around it is left alone. Writes are
atomic (a temporary file in the same folder, then a rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_block(path: Path, name: str, text: str) -> None:
    """Put ``text`` between the ``name`` markers of ``path``; a one-line error if the file lacks them."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    content = Path(path).read_text()
    if content.count(begin) != 1 or content.count(end) != 1 or content.index(begin) > content.index(end):
        raise SystemExit(f"{path}: needs exactly one '{begin}' line followed by one '{end}' line; add them where "
                         f"the generated block belongs.")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    atomic_write(Path(path), f"{head}{begin}\n{text.rstrip()}\n{end}{tail}")
