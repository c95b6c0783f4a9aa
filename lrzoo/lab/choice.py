"""What happened to each run of a sweep plan, and the learning rates a cell chooses from them (the rules are
:mod:`lrzoo.lab.plan`'s docstring): a run's :class:`Outcome` read from its own directory (``lrzoo-sweep``,
:func:`outcome_in_dir`) or from any tree of finished runs (``lrzoo-report --plan``, :class:`RunIndex`), the
held-out :func:`selection_score`, and a cell's :class:`CellState` (:func:`cell_state`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from ..runs.files import HELDOUT_PREFIX, RESULTS_FILE, STATUS_FILE, read_json
from ..runs.identity import plan_key
from ..runs.lock import live_holder
from .plan import Composer, Method, Plan, PlannedRun


@dataclass
class Outcome:
    """``done`` (a finished ``results.json`` of this configuration), ``diverged`` (training stopped on a
    NaN/inf: final, it counts as the worst grid point), ``failed`` (anything else: retried by the next
    ``lrzoo-sweep``), ``running``, or ``pending``."""

    status: str
    result: Optional[dict[str, Any]] = None
    run_dir: Optional[Path] = None
    detail: str = ""


def selection_score(result: dict[str, Any], task: str) -> tuple[bool, float]:
    """``(recorded, score)``: the held-out primary metric of a finished run (``selection_score``, or the
    ``heldout/<task>/<metric>`` entry of ``metrics`` in results written before it was recorded); a null
    (NaN) score counts as ``-inf``. ``recorded`` is False when the run had no held-out slice."""
    if "selection_score" in result:
        value = result["selection_score"]
    else:
        name = f"{HELDOUT_PREFIX}{task}/{result.get('primary_metric')}"
        metrics = result.get("metrics") or {}
        if name not in metrics:
            return False, -math.inf
        value = metrics[name]
    return True, (float(value) if value is not None and math.isfinite(float(value)) else -math.inf)


@dataclass
class CellState:
    """A cell's grid outcomes (first seed), its chosen learning rate (or why there is none yet), the head
    rates tried at it and the one chosen, and the outcomes of every seed at that pair."""

    method: Method
    task: str
    grid: dict[float, Outcome]
    chosen: Optional[float] = None
    why_not: str = ""
    seeds: dict[int, Outcome] = field(default_factory=dict)
    scores: dict[float, float] = field(default_factory=dict)
    preset_head: Optional[float] = None                      # the cell's head lr without head_grid (None: = lr)
    head_trials: tuple[float, ...] = ()                      # the plan's other head rates for this cell
    heads: dict[float, Outcome] = field(default_factory=dict)  # their first-seed runs at the chosen lr
    head_scores: dict[float, float] = field(default_factory=dict)
    head: Optional[float] = None                             # the head rate chosen among them; None: the preset's
    head_why_not: str = ""                                   # why the head rate is not chosen yet
    rechecks: dict[float, Outcome] = field(default_factory=dict)  # recheck_lr: first-seed runs at (other lr, head)
    recheck_scores: dict[float, float] = field(default_factory=dict)
    moved: Optional[float] = None                            # the lr the recheck moved to; None: it stays
    recheck_why_not: str = ""                                # why the recheck has not decided yet

    @property
    def grid_done(self) -> int:
        return sum(o.status in ("done", "diverged") for o in self.grid.values())

    @property
    def heads_done(self) -> int:
        return sum(o.status in ("done", "diverged") for o in self.heads.values())

    @property
    def head_chosen(self) -> bool:
        return self.chosen is not None and not self.head_why_not

    @property
    def rechecks_done(self) -> int:
        return sum(o.status in ("done", "diverged") for o in self.rechecks.values())

    @property
    def settled(self) -> bool:
        """Both rates are final (the lr rechecked at a changed head, where the plan asks): the seeds can run."""
        return self.head_chosen and not self.recheck_why_not

    @property
    def seed_lr(self) -> Optional[float]:
        """The body's learning rate the seeds run at: the recheck's when it moved, else the grid's choice."""
        return self.moved if self.moved is not None else self.chosen

    @property
    def preset_rate(self) -> Optional[float]:
        """The rate the preset's head trains at: ``preset_head``, or the chosen lr when that is null."""
        return self.preset_head if self.preset_head is not None else self.chosen

    @property
    def head_lr(self) -> Optional[float]:
        """The head learning rate the seeds run at (None: the body's)."""
        return self.head if self.head is not None else self.preset_head

    @property
    def seeds_done(self) -> int:
        return sum(o.status == "done" for o in self.seeds.values())

    def outcomes(self) -> list[Outcome]:
        """Every run of the cell so far: grid points, head-lr trials, lr rechecks and seeds (a run may appear
        twice)."""
        return [*self.grid.values(), *self.heads.values(), *self.rechecks.values(), *self.seeds.values()]

    def complete(self, n_seeds: int) -> bool:
        """Both rates final and ``n_seeds`` seeds done (``len(plan.seeds_of(method))``: one for a method that
        trains nothing)."""
        return self.settled and self.seeds_done == n_seeds


def choose_lr(task: str, grid: dict[float, Outcome]) -> tuple[Optional[float], str, dict[float, float]]:
    """``(chosen lr or None, why none, {lr: selection score})`` from a cell's grid outcomes."""
    scores: dict[float, float] = {}
    unresolved = [lr for lr, o in grid.items() if o.status not in ("done", "diverged")]
    if len(grid) == 1 and not unresolved:  # a one-point grid (a fixed lr per method): nothing to choose
        (lr, outcome), = grid.items()
        return (lr, "", scores) if outcome.status == "done" else (None, "its only lr diverged", scores)
    for lr, outcome in grid.items():
        if outcome.status == "done":
            recorded, score = selection_score(outcome.result or {}, task)
            if not recorded:
                return None, (f"no selection_score in {outcome.run_dir}: the run had no held-out slice "
                              "(task.heldout_size)"), scores
            scores[lr] = score
        elif outcome.status == "diverged":
            scores[lr] = -math.inf
    if unresolved:
        return None, f"lr grid {len(grid) - len(unresolved)}/{len(grid)} done", scores
    if all(o.status == "diverged" for o in grid.values()):
        return None, "every lr of the grid diverged", scores
    finished = {lr: scores[lr] for lr, o in grid.items() if o.status == "done"}  # never a diverged one
    best = max(finished.values())
    return min(lr for lr, score in finished.items() if score == best), "", scores


def choose_head(task: str, preset: Outcome, heads: dict[float, Outcome], what: str = "head lr trials",
                ) -> tuple[bool, Optional[float], str, dict[float, float]]:
    """``(chosen, head lr or None for the preset's, why not chosen, {head lr: selection score})``: the best head
    rate of ``heads`` (first-seed runs at the chosen lr) when it beats ``preset`` (the grid's run there) strictly;
    ties between them go to the smaller rate, a diverged run counts as the worst. The lr recheck uses the same
    rule (``heads``: runs at other body rates, ``preset``: the run at the chosen pair; ``what`` names them)."""
    scores: dict[float, float] = {}
    for head, outcome in heads.items():
        if outcome.status == "diverged":
            scores[head] = -math.inf
        elif outcome.status == "done":
            recorded, scores[head] = selection_score(outcome.result or {}, task)
            if not recorded:
                return False, None, f"no selection_score in {outcome.run_dir}: no held-out slice", scores
    if len(scores) < len(heads):
        return False, None, f"{what} {len(scores)}/{len(heads)} done", scores
    if not scores:
        return True, None, "", scores
    best = max(scores.values())
    if best > selection_score(preset.result or {}, task)[1]:
        return True, min(h for h, score in scores.items() if score == best), "", scores
    return True, None, "", scores


def beyond_edge(grid: list[float], scores: dict[float, float], chosen: float, factor: float) -> Optional[float]:
    """The next grid point past ``chosen`` when it is an end of ``grid`` (sorted) and strictly better than its
    neighbour there (a tie says the optimum is flat, not beyond); else ``None``."""
    if len(grid) < 2 or chosen not in (grid[0], grid[-1]):
        return None
    neighbour = grid[1] if chosen == grid[0] else grid[-2]
    if not scores.get(chosen, -math.inf) > scores.get(neighbour, -math.inf):
        return None
    return Plan.rounded(chosen / factor if chosen == grid[0] else chosen * factor)


def cell_state(plan: Plan, composer: Composer, method: Method, task: str, lookup: Any) -> CellState:
    """The state of one cell, with ``lookup(run) -> Outcome`` telling what happened to each run. The grid is
    the plan's, grown past a winning end up to ``plan.extend`` points (:func:`beyond_edge`) once it has
    finished; the choice waits for each added point. Then the head rates of ``plan.head_grid`` are tried at
    the chosen lr (:func:`choose_head`), growing past a trial that wins at their end as the lr grid does, and
    the seeds wait for that choice. A method that trains nothing has one grid point and one seed
    (:meth:`~lrzoo.lab.plan.Plan.seeds_of`): its cell is that one run."""
    grid = {lr: lookup(composer.run(method, task, lr, plan.seeds[0])) for lr in plan.grid(method)}
    state = CellState(method, task, grid)
    state.chosen, state.why_not, state.scores = choose_lr(task, grid)
    for _ in range(plan.extend):
        extra = (beyond_edge(sorted(grid), state.scores, state.chosen, plan.factor)
                 if state.chosen is not None else None)
        if extra is None or extra in grid:
            break
        grid[extra] = lookup(composer.run(method, task, extra, plan.seeds[0]))
        state.grid = grid = dict(sorted(grid.items()))
        state.chosen, state.why_not, state.scores = choose_lr(task, grid)
    state.preset_head = composer.preset_head(method, task)
    state.head_trials = tuple(h for h in plan.head_lrs(method) if h != state.preset_head) \
        if plan.head_lrs(method) and composer.trains_head(method, task) else ()
    if state.chosen is None:
        state.head_why_not = "the lr is not chosen yet"
        return state
    # a null preset's head trains at the chosen lr: a trial there would repeat the grid's run
    state.head_trials = tuple(h for h in state.head_trials if h != state.preset_rate)
    state.heads = {head: lookup(composer.run(method, task, state.chosen, plan.seeds[0], head))
                   for head in state.head_trials}
    resolved, state.head, why, state.head_scores = _challenge(
        plan, task, state.preset_rate, grid[state.chosen], state.heads, "head lr trials",
        lambda head: lookup(composer.run(method, task, state.chosen, plan.seeds[0], head)))
    state.head_trials = tuple(state.heads)   # with the rates grown past a winning trial
    state.head_why_not = "" if resolved else why
    if resolved and plan.recheck_lr and state.head is not None:
        resolved = _recheck_lr(plan, composer, state, lookup)
    if resolved:
        first = (state.rechecks[state.moved] if state.moved is not None else
                 state.heads[state.head] if state.head is not None else grid[state.chosen])
        state.seeds = {seed: first if seed == plan.seeds[0] else
                       lookup(composer.run(method, task, state.seed_lr, seed, state.head))
                       for seed in plan.seeds_of(method)}
    return state


def _recheck_lr(plan: Plan, composer: Composer, state: CellState, lookup: Any) -> bool:
    """``recheck_lr``: the first seed at the chosen lr's two neighbours with the new head rate; one replaces
    the chosen lr when it beats the run at (chosen lr, head) strictly, growing past a winning end like the
    grid. Fills ``state.rechecks``/``moved``/``recheck_why_not``; returns whether it has decided."""
    method, task, first, head = state.method, state.task, plan.seeds[0], state.head
    lrs = sorted(state.grid)
    i = lrs.index(state.chosen)
    below = lrs[i - 1] if i > 0 else Plan.rounded(state.chosen / plan.factor)
    above = lrs[i + 1] if i + 1 < len(lrs) else Plan.rounded(state.chosen * plan.factor)
    state.rechecks = {lr: lookup(composer.run(method, task, lr, first, head)) for lr in (below, above)}
    resolved, state.moved, why, state.recheck_scores = _challenge(
        plan, task, state.chosen, state.heads[head], state.rechecks, "lr rechecks",
        lambda lr: lookup(composer.run(method, task, lr, first, head)))
    state.rechecks = dict(sorted(state.rechecks.items()))
    state.recheck_why_not = "" if resolved else why
    return resolved


def _challenge(plan: Plan, task: str, incumbent_rate: float, incumbent: Outcome, trials: dict[float, Outcome],
               what: str, run_at: Any) -> tuple[bool, Optional[float], str, dict[float, float]]:
    """Rates ``trials`` (first-seed runs, filled in place) challenging ``incumbent`` (the run at
    ``incumbent_rate``) by :func:`choose_head`'s rule. A challenger that wins at the end of the rates tried grows
    them past it (``run_at(rate)`` gives the new run), up to ``plan.extend`` times, like the lr grid; the
    incumbent winning grows nothing: it is the default the trials question, not a point of a grid."""
    resolved, winner, why, scores = choose_head(task, incumbent, trials, what)
    incumbent_score = selection_score(incumbent.result or {}, task)[1]
    for _ in range(plan.extend):
        if not resolved or winner is None:
            break
        tried = {incumbent_rate: incumbent_score, **scores}
        extra = beyond_edge(sorted(tried), tried, winner, plan.factor)
        if extra is None or extra in tried:
            break
        trials[extra] = run_at(extra)
        resolved, winner, why, scores = choose_head(task, incumbent, trials, what)
    return resolved, winner, why, scores


def outcome_in_dir(run: PlannedRun, retry_failed: bool = False) -> Outcome:
    """What ``run``'s own directory says (``lrzoo-sweep``): finished with this configuration, diverged, held by
    another live process (``running``, with its PID in ``detail``: another sweep of the plan, or a hand-started
    run), or pending."""
    result = read_json(run.run_dir / RESULTS_FILE)
    if result is not None and result.get("config_hash") == run.config_hash:
        return Outcome("done", result, run.run_dir)
    status = read_json(run.run_dir / STATUS_FILE)
    if status and status.get("config_hash") == run.config_hash and status.get("status") == "diverged" and not retry_failed:
        return Outcome("diverged", None, run.run_dir, status.get("detail", ""))
    return _in_flight(run) or Outcome("pending", None, run.run_dir)


def _in_flight(run: PlannedRun) -> Optional[Outcome]:
    """``running`` (with the holder's PID in ``detail``) when a live process holds the run's directory where the
    plan puts it (a sweep, or a run started by hand), else None."""
    holder = live_holder(str(run.run_dir))
    return None if holder is None else Outcome("running", None, run.run_dir, f"process {holder.get('pid', '?')}")


class RunIndex:
    """Every finished run and sweep status under a directory, by :func:`plan_key` and seed (``lrzoo-report``:
    finds a plan's runs wherever the tree was moved and whatever ``task.data_dir`` was)."""

    def __init__(self, root: Path):
        self.results: dict[tuple[str, int], tuple[Path, dict[str, Any]]] = {}
        self.statuses: dict[tuple[str, int], tuple[Path, dict[str, Any]]] = {}
        for path in sorted(Path(root).rglob(RESULTS_FILE)):
            result = read_json(path)
            if isinstance(result, dict) and isinstance(result.get("config"), dict):
                self.results.setdefault((plan_key(result["config"]), result.get("seed")), (path.parent, result))
        for path in sorted(Path(root).rglob(STATUS_FILE)):
            status = read_json(path)
            if isinstance(status, dict) and "key" in status:
                self.statuses.setdefault((status["key"], status.get("seed")), (path.parent, status))

    def __call__(self, run: PlannedRun) -> Outcome:
        if (run.key, run.seed) in self.results:
            run_dir, result = self.results[(run.key, run.seed)]
            return Outcome("done", result, run_dir)
        in_flight = _in_flight(run)
        if in_flight is not None:
            return in_flight
        if (run.key, run.seed) in self.statuses:
            run_dir, status = self.statuses[(run.key, run.seed)]
            return Outcome(status.get("status", "failed"), None, run_dir, status.get("detail", ""))
        return Outcome("pending")


def iter_states(plan: Plan, composer: Composer, lookup: Any) -> Iterator[CellState]:
    for method, task in plan.cells():
        yield cell_state(plan, composer, method, task, lookup)
