"""``lrzoo-report DIR --plan PLAN``: the tuned comparison of a sweep plan (:mod:`lrzoo.lab.plan`).

Per (method, task) only the configuration at the learning rate chosen on the held-out training slice
is shown: the mean over seeds of the dev primary metric, its 95% bootstrap interval over dev examples
pooled over seeds (:mod:`lrzoo.lab.intervals`, from each run's ``predictions.json``), and whether it is
statistically tied with the best method of its column (paired bootstrap of the difference), and whether
that verdict survives resampling the training seeds as well (:func:`lrzoo.lab.intervals.seeds_resampled`;
a ``†`` marks a verdict the seeds decide). Every planned cell appears: one whose grid or seeds have not all
finished reads ``— (missing: ...)``. A pre-training plan (language-modelling tasks) gets the perplexity table of
:mod:`lrzoo.lab.perplexity` instead.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..io import atomic_file
from ..runs.files import HELDOUT_PREFIX
from ..tasks.metrics import modal_share
from . import comparison, intervals, perplexity
from .cells import AVERAGE, Average, Cell, averages, build_cells, columns_of, shown_difference
from .choice import CellState
from .plan import Plan, format_lr
from .plot import plot, plot_perplexity
from .table import REPORT_CSV, REPORT_MD, REPORT_PNG

CSV_FIELDS = ("model", "method", "task", "metric", "status", "chosen_lr", "chosen_head_lr", "n_seeds", "planned_seeds", "mean",
              "ci_low", "ci_high", "diff_to_best", "diff_low", "diff_high", "verdict", "seeds_diff_low",
              "seeds_diff_high", "seeds_verdict", "floor_method", "diff_to_floor", "floor_low", "floor_high",
              "floor_verdict", "trainable_params")


def _value(mean: float, interval: tuple[float, float], bold: bool) -> str:
    shown = f"**{100 * mean:.2f}**" if bold else f"{100 * mean:.2f}"
    if all(math.isfinite(v) for v in interval):
        shown += f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"
    return shown


def _tied(item: Any) -> bool:
    return item.best or (item.diff is not None and item.diff[3] == "tied")


def seeds_disagree(item: Any) -> bool:
    """The verdict against the best changes when the training seeds are resampled too."""
    return item.diff is not None and item.seeds_diff is not None and item.seeds_diff[2] != item.diff[3]


def _shown_cell(cell: Cell) -> str:
    if cell.mean is None:
        if cell.complete:
            return "— (undefined: a seed's score is null)"
        return f"— (missing: {cell.missing()})"
    shown = _value(cell.mean, cell.interval, _tied(cell))
    if len(cell.scores) > 1:  # the training-seed spread, which the interval over dev examples does not contain
        shown += f" ±{100 * statistics.stdev(cell.scores):.1f}"
    return shown + (" †" if seeds_disagree(cell) else "")


#: after the score of a method that trains nothing, in a plan whose other cells have several seeds
ONE_RUN = " (one run)"
#: its learning-rate cells: it has no grid, and its rate changes nothing
NOTHING_TO_TUNE = "— (trains nothing)"


def _edge_mark(cell: Cell, plan: Plan) -> str:
    """`` *lr edge*`` (and/or ``*head edge*``) after a scored cell whose rate won at an end of the rates tried
    with the plan's growth used up (:func:`lrzoo.lab.comparison.edge_flags`)."""
    return "".join(f" *{flag}*" for flag in comparison.edge_flags(cell.state, plan.factor)) if cell.mean is not None else ""


def _edge_note(cells: dict[tuple[str, str], Cell], plan: Plan) -> str:
    edged = sum(bool(_edge_mark(c, plan)) for c in cells.values())
    return (f" *lr edge* / *head edge*: {edged} cell(s) chose a rate at an end of the rates tried that beat its "
            "neighbour, the grid's growth (grid.extend) used up: the best rate may lie beyond (under-tuned)."
            if edged else "")


def _shown_diff(item: Any) -> str:
    if item is None:
        return "—"
    if item.best:
        return "best"
    if item.diff is None:
        return "—"
    return shown_difference(item.diff, item.seeds_diff, scale=100)


def _shown_floor(item: Any) -> str:
    if item is None or item.floor is None:
        return "—"
    method, point, low, high, verdict = item.floor
    if verdict == "floor":
        return f"floor ({method})"
    if verdict == "n/a":
        return f"{100 * point:+.2f} (no interval) vs {method}"
    return f"{100 * point:+.2f} [{100 * low:+.1f}, {100 * high:+.1f}] {verdict} ({method})"


def _shown_lr(cell: Cell, base_grid: Sequence[float] = ()) -> str:
    s = cell.state
    parts = []
    for lr, outcome in s.grid.items():
        text = _score_text(outcome, s.scores.get(lr))
        text = f"**{text}**" if lr == s.chosen else text
        # a point the grid grew to past a winning end (plan grid.extend) is named by its lr
        parts.append(f"{format_lr(lr)}: {text}" if base_grid and lr not in base_grid else text)
    chosen = format_lr(s.chosen) if s.chosen is not None else "—"
    # the best point at an end of the grid: the optimum may lie beyond it (the cell may be under-tuned)
    edge = " edge" if s.chosen is not None and len(s.grid) > 1 and s.chosen in (min(s.grid), max(s.grid)) else ""
    # every grid point scored exactly the same: the swept rate probably reaches nothing that trains
    finite = [v for v in s.scores.values() if v is not None and math.isfinite(v)]
    flat = " flat" if len(s.grid) > 1 and len(finite) == len(s.grid) and len(set(finite)) == 1 else ""
    return f"{chosen}{edge}{flat} ({' / '.join(parts)}){_shown_head(s)}{_shown_recheck(s)}"


def _shown_head(s: CellState) -> str:
    """``; head 2e-2 edge (2e-3: 70.2 / 2e-2: **79.6**)``: the head rates tried at the chosen lr (plan head_grid),
    the preset's first; empty for a cell without head trials."""
    if not s.head_trials or s.chosen is None:
        return ""
    # (key, label, outcome, score); key None: the preset's head, whose run is the grid's at the chosen lr
    rows = [(None, format_lr(s.preset_head) if s.preset_head is not None else "lr", s.grid[s.chosen],
             s.scores.get(s.chosen)),
            *((head, format_lr(head), outcome, s.head_scores.get(head)) for head, outcome in s.heads.items())]
    parts = []
    for key, label, outcome, score in rows:
        text = _score_text(outcome, score)
        parts.append(f"{label}: " + (f"**{text}**" if s.head_chosen and s.head == key else text))
    chosen = ("—" if not s.head_chosen else format_lr(s.head_lr) if s.head_lr is not None else "lr")
    # the fastest head rate tried won (after any growth): a faster one might do better still
    edge = " edge" if s.head is not None and s.head == max([s.preset_rate, *s.heads]) else ""
    return f"; head {chosen}{edge} ({' / '.join(parts)})"


def _shown_recheck(s: CellState) -> str:
    """``; lr at the new head 3e-3 (1.1e-4: 30.4 / 3.3e-4: 59.8 / 1e-3: 77.1 / 3e-3: **81.3** / 9e-3: 8.5)``
    (DoRA on STS-B): the body's rates tried again with the chosen head rate (plan recheck_lr), the grid's choice
    among them, the one the seeds ran at in bold; empty for a cell without a recheck."""
    if not s.rechecks or s.head is None:
        return ""
    rows = sorted([(s.chosen, s.heads[s.head], s.head_scores.get(s.head)),
                   *((lr, outcome, s.recheck_scores.get(lr)) for lr, outcome in s.rechecks.items())],
                  key=lambda row: row[0])
    final = s.seed_lr if s.settled else None
    parts = []
    for lr, outcome, score in rows:
        text = _score_text(outcome, score)
        parts.append(f"{format_lr(lr)}: " + (f"**{text}**" if lr == final else text))
    shown = format_lr(final) if final is not None else "—"
    edge = " edge" if s.moved is not None and s.moved in (rows[0][0], rows[-1][0]) else ""
    return f"; lr at the new head {shown}{edge} ({' / '.join(parts)})"


def _score_text(outcome: Any, score: Optional[float]) -> str:
    """A grid point's or head trial's held-out score ×100: ``diverged``, ``null`` (a NaN score) or ``—`` (not
    finished)."""
    if outcome.status == "diverged":
        return "diverged"
    if score is None:
        return "—"
    return f"{100 * score:.1f}" if math.isfinite(score) else "null"


def _primary(task: str) -> str:
    from ..tasks import get_task

    try:
        return get_task(task).primary_metric
    except (KeyError, ValueError):
        return "?"


def _span(values: list[float], fmt: str) -> str:
    """``a`` when every run agrees, else ``a–b`` (e.g. a head sized per task). ``fmt="mb"``: one decimal, three
    below 1 (the vector methods' optimizer state is a few kB)."""
    if not values:
        return "—"

    def shown(value: float) -> str:
        return format(value, (".1f" if value >= 1 or value == 0 else ".3f") if fmt == "mb" else fmt)

    low, high = min(values), max(values)
    return shown(low) if low == high else f"{shown(low)}–{shown(high)}"


def cost_table(cells: dict[tuple[str, str], Cell], plan: Plan) -> str:
    """Per method, over every finished run of the plan (grid points and seeds, all tasks): trainable parameters,
    optimizer state, peak memory and the training wall time per run (median, and the range)."""
    lines = ["### Cost per run", "", "| method | trainable params | optimizer state MB | peak memory MB | "
             "train wall s per run, median (range) | finished runs |", "|---|---|---|---|---|---|"]
    kind = None
    for method in plan.methods:
        results, seen = [], set()
        for cell in (c for (name, _), c in cells.items() if name == method.name):
            for outcome in cell.state.outcomes():
                if outcome.status == "done" and outcome.result and outcome.run_dir not in seen:
                    seen.add(outcome.run_dir)
                    results.append(outcome.result)
        kind = kind or next((r.get("peak_memory_kind") for r in results if r.get("peak_memory_kind")), None)

        def values(key: str) -> list[float]:
            return [r[key] for r in results if isinstance(r.get(key), (int, float))]

        walls = values("wall_time_s")
        wall = ("—" if not walls else _span(walls, ".0f") if len(set(walls)) == 1
                else f"{statistics.median(walls):.0f} ({_span(walls, '.0f')})")
        lines.append("| " + " | ".join([method.name, _span(values("trainable_params"), ","),
                                        _span(values("optimizer_state_mb"), "mb"), _span(values("peak_memory_mb"), ".0f"),
                                        wall, str(len(results))]) + " |")
    note = ("Read from each finished run's results.json. Trainable parameters differ by task when the head does "
            "(e.g. STS-B's one regression output); peak memory is "
            + ("the process's peak RSS (`cpu_max_rss`: it includes the model, the data and Python)"
               if kind == "cpu_max_rss" else "the peak CUDA allocation" if kind else "as recorded")
            + "; the wall time is the training loop's, without loading and evaluation.")
    return "\n".join(lines) + "\n\n" + note


def truncation_table(cells: dict[tuple[str, str], Cell], plan: Plan) -> str:
    """Per task: the ``max_length`` its runs used and the largest share of training, dev and held-out rows any of its
    finished runs cut there (``results.json``'s ``truncated``, measured at data load)."""
    lines = ["### Sequence length", "", "| task | max_length | truncated: train | dev | held out |", "|---|---|---|---|---|"]
    for task in plan.tasks:
        lengths, shares = set(), {"train": [], "dev": [], "held out": []}
        for cell in (c for c in cells.values() if c.state.task == task):
            for outcome in cell.state.outcomes():
                result = outcome.result or {}
                if outcome.status != "done" or not isinstance(result.get("truncated"), dict):
                    continue
                lengths.add(result.get("max_length"))
                for name, share in result["truncated"].items():
                    part = ("train" if name == "train" else "held out" if name.startswith(HELDOUT_PREFIX) else "dev")
                    if isinstance(share, (int, float)):
                        shares[part].append(share)
        shown = [f"{100 * max(v):.2f}%" if v else "—" for v in shares.values()]
        length = ", ".join(str(n) for n in sorted(lengths, key=str)) if lengths else "not recorded"
        lines.append("| " + " | ".join([task, length, *shown]) + " |")
    note = ("The share of rows longer than max_length in tokens (the largest over the task's finished runs, which "
            "differ only where a method reads pairs otherwise: a bi-encoder encodes each sentence alone), measured "
            "when the data is loaded; such rows are cut. `not recorded`: runs made before results.json held it.")
    return "\n".join(lines) + "\n\n" + note


def diversity_table(cells: dict[tuple[str, str], Cell], plan: Plan) -> Optional[str]:
    """Per method and label-scored column: how often the model gives its most frequent answer (mean over seeds),
    and the accuracy of always giving the most frequent gold answer. None when no column has discrete answers."""
    columns = [t for t in columns_of(cells) if any(c.modal_shares for (m, col), c in cells.items() if col == t)]
    if not columns:
        return None
    lines = ["### Answer diversity", "", "| method | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for method in plan.methods:
        shares = [cells[(method.name, t)].modal_shares for t in columns]
        lines.append("| " + " | ".join([method.name, *(f"{100 * statistics.fmean(v):.0f}" if v else "—"
                                                       for v in shares)]) + " |")
    majority = []
    for t in columns:
        refs = next((c.references for (m, col), c in cells.items() if col == t and c.references), None)
        majority.append(f"{100 * modal_share(refs):.1f}" if refs else "—")
    lines.append("| *always the most frequent gold answer (accuracy)* | " + " | ".join(majority) + " |")
    note = ("Share ×100 of the dev answers that are the method's most frequent answer (mean over seeds). Near 100, a "
            "method gives (almost) the same label or option to every item: its accuracy is then that answer's frequency "
            "in the set, not what it knows, whatever the interval says. The last row is the accuracy of always giving "
            "the set's most frequent gold answer, a baseline that knows only the label distribution of the dev set.")
    return "\n".join(lines) + "\n\n" + note


def markdown(cells: dict[tuple[str, str], Cell], plan: Plan, avg: dict[str, Average], replicates: int) -> str:
    tasks = columns_of(cells)
    models = sorted({c.model for c in cells.values() if c.model}) or ["?"]
    metric_of = {t: next((c.metric for c in cells.values() if c.task == t and c.metric), None) or _primary(t)
                 for t in tasks}
    with_avg = len(tasks) > 1
    header = ["method", *(f"{t} ({metric_of[t]})" for t in tasks)] + ([AVERAGE] if with_avg else [])
    rule = "|" + "---|" * len(header)
    main = [f"### Tuned comparison: {Path(plan.path).name} ({', '.join(models)}, seeds "
            f"{','.join(map(str, plan.seeds))})", "", "| " + " | ".join(header) + " |", rule]
    diffs = ["### Difference to the best method of each column (paired bootstrap)", "",
             "| " + " | ".join(header) + " |", rule]
    floors = ["### Difference to the no-training floor (paired bootstrap)", "",
              "| " + " | ".join(header) + " |", rule]
    tuned = plan.tunes
    # a one-point grid chooses nothing: its table is the one rate per method, without per-task columns
    lrs = (["### Learning rate chosen on the held-out training slice", "",
            "| method | lr grid | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 2)] if tuned else
           ["### Learning rate", "", "| method | lr (one per method, not tuned) |", "|---|---|"])
    for method in plan.methods:
        row = [cells[(method.name, t)] for t in tasks]
        a = avg.get(method.name)
        one_run = ONE_RUN if method.trains_nothing and len(plan.seeds) > 1 else ""
        main.append("| " + " | ".join([method.name, *(_shown_cell(c) + (one_run if c.mean is not None else "") +
                                                      _edge_mark(c, plan) for c in row)] +
                                       ([_value(a.mean, a.interval, _tied(a)) + (" †" if seeds_disagree(a) else "")
                                         if a else "—"] if with_avg else [])) + " |")
        diffs.append("| " + " | ".join([method.name, *(_shown_diff(c) if c.mean is not None else "—" for c in row)] +
                                        ([_shown_diff(a)] if with_avg else [])) + " |")
        floors.append("| " + " | ".join([method.name, *(_shown_floor(c) for c in row)] +
                                         ([_shown_floor(a)] if with_avg else [])) + " |")
        if method.trains_nothing:   # one run at its line's lr, which changes nothing: no grid, nothing chosen
            lrs.append("| " + " | ".join([method.name, NOTHING_TO_TUNE, *(NOTHING_TO_TUNE for _ in row if tuned)]) + " |")
            continue
        lrs.append("| " + " | ".join([method.name, ", ".join(format_lr(x) for x in plan.grid(method)),
                                      *((_shown_lr(c, plan.grid(method)) if len(plan.grid(method)) > 1 else
                                         f"{format_lr(method.centre)} (one point: not tuned)") for c in row if tuned)]) + " |")
    missing = [c for c in cells.values() if not c.complete]
    complete = len(cells) - len(missing)
    chosen = ("the learning rate chosen per method and task on the held-out slice of the training set (never on dev)"
              if plan.tunes else "each method's one learning rate (a one-point grid: nothing chosen)")
    several = len(plan.seeds) > 1
    once = [m.name for m in plan.methods if m.trains_nothing]
    note = (("Dev scores ×100: mean over " + (f"{len(plan.seeds)} seeds" if several else "one seed") + f" at {chosen}, "
             "with a 95% bootstrap interval over dev examples" + (" pooled over seeds" if several else "") +
             f" ({replicates} replicates of the dev set, fixed RNG; the same resampled examples for "
             + ("every seed and " if several else "") + "every method of a task; percentile interval)")
            + (", then ±: the standard deviation over seeds (the interval is the dev set's sampling error of the seed "
               "mean; the ± shows how much training runs vary)" if several else
               "; with one seed the interval does not contain how much training runs vary") + ". **Bold**: the best mean of the column and "
            "every cell statistically tied with it (the paired bootstrap 95% interval of its difference to the best "
            "contains 0); a cell not in bold is really worse than the best. Each comparison is at 95% on its own, not "
            "corrected for the number of methods: among many truly tied methods about one in twenty reads as worse. "
            + ("†: the verdict changes when the training seeds are resampled as well (a two-level bootstrap: seeds "
               "drawn with replacement, then dev examples; the difference table gives its interval): these seeds "
               "decide the verdict, another draw of seeds might not, so read it as uncertain. " if several else "")
            + (f"{ONE_RUN.strip()}: {', '.join(once)} {'trains' if len(once) == 1 else 'train'} nothing (the "
               "checkpoint as it is), so a seed or a rate changes nothing in it: it is one run per task (the first seed, at its line's rate), and its cell "
               "is that run's score and interval, with no ± (more seeds would repeat one evaluation, not measure "
               "anything); resampling the training seeds leaves it as it is. " if several and once else "")
            + "The average is the mean over tasks "
            "(shown only for methods complete on every task; its interval averages the tasks' replicates). "
            f"{complete}/{len(cells)} cells complete; a missing cell says what is missing."
            + _edge_note(cells, plan))
    lr_note = ("Chosen lr, then the held-out score ×100 at each grid point (the chosen one in bold; ties go to the "
               "smaller lr; `diverged`: training stopped on a NaN/inf, `—`: not finished)" + (
                   f"; a point shown as `lr: score` is one the grid grew to (up to {plan.extend} per cell) because "
                   "the end next to it won" if plan.extend else "") + ". `edge`: the best point is "
               "an end of the grid" + (" after the growth" if plan.extend else "") + ", so the best rate may lie "
               "beyond it and the cell may be under-tuned. `flat`: every grid "
               "point scored exactly the same: no rate moved the model off a constant prediction (an MCC of 0), or "
               "the swept rate is not the one that trains (a plan bug, e.g. a head-only run with its own head lr)."
               + (" `head`: the task head's lr the seeds ran at, then the held-out score ×100 of the first seed at "
                  "the chosen lr with the preset's head lr and with each rate of the plan's head_grid (the preset's "
                  "is kept unless another beats it strictly; a method whose line fixes its head lr has none; a trial that won at the "
                  "end of the rates tried grows them past it, like the lr grid; `edge`: the fastest head rate tried "
                  "won even so, and a faster one might be better still)."
                  if plan.head_grid else "")
               + (" `lr at the new head`: where the head's rate changed, the body's lr the seeds ran at after trying the "
                  "chosen lr's neighbours again with the new head (held-out ×100, first seed; a neighbour replaces "
                  "the chosen lr only when strictly better, and grows past a winning end like the grid; `edge`: it "
                  "won at the end of the rates tried)." if plan.recheck_lr else ""))
    diversity = diversity_table(cells, plan)
    floor_parts = []
    if plan.floors:
        floor_parts = ["\n".join(floors), (
            f"The floor of a column is the best of the methods that train no encoder weight ({', '.join(plan.floors)}: "
            "the checkpoint as it is, e.g. the cosine of its sentence embeddings, and a head trained on its frozen "
            "features), the method named in each cell. Difference ×100 to it with the paired bootstrap 95% interval "
            "(the same resampled dev examples and seeds as above): `above` / `below` when the whole interval is above "
            "/ below 0, `tied` when it contains 0, so a `tied` or `below` row has not shown that training beats the "
            "untrained checkpoint on this dev set. The average's floor is the mean of the columns' floors.")]
    parts = ["\n".join(main), note, comparison.comparison_table(cells, plan), "\n".join(diffs), *floor_parts, "\n".join(lrs),
             *([lr_note] if tuned else []),
             *([diversity] if diversity else []), cost_table(cells, plan), truncation_table(cells, plan)]
    if missing:
        parts.append("Missing cells:\n\n" + "\n".join(f"- {c.method} × {c.task}: {c.missing()}" for c in missing))
    return "\n\n".join(parts) + "\n"


def _floor_fields(item: Any) -> dict[str, Any]:
    if item.floor is None:
        return {"floor_method": "", "diff_to_floor": "", "floor_low": "", "floor_high": "", "floor_verdict": ""}
    method, point, low, high, verdict = item.floor
    shown = (lambda v: round(100 * v, 4) if math.isfinite(v) else "")
    return {"floor_method": method, "diff_to_floor": shown(point), "floor_low": shown(low),
            "floor_high": shown(high), "floor_verdict": verdict}


def _seeds_fields(item: Any) -> dict[str, Any]:
    if item.seeds_diff is None:
        return {"seeds_diff_low": "", "seeds_diff_high": "", "seeds_verdict": ""}
    low, high, verdict = item.seeds_diff
    shown = (lambda v: round(100 * v, 4) if math.isfinite(v) else "")
    return {"seeds_diff_low": shown(low), "seeds_diff_high": shown(high), "seeds_verdict": verdict}


def csv_rows(cells: dict[tuple[str, str], Cell], plan: Plan, avg: dict[str, Average]) -> list[dict[str, Any]]:
    rows = []

    def number(value: Optional[float]) -> Any:
        return "" if value is None or not math.isfinite(value) else round(100 * value, 4)

    for (method, task), c in cells.items():
        verdict = "best" if c.best else c.diff[3] if c.diff else ("missing" if not c.complete else "")
        rows.append({"model": c.model or "", "method": method, "task": task, "metric": c.metric or "",
                     "status": "complete" if c.complete else f"missing: {c.missing()}",
                     "chosen_lr": c.state.seed_lr if c.state.seed_lr is not None else "",
                     "chosen_head_lr": ("" if not c.state.head_chosen else c.state.head_lr if c.state.head_lr is not None
                                        else "lr"),
                     "n_seeds": c.state.seeds_done, "planned_seeds": c.planned_seeds, "mean": number(c.mean),
                     "ci_low": number(c.interval[0]), "ci_high": number(c.interval[1]),
                     "diff_to_best": number(c.diff[0]) if c.diff else "", "diff_low": number(c.diff[1]) if c.diff else "",
                     "diff_high": number(c.diff[2]) if c.diff else "", "verdict": verdict,
                     **_seeds_fields(c), **_floor_fields(c),
                     "trainable_params": c.trainable_params if c.trainable_params is not None else ""})
    seeds_of = {m.name: plan.seeds_of(m) for m in plan.methods}
    for a in avg.values():
        rows.append({**{k: "" for k in CSV_FIELDS}, "method": a.method, "task": AVERAGE, "status": "complete",
                     "mean": number(a.mean), "ci_low": number(a.interval[0]), "ci_high": number(a.interval[1]),
                     "diff_to_best": number(a.diff[0]) if a.diff else "", "diff_low": number(a.diff[1]) if a.diff else "",
                     "diff_high": number(a.diff[2]) if a.diff else "", "verdict": "best" if a.best else
                     (a.diff[3] if a.diff else ""), **_seeds_fields(a), **_floor_fields(a),
                     "n_seeds": len(seeds_of[a.method]), "planned_seeds": len(seeds_of[a.method])})
    return rows


@dataclass
class Report:
    """A plan's tuned comparison: its cells, the per-method averages and the markdown of both."""

    plan: Plan
    cells: dict[tuple[str, str], Cell]
    averages: dict[str, Average]
    text: str


def write_report(root: Path, plan: Plan, out: Path, replicates: int = intervals.REPLICATES) -> Report:
    """Write ``results.md``, ``results.csv``, ``comparison.csv`` and ``results.png`` for ``plan``'s runs under
    ``root``."""
    cells = build_cells(root, plan, replicates)
    if perplexity.is_language_modelling(plan):   # pre-training: perplexity and memory, not scores ×100
        return _write_perplexity_report(cells, plan, out, replicates)
    avg = averages(cells, plan)
    text = markdown(cells, plan, avg, replicates)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_MD).write_text(text)
    with open(out / REPORT_CSV, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(csv_rows(cells, plan, avg))
    with atomic_file(str(out / comparison.COMPARISON_CSV)) as handle:
        writer = csv.DictWriter(handle, fieldnames=comparison.CSV_FIELDS)
        writer.writeheader()
        writer.writerows(comparison.csv_rows(cells, plan))
    points = [{"model": c.model or "?", "adapter": c.method, "variant": "", "task": c.task, "mean": 100 * c.mean,
               "std": 0.0, "ci": (100 * c.interval[0], 100 * c.interval[1]) if math.isfinite(c.interval[0]) else None,
               "trainable_params": c.trainable_params or 1} for c in cells.values() if c.mean is not None]
    if points:
        plot(points, out / REPORT_PNG)
    return Report(plan, cells, avg, text)


def _write_perplexity_report(cells: dict[tuple[str, str], Cell], plan: Plan, out: Path, replicates: int) -> Report:
    """A language-modelling plan's ``results.md``, ``results.csv`` and ``results.png`` (:mod:`lrzoo.lab.perplexity`:
    its one table is the method comparison, so no ``comparison.csv``)."""
    rows = perplexity.rows_of(cells, plan)   # before any file is written: runs that disagree stop it here
    text = perplexity.markdown(rows, cells, plan, replicates)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(str(out / REPORT_MD)) as handle:
        handle.write(text)
    with atomic_file(str(out / REPORT_CSV)) as handle:
        writer = csv.DictWriter(handle, fieldnames=perplexity.CSV_FIELDS)
        writer.writeheader()
        writer.writerows(perplexity.csv_rows(rows))
    points = perplexity.plot_points(rows)
    if points:
        plot_perplexity(points, out / REPORT_PNG)
    return Report(plan, cells, {}, text)
