"""What data a recipe trains and scores on: which tasks, where their files are, and what those files hold.

* :func:`check_task_sets`: a run is named after ``task.name``, so it must train on that task (or on members
  of it, for a union such as ``commonsense/all``) and score on it. A preset's ``task.train_tasks`` /
  ``task.eval_tasks`` left in place under another ``task=`` would train and score on other tasks under
  that name: refused.
* :func:`data_plan`: the folder the run reads (``task.data_dir``; when it is null and the Hub is offline, the
  first of ``$LRZOO_DATA_DIR`` and ``../shared/data`` that holds the run's files) and those files.
* :func:`data_record` / :func:`check_recorded_data`: the fingerprint of those files (size and SHA-256, from
  :mod:`lrzoo.tasks.data_identity`) goes into the run's hash and ``results.json`` (``config.data``), and into
  ``<run dir>/data.json`` when a run starts, so resuming on edited data is refused with the file that changed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import UserError
from ..io import atomic_file
from ..tasks.data_identity import fingerprint, hub_offline, local_data_dirs
from .files import DATA_RECORD


def check_task_sets(task_cfg: dict[str, Any]) -> None:
    """Refuse ``task.train_tasks`` / ``task.eval_tasks`` that are not the task the run is named after."""
    from ..tasks import get_task

    name = task_cfg["name"]
    task = get_task(name)
    members = set(task.eval_tasks) | {name}  # commonsense/all: the eight; any other task: itself
    train, scored = task_cfg.get("train_tasks"), task_cfg.get("eval_tasks")
    for key in ("train_tasks", "eval_tasks"):
        for other in task_cfg.get(key) or ():
            get_task(other)  # an unknown name fails here, with the known ones
    problems = []
    if train and not set(train) <= members:
        problems.append(f"task.train_tasks trains on {', '.join(sorted(set(train) - members))}")
    if scored and name not in scored and not set(scored) <= members:
        problems.append(f"task.eval_tasks scores {', '.join(scored)}")
    if problems:
        raise UserError(
            f"task={name}, but {' and '.join(problems)}: the run would be named {name} without training or "
            f"scoring on it. These keys come from an experiment preset made for another task: use that preset's "
            f"own task, or train and score on {name} alone with task.train_tasks=null task.eval_tasks=null.")
    metric = task_cfg.get("metric")
    if metric is not None and metric != task.primary_metric:
        raise UserError(f"task.metric={metric}: {name} is scored on {task.primary_metric} (task.metric documents the "
                        f"task's primary metric; it does not choose one). Remove the override.")


@dataclass
class DataPlan:
    """The folder a run reads (None: the Hub) and the local files it reads there."""

    data_dir: Optional[str]
    files: list[Path] = field(default_factory=list)
    #: where a null ``data_dir`` was looked for offline, when nothing was found: ``(how, folder)``
    searched: list[tuple[str, Path]] = field(default_factory=list)
    #: how the folder was found when ``task.data_dir`` was null ("$LRZOO_DATA_DIR", ...)
    found_by: Optional[str] = None
    #: the files a run needs, relative to the data folder (for the message when none was found)
    relative_files: list[str] = field(default_factory=list)

    def missing(self) -> list[Path]:
        return [path for path in self.files if not path.is_file()]

    def not_found_message(self, task_name: str) -> str:
        where = "; ".join(f"{how}: {os.path.normpath(path)}" for how, path in self.searched)
        return (f"{task_name} has task.data_dir=null and the Hub is offline (HF_HUB_OFFLINE), and no local copy "
                f"holds its files ({', '.join(self.relative_files)}): looked in {where}. Set "
                "task.data_dir=<folder in the ../shared/data layout> or LRZOO_DATA_DIR=<that folder>.")


def data_plan(task_cfg: dict[str, Any]) -> DataPlan:
    """The data a run with this ``task`` node reads: its training split (or ``train_tasks``' splits) and the eval
    split of each eval task."""
    from ..tasks import get_task

    task = get_task(task_cfg["name"])
    eval_split = task_cfg.get("eval_split") or ("test" if task.kind == "generation" else "validation")
    wanted = [(get_task(name), "train") for name in (task_cfg.get("train_tasks") or [task.name])]
    wanted += [(get_task(name), eval_split) for name in (task_cfg.get("eval_tasks") or task.eval_tasks)]

    def files_under(root: Path) -> list[Path]:
        return [path for part, split in wanted for path in part.data_files(split, root)]

    data_dir = task_cfg.get("data_dir")
    if data_dir is not None:
        root = Path(os.path.expanduser(str(data_dir)))
        return DataPlan(str(data_dir), files_under(root))
    if not hub_offline():
        return DataPlan(None)
    searched = local_data_dirs()
    for how, root in searched:
        files = files_under(root)
        if root.is_dir() and all(path.is_file() for path in files):
            return DataPlan(str(root), files, found_by=how)
    relative = sorted({str(path.relative_to(searched[0][1])) for path in files_under(searched[0][1])})
    return DataPlan(None, searched=searched, relative_files=relative)


#: the data folder as the presets spell it (``${oc.env:LRZOO_DATA_DIR,../shared/data}``): a file of the data folder
#: other than the task's own is named in a run's identity by its place in the layout under this spelling
#: (:func:`file_identity`), which is how every pre-training run spelled its tokenizer corpus before the path was
#: normalised, so those runs keep their hash
LAYOUT_ROOT = "../shared/data"


def model_data_files(model_cfg: Any) -> list[str]:
    """The local files the ``model`` node makes a run read besides the task's: ``model.tokenizer_corpus``."""
    corpus = model_cfg.get("tokenizer_corpus") if isinstance(model_cfg, dict) else None
    return [corpus] if isinstance(corpus, str) and corpus else []


def file_identity(path: str, data_dir: Optional[str]) -> tuple[str, str]:
    """``(record key, spelling)`` of a local file a run reads: a file inside the data folder ``data_dir`` is its
    path relative to that folder, spelled ``LAYOUT_ROOT/<that path>``; any other file is its real path. Whatever
    the spelling (relative, absolute, through a symbolic link, a trailing ``./``), one file gets one identity."""
    here = os.path.abspath(os.path.expanduser(path))
    real = os.path.realpath(here)
    if data_dir is not None:
        root = os.path.abspath(os.path.expanduser(data_dir))
        # the spelling first (a link inside the folder stays inside it), then the folder a link leads to
        for file, folder in ((here, root), (real, os.path.realpath(root))):
            if os.path.commonpath([file, folder]) == folder and file != folder:
                key = Path(os.path.relpath(file, folder)).as_posix()
                return key, f"{LAYOUT_ROOT}/{key}"
    return real, real


def data_record(plan: DataPlan, extra: Sequence[str] = ()) -> dict[str, Any]:
    """``{path relative to the data folder: {"bytes", "sha256"}}`` of the plan's files that exist ({} for the Hub),
    and of the ``extra`` files the run reads (:func:`model_data_files`) under their :func:`file_identity` key, so
    an edited tokenizer corpus is another run too."""
    record = {} if plan.data_dir is None else fingerprint(plan.files, Path(os.path.expanduser(plan.data_dir)))
    for path in extra:
        key, _ = file_identity(path, plan.data_dir)
        if key not in record:  # the task's own file (the pre-training text) is recorded once, as before
            file = Path(os.path.abspath(os.path.expanduser(path)))
            record.update({key: entry for entry in fingerprint([file], file.parent).values()})
    return record


def check_recorded_data(run_dir: str, data: dict[str, Any], resuming: bool) -> None:
    """Compare the fingerprint ``data`` with the one ``run_dir`` recorded when it started. A run resuming on
    other data is refused, naming the files that changed; otherwise the record is (re)written."""
    path = os.path.join(run_dir, DATA_RECORD)
    recorded = _read_record(path)
    if recorded is not None and recorded != data and resuming:
        raise UserError(f"{run_dir} was started on other data: {describe_change(recorded, data)}. Resuming would "
                        "mix the two. Start it over on the new data with resume=never, or put the edited data in "
                        "another run directory (run_name=...).")
    if recorded != data:
        with atomic_file(path) as handle:
            json.dump(data, handle, indent=1, sort_keys=True)


def check_checkpoint_data(checkpoint: str, data: dict[str, Any]) -> None:
    """``resume=<checkpoint dir>``: refuse it when its run directory recorded other data."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))  # <run dir>/checkpoints/step-N
    recorded = _read_record(os.path.join(run_dir, DATA_RECORD))
    if recorded is not None and recorded != data:
        raise UserError(f"resume={checkpoint}: that run was trained on other data: {describe_change(recorded, data)}. "
                        "Resume on the data it was trained on, or start over with resume=never.")


def _read_record(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is damaged ({err}): it records the data this run started on. Delete it and "
                        "start over with resume=never.") from None
    return record if isinstance(record, dict) else {}


def describe_change(before: dict[str, Any], after: dict[str, Any]) -> str:
    """``glue/SST-2/train.tsv changed (4,012 -> 4,020 bytes, sha256 1a2b3c4d -> 5e6f7a8b)``, for each file."""
    changes = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if old is None or new is None:
            changes.append(f"{name} {'is new' if old is None else 'is gone'}")
            continue
        changes.append(f"{name} changed ({old.get('bytes'):,} -> {new.get('bytes'):,} bytes, sha256 "
                       f"{str(old.get('sha256'))[:8]} -> {str(new.get('sha256'))[:8]})")
    return "; ".join(changes) or "the data folder differs"
