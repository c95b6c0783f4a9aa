"""A run's identity: the configuration it computes from, and the digests that name it.

* :func:`hashed_config`: the resolved config without the keys that do not change what a run computes
  (:data:`HASH_EXCLUDED`, the options of :data:`HASH_DEFAULTS` at their default, the options a method ignores)
  plus the fingerprint of the data files it reads (:mod:`lrzoo.runs.data`); saved in ``results.json`` as
  ``config``.
* :func:`config_hash` (``results.json``'s ``config_hash``), :func:`run_hash` (the ``<hash>`` of a run directory,
  ``seed<seed>-<hash>``, shared by the seeds of one configuration; ``${lrzoo.run_hash:}`` in ``run_name``) and
  :func:`plan_key` (a run's identity within a sweep plan, wherever its data was read from) are all
  :func:`digest` of it, the one hash function of a run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from .data import DataPlan, data_plan, data_record, file_identity, model_data_files
from .model_source import local_model_dir, model_record

#: keys that do not change what a run computes: excluded from the config hash, so a resumed
#: run (which differs in them) still matches its checkpoint.
HASH_EXCLUDED = ("resume", "logger", "output_root", "run_name", "trainer.stop_after", "trainer.progress",
                  # a policy for non-finite steps: switching a diverged run to skip_step resumes it from its
                  # last good checkpoint (lrzoo.train.divergence)
                  "trainer.on_nonfinite")

#: options added after runs had finished, with the value that reproduces what those runs computed: left out
#: of the hash (and of results.json's ``config``) when they have it, so the runs that predate an option keep
#: their hash (and are still skipped as done), while any other value hashes differently. A node emptied by
#: this is dropped too.
HASH_DEFAULTS = {"eval.mode": "generate", "eval.choices": "label", "eval.forgetting": None,
                  # the encoder head (lrzoo.heads): null = the checkpoint's pooling, which for every preset but
                  # minilm (which sets mean) is transformers' own head, what runs computed before the keys existed
                  "model.pooling": None, "model.similarity_head": "cross_encoder",
                  # the bi-encoder's loss: CosineSimilarityLoss is what every bi-encoder run computed before
                  "model.pair_loss": "cosine",
                  # null: the input embeddings train at trainer.lr, as every run did before the key existed
                  "trainer.embedding_lr": None}


def run_files_record(plan: Optional[DataPlan], model_cfg: Any) -> dict[str, Any]:
    """``{file: {"bytes", "sha256"}}`` of every local file a run reads: the task's data (``plan``; ``None``: no local
    data), ``model.tokenizer_corpus`` and a local ``model.source`` directory's files. The run hash digests it and
    ``data.json`` records it, so the two cannot disagree on what the run read."""
    return {**data_record(plan or DataPlan(None), model_data_files(model_cfg)), **model_record(model_cfg)}


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers, without the ``hydra`` node (dropped before resolving: it has
    values Hydra fills in only inside a job)."""
    if "hydra" in cfg:
        unresolved = OmegaConf.to_container(cfg, resolve=False)
        unresolved.pop("hydra")
        cfg = OmegaConf.create(unresolved)
    return OmegaConf.to_container(cfg, resolve=True)


def hashed_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the ``hydra`` node, :data:`HASH_EXCLUDED` and the options of
    :data:`HASH_DEFAULTS` at their default, plus ``data``: the size and SHA-256 of every local data file the
    run reads (:mod:`lrzoo.runs.data`: the task's files and ``model.tokenizer_corpus``; the files of a local
    ``model.source`` directory, :mod:`lrzoo.runs.model_source`), so an edited file makes another run. Paths are
    the files, not their spelling: ``task.data_dir`` and a local ``model.source`` their real path, the corpus
    :func:`lrzoo.runs.data.file_identity` (``../shared/data/<its place in the layout>`` inside the data folder,
    the spelling the runs made before it was normalised have). What the run computes from
    (also saved in ``results.json`` as ``config``, which ``lrzoo-report`` groups runs by)."""
    data = plain_config(cfg)
    task, model = data.get("task"), data.get("model")
    plan = _data_plan_or_none(task) if isinstance(task, dict) else None
    data_dir = plan.data_dir if plan is not None else None
    # the bytes of every file the run reads (task data, tokenizer corpus, a local model's files): an edited one is
    # another run; a run with a local data folder records its files even when none exists yet
    record = run_files_record(plan, model)
    if data_dir is not None or record:
        data["data"] = record
    if isinstance(task, dict):
        if data_dir is not None:
            # the folder, not its spelling: ``../shared/data`` and LRZOO_DATA_DIR=/abs/shared/data are the same
            # data, and a sweep resumed under the other spelling must still find its finished runs; a null
            # data_dir read offline from a local copy is that copy
            task["data_dir"] = os.path.realpath(os.path.expanduser(data_dir))
        elif isinstance(task.get("data_dir"), str):
            task["data_dir"] = os.path.realpath(os.path.expanduser(task["data_dir"]))
    if extra := model_data_files(model):
        # the file, not its spelling (the corpus of experiment=pretrain_cpu interpolates task.data_dir)
        model["tokenizer_corpus"] = file_identity(extra[0], data_dir)[1]
    if (directory := local_model_dir(model.get("source") if isinstance(model, dict) else None)) is not None:
        # a local model directory as its real path (lrzoo.runs.model_source): another spelling finds the run.
        # Built-ins and hub ids stay as spelled.
        model["source"] = directory
    for dotted in HASH_EXCLUDED:
        pop_dotted(data, dotted)
    for dotted, default in HASH_DEFAULTS.items():
        pop_dotted(data, dotted, only_if=lambda value, default=default: value == default, prune_empty=True)
    drop_ignored_adapter_options(data.get("adapter"))
    return data


def _data_plan_or_none(task: dict[str, Any]) -> Any:
    """:func:`lrzoo.runs.data.data_plan`, or None when the task node is broken (an unknown task, a bad split):
    the hash is computed while Hydra names the run directory, and the run itself then says what is wrong."""
    try:
        return data_plan(task)
    except Exception:
        return None


def drop_ignored_adapter_options(adapter: Any, method: Optional[str] = None) -> dict[str, Any]:
    """Remove from the ``adapter`` node (in place) the options its method (``method``, else the node's ``name``)
    takes no value from (:func:`lrzoo.registry.ignored_options`: ``alpha`` of SALT and SVFit, which the
    experiment presets set for every adapter) and return them: they are not part of a run's hash, and the run
    never passes them to ``wrap`` (which refuses them). ``plan_key`` applies it to recorded configs too, so
    the runs recorded with such an option are still found."""
    from ..registry import ignored_options, list_adapters

    method = method or (adapter.get("name") if isinstance(adapter, dict) else None)
    if not isinstance(adapter, dict) or method not in list_adapters():
        return {}
    return {key: adapter.pop(key) for key in ignored_options(method) if key in adapter}


def pop_dotted(data: dict[str, Any], dotted: str, only_if: Any = None, prune_empty: bool = False) -> None:
    """Remove ``dotted`` (``"trainer.stop_after"``) from the nested dict ``data`` if present (and ``only_if``
    its value, when given); ``prune_empty`` also removes the parents this leaves empty."""
    *parents, leaf = dotted.split(".")
    nodes = [data]
    for key in parents:
        child = nodes[-1].get(key)
        nodes.append(child if isinstance(child, dict) else {})
    if leaf not in nodes[-1] or (only_if is not None and not only_if(nodes[-1][leaf])):
        return
    nodes[-1].pop(leaf)
    if prune_empty:
        for key, parent in zip(reversed(parents), reversed(nodes[:-1])):
            if parent.get(key) == {}:
                parent.pop(key)


def digest(data: dict[str, Any]) -> str:
    """SHA-256 (hex) of ``data`` as sorted JSON: every hash that names a run is a prefix of this."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def config_hash(cfg: DictConfig) -> str:
    """A short digest of the resolved config, minus :data:`HASH_EXCLUDED`."""
    return digest(hashed_config(cfg))[:16]


def run_hash(cfg: DictConfig) -> str:
    """8 hex digits of :func:`config_hash`'s config without ``seed``: the ``<hash>`` of a run directory's
    name (``seed<seed>-<hash>``), shared by the seeds of one configuration."""
    data = hashed_config(cfg)
    data.pop("seed", None)
    return digest(data)[:8]


def _run_hash_resolver(*, _root_: DictConfig) -> str:
    """``${lrzoo.run_hash:}`` in ``run_name``: :func:`run_hash` of the config it sits in. A copy is hashed,
    without ``run_name`` (this very interpolation) and the ``hydra`` node (whose run dir interpolates it)."""
    data = OmegaConf.to_container(_root_, resolve=False)
    data.pop("hydra", None)
    data["run_name"] = ""
    return run_hash(OmegaConf.create(data))


OmegaConf.register_new_resolver("lrzoo.run_hash", _run_hash_resolver, replace=True)


#: keys left out of a plan's run identity (:func:`plan_key`): the seed, and where the data was read from
KEY_EXCLUDED = ("seed", "task.data_dir")


def plan_key(config: dict[str, Any]) -> str:
    """A run's identity within a plan: the digest of its ``results.json`` ``config`` without the seed and
    ``task.data_dir`` (so a report finds the runs wherever the data was read from)."""
    data = copy.deepcopy(config)
    drop_ignored_adapter_options(data.get("adapter"))  # recorded before such an option was left out of the hash
    for dotted in KEY_EXCLUDED:
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return digest(data)[:16]
