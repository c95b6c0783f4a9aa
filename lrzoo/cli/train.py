"""``lrzoo-train``: the Hydra app that runs a recipe (model × adapter × task × trainer × logger).

    lrzoo-train adapter=dora task=glue/rte trainer.lr=4e-4 task.data_dir=../shared/data
    lrzoo-train -m adapter=lora,dora,lora_xs task=glue/rte seed=0,1,2      # a sweep
    torchrun --nproc_per_node 2 -m lrzoo.cli.train experiment=demo          # DDP, one run dir

Each run gets its own directory, ``<output_root>/<task>/<model>/<adapter>/seed<seed>-<hash>``, where
``<hash>`` (:func:`run_hash`) digests the whole resolved configuration but the seed and bookkeeping
keys, plus the size and SHA-256 of every local data file the run reads: a sweep over any key never mixes
two configurations in one directory, an edited data file is a new run, every rank of a job and every
re-run of a command find the same one, and the seeds of one configuration share the hash. One process
writes a run directory at a time (:mod:`lrzoo.train.run_dir`).

The config tree is ``recipes/`` (root ``config.yaml``); the ``adapter`` group is the top-level
``adapters/`` directory, registered into Hydra's ConfigStore at startup because its folder name
differs from the group's. Everything the run needs is checked before the first step: every config key
(:mod:`lrzoo.train.schema`), the task and its data (:mod:`lrzoo.cli.run_data`), the model, and the
adapter's keywords. A mistake there is one line on stderr and exit status 2 (:mod:`lrzoo.cli.errors`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import sys
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from ..configs import config_dir
from ..errors import UserError
from .errors import debugging, input_phase, is_user_error, message, take_debug_flag
from .overrides import check_overrides
from .run_data import check_checkpoint_data, check_recorded_data, check_task_sets, data_plan, data_record

#: keys that do not change what a run computes: excluded from the config hash, so a resumed
#: run (which differs in them) still matches its checkpoint.
_HASH_EXCLUDED = ("resume", "logger", "output_root", "run_name", "trainer.stop_after", "trainer.progress",
                  # a policy for non-finite steps: switching a diverged run to skip_step resumes it from its
                  # last good checkpoint (lrzoo.train.divergence)
                  "trainer.on_nonfinite")

#: options added after runs had finished, with the value that reproduces what those runs computed: left out
#: of the hash (and of results.json's ``config``) when they have it, so the runs that predate an option keep
#: their hash (and are still skipped as done), while any other value hashes differently. A node emptied by
#: this is dropped too.
_HASH_DEFAULTS = {"eval.mode": "generate", "eval.choices": "label", "eval.forgetting": None,
                  # the encoder head (lrzoo.heads): null = the checkpoint's pooling, which for every preset but
                  # minilm (which sets mean) is transformers' own head, what runs computed before the keys existed
                  "model.pooling": None, "model.similarity_head": "cross_encoder"}


#: the held-out slice's permutation seed: fixed, independent of the run's ``seed``
HELDOUT_SEED = 1234


def register_adapter_configs() -> None:
    """Store every ``adapters/*.yaml`` in Hydra's ConfigStore as option ``adapter=<stem>``."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for path in sorted(config_dir("adapters").glob("*.yaml")):
        store.store(group="adapter", name=path.stem, node=OmegaConf.load(path))


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers, without the ``hydra`` node (dropped before resolving: it has
    values Hydra fills in only inside a job)."""
    if "hydra" in cfg:
        unresolved = OmegaConf.to_container(cfg, resolve=False)
        unresolved.pop("hydra")
        cfg = OmegaConf.create(unresolved)
    return OmegaConf.to_container(cfg, resolve=True)


def hashed_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the ``hydra`` node, :data:`_HASH_EXCLUDED` and the options of
    :data:`_HASH_DEFAULTS` at their default, plus ``data``: the size and SHA-256 of every local data file the
    run reads (:mod:`lrzoo.cli.run_data`), so an edited file makes another run. What the run computes from
    (also saved in ``results.json`` as ``config``, which ``lrzoo-report`` groups runs by)."""
    data = plain_config(cfg)
    task = data.get("task")
    if isinstance(task, dict):
        plan = _data_plan_or_none(task)
        if plan is not None and plan.data_dir is not None:
            # the folder, not its spelling: ``../shared/data`` and LRZOO_DATA_DIR=/abs/shared/data are the same
            # data, and a sweep resumed under the other spelling must still find its finished runs; a null
            # data_dir read offline from a local copy is that copy
            task["data_dir"] = os.path.realpath(os.path.expanduser(plan.data_dir))
            data["data"] = data_record(plan)
        elif isinstance(task.get("data_dir"), str):
            task["data_dir"] = os.path.realpath(os.path.expanduser(task["data_dir"]))
    for dotted in _HASH_EXCLUDED:
        _pop_dotted(data, dotted)
    for dotted, default in _HASH_DEFAULTS.items():
        _pop_dotted(data, dotted, only_if=lambda value, default=default: value == default, prune_empty=True)
    drop_ignored_adapter_options(data.get("adapter"))
    return data


def _data_plan_or_none(task: dict[str, Any]) -> Any:
    """:func:`lrzoo.cli.run_data.data_plan`, or None when the task node is broken (an unknown task, a bad split):
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


def _pop_dotted(data: dict[str, Any], dotted: str, only_if: Any = None, prune_empty: bool = False) -> None:
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


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def config_hash(cfg: DictConfig) -> str:
    """A short digest of the resolved config, minus :data:`_HASH_EXCLUDED`."""
    return _digest(hashed_config(cfg))[:16]


def run_hash(cfg: DictConfig) -> str:
    """8 hex digits of :func:`config_hash`'s config without ``seed``: the ``<hash>`` of a run directory's
    name (``seed<seed>-<hash>``), shared by the seeds of one configuration."""
    data = hashed_config(cfg)
    data.pop("seed", None)
    return _digest(data)[:8]


def _run_hash_resolver(*, _root_: DictConfig) -> str:
    """``${lrzoo.run_hash:}`` in ``run_name``: :func:`run_hash` of the config it sits in. A copy is hashed,
    without ``run_name`` (this very interpolation) and the ``hydra`` node (whose run dir interpolates it)."""
    data = OmegaConf.to_container(_root_, resolve=False)
    data.pop("hydra", None)
    data["run_name"] = ""
    return run_hash(OmegaConf.create(data))


OmegaConf.register_new_resolver("lrzoo.run_hash", _run_hash_resolver, replace=True)


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def run_recipe(cfg: DictConfig, run_dir: str) -> Optional[dict[str, Any]]:
    """Build task, data, model, adapter and trainer from ``cfg``; train; return the results.

    Usable without Hydra (tests compose a config and call this). Returns ``None`` when the run
    stopped early (``trainer.stop_after``) and can be resumed. Rank 0 locks ``run_dir``
    (:class:`lrzoo.train.run_dir.RunDirInUse` if another process holds it) and removes what an interrupted
    write left there; then the config's keys are checked (:func:`lrzoo.train.schema.check_keys`) before
    anything loads. A run that fails before it wrote anything of its own removes its directory
    (:func:`remove_stub`).

    Errors in what the run was given (config, data, model, adapter options, checkpoint) keep their types and
    are marked as the user's (:func:`lrzoo.cli.errors.input_phase`): ``lrzoo-train`` prints them as one line.
    """
    from lrzoo.train.resume import UnreadableCheckpoint
    from lrzoo.train.run_dir import RunDirInUse, RunLock, remove_leftovers
    from lrzoo.train.schema import check_keys

    is_main = _rank() == 0
    with input_phase(RunDirInUse):
        lock = RunLock(run_dir, enabled=is_main)
        lock.acquire()
    try:
        if is_main:
            removed = remove_leftovers(run_dir)
            if removed:
                print(f"[lrzoo] removed what an interrupted write left in {run_dir}: "
                      f"{', '.join(os.path.relpath(p, run_dir) for p in removed)}", file=sys.stderr)
        try:
            with input_phase(UnreadableCheckpoint):
                check_keys(plain_config(cfg))
                trainer = _prepare(cfg, run_dir, is_main)
            return trainer if isinstance(trainer, dict) else trainer.fit()
        except BaseException:
            if is_main:
                remove_stub(run_dir, lock, str(cfg.get("output_root") or ""))
            raise
    finally:
        lock.release()


#: what a run directory holds before the run has written anything of its own: Hydra's record of the command
#: (``.hydra/``), the lock, the data fingerprint
_STUB_ENTRIES = {".hydra", "run.lock", "data.json"}


def remove_stub(run_dir: str, lock: Any, output_root: str = "") -> None:
    """Remove ``run_dir`` when it holds nothing but :data:`_STUB_ENTRIES`: a run that failed before its first
    metric, checkpoint or result (most often refused by a check) leaves no empty-looking run behind. Called
    while holding its lock; a directory with anything else (a metrics.csv, an earlier run's checkpoints, a
    sweep's log) is left as it is, since it tells what happened."""
    import shutil

    try:
        entries = set(os.listdir(run_dir))
    except OSError:
        return
    if not entries <= _STUB_ENTRIES:
        return
    for name in entries - {"run.lock"}:
        path = os.path.join(run_dir, name)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    lock.release()
    try:  # gone only if nothing else appeared meanwhile
        os.remove(os.path.join(run_dir, "run.lock"))
        os.rmdir(run_dir)
    except OSError:
        return
    # and the folders above it that it leaves empty (<task>/<model>/<adapter>/), up to output_root
    root, parent = os.path.abspath(output_root or run_dir), os.path.dirname(os.path.abspath(run_dir))
    while parent.startswith(root + os.sep):
        try:
            os.rmdir(parent)
        except OSError:
            break
        parent = os.path.dirname(parent)


def _prepare(cfg: DictConfig, run_dir: str, is_main: bool) -> Any:
    """The checks and the set-up of a run: the finished results (already done), or the :class:`Trainer` to fit."""
    import lrzoo
    from lrzoo.models import head_options, load_model
    from lrzoo.tasks import get_task
    from lrzoo.train.baselines import BASELINES, prepare_baseline
    from lrzoo.train.budget import check_limits, check_splits
    from lrzoo.train.callbacks import make_logger
    from lrzoo.train.config import HELDOUT_PREFIX, EvalConfig
    from lrzoo.train.procedures import LowRankOptimizerProcedure, procedure_for
    from lrzoo.train.resume import resume_latest
    from lrzoo.train.run_dir import read_results
    from lrzoo.train.schema import ADAPTER_ONLY_KEYS
    from lrzoo.train.trainer import Trainer, TrainerConfig, seed_everything

    plain = OmegaConf.to_container(cfg, resolve=True)
    model_cfg, task_cfg, adapter = plain["model"], plain["task"], dict(plain["adapter"])
    # Cheap checks first: task, data and trainer options fail before the model is loaded.
    task = get_task(task_cfg["name"])
    check_task_sets(task_cfg)
    plan = data_plan(task_cfg)
    if plan.searched:  # data_dir null, the Hub offline, no local copy
        raise UserError(plan.not_found_message(task.name))
    data_dir = plan.data_dir
    if plan.found_by and is_main:
        print(f"[lrzoo] task.data_dir is null and the Hub is offline: reading {task.name} from {data_dir} "
              f"({plan.found_by})")
    digest = config_hash(cfg)
    resume = str(plain.get("resume", "auto"))
    previous = read_results(run_dir, move_damaged=is_main) if resume == "auto" else None
    if previous is not None:
        if previous.get("config_hash") == digest:  # re-running a finished sweep skips what is done
            if is_main:
                print(f"[lrzoo] {run_dir} already finished with this configuration; resume=never re-runs it")
            return previous
    fingerprint = data_record(plan)
    if is_main:  # the data this run started on: resuming on edited files is refused with the file that changed
        check_recorded_data(run_dir, fingerprint, resuming=resume == "auto" and _has_checkpoint(run_dir))
    if resume not in ("auto", "never"):
        check_checkpoint_data(resume, fingerprint)
    seed_everything(plain["seed"])
    trainer_options = {**plain["trainer"], "seed": plain["seed"]}
    trainer_options["max_length"] = (trainer_options.get("max_length") or task_cfg.get("max_length")
                                     or model_cfg.get("max_length") or 128)
    # The task's protocol decoding settings (task.generation), then the trainer's overrides.
    trainer_options["generation"] = {**(task_cfg.get("generation") or {}), **(trainer_options.get("generation") or {})}
    config = TrainerConfig.from_dict(trainer_options)
    evaluation = EvalConfig.from_dict(plain.get("eval") or {})  # the root eval node: generate | loglik
    eval_split = task_cfg.get("eval_split") or ("test" if task.kind == "generation" else "validation")
    check_limits(plain.get("train_limit"), plain.get("eval_limit"))
    heldout_size = task_cfg.get("heldout_size")  # absent from the task YAMLs: +task.heldout_size=N
    with _hub_errors(task.name, data_dir):
        train_rows = _train_rows(task, task_cfg.get("train_tasks"), data_dir,
                                 plain.get("train_limit") if heldout_size is None else None)
    train_rows, heldout_rows = split_heldout(train_rows, heldout_size, task.name, config.batch_size,
                                             plain.get("train_limit"), task_cfg.get("train_tasks"))
    train_rows = formatted_train_rows(task, train_rows, task_cfg.get("format"), evaluation)
    eval_sets = {}
    for name in task_cfg.get("eval_tasks") or getattr(task, "eval_tasks", (task.name,)):
        eval_task = task if name == task.name else get_task(name)
        with _hub_errors(name, data_dir):
            eval_sets[name] = (eval_task, eval_task.load_split(eval_split, data_dir, limit=plain.get("eval_limit")))
    if heldout_rows is not None:  # scored beside dev, reported as selection_score, never part of score
        eval_sets[HELDOUT_PREFIX + task.name] = (task, heldout_rows)
    check_splits(task.name, train_rows, eval_sets, config.batch_size, plain.get("train_limit"), plain.get("eval_limit"))

    model, tokenizer = load_model(model_cfg["source"], task.kind, task.num_labels, dtype=model_cfg.get("dtype"),
                                  config_overrides=model_cfg.get("config_overrides"),
                                  quantization=model_cfg.get("quantization"), compute_dtype=config.precision,
                                  **head_options(model_cfg, task))
    # the checkpoint's own loss on general text, before anything wraps or rewrites its weights (lrzoo.train.forgetting)
    forgetting = base_forgetting(evaluation, data_dir, model, tokenizer, config.max_length)
    method = adapter.pop("name")
    procedure = None
    if method in BASELINES or method in lrzoo.list_optimizers():
        # experiment presets set adapter.r/alpha/dropout for every adapter; they mean nothing to a baseline or an
        # optimizer (lrzoo.train.schema lets only these through)
        ignored = {k: adapter.pop(k) for k in ADAPTER_ONLY_KEYS if k in adapter}
        if ignored and is_main:
            kind = "a baseline" if method in BASELINES else "an optimizer, not an adapter"
            rank = "" if method in BASELINES else " (its rank is adapter.rank)"
            print(f"[lrzoo] {method} is {kind}: ignoring {ignored}{rank}")
    if method in BASELINES:
        peft_model = prepare_baseline(model, method)
    elif method in lrzoo.list_optimizers():  # GaLore, Fira: every weight trained through a low-rank optimizer
        peft_model = prepare_baseline(model, "full_finetune")
        procedure = LowRankOptimizerProcedure({"method": method, **adapter}, config)
    else:
        if adapter.get("target_modules") is None and model_cfg.get("adapter_targets") is not None:
            adapter["target_modules"] = list(model_cfg["adapter_targets"])
        # SALT/SVFit's alpha, which the experiment presets set for every adapter: wrap refuses it, so drop it
        ignored = {k: v for k, v in drop_ignored_adapter_options(adapter, method).items() if v is not None}
        if ignored and is_main:
            print(f"[lrzoo] {method} has no scale: ignoring {ignored} (not part of the run's hash; "
                  f"docs/adapters/{method}.md)")
        peft_model = lrzoo.wrap(model, method, **adapter)

    if procedure is None:
        procedure = procedure_for(peft_model, config)  # the method's procedure, with the options wrap recorded
    logger_options = dict(plain["logger"])
    logger = make_logger(logger_options.pop("name"), run_dir, is_main, **logger_options)
    run_info = {"adapter": method, "adapter_config": adapter, "model": model_cfg["name"], "seed": plain["seed"],
                "config_hash": digest, "config": hashed_config(cfg), "lrzoo_version": lrzoo.__version__,
                "train_tasks": list(task_cfg.get("train_tasks") or [task.name]), "eval_tasks": list(eval_sets)}
    trainer = Trainer(peft_model, tokenizer, task, train_rows, eval_sets, config, run_dir,
                      callbacks=[logger] if logger is not None else [], run_info=run_info, procedure=procedure,
                      evaluation=evaluation)
    trainer.forgetting = forgetting
    if is_main:
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in peft_model.parameters())
        print(f"[lrzoo] {method} on {model_cfg['name']}: {trainable:,} trainable of {total:,} parameters "
              f"({100 * trainable / total:.3f}%); run dir {run_dir}")

    checkpoint = None
    if resume == "auto":  # the newest intact checkpoint; damaged ones are skipped with a warning
        checkpoint = resume_latest(trainer, run_dir, verbose=is_main)
    elif resume != "never":
        if not os.path.isfile(os.path.join(resume, "trainer_state.pt")):
            raise FileNotFoundError(f"resume={resume!r}: {resume} holds no trainer_state.pt. Use resume=auto "
                                    "(latest checkpoint of this run dir), resume=never, or a checkpoint directory.")
        trainer.load_checkpoint(resume)
        checkpoint = resume
    if checkpoint is not None:
        if is_main:
            print(f"[lrzoo] resumed from {checkpoint} at step {trainer.start_step}")
    return trainer


def base_forgetting(evaluation: Any, data_dir: Optional[str], model: Any, tokenizer: Any, window: int) -> Any:
    """``eval.forgetting``'s measurement with the base model's loss taken now (None when the option is off)."""
    from lrzoo.train.forgetting import Forgetting, ForgettingSpec

    spec = ForgettingSpec.parse(evaluation.forgetting)
    if spec is None:
        return None
    import torch

    if data_dir is None:
        raise UserError("eval.forgetting reads its text from task.data_dir (../shared/data layout); set task.data_dir")
    forgetting = Forgetting(spec, data_dir, tokenizer, window)
    local = int(os.environ.get("LOCAL_RANK", 0))
    forgetting.measure_base(model, f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    return forgetting


def _has_checkpoint(run_dir: str) -> bool:
    from lrzoo.train.resume import checkpoint_dirs

    return bool(checkpoint_dirs(run_dir))


@contextlib.contextmanager
def _hub_errors(task_name: str, data_dir: Optional[str]) -> Iterator[None]:
    """A task read from the Hub (``data_dir`` null) that cannot reach it: one line with the ways round it."""
    try:
        yield
    except ConnectionError as err:
        if data_dir is not None:
            raise
        raise UserError(f"{task_name}: could not reach the Hugging Face Hub for its data ({message(err)}). Offline, "
                        "set HF_HUB_OFFLINE=1 to read a local copy ($LRZOO_DATA_DIR or ../shared/data), or give "
                        "task.data_dir=<folder in the ../shared/data layout>.") from err


def split_heldout(rows: Any, size: Any, task_name: str, batch_size: int, train_limit: Optional[int] = None,
                  train_tasks: Optional[list[str]] = None) -> tuple[Any, Any]:
    """``(training rows, held-out rows)``: ``task.heldout_size`` rows of the training split set aside for
    choosing hyperparameters (``lrzoo-sweep``'s learning rate) and scored as eval set ``heldout/<task>``.

    The slice is the first ``size`` of a permutation seeded by :data:`HELDOUT_SEED` alone, so every
    learning rate and every seed of a sweep holds out the same rows, and it is taken from the whole split
    before ``train_limit`` keeps the first N of the rest. Both parts keep the split's order (a
    ``datasets.Dataset`` stays one). With ``train_tasks`` the rows are the union of their training splits
    and the slice is taken from it. ``size=None``: no slice, the rows unchanged."""
    if size is None:
        return rows, None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"task.heldout_size={size!r}: must be a positive integer (training rows held out to choose "
                         "hyperparameters on, scored as eval set heldout/<task>) or null (off).")
    # with task.train_tasks the rows are their interleaved union (commonsense/all): the slice mixes the tasks in
    # proportion to their training splits, and the union task scores it (``heldout/commonsense/all``)
    import numpy as np

    total = len(rows)
    if total - size < batch_size:
        raise ValueError(f"task.heldout_size={size} leaves {total - size} of the {total} training rows of {task_name} "
                         f"to train on, fewer than one batch (trainer.batch_size={batch_size}). Lower "
                         "task.heldout_size or trainer.batch_size.")
    order = np.random.default_rng(HELDOUT_SEED).permutation(total)
    held, kept = sorted(order[:size].tolist()), sorted(order[size:].tolist())
    if train_limit is not None:
        kept = kept[:train_limit]

    def pick(indices: list[int]) -> Any:
        return rows.select(indices) if hasattr(rows, "select") else [rows[i] for i in indices]

    return pick(kept), pick(held)


def formatted_train_rows(task: Any, rows: Any, fmt: Optional[str], evaluation: Any) -> Any:
    """The training rows in ``task.format`` (absent/null: the task's own, e.g. LLM-Adapters' instruction).
    ``question``: multiple-choice rows as lm-eval's plain ``Question: <q>\nAnswer:`` + " <gold option text>"
    (:meth:`lrzoo.tasks.commonsense.CommonsenseTask.question_row`), scored the same way by ``eval.choices=question``; any other
    evaluation would score a format the model was not trained on, so it is refused."""
    if fmt is None:
        return rows
    if fmt != "question":
        raise ValueError(f"task.format={fmt!r}: must be null (the task's own prompt) or 'question' (multiple-choice "
                         "rows as 'Question: <q>\\nAnswer: <option text>').")
    if not getattr(task, "multiple_choice", False):
        raise ValueError(f"task.format=question rewrites multiple-choice rows (commonsense/*); {task.name} has none.")
    if (evaluation.mode, evaluation.choices) != ("loglik", "question"):
        raise ValueError(f"task.format=question trains on 'Question: <q>\\nAnswer: <option text>', but "
                         f"eval.mode={evaluation.mode} eval.choices={evaluation.choices} scores another format; set "
                         "eval.mode=loglik eval.choices=question.")
    return [task.question_row(row) for row in rows]


def _train_rows(task: Any, train_tasks: Optional[list[str]], data_dir: Optional[str], limit: Optional[int]) -> Any:
    """The task's own training split (a ``datasets.Dataset``), or the union of ``task.train_tasks``' splits
    (e.g. the commonsense tasks whose training files are at hand), interleaved so that ``train_limit``
    takes from every one."""
    if not train_tasks:
        return task.load_split("train", data_dir, limit=limit)
    from lrzoo.tasks import get_task

    parts = [list(get_task(name).load_split("train", data_dir)) for name in train_tasks]
    mixed = [row for group in itertools.zip_longest(*parts) for row in group if row is not None]
    return mixed[:limit] if limit is not None else mixed


def _summary(results: dict[str, Any], run_dir: str) -> str:
    from lrzoo.train.run_dir import RESULTS_FILE

    def shown(value: Optional[float], scale: float = 1.0, digits: int = 4) -> str:
        return "null (not finite: see nonfinite_metrics)" if value is None else f"{scale * value:.{digits}f}"

    metrics = ", ".join(f"{k}={shown(v)}" for k, v in results["metrics"].items() if k != "score")
    skipped = results.get("nonfinite_steps_skipped")
    return (f"[lrzoo] {results['task']} / {results['adapter']} / {results['model']} seed {results['seed']}: "
            f"{metrics}\n[lrzoo] {results['primary_metric']} = {shown(results['score'], 100, 2)}  "
            + (f"[{skipped} non-finite steps skipped] " if skipped else "") +
            f"({results['steps']} steps, {results['wall_time_s']:.0f} s, {results['train_tokens_per_s']:.0f} tokens/s); "
            f"results in {os.path.join(run_dir, RESULTS_FILE)}")


#: exit status of ``lrzoo-train`` when a run was refused (its input) / diverged; the worst of a sweep's runs wins
EXIT_REFUSED, EXIT_DIVERGED = 2, 1
_failures: list[int] = []


def _hydra_task(cfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig

    from lrzoo.train.divergence import DivergenceError

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        results = run_recipe(cfg, run_dir)
    except Exception as err:
        diverged = isinstance(err, DivergenceError)
        if debugging() or not (diverged or is_user_error(err)):
            raise  # a bug: Hydra prints its traceback
        # The message alone, as the last line of the output (lrzoo-sweep's failure line); no Hydra traceback
        # hint. In a sweep (-m) the other runs still go, and lrzoo-train exits non-zero at the end.
        print(f"[lrzoo] {err}" if diverged else f"lrzoo-train: error: {message(err)}", file=sys.stderr)
        _failures.append(EXIT_DIVERGED if diverged else EXIT_REFUSED)
        return None
    if results is None:
        if _rank() == 0:
            print(f"[lrzoo] stopped early (trainer.stop_after); run the same command again to resume from {run_dir}")
        return None
    if _rank() == 0:
        print(_summary(results, run_dir))
    return results["score"]


def main() -> None:
    """Console entry point of ``lrzoo-train`` (and ``python -m lrzoo.cli.train``, handy under ``torchrun -m`` /
    ``accelerate launch -m``). ``--debug`` shows the traceback of a refused configuration (as
    ``HYDRA_FULL_ERROR=1`` does)."""
    import hydra

    from .console import quiet_console

    sys.argv[1:] = take_debug_flag(sys.argv[1:])
    quiet_console()
    register_adapter_configs()
    try:
        check_overrides(sys.argv[1:])
    except UserError as err:
        if debugging():
            raise
        print(f"lrzoo-train: error: {message(err)}", file=sys.stderr)
        sys.exit(EXIT_REFUSED)
    if _rank() != 0:
        # One run directory for all ranks (hydra#2070): only rank 0 writes .hydra/ and the log.
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    app = hydra.main(config_path=str(config_dir("recipes")), config_name="config", version_base="1.3")(_hydra_task)
    try:
        app()
    finally:
        _leave_process_group()
    if _failures:
        sys.exit(max(_failures))


def _leave_process_group() -> None:
    """Destroy the process group (if torchrun/accelerate made one) while the interpreter is whole. Left to
    interpreter shutdown, gloo's worker threads can die holding Python tensors and the rank aborts with
    "terminate called without an active exception" (SIGABRT) after a run that succeeded (pytorch#190489)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
