"""The method comparison of a plan in the shape of PEFT's ``method_comparison`` suite (issue 28): one row per
method and task with its score, its difference to the no-training floor, what it trains, saves, holds and
costs, and, for decoders, how much it forgot.

Rows are grouped by what a run trains, read from its ``results.json`` (never from the method's name): the plan's
floors (no training), adapters (at most :data:`MOST_WEIGHTS` of the model's parameters trained) and methods that
train most weights (full fine-tuning, and GaLore/Fira/ReLoRA as configured when they train the norms and heads
too). A cell whose chosen rate is an end of the rates tried, still winning there after the plan's growth
(``grid.extend``) ran out, is flagged ``edge``: its optimum may lie beyond, and it may be under-tuned.

Built on :mod:`lrzoo.cli.tuned`'s cells (the scores, bootstrap intervals and floor differences are theirs).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from . import intervals
from .choice import beyond_edge
from .plan import Plan

#: a run that trains more than this share of the model's parameters is grouped with full fine-tuning
MOST_WEIGHTS = 0.5
#: the file lrzoo-report --plan writes beside results.csv: this table's rows as numbers
COMPARISON_CSV = "comparison.csv"
GROUPS = ("no-training floor", "adapter", "most weights", "no finished run yet")
#: files of a saved adapter (or, for a method that trains the model's own weights, the saved model)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def adapter_bytes(run_dir: Optional[Path]) -> Optional[int]:
    """Bytes of the weight files a run saved in ``adapter/`` (None: it saved none, e.g. zero-shot)."""
    folder = Path(run_dir) / "adapter" if run_dir else None
    if folder is None or not folder.is_dir():
        return None
    files = [p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    return sum(p.stat().st_size for p in files) if files else None


def edge_flags(state: Any, factor: float) -> list[str]:
    """``lr edge`` / ``head edge``: the rate the seeds ran at is an end of the rates tried and beat its
    neighbour strictly, so the grid would have grown past it had ``grid.extend`` allowed (a tie at an end says
    the optimum is flat, not beyond). Empty for a cell not chosen yet or a one-point grid."""
    flags = []
    if state.chosen is None:
        return flags
    if state.moved is not None:   # recheck_lr moved the body's rate: the rates tried at the new head
        tried = {state.chosen: state.head_scores.get(state.head, -math.inf), **state.recheck_scores}
        if beyond_edge(sorted(tried), tried, state.moved, factor) is not None:
            flags.append("lr edge")
    elif beyond_edge(sorted(state.grid), state.scores, state.chosen, factor) is not None:
        flags.append("lr edge")
    if state.head is not None:
        tried = {state.preset_rate: state.scores.get(state.chosen, -math.inf), **state.head_scores}
        if beyond_edge(sorted(tried), tried, state.head, factor) is not None:
            flags.append("head edge")
    return flags


def _seed_results(cell: Any) -> list[tuple[Optional[Path], dict[str, Any]]]:
    """(run directory, results.json) of the seeds a complete cell is scored on."""
    if not cell.complete:
        return []
    return [(o.run_dir, o.result or {}) for o in cell.state.seeds.values() if o.status == "done"]


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    finite = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def trained_share(results: Sequence[dict[str, Any]]) -> Optional[float]:
    shares = [r["trainable_params"] / r["total_params"] for r in results
              if isinstance(r.get("trainable_params"), int) and isinstance(r.get("total_params"), int)
              and r["total_params"] > 0]
    return max(shares) if shares else None


def _floor_of(column: Sequence[Any], floors: Sequence[str]) -> Optional[Any]:
    """The column's floor as :func:`lrzoo.cli.tuned.floor_of` picks it: the best-scoring floor method with replicates."""
    candidates = [c for c in column if c.method in floors and c.mean is not None and c.replicates is not None]
    return max(candidates, key=lambda c: c.mean) if candidates else None


def group_of(method: str, share: Optional[float], floors: Sequence[str]) -> str:
    """The row's group; a row none of whose runs has finished cannot be placed (its share is unknown)."""
    if method in floors:
        return GROUPS[0]
    if share is None:
        return GROUPS[3]
    return GROUPS[2] if share > MOST_WEIGHTS else GROUPS[1]


class Row:
    """One method on one plan task: the score (a column's cell, or the mean over the task's columns) and costs."""

    def __init__(self, method: str, task: str, cells: list[Any], plan: Plan, columns: dict[str, list[Any]]):
        self.method, self.task, self.cells = method, task, cells
        runs = [pair for cell in cells[:1] for pair in _seed_results(cell)]   # the task's seeds: every column's
        results = [r for _, r in runs]
        self.complete = all(c.complete for c in cells)
        self.trainable = _median([r.get("trainable_params") for r in results])
        # the share trained does not depend on the rate: any finished run of the cell (a grid point) places it
        self.share = trained_share([o.result for c in cells[:1] for o in c.state.outcomes()
                                    if o.status == "done" and o.result])
        self.group = group_of(method, self.share, plan.floors)
        self.file_bytes = _median([adapter_bytes(d) for d, _ in runs])
        self.peak_mb = _median([r.get("peak_memory_mb") for r in results])
        self.mean_mb = _median([(r.get("memory") or {}).get("mean_mb") for r in results])
        self.memory_kind = next((r.get("peak_memory_kind") for r in results if r.get("peak_memory_kind")), None)
        self.step_s = _median([r["wall_time_s"] / r["steps"] for r in results
                               if isinstance(r.get("steps"), int) and r["steps"] > 0
                               and isinstance(r.get("wall_time_s"), (int, float))])
        deltas = [(r.get("forgetting") or {}).get("delta_nll") for r in results]
        self.forgetting = (statistics.fmean(deltas) if deltas and all(isinstance(d, (int, float)) for d in deltas)
                           else None)
        self.edges = edge_flags(cells[0].state, plan.factor) if cells else []
        self.mean, self.interval, self.floor = self._score(cells, plan, columns)

    @staticmethod
    def _score(cells: list[Any], plan: Plan, columns: dict[str, list[Any]],
               ) -> tuple[Optional[float], tuple[float, float], Optional[tuple]]:
        """A single column's cell as :mod:`lrzoo.cli.tuned` scored it; over several columns (commonsense/all's 7
        sets) the mean, its bootstrap averaging the columns' replicates, and its paired difference to the mean
        of the columns' floors (as ``tuned.averages`` does for the average column)."""
        if len(cells) == 1:
            c = cells[0]
            return c.mean, c.interval, c.floor
        if not cells or any(c.mean is None for c in cells):
            return None, (math.nan, math.nan), None
        mean = statistics.fmean(c.mean for c in cells)
        if any(c.replicates is None for c in cells):
            return mean, (math.nan, math.nan), None
        reps = np.mean([c.replicates for c in cells], axis=0)
        floor = None
        if all(c.floor is not None for c in cells):
            floors = [_floor_of(columns[c.task], plan.floors) for c in cells]
            if all(f is not None for f in floors):
                floor_reps = np.mean([f.replicates for f in floors], axis=0)
                floor_mean = statistics.fmean(f.mean for f in floors)
                names = "+".join(dict.fromkeys(f.method for f in floors))
                if all(f.method == cells[0].method for f in floors):
                    floor = (names, 0.0, 0.0, 0.0, "floor")
                else:
                    low, high, verdict = intervals.paired_difference(reps, floor_reps)
                    floor = (names, mean - floor_mean, low, high,
                             {"better": "above", "worse": "below"}.get(verdict, verdict))
        return mean, intervals.percentile_interval(reps), floor


def rows_of(cells: dict[tuple[str, str], Any], plan: Plan) -> list[Row]:
    """A row per method and plan task, grouped (floors, adapters, most weights), plan order within a group."""
    columns: dict[str, list[Any]] = {}
    for (_, column), cell in cells.items():
        columns.setdefault(column, []).append(cell)
    rows = []
    for method in plan.methods:
        for task in plan.tasks:
            mine = [c for (name, _), c in cells.items() if name == method.name and c.state.task == task]
            rows.append(Row(method.name, task, mine, plan, columns))
    return sorted(rows, key=lambda r: GROUPS.index(r.group))


def _score_text(row: Row) -> str:
    if row.mean is None:
        return "—" if row.complete else "— (missing)"
    shown = f"{100 * row.mean:.2f}"
    if all(math.isfinite(v) for v in row.interval):
        shown += f" [{100 * row.interval[0]:.1f}, {100 * row.interval[1]:.1f}]"
    return shown + "".join(f" **{flag}**" for flag in row.edges)


def _floor_text(row: Row) -> str:
    if row.floor is None:
        return "—"
    method, point, low, high, verdict = row.floor
    if verdict == "floor":
        return "floor"
    if verdict == "n/a" or not math.isfinite(low):
        return f"{100 * point:+.2f}"
    return f"{100 * point:+.2f} [{100 * low:+.1f}, {100 * high:+.1f}] {verdict}"


def _params_text(row: Row) -> str:
    if row.trainable is None:
        return "—"
    share = f" ({100 * row.share:.3g}%)" if row.share is not None else ""
    return f"{int(row.trainable):,}{share}"


def _number(value: Optional[float], fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def comparison_table(cells: dict[tuple[str, str], Any], plan: Plan) -> str:
    """The markdown of the method comparison (see the module docstring), with its notes."""
    rows = rows_of(cells, plan)
    decoder = any(r.forgetting is not None for r in rows)
    header = ["group", "method", "task", "score [95% CI]", "Δ vs floor [95% CI]", "trainable params (% of model)",
              "adapter file MB", "peak memory MB", "mean memory MB", "train s/step"] + (
        ["forgetting ΔNLL"] if decoder else [])
    lines = ["### Method comparison", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [row.group, row.method, row.task, _score_text(row), _floor_text(row), _params_text(row),
                  _number(row.file_bytes / 1e6 if row.file_bytes is not None else None, ".3g"),
                  _number(row.peak_mb, ".0f"), _number(row.mean_mb, ".0f"), _number(row.step_s, ".3g")]
        if decoder:
            values.append(_number(row.forgetting, "+.3f"))
        lines.append("| " + " | ".join(values) + " |")
    edged = [r for r in rows if r.edges]
    kind = next((r.memory_kind for r in rows if r.memory_kind), None)
    memory = ("the process's resident memory (peak: `cpu_max_rss`; mean: sampled after each optimizer step; both "
              "include the model, the data and Python)" if kind == "cpu_max_rss" else
              "CUDA's allocated memory (peak: `max_memory_allocated`; mean: `memory_allocated` after each optimizer "
              "step)" if kind else "as recorded")
    note = (f"One row per method and task (a task scored on several sets: the mean over them, its interval "
            f"averaging theirs). Scores ×100: the seeds' mean at the chosen rate with its 95% bootstrap interval; "
            f"Δ vs floor: the paired difference to the best no-training method ({', '.join(plan.floors) or 'none'})"
            f", `above`/`below` when its whole interval is. Group from what the runs train (results.json's trainable "
            f"/ total parameters): more than {MOST_WEIGHTS:.0%} of the model is `most weights`, whatever the method is "
            f"called. Adapter file: the weight files in the run's `adapter/` (the whole model for a method that "
            f"trains its weights). Memory: {memory}; time per step: the training loop's wall time over its steps "
            f"(median over seeds)."
            + (" Forgetting: the change of the mean token loss (nats) on the first tokens of WikiText-2's test file "
               "from the checkpoint to the trained model (eval.forgetting), mean over seeds; positive: it got worse "
               "at general text." if decoder else "")
            + f" **edge**: {len(edged)} of {len(rows)} rows chose a rate at an end of the rates tried that beat its "
              "neighbour, with the grid's growth (grid.extend) used up: the best rate may lie beyond, so the row may "
              "be under-tuned" + (f" ({', '.join(f'{r.method} × {r.task}' for r in edged)})" if edged else "") + ".")
    return "\n".join(lines) + "\n\n" + note


CSV_FIELDS = ("group", "method", "task", "mean", "ci_low", "ci_high", "floor_method", "diff_to_floor", "floor_low",
              "floor_high", "floor_verdict", "trainable_params", "trained_share", "adapter_bytes", "peak_memory_mb",
              "mean_memory_mb", "train_s_per_step", "forgetting_delta_nll", "edge")


def csv_rows(cells: dict[tuple[str, str], Any], plan: Plan) -> list[dict[str, Any]]:
    """``comparison.csv``: the table's rows as numbers (scores ×100; empty where there is none)."""

    def shown(value: Optional[float], scale: float = 1.0) -> Any:
        return "" if value is None or not math.isfinite(value) else round(scale * value, 6)

    out = []
    for row in rows_of(cells, plan):
        floor = row.floor or ("", math.nan, math.nan, math.nan, "")
        out.append({"group": row.group, "method": row.method, "task": row.task, "mean": shown(row.mean, 100),
                    "ci_low": shown(row.interval[0], 100), "ci_high": shown(row.interval[1], 100),
                    "floor_method": floor[0], "diff_to_floor": shown(floor[1], 100), "floor_low": shown(floor[2], 100),
                    "floor_high": shown(floor[3], 100), "floor_verdict": floor[4],
                    "trainable_params": "" if row.trainable is None else int(row.trainable),
                    "trained_share": shown(row.share), "adapter_bytes": "" if row.file_bytes is None else int(row.file_bytes),
                    "peak_memory_mb": shown(row.peak_mb), "mean_memory_mb": shown(row.mean_mb),
                    "train_s_per_step": shown(row.step_s), "forgetting_delta_nll": shown(row.forgetting),
                    "edge": " ".join(row.edges)})
    return out
