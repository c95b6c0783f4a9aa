"""Which local data a run reads, and what those files hold.

* :func:`fingerprint` gives each data file's size and the SHA-256 of its bytes, so a run's identity covers
  its data and not only the data's path: an edited training file makes another run (``lrzoo-train`` puts
  the fingerprint into the run's hash and ``results.json``). Hashing is cached by (path, size, mtime, ctime,
  inode) in ``$LRZOO_CACHE_DIR`` (default ``$XDG_CACHE_HOME/lrzoo``, i.e. ``~/.cache/lrzoo``), so a file is
  read once until it changes; the cache is an optimisation only (unwritable: every process hashes).
* :func:`local_data_dirs` lists where a task with ``data_dir: null`` finds its files when the Hugging Face
  Hub is offline: ``$LRZOO_DATA_DIR``, then ``../shared/data`` from the working directory and from the
  checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from ..io import atomic_file

CACHE_FILE = "data_hashes.json"
_CHUNK = 1 << 20
_memo: dict[tuple, str] = {}


def hub_offline() -> bool:
    """Whether the Hub may not be reached (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` set)."""
    return any(os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def local_data_dirs() -> list[tuple[str, Path]]:
    """``(how it was found, folder)`` for every place a task without ``data_dir`` looks offline, in order
    (duplicates dropped): ``$LRZOO_DATA_DIR``, ``../shared/data`` from the working directory, then from the
    checkout (the folder above the ``lrzoo`` package)."""
    places = []
    if os.environ.get("LRZOO_DATA_DIR"):
        places.append(("$LRZOO_DATA_DIR", Path(os.environ["LRZOO_DATA_DIR"]).expanduser()))
    places.append(("../shared/data from the working directory", Path.cwd().parent / "shared" / "data"))
    places.append(("../shared/data from the checkout", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
    seen, unique = set(), []
    for how, path in places:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append((how, path))
    return unique


def cache_path() -> Path:
    from ..cache import cache_root

    explicit = os.environ.get("LRZOO_CACHE_DIR", "").strip()  # the older name of this one cache's folder
    return (Path(explicit).expanduser() if explicit else cache_root()) / CACHE_FILE


def fingerprint(paths: list[Path], root: Path) -> dict[str, dict[str, object]]:
    """``{path relative to root: {"bytes": size, "sha256": hex digest}}`` for each of ``paths`` that exists
    (a missing one is left out: loading it fails with its own message)."""
    found = {}
    cache: Optional[dict[str, dict[str, object]]] = None
    dirty = False
    for path in sorted(set(paths)):
        try:
            stat = os.stat(path)
        except OSError:
            continue
        real = os.path.realpath(path)
        key = (real, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
        digest = _memo.get(key)
        if digest is None:
            if cache is None:
                cache = _read_cache()
            entry = cache.get(real)
            stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
            if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
                digest = entry["sha256"]
            else:
                digest = _sha256(real)
                cache[real] = {"stamp": stamp, "sha256": digest}
                dirty = True
            _memo[key] = digest
        found[os.path.relpath(path, root)] = {"bytes": stat.st_size, "sha256": digest}
    if dirty:
        _write_cache(cache)
    return found


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache() -> dict[str, dict[str, object]]:
    try:
        with open(cache_path(), encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):  # none yet, or damaged: it is only a cache
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache: dict[str, dict[str, object]]) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(str(path)) as handle:
            json.dump(cache, handle)
    except OSError:  # a read-only home: hash again next time
        pass
