"""Running a recipe: the composed config of ``lrzoo-train`` checked, its task, data, model, adapter and trainer
built, trained and scored into its run directory (``lrzoo-train`` is :mod:`lrzoo.cli.train`; tests call
:func:`run_recipe` on a composed config).

Everything the run needs is checked before the first step: every config key (:mod:`lrzoo.train.schema`), the
task and its data (:mod:`lrzoo.runs.data`), the model, and the adapter's keywords; an error there is marked as
the user's (:func:`lrzoo.errors.input_phase`). One process writes a run directory at a time
(:mod:`lrzoo.runs.lock`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from ..errors import UserError, input_phase, message
from ..runs.data import check_checkpoint_data, check_recorded_data, check_task_sets, data_plan
from ..runs.files import DATA_RECORD, HELDOUT_PREFIX, LOCK_NAME
from ..runs.identity import config_hash, drop_ignored_adapter_options, hashed_config, plain_config, run_files_record

#: the held-out slice's permutation seed: fixed, independent of the run's ``seed``
HELDOUT_SEED = 1234


def rank() -> int:
    """This process's rank in a distributed job (0 alone)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def run_recipe(cfg: DictConfig, run_dir: str) -> Optional[dict[str, Any]]:
    """Build task, data, model, adapter and trainer from ``cfg``; train; return the results.

    Usable without Hydra (tests compose a config and call this). Returns ``None`` when the run
    stopped early (``trainer.stop_after``) and can be resumed. Rank 0 locks ``run_dir``
    (:class:`lrzoo.runs.lock.RunDirInUse` if another process holds it) and removes what an interrupted
    write left there; then the config's keys are checked (:func:`lrzoo.train.schema.check_keys`) before
    anything loads. A run that fails before it wrote anything of its own removes its directory
    (:func:`remove_stub`).

    Errors in what the run was given (config, data, model, adapter options, checkpoint) keep their types and
    are marked as the user's (:func:`lrzoo.errors.input_phase`): ``lrzoo-train`` prints them as one line.
    """
    from ..runs.lock import RunDirInUse, RunLock, remove_leftovers
    from .resume import UnreadableCheckpoint
    from .schema import check_keys

    is_main = rank() == 0
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
STUB_ENTRIES = {".hydra", LOCK_NAME, DATA_RECORD}


def remove_stub(run_dir: str, lock: Any, output_root: str = "") -> None:
    """Remove ``run_dir`` when it holds nothing but :data:`STUB_ENTRIES`: a run that failed before its first
    metric, checkpoint or result (most often refused by a check) leaves no empty-looking run behind. Called
    while holding its lock; a directory with anything else (a metrics.csv, an earlier run's checkpoints, a
    sweep's log) is left as it is, since it tells what happened."""
    import shutil

    try:
        entries = set(os.listdir(run_dir))
    except OSError:
        return
    if not entries <= STUB_ENTRIES:
        return
    for name in entries - {LOCK_NAME}:
        path = os.path.join(run_dir, name)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    lock.release()
    try:  # gone only if nothing else appeared meanwhile
        os.remove(os.path.join(run_dir, LOCK_NAME))
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

    from ..runs.files import read_results
    from .baselines import BASELINES, prepare_baseline
    from .budget import check_limits, check_splits
    from .callbacks import make_logger
    from .config import EvalConfig
    from .parameterisations import PARAMETERISATIONS, prepare_parameterisation
    from .procedures import LowRankOptimizerProcedure, procedure_for
    from .resume import resume_latest
    from .schema import ADAPTER_ONLY_KEYS
    from .trainer import Trainer, TrainerConfig, seed_everything

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
    # the tokenizer corpus and a local model directory's files are data the run reads too
    fingerprint = run_files_record(plan, model_cfg)
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
                                  tokenizer_corpus=model_cfg.get("tokenizer_corpus"), **head_options(model_cfg, task))
    # the checkpoint's own loss on general text, before anything wraps or rewrites its weights (lrzoo.train.forgetting)
    forgetting = base_forgetting(evaluation, data_dir, model, tokenizer, config.max_length)
    method = adapter.pop("name")
    config = bi_encoder_head_lr(config, model, is_main)
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
    elif method in PARAMETERISATIONS:  # SLTrain: the model's layers re-parameterised, trained from scratch
        peft_model = prepare_parameterisation(model, method, adapter, seed=plain["seed"],
                                              default_targets=model_cfg.get("adapter_targets"))
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


def bi_encoder_head_lr(config: Any, model: Any, is_main: bool) -> Any:
    """``config`` without a ``head_lr`` for a bi-encoder, which has no head (it scores a pair by the cosine of two
    embeddings), said in one line; anywhere else ``checked_rates`` refuses a head rate that reaches nothing.

    The GLUE presets set ``trainer.head_lr`` for every task, and their STS-B and MRPC cells are bi-encoders:
    refusing it there would stop every such run (the tuned plan gives them no head trials, ``trains_head``), and
    dropping it from the presets would change their run hashes. The key stays in the run's config and hash."""
    import dataclasses

    from ..heads import find_pooled_head

    head = find_pooled_head(model)
    if config.head_lr is None or head is None or head.pair_form != "bi_encoder":
        return config
    if is_main:
        print(f"[lrzoo] a bi-encoder (model.similarity_head=bi_encoder) has no task head: trainer.head_lr="
              f"{config.head_lr:g} trains nothing and is ignored")
    return dataclasses.replace(config, head_lr=None)


def base_forgetting(evaluation: Any, data_dir: Optional[str], model: Any, tokenizer: Any, window: int) -> Any:
    """``eval.forgetting``'s measurement with the base model's loss taken now (None when the option is off)."""
    from .forgetting import Forgetting, ForgettingSpec

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
    from .resume import checkpoint_dirs

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
