"""The files a run leaves in its directory, named once, and how a finished run's results are read back.

The trainer writes them (``lrzoo.train``), ``lrzoo-sweep`` adds its status and log, and the lab
(``lrzoo-report``, ``lrzoo-sweep``'s choices) reads them: every one of them spells a name through here.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

#: a finished run's scores and configuration, written last (``lrzoo.train.evaluation``): its presence marks the
#: run finished for ``lrzoo-train`` (nothing to do), ``lrzoo-sweep`` and ``lrzoo-report``
RESULTS_FILE = "results.json"
#: every eval set's references and predictions of the final evaluation (the report's bootstrap resamples them)
PREDICTIONS_FILE = "predictions.json"
#: the CSV logger's long-format metrics (``step,name,value``)
METRICS_FILE = "metrics.csv"
#: the fingerprint of the data files a run started on (``lrzoo.runs.data``): resuming on edited data is refused
DATA_RECORD = "data.json"
#: the lock of the one process writing a run directory (``lrzoo.runs.lock``)
LOCK_NAME = "run.lock"
#: what ``lrzoo-sweep`` writes in a run directory whose run did not finish: ``status`` (``diverged`` or
#: ``failed``), ``returncode``, ``config_hash``, ``key``, ``seed``, ``log``
STATUS_FILE = "sweep-status.json"
#: each run's stdout and stderr, appended by ``lrzoo-sweep`` in its run directory
LOG_FILE = "sweep.log"
#: what a damaged results file is renamed to: ``results.json.damaged-<time>`` (kept for a look, read by nobody)
DAMAGED_SUFFIX = ".damaged-"
#: eval sets whose name starts with this are slices of the training split (``task.heldout_size``) for choosing
#: hyperparameters: the trainer reports them as ``selection_score``, never as part of ``score``, and the report
#: leaves them out of its columns
HELDOUT_PREFIX = "heldout/"


def read_json(path: Path) -> Optional[dict[str, Any]]:
    """The JSON in ``path``, or None when it is missing or unreadable (a run still writing, a damaged file)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_results(run_dir: str, move_damaged: bool = True) -> Optional[dict[str, Any]]:
    """``run_dir``'s :data:`RESULTS_FILE` (a dict), or None when there is none or it is damaged.

    A file that is not a JSON object (cut short, garbled, not UTF-8) would stop every later attempt at the run
    with a bare ``JSONDecodeError``; instead, with ``move_damaged`` (the lock holder: rank 0 of the run), it is
    renamed to ``results.json.damaged-<time>`` beside it, with a note on stderr naming both files, and the run
    counts as unfinished (it resumes from its newest checkpoint, or starts over).
    """
    path = os.path.join(run_dir, RESULTS_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = f"{type(err).__name__}: {err}"
    else:
        if isinstance(results, dict):
            return results
        reason = f"a JSON {type(results).__name__}, not an object"
    if move_damaged:
        aside = f"{path}{DAMAGED_SUFFIX}{time.strftime('%Y%m%d-%H%M%S')}"
        while os.path.exists(aside):
            aside += "x"
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, aside)
            print(f"[lrzoo] {path} is damaged ({reason}): moved to {aside}; the run counts as unfinished and "
                  "resumes from its newest checkpoint (or starts over)", file=sys.stderr)
    return None


