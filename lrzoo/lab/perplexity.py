"""The tuned report of a language-modelling plan (``lrzoo-report DIR --plan recipes/sweeps/pretrain_cpu.yaml``), in
the shape of the low-rank pre-training papers' tables (GaLore Table 2, SLTrain, APOLLO): per method, test
perplexity with its 95% interval, its paired difference to full-rank AdamW, and what the method holds in memory.

The cells are :mod:`lrzoo.lab.cells`' (the lr chosen on the held-out slice's ``neg_loss``, the seeds' runs there,
bootstrap replicates over test blocks: :func:`lrzoo.lab.intervals.metric_replicates`). A cell's primary metric
``neg_loss`` is minus the mean NLL per token; what a reader compares is perplexity, exp(loss), lower better, so
every figure here is perplexity: exp of the seeds' mean loss, its interval the exp of the loss interval's ends (a
monotone map), and the paired differences the percentiles of the replicates' perplexity differences (the same
resampled blocks for every row). ``neg_loss`` itself is never shown.

Costs per row, from ``results.json``: the weights as stored (``weights_mb``: parameters and buffers, Q-GaLore's
INT8 codes, SLTrain's sparse values and indices; the same for every run of a row whatever its lr or seed, so any
run that recorded it gives it, and runs that disagree are an error), the optimizer state, the step time and
throughput and peak memory of the seeds' runs at the chosen lr (mean over them).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import UserError
from . import comparison, intervals
from .cells import Cell, columns_of, shown_difference
from .plan import Plan, format_lr

#: the task kind this report is for (:mod:`lrzoo.tasks.pretrain`)
KIND = "language_modeling"
#: the adapter of the reference row: full-rank AdamW training every weight
REFERENCE = "full_finetune"
CSV_FIELDS = ("model", "method", "task", "metric", "status", "chosen_lr", "lr_edge", "n_seeds", "planned_seeds",
              "perplexity", "ci_low", "ci_high", "seed_std", "verdict", "seeds_verdict", "reference",
              "diff_to_reference", "diff_low", "diff_high", "reference_verdict", "trainable_params", "weights_mb",
              "optimizer_state_mb", "weights_plus_state_mb", "train_s_per_step", "train_tokens_per_s",
              "peak_memory_mb")


def _kind(task: str) -> Optional[str]:
    from ..tasks import get_task

    try:
        return get_task(task).kind
    except (KeyError, ValueError):
        return None


def is_language_modelling(plan: Plan) -> bool:
    """Whether ``plan``'s tasks are language modelling (pre-training); a plan mixing them with scored tasks is an
    error, since one report cannot show perplexity and scores ×100 in one table."""
    kinds = {task: _kind(task) for task in plan.tasks}
    modelling = [task for task, kind in kinds.items() if kind == KIND]
    if modelling and len(modelling) < len(kinds):
        others = [task for task in kinds if task not in modelling]
        raise UserError(f"plan {plan.path} mixes language-modelling tasks ({', '.join(modelling)}) with scored ones "
                        f"({', '.join(others)}): report them from two plans (perplexity and scores do not share a table)")
    return bool(modelling)


def perplexity(neg_loss: Any) -> Any:
    """exp(-neg_loss), elementwise; inf past float range (a diverged model), never an overflow error."""
    with np.errstate(over="ignore"):
        value = np.exp(-np.asarray(neg_loss, dtype=np.float64))
    return float(value) if value.ndim == 0 else value


def _difference(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> tuple[float, float, str]:
    """The 95% interval of perplexity ``a - b`` over shared replicates and a verdict on it: ``lower`` (all of it
    below 0), ``higher``, ``tied`` (it contains 0), ``n/a`` (no replicates, or an undefined one)."""
    if a is None or b is None:
        return math.nan, math.nan, "n/a"
    low, high = intervals.percentile_interval(a - b)
    if not (math.isfinite(low) and math.isfinite(high)):
        return low, high, "n/a"
    return low, high, "lower" if high < 0 else "higher" if low > 0 else "tied"


def _finite(values: Sequence[Any]) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def weights_mb(cell: Cell) -> Optional[float]:
    """``weights_mb`` of any finished run of the cell (grid points and seeds; runs made before it was recorded
    have none): a row's stored weights do not depend on its lr or seed, so two runs that disagree are not one
    configuration, and the report refuses to pick one."""
    seen: dict[float, Path] = {}
    for outcome in cell.state.outcomes():
        value = (outcome.result or {}).get("weights_mb") if outcome.status == "done" else None
        if _finite([value]):
            seen.setdefault(float(value), outcome.run_dir)
    if len(seen) > 1:
        (a, where_a), (b, where_b) = list(seen.items())[:2]
        raise UserError(f"{cell.method}: its runs record different weights_mb ({a} MB in {where_a}, {b} MB in "
                        f"{where_b}), yet a row's weights depend on neither lr nor seed: remove the run(s) not made "
                        f"with this row's configuration and run lrzoo-sweep again")
    return next(iter(seen), None)


@dataclass
class Row:
    """One method on one language-modelling set: perplexity figures (``None``/NaN where unknown) and costs."""

    method: str
    column: str
    cell: Cell
    ppl: Optional[float] = None
    interval: tuple[float, float] = (math.nan, math.nan)
    seed_std: Optional[float] = None
    replicates: Optional[np.ndarray] = None         # perplexity per bootstrap replicate (seed mean)
    seeds_replicates: Optional[np.ndarray] = None   # the same with the training seeds resampled too
    verdict: str = ""                               # vs the lowest perplexity: best / tied / worse / n/a
    seeds_verdict: str = ""                         # the same with the seeds resampled
    reference: Optional[str] = None                 # the full-rank AdamW row's method
    diff: Optional[tuple[float, float, float, str]] = None       # (point, low, high, verdict) vs the reference
    seeds_diff: Optional[tuple[float, float, str]] = None
    edges: list[str] = field(default_factory=list)
    costs: dict[str, Optional[float]] = field(default_factory=dict)

    @property
    def bold(self) -> bool:
        return self.verdict in ("best", "tied")

    @property
    def disputed(self) -> bool:
        """The verdict against the best changes when the training seeds are resampled too (``†``)."""
        return bool(self.seeds_verdict) and self.verdict not in ("best", "n/a") and self.seeds_verdict != self.verdict


def _costs(cell: Cell) -> dict[str, Optional[float]]:
    """The row's costs: weights from any run, the rest the mean over the seeds' finished runs at the chosen lr."""
    results = [o.result or {} for o in cell.state.seeds.values() if o.status == "done"]

    def mean(values: Sequence[Any]) -> Optional[float]:
        finite = _finite(values)
        return statistics.fmean(finite) if finite else None

    weights = weights_mb(cell)
    state = mean([r.get("optimizer_state_mb") for r in results])
    trainable = mean([r.get("trainable_params") for r in results])
    return {"trainable_params": None if trainable is None else round(trainable),
            "weights_mb": weights, "optimizer_state_mb": state,
            "weights_plus_state_mb": weights + state if weights is not None and state is not None else None,
            "train_s_per_step": mean([r["wall_time_s"] / r["steps"] for r in results
                                      if _finite([r.get("wall_time_s")]) and isinstance(r.get("steps"), int)
                                      and r["steps"] > 0]),
            "train_tokens_per_s": mean([r.get("train_tokens_per_s") for r in results]),
            "peak_memory_mb": mean([r.get("peak_memory_mb") for r in results])}


def _row(method: str, column: str, cell: Cell, plan: Plan) -> Row:
    row = Row(method, column, cell, edges=comparison.edge_flags(cell.state, plan.factor) if cell.mean is not None
              else [], costs=_costs(cell))
    if cell.mean is not None:
        row.ppl = perplexity(cell.mean)
        per_seed = [perplexity(s) for s in cell.scores]
        row.seed_std = statistics.stdev(per_seed) if len(per_seed) > 1 else None
    if cell.replicates is not None:
        row.replicates = perplexity(cell.replicates)
        low, high = intervals.percentile_interval(cell.replicates)   # neg_loss: its high end is the low perplexity
        row.interval = (perplexity(high), perplexity(low))
    if cell.seeds_replicates is not None:
        row.seeds_replicates = perplexity(cell.seeds_replicates)
    return row


def rows_of(cells: dict[tuple[str, str], Cell], plan: Plan) -> list[Row]:
    """A row per method and set, full-rank AdamW first, then the plan's order; each with its verdict against the
    lowest perplexity of its set and its paired difference to full-rank AdamW."""
    reference = next((m.name for m in plan.methods if m.adapter == REFERENCE), None)
    order = sorted(plan.methods, key=lambda m: m.name != reference)
    rows = []
    for column in columns_of(cells):
        mine = [_row(m.name, column, cells[(m.name, column)], plan) for m in order]
        _compare(mine, next((r for r in mine if r.method == reference), None))
        rows.extend(mine)
    return rows


def _compare(rows: list[Row], reference: Optional[Row]) -> None:
    scored = [r for r in rows if r.ppl is not None and math.isfinite(r.ppl)]
    if scored:
        best = min(scored, key=lambda r: r.ppl)
        best.verdict = "best"
        for row in scored:
            if row is best:
                continue
            verdict = _difference(row.replicates, best.replicates)[2]
            row.verdict = {"higher": "worse", "lower": "better"}.get(verdict, verdict)
            if row.seeds_replicates is not None and best.seeds_replicates is not None:
                seeds = _difference(row.seeds_replicates, best.seeds_replicates)[2]
                row.seeds_verdict = {"higher": "worse", "lower": "better"}.get(seeds, seeds)
    for row in rows:
        row.reference = reference.method if reference is not None else None
        if reference is None or row is reference or row.ppl is None or reference.ppl is None:
            continue
        row.diff = (row.ppl - reference.ppl, *_difference(row.replicates, reference.replicates))
        if row.seeds_replicates is not None and reference.seeds_replicates is not None:
            row.seeds_diff = _difference(row.seeds_replicates, reference.seeds_replicates)


def _ppl_text(row: Row) -> str:
    cell = row.cell
    if row.ppl is None:
        if cell.complete:
            return "— (undefined: a seed's score is null)"
        return f"— (missing: {cell.missing()})"
    shown = f"**{row.ppl:.2f}**" if row.bold else f"{row.ppl:.2f}"
    if all(math.isfinite(v) for v in row.interval):
        shown += f" [{row.interval[0]:.1f}, {row.interval[1]:.1f}]"
    if row.seed_std is not None:   # the training-seed spread, which the interval over test blocks does not contain
        shown += f" ±{row.seed_std:.1f}"
    return shown + (" †" if row.disputed else "")


def _diff_text(row: Row) -> str:
    if row.reference is None:
        return "—"
    if row.method == row.reference:
        return "reference" if row.ppl is not None else "—"
    if row.diff is None:
        return "—"
    return shown_difference(row.diff, row.seeds_diff)


def _lr_text(row: Row) -> str:
    lr = row.cell.state.seed_lr if row.cell.state.settled else None
    if lr is None:
        return "—"
    return format_lr(lr) + "".join(f" *{flag}*" for flag in row.edges)


def _number(value: Optional[float], fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _mb(value: Optional[float]) -> str:
    return "—" if value is None else format(value, ".2f" if value >= 1 or value == 0 else ".4f")


def _grid_text(state: Any) -> str:
    """``3.3e-4: 412.3 / **1e-3: 398.0** / 3e-3: diverged``: held-out perplexity at each rate of the grid."""
    parts = []
    for lr, outcome in state.grid.items():
        score = state.scores.get(lr)
        text = ("diverged" if outcome.status == "diverged" else "—" if score is None else
                f"{perplexity(score):.1f}" if math.isfinite(score) else "null")
        text = f"{format_lr(lr)}: {text}"
        parts.append(f"**{text}**" if lr == state.chosen else text)
    chosen = format_lr(state.chosen) if state.chosen is not None else "—"
    return f"{chosen} ({' / '.join(parts)})"


def markdown(rows: Sequence[Row], cells: dict[tuple[str, str], Cell], plan: Plan, replicates: int) -> str:
    """The report's markdown: the comparison table (:func:`rows_of`) per language-modelling set, its notes, the lr
    grids and what is missing."""
    models = sorted({c.model for c in cells.values() if c.model}) or ["?"]
    header = ["method", "test perplexity [95% CI] ±seed sd", "Δ perplexity vs full-rank AdamW [95% CI]", "lr",
              "trainable params", "weights MB", "optimizer state MB", "weights + state MB", "train s/step",
              "tokens/s", "peak memory MB"]
    parts = []
    for column in columns_of(cells):
        lines = [f"### Pre-training comparison on {column}: {Path(plan.path).name} ({', '.join(models)}, seeds "
                 f"{','.join(map(str, plan.seeds))})", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in (r for r in rows if r.column == column):
            c = row.costs
            lines.append("| " + " | ".join([
                row.method, _ppl_text(row), _diff_text(row), _lr_text(row),
                _number(c["trainable_params"], ",.0f"), _mb(c["weights_mb"]), _mb(c["optimizer_state_mb"]),
                _mb(c["weights_plus_state_mb"]), _number(c["train_s_per_step"], ".3g"),
                _number(c["train_tokens_per_s"], ",.0f"), _number(c["peak_memory_mb"], ",.0f")]) + " |")
        parts.append("\n".join(lines))
    several = len(plan.seeds) > 1
    kind = next((o.result.get("peak_memory_kind") for c in cells.values() for o in c.state.seeds.values()
                 if o.result and o.result.get("peak_memory_kind")), None)
    reference = next((m.name for m in plan.methods if m.adapter == REFERENCE), None)
    edged = [r for r in rows if r.edges]
    complete = sum(c.complete for c in cells.values())
    parts.append(
        "Test perplexity: exp of the mean loss per token (nats) over " +
        (f"{len(plan.seeds)} seeds" if several else "one seed") + " at the learning rate chosen on the held-out "
        "slice of the training text (never on the test set), with a 95% bootstrap interval over test blocks"
        + (" pooled over seeds" if several else "") + f" ({replicates} replicates, fixed RNG; the same resampled "
        "blocks for every seed and method; a replicate's loss is its blocks' summed NLL over their summed tokens, "
        "its perplexity the exp of that)"
        + (", then ±: the standard deviation of the seeds' perplexities (how much training runs vary, which the "
           "interval over test blocks does not contain)" if several else "") + ". Lower is better. **Bold**: the "
        "lowest perplexity and every row statistically tied with it (the paired bootstrap 95% interval of its "
        "difference contains 0); each comparison is at 95% on its own, not corrected for the number of methods."
        + (" †: the verdict changes when the training seeds are resampled as well (a two-level bootstrap): these "
           "seeds decide it, read it as uncertain." if several else "")
        + (f" Δ vs full-rank AdamW: the row's perplexity minus {reference}'s, with the paired bootstrap 95% interval "
           "(the same resampled blocks and seeds): `lower`/`higher` when the whole interval is below/above 0, "
           "`tied` when it contains 0." if reference else
           f" Δ vs full-rank AdamW: the plan has no {REFERENCE} row, so none is shown.")
        + " lr: the rate the seeds ran at; *lr edge*: it won at an end of the rates tried, beating its neighbour, "
        "with the grid's growth (grid.extend) used up, so the best rate may lie beyond (under-tuned)"
        + (f" ({', '.join(r.method for r in edged)})" if edged else "") + ". "
        "Trainable params: the parameters the optimizer updates (results.json). Weights MB: the parameters and "
        "buffers as the run stores them (`weights_mb`: Q-GaLore's INT8 codes and scales, SLTrain's factors, sparse "
        "values and their indices; '—': its runs predate the record); optimizer state MB: the optimizer's "
        "state tensors (moments, projections); weights + state: their sum, the papers' memory column (no "
        "activations, no gradients). MB = 2^20 bytes. Train s/step: the training loop's wall time over its steps, "
        "tokens/s its training tokens per second, peak memory "
        + ("the process's peak resident memory (`cpu_max_rss`: model, data and Python)" if kind == "cpu_max_rss"
           else "the peak CUDA allocation" if kind else "as recorded")
        + ": each the mean over the seeds' runs at the chosen lr. "
        f"{complete}/{len(cells)} rows complete; a missing row says what is missing.")
    lrs = ["### Learning rate chosen on the held-out slice", "",
           "| method | lr grid | chosen (held-out perplexity per rate tried) |", "|---|---|---|"]
    for row in rows:
        if row.column == columns_of(cells)[0]:
            state = row.cell.state
            lrs.append(f"| {row.method} | {', '.join(format_lr(x) for x in plan.grid(state.method))} | "
                       f"{_grid_text(state)} |")
    parts.append("\n".join(lrs))
    parts.append("Held-out perplexity of the first seed at each rate (the chosen one in bold; the lowest wins, ties "
                 "go to the smaller rate; `diverged`: training stopped on a NaN/inf; `—`: not finished). Rates "
                 "outside the lr grid are the grid's growth past a winning end.")
    missing = [c for c in cells.values() if not c.complete]
    if missing:
        parts.append("Missing cells:\n\n" + "\n".join(f"- {c.method} × {c.task}: {c.missing()}" for c in missing))
    return "\n\n".join(parts) + "\n"


def csv_rows(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """``results.csv``: the table's rows (:func:`rows_of`) as numbers (empty where there is none)."""

    def number(value: Optional[float]) -> Any:
        return "" if value is None or not math.isfinite(value) else round(value, 6)

    out = []
    for row in rows:
        cell, diff = row.cell, row.diff or (math.nan, math.nan, math.nan, "")
        out.append({"model": cell.model or "", "method": row.method, "task": row.column, "metric": "perplexity",
                    "status": "complete" if cell.complete else f"missing: {cell.missing()}",
                    "chosen_lr": cell.state.seed_lr if cell.state.settled and cell.state.seed_lr is not None else "",
                    "lr_edge": " ".join(row.edges), "n_seeds": cell.state.seeds_done,
                    "planned_seeds": cell.planned_seeds, "perplexity": number(row.ppl),
                    "ci_low": number(row.interval[0]), "ci_high": number(row.interval[1]),
                    "seed_std": number(row.seed_std), "verdict": row.verdict or ("" if cell.complete else "missing"),
                    "seeds_verdict": row.seeds_verdict, "reference": row.reference or "",
                    "diff_to_reference": number(diff[0]), "diff_low": number(diff[1]), "diff_high": number(diff[2]),
                    "reference_verdict": ("reference" if row.method == row.reference and row.ppl is not None
                                          else diff[3]),
                    **{key: number(value) for key, value in row.costs.items()}})
    return out


def plot_points(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The scored rows for :func:`lrzoo.lab.plot.plot_perplexity`: perplexity, its interval and memory."""
    return [{"method": r.method, "task": r.column, "perplexity": r.ppl,
             "ci": r.interval if all(math.isfinite(v) for v in r.interval) else None,
             "weights_plus_state_mb": r.costs["weights_plus_state_mb"],
             "optimizer_state_mb": r.costs["optimizer_state_mb"]}
            for r in rows if r.ppl is not None and math.isfinite(r.ppl)]
