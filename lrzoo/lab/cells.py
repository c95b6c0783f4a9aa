"""The cells of a tuned comparison (one per method and dev column of a plan): each cell's chosen rates and seeds
(:func:`lrzoo.lab.choice.cell_state`), its dev scores and predictions read from the runs, the bootstrap interval
over dev examples pooled over seeds (:mod:`lrzoo.lab.intervals`), the paired difference to the best of its
column and to the no-training floor, and the averages over tasks. The tables that show them are
:mod:`lrzoo.lab.tuned`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..runs.files import HELDOUT_PREFIX, PREDICTIONS_FILE, read_json
from ..tasks.metrics import modal_share
from . import intervals
from .choice import CellState, RunIndex, cell_state
from .plan import Composer, Plan, format_lr

AVERAGE = "average"


@dataclass
class Cell:
    method: str
    task: str
    state: CellState
    planned_seeds: int
    metric: Optional[str] = None
    scores: list[Optional[float]] = field(default_factory=list)     # dev primary metric per seed
    predictions: list[Optional[list]] = field(default_factory=list)  # per seed, None: no predictions.json
    references: Optional[list] = None
    model: Optional[str] = None
    trainable_params: Optional[int] = None
    mean: Optional[float] = None
    replicates: Optional[np.ndarray] = None
    interval: tuple[float, float] = (math.nan, math.nan)
    diff: Optional[tuple[float, float, float, str]] = None   # (point, low, high, verdict) vs the column's best
    seeds_replicates: Optional[np.ndarray] = None   # training seeds resampled too (intervals.seeds_resampled)
    seeds_diff: Optional[tuple[float, float, str]] = None    # (low, high, verdict) of the same difference with them
    best: bool = False
    modal_shares: list[float] = field(default_factory=list)   # per seed: share of the most frequent answer
    floor: Optional[tuple[str, float, float, float, str]] = None   # (floor method, point, low, high, verdict)

    @property
    def complete(self) -> bool:
        return self.state.complete(self.planned_seeds)

    def missing(self) -> str:
        running = {o.run_dir: o.detail for o in self.state.outcomes() if o.status == "running"}  # a run once
        now = f"; {len(running)} run(s) in flight now ({', '.join(running.values())})" if running else ""
        return self._missing() + now

    def _missing(self) -> str:
        s = self.state
        if s.chosen is None:
            failed = [f"lr={format_lr(lr)} failed" for lr, o in s.grid.items() if o.status == "failed"]
            if not s.grid_done and not failed:
                return "not run"
            return s.why_not + (f" ({', '.join(failed)})" if failed else "")
        if not s.head_chosen:
            failed = [f"head lr {format_lr(h)} failed" for h, o in s.heads.items() if o.status == "failed"]
            return s.head_why_not + (f" ({', '.join(failed)})" if failed else "")
        if not s.settled:
            failed = [f"lr {format_lr(lr)} failed" for lr, o in s.rechecks.items() if o.status == "failed"]
            return s.recheck_why_not + (f" ({', '.join(failed)})" if failed else "")
        failed = [f"seed {seed} {o.status}" for seed, o in s.seeds.items() if o.status in ("diverged", "failed")]
        return f"{s.seeds_done}/{self.planned_seeds} seeds done" + (f", {', '.join(failed)}" if failed else "")


def dev_set(predictions: dict[str, Any], task: str) -> Optional[dict[str, Any]]:
    """The dev entry of a run's ``predictions.json`` (the set named like the task, else the only one that is
    not a held-out slice)."""
    sets = (predictions or {}).get("sets") or {}
    if task in sets:
        return sets[task]
    dev = [entry for name, entry in sets.items() if not name.startswith(HELDOUT_PREFIX)]
    return dev[0] if len(dev) == 1 else None


def _comparable(entry: dict[str, Any], task: str) -> tuple[list, list, str]:
    """``(predictions, references, metric)`` to bootstrap: generation answers become correct/incorrect
    (accuracy), log-likelihood choices are compared with the gold index."""
    predictions, references = list(entry["predictions"]), list(entry["references"])
    metric = entry.get("primary_metric", "accuracy")
    if entry.get("kind") == "generation":
        from ..tasks import get_task

        checker = get_task(entry.get("task", task))
        predictions = [p is not None and bool(checker.is_correct(str(p), str(r))) for p, r in zip(predictions, references)]
        references = [True] * len(references)
        metric = "accuracy"
    return predictions, references, metric


#: predictions.json kinds whose answers are labels or options (not numbers, not free text)
DISCRETE_KINDS = ("classification", "loglik")


def dev_score(result: dict[str, Any], task: str) -> Optional[float]:
    """The dev primary metric of a finished run from its ``results.json`` (not the held-out one)."""
    metric = result.get("primary_metric")
    metrics = result.get("metrics") or {}
    for key in (f"{task}/{metric}", metric):
        if key in metrics:
            return metrics[key]
    return result.get("score")


def build_cells(root: Path, plan: Plan, replicates: int = intervals.REPLICATES) -> dict[tuple[str, str], Cell]:
    """Every planned cell with its chosen lr, per-seed dev scores, and (complete cells with predictions)
    bootstrap replicates, interval and paired difference to the best of its task."""
    composer, index = Composer(plan), RunIndex(root)
    states = [cell_state(plan, composer, method, task, index) for method, task in plan.cells()]
    columns = {task: eval_columns(task, [s for s in states if s.task == task]) for task in plan.tasks}
    cells: dict[tuple[str, str], Cell] = {}
    for state in states:
        for column in columns[state.task]:
            cell = Cell(state.method.name, column, state, len(plan.seeds_of(state.method)))
            cells[(state.method.name, column)] = _fill_cell(cell, plan)
    for column in (c for task in plan.tasks for c in columns[task]):
        scored = [c for c in cells.values() if c.task == column and c.mean is not None]
        _bootstrap_task(scored, column, replicates)
        _compare_to_floor(scored, plan.floors)
    return cells


def floor_of(column: Sequence[Any], floors: Sequence[str]) -> Optional[Any]:
    """The no-training floor of a column: among its cells of the plan's ``floors`` methods (the untrained
    checkpoint, a probe on its frozen features) with bootstrap replicates, the one with the best mean."""
    candidates = [c for c in column if c.method in floors and c.mean is not None and c.replicates is not None]
    return max(candidates, key=lambda c: c.mean) if candidates else None


def _compare_to_floor(column: Sequence[Any], floors: Sequence[str]) -> None:
    """Each cell's paired difference to its column's floor (:func:`floor_of`): ``above`` when the whole 95%
    interval is above 0, ``below`` when it is below, ``tied`` when it contains 0 (``floor`` for the floor itself)."""
    floor = floor_of(column, floors)
    if floor is None:
        return
    for cell in column:
        if cell is floor:
            cell.floor = (floor.method, 0.0, 0.0, 0.0, "floor")
        elif cell.replicates is not None:
            low, high, verdict = intervals.paired_difference(cell.replicates, floor.replicates)
            verdict = {"better": "above", "worse": "below"}.get(verdict, verdict)
            cell.floor = (floor.method, cell.mean - floor.mean, low, high, verdict)


def eval_columns(task: str, states: list[CellState]) -> list[str]:
    """The columns of a plan task: its eval sets other than held-out slices, read from the first finished run's
    ``predictions.json`` (``commonsense/all`` is scored on 7 test sets), else the task itself."""
    for state in states:
        for outcome in state.outcomes():
            sets = ((read_json(outcome.run_dir / PREDICTIONS_FILE) or {}).get("sets") or {}) if outcome.run_dir else {}
            names = [name for name in sets if not name.startswith(HELDOUT_PREFIX)]
            if outcome.status == "done" and names:
                return names
    return [task]


def _fill_cell(cell: Cell, plan: Plan) -> Cell:
    """Per-seed scores and predictions of a complete cell (its column: an eval set of the cell's runs)."""
    state, task = cell.state, cell.task
    for outcome in state.outcomes():
        if outcome.result:
            cell.model = cell.model or outcome.result.get("model")
            cell.metric = cell.metric or outcome.result.get("primary_metric")
    if cell.complete:
        for seed in plan.seeds_of(state.method):   # one run for a method that trains nothing
            outcome = state.seeds[seed]
            cell.trainable_params = outcome.result.get("trainable_params")
            entry = dev_set(read_json(outcome.run_dir / PREDICTIONS_FILE) or {}, task) if outcome.run_dir else None
            if entry is not None:
                if entry.get("kind") in DISCRETE_KINDS and entry.get("predictions"):
                    cell.modal_shares.append(modal_share(entry["predictions"]))
                predictions, references, metric = _comparable(entry, task)
                cell.metric = entry.get("primary_metric", cell.metric)
                if cell.references is None:
                    cell.references = references
                cell.predictions.append(predictions if references == cell.references and None not in predictions
                                        else None)
                usable = None not in predictions
                cell.scores.append(intervals.point_metric(metric, predictions, references) if usable else None)
            else:
                cell.predictions.append(None)
                cell.scores.append(dev_score(outcome.result, task))
        if all(s is not None for s in cell.scores):
            cell.mean = statistics.fmean(cell.scores)
    return cell


def _bootstrap_task(column: list[Cell], task: str, replicates: int) -> None:
    references = next((c.references for c in column if c.references is not None), None)
    if references is not None:
        indices = intervals.replicate_indices(len(references), task, replicates)
        for cell in column:
            if cell.references == references and all(p is not None for p in cell.predictions):
                per_seed = intervals.seed_replicates(_bootstrap_metric(cell), cell.predictions, references, indices)
                cell.replicates = per_seed.mean(axis=0)
                cell.interval = intervals.percentile_interval(cell.replicates)
                if len(per_seed) > 1:
                    cell.seeds_replicates = intervals.seeds_resampled(per_seed, task)
                elif cell.state.method.trains_nothing:
                    # no training, so no seed to resample: every draw of seeds gives these replicates, and a
                    # 3-seed cell's resampled-seeds difference to it (the table's †) stays defined
                    cell.seeds_replicates = cell.replicates
    _compare(column)


def _bootstrap_metric(cell: Cell) -> str:
    return "accuracy" if cell.references and all(r is True for r in cell.references) else cell.metric


def _compare(column: list[Any]) -> None:
    """Mark the best mean of a column and each other's paired difference to it (point, interval, verdict)."""
    finite = [c for c in column if c.mean is not None and math.isfinite(c.mean)]
    if not finite:
        return
    best = max(finite, key=lambda c: c.mean)
    best.best = True
    for cell in finite:
        if cell is best:
            continue
        if cell.replicates is not None and best.replicates is not None:
            low, high, verdict = intervals.paired_difference(cell.replicates, best.replicates)
        else:
            low, high, verdict = math.nan, math.nan, "n/a"
        cell.diff = (cell.mean - best.mean, low, high, verdict)
        if cell.seeds_replicates is not None and best.seeds_replicates is not None:
            cell.seeds_diff = intervals.paired_difference(cell.seeds_replicates, best.seeds_replicates)


@dataclass
class Average:
    """A method's mean over the plan's tasks (only when complete on every task); its bootstrap averages the
    tasks' replicates (the tasks' resamples are independent)."""

    method: str
    mean: float
    replicates: Optional[np.ndarray]
    interval: tuple[float, float] = (math.nan, math.nan)
    diff: Optional[tuple[float, float, float, str]] = None
    seeds_replicates: Optional[np.ndarray] = None
    seeds_diff: Optional[tuple[float, float, str]] = None
    best: bool = False
    floor: Optional[tuple[str, float, float, float, str]] = None


def columns_of(cells: dict[tuple[str, str], Cell]) -> list[str]:
    """The report's columns in plan order: one per task, or per eval set for a task scored on several."""
    return list(dict.fromkeys(column for _, column in cells))


def averages(cells: dict[tuple[str, str], Cell], plan: Plan) -> dict[str, Average]:
    out = {}
    columns = columns_of(cells)
    for method in plan.methods:
        mine = [cells[(method.name, column)] for column in columns]
        if len(columns) < 2 or not all(c.mean is not None for c in mine):
            continue
        reps = (np.mean([c.replicates for c in mine], axis=0) if all(c.replicates is not None for c in mine)
                else None)
        seeds = (np.mean([c.seeds_replicates for c in mine], axis=0)
                 if all(c.seeds_replicates is not None for c in mine) else None)
        out[method.name] = Average(method.name, statistics.fmean(c.mean for c in mine), reps,
                                   intervals.percentile_interval(reps) if reps is not None else (math.nan, math.nan),
                                   seeds_replicates=seeds)
    _compare(list(out.values()))
    # the average's floor: the mean of the columns' floors (each column's own best no-training cell)
    floors = [floor_of([c for (_, col), c in cells.items() if col == column], plan.floors) for column in columns]
    if len(columns) > 1 and all(f is not None for f in floors):
        floor_reps = np.mean([f.replicates for f in floors], axis=0)
        floor_mean = statistics.fmean(f.mean for f in floors)
        names = "+".join(dict.fromkeys(f.method for f in floors))
        for a in out.values():
            if a.replicates is not None:
                low, high, verdict = intervals.paired_difference(a.replicates, floor_reps)
                a.floor = (names, a.mean - floor_mean, low, high, {"better": "above", "worse": "below"}.get(verdict,
                                                                                                         verdict))
    return out


def shown_difference(diff: tuple, seeds_diff: Optional[tuple] = None, scale: float = 1.0) -> str:
    """A paired difference ``(point, low, high, verdict)`` as the reports print it, ×``scale``; where resampling the
    training seeds too (``seeds_diff``: low, high, verdict) changes the verdict, that interval follows with a †."""
    point, low, high, verdict = diff
    if verdict == "n/a":
        return f"{scale * point:+.2f} (no interval)"
    shown = f"{scale * point:+.2f} [{scale * low:+.1f}, {scale * high:+.1f}] {verdict}"
    if seeds_diff is not None and seeds_diff[2] != verdict:
        low, high, seeds_verdict = seeds_diff
        shown += f"; seeds resampled: [{scale * low:+.1f}, {scale * high:+.1f}] {seeds_verdict} †"
    return shown
