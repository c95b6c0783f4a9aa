"""Sweep plans for tuned comparisons: what ``lrzoo-sweep`` runs and ``lrzoo-report --plan`` expects.

A plan (``recipes/sweeps/glue_tuned.yaml``) names an experiment preset, the tasks, the seeds, a
learning-rate grid rule and the methods, one line each as in ``recipes/sweeps/glue_cpu.txt``
(``<adapter> <overrides>``, whose ``trainer.lr=`` is the centre of the method's grid)::

    experiment: glue_tuned
    tasks: [glue/sst2, glue/mrpc]
    seeds: [0, 1, 2]
    grid: {factor: 3, points: 3, extend: 2}   # centre × 3^k, k = -1, 0, 1, rounded to 2 significant digits
    head_grid: [2e-2]                         # then the task head's lr: the preset's, or one of these
    methods:
      - lora trainer.lr=1e-3
      - loldu trainer.lr=2e-2 adapter.alpha=1.0

A method line may carry its own grid size, ``grid.points=N`` (odd): a plan option, not an ``lrzoo-train``
override, so it never enters a run's configuration or hash (``cs_question`` tunes its four smallest adapters on
a held-out slice this way while every other method keeps the plan's one point).

A *cell* is one (method, task). Its learning rate is chosen on the held-out slice of the training set
(``task.heldout_size``; ``results.json``'s ``selection_score``) from the grid runs at the first seed:
the best score wins, ties go to the smaller learning rate, a run that diverged counts as the worst and
a run that failed otherwise (or has not run) leaves the grid incomplete. When the winner is an end of the
grid and strictly better than its neighbour, the optimum may lie beyond it: with ``grid.extend: N`` the
grid grows by one point past that end (× or ÷ ``factor``), up to N times, before anything is chosen. The
other seeds then run at the chosen rate (the first seed's run there is the same configuration, not run
again).

The task head (``modules_to_save``) trains at its own rate, ``trainer.head_lr`` (the experiment preset's;
null: the body's). With ``head_grid`` the plan tunes it too, one coordinate after the other: once the body's
rate is chosen, the first seed trains at it with each head rate of ``head_grid``; one of them replaces the
preset's only when its held-out score beats the preset's run at the chosen rate strictly (ties: the smaller
head rate); a trial that wins at the end of the rates tried grows them past it (× or ÷ ``factor``, up to
``extend`` times, as the lr grid does), and the seeds run at the pair. A method whose line sets
``trainer.head_lr`` itself (head-only: null, its head is what ``trainer.lr`` sweeps) keeps it and gets no
head trials.

The body's rate was chosen with the preset's head, and a faster head can move its optimum (DoRA on STS-B: 59.8
held out at the chosen 3.3e-4, 77.1 at 1e-3, both with the head at 2e-2). With ``recheck_lr: true`` a cell whose
head rate changed tries the body's rate once more at the new head: the first seed runs at the chosen lr's two
neighbours (the grid's points beside it, or one ``factor`` past an end); one of them replaces the chosen lr
only when its held-out score beats the run at (chosen lr, new head) strictly, and a winner at the end of the
rates tried grows past it (up to ``extend`` times). The head is not tuned again after that: one and a half
rounds of a coordinate search, ~2 more runs for each cell whose head changed.

Each run is the configuration ``lrzoo-train`` composes from the plan; :class:`Composer` composes it
once per cell with Hydra and sets ``trainer.lr`` and ``seed`` on copies, which gives the same run
directory and hash as the command line (checked in ``tests/test_sweep.py``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from ..train.config import HELDOUT_PREFIX
from ..train.run_dir import RESULTS_FILE, live_holder

#: what ``lrzoo-sweep`` writes in a run directory whose run did not finish: ``status`` (``diverged`` or
#: ``failed``), ``returncode``, ``config_hash``, ``key``, ``seed``, ``log``
STATUS_FILE = "sweep-status.json"
#: each run's stdout and stderr, appended by ``lrzoo-sweep`` in its run directory
LOG_FILE = "sweep.log"
PLAN_KEYS = {"experiment", "overrides", "tasks", "seeds", "grid", "head_grid", "recheck_lr", "methods", "floors"}
HEAD_LR = "trainer.head_lr="
#: a method line's plan options start with this (``grid.points=3``: that method's own grid size)
METHOD_GRID = "grid."
#: keys left out of a plan's run identity (:func:`plan_key`): the seed, and where the data was read from
KEY_EXCLUDED = ("seed", "task.data_dir")


class PlanError(ValueError):
    """A plan file that cannot be run, with what to change."""


@dataclass(frozen=True)
class Method:
    """One line of a plan: the ``adapter`` option, its fixed overrides and the centre of its lr grid."""

    name: str
    adapter: str
    centre: float
    overrides: tuple[str, ...]
    points: Optional[int] = None   # its own grid.points (a ``grid.points=N`` token of its line); None: the plan's

    @property
    def fixes_head(self) -> bool:
        """Its line sets ``trainer.head_lr``: the plan's ``head_grid`` leaves its head alone."""
        return any(o.lstrip("+").startswith(HEAD_LR) for o in self.overrides)  # also +key= and ++key=


@dataclass(frozen=True)
class Plan:
    path: str
    experiment: Optional[str]
    overrides: tuple[str, ...]
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    factor: float
    points: int
    methods: tuple[Method, ...]
    extend: int = 0   # points a cell's grid may grow past an end that wins (see cell_state)
    head_grid: tuple[float, ...] = ()   # head learning rates tried at the chosen lr (see cell_state)
    recheck_lr: bool = False            # try the chosen lr's neighbours again once the head rate changed
    floors: tuple[str, ...] = ()        # methods that train no encoder weight: the report's no-training floor

    def head_lrs(self, method: Method) -> tuple[float, ...]:
        """The head learning rates ``method`` is tried at besides the preset's (none if its line fixes one)."""
        return () if method.fixes_head else self.head_grid

    def grid(self, method: Method) -> list[float]:
        """``centre × factor^k`` for ``k = -(points // 2) .. points // 2``, rounded to 2 significant digits
        (``points``: the method's own ``grid.points=N`` where its line sets one, else the plan's)."""
        half = self.points_of(method) // 2
        return [self.rounded(method.centre * self.factor ** k) for k in range(-half, half + 1)]

    def points_of(self, method: Method) -> int:
        return method.points if method.points is not None else self.points

    @property
    def tunes(self) -> bool:
        """Whether any method's grid has more than one point (a rate is chosen on the held-out slice)."""
        return any(self.points_of(m) > 1 for m in self.methods)

    @staticmethod
    def rounded(lr: float) -> float:
        return float(f"{lr:.2g}")

    def cells(self) -> list[tuple[Method, str]]:
        """Every (method, task), method by method: the order ``lrzoo-sweep`` completes them in."""
        return [(method, task) for method in self.methods for task in self.tasks]

    def filtered(self, only: Optional[Iterable[str]] = None, tasks: Optional[Iterable[str]] = None) -> "Plan":
        """The plan restricted to some methods and tasks (names checked against the plan)."""
        methods, kept_tasks = self.methods, self.tasks
        if only:
            wanted = list(only)
            unknown = [m for m in wanted if m not in {x.name for x in self.methods}]
            if unknown:
                raise PlanError(f"--only {','.join(unknown)}: not in {self.path}; its methods: "
                                f"{', '.join(m.name for m in self.methods)}")
            methods = tuple(m for m in self.methods if m.name in wanted)
        if tasks:
            wanted = list(tasks)
            unknown = [t for t in wanted if t not in self.tasks]
            if unknown:
                raise PlanError(f"--tasks {','.join(unknown)}: not in {self.path}; its tasks: {', '.join(self.tasks)}")
            kept_tasks = tuple(t for t in self.tasks if t in wanted)
        return Plan(self.path, self.experiment, self.overrides, kept_tasks, self.seeds, self.factor, self.points, methods,
                    self.extend, self.head_grid, self.recheck_lr, tuple(f for f in self.floors if f in
                                                                         {m.name for m in methods}))


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan file (:class:`PlanError` naming every problem)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: no such plan file (e.g. recipes/sweeps/glue_tuned.yaml)")
    data = yaml.safe_load(path.read_text()) or {}
    errors = []
    unknown = set(data) - PLAN_KEYS
    if unknown:
        errors.append(f"unknown key(s) {sorted(unknown)}; a plan has {sorted(PLAN_KEYS)}")
    tasks, seeds = data.get("tasks") or [], data.get("seeds") or []
    if not tasks or not all(isinstance(t, str) for t in tasks) or len(set(tasks)) != len(tasks):
        errors.append(f"tasks: {tasks!r} must be a non-empty list of distinct task names (glue/sst2, ...)")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds):
        errors.append(f"seeds: {seeds!r} must be a non-empty list of distinct integers; the grid runs at the first")
    grid = data.get("grid") or {}
    factor, points, extend = grid.get("factor", 3), grid.get("points", 3), grid.get("extend", 0)
    if set(grid) - {"factor", "points", "extend"}:
        errors.append(f"grid: unknown key(s) {sorted(set(grid) - {'factor', 'points', 'extend'})}; "
                      "a grid has factor, points and extend")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 1:
        errors.append(f"grid.factor: {factor!r} must be a number > 1 (neighbouring grid points differ by it)")
    if not isinstance(points, int) or isinstance(points, bool) or points < 1 or points % 2 == 0:
        errors.append(f"grid.points: {points!r} must be an odd positive integer (the centre and as many on each side)")
    if not isinstance(extend, int) or isinstance(extend, bool) or extend < 0:
        errors.append(f"grid.extend: {extend!r} must be an integer >= 0 (points a grid may grow past a winning end)")
    overrides = data.get("overrides") or []
    if not all(isinstance(o, str) for o in overrides):
        errors.append(f"overrides: {overrides!r} must be a list of lrzoo-train overrides (key=value)")
    head_grid = data.get("head_grid") or []
    if isinstance(head_grid, list):  # PyYAML reads 2e-2 (no dot) as a string: take numbers written either way
        head_grid = [_number(h) for h in head_grid]
    if not isinstance(head_grid, list) or not all(h is not None and math.isfinite(h) and h > 0 for h in head_grid) \
            or len(set(head_grid)) != len(head_grid):
        errors.append(f"head_grid: {head_grid!r} must be a list of distinct positive learning rates (e.g. [2e-2]) "
                      "tried for the task head at each cell's chosen lr")
    elif head_grid and points == 1:
        errors.append("head_grid with a one-point lr grid: such a plan chooses nothing (and needs no held-out "
                      "slice), so it cannot choose a head lr either; set grid.points >= 3 or drop head_grid")
    recheck_lr = data.get("recheck_lr", False)
    if not isinstance(recheck_lr, bool):
        errors.append(f"recheck_lr: {recheck_lr!r} must be true or false")
    elif recheck_lr and not head_grid:
        errors.append("recheck_lr: true without head_grid: the lr is rechecked after the head's rate changes, and "
                      "without head_grid it never does; add head_grid (e.g. [2e-2]) or drop recheck_lr")
    methods = []
    for line in data.get("methods") or []:
        tokens = shlex.split(str(line))
        # plan options of the line (``grid.points=N``): not lrzoo-train overrides, so never part of a run's hash
        plan_options = [t for t in tokens[1:] if t.startswith(METHOD_GRID)]
        tokens = [t for t in tokens if t not in plan_options]
        method_points = None
        for option in plan_options:
            key, _, value = option.partition("=")
            if key != "grid.points" or not value.isdigit() or int(value) < 1 or int(value) % 2 == 0:
                errors.append(f"methods: {line!r}: {option} must be grid.points=<odd positive integer> (the only "
                              "grid option a method line takes: its own number of grid points)")
            else:
                method_points = int(value)
        lrs = [t for t in tokens[1:] if t.startswith("trainer.lr=")]
        if not tokens or "=" in tokens[0] or len(lrs) != 1:
            errors.append(f"methods: {line!r} must be '<adapter> trainer.lr=<centre> [overrides...]'")
            continue
        try:
            centre = float(lrs[0].split("=", 1)[1])
        except ValueError:
            errors.append(f"methods: {line!r}: {lrs[0]} is not a number")
            continue
        methods.append(Method(tokens[0], tokens[0], centre, tuple(t for t in tokens[1:] if t not in lrs), method_points))
    if not methods:
        errors.append("methods: list at least one '<adapter> trainer.lr=<centre> [overrides...]'")
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        errors.append(f"methods: {duplicates} listed more than once (one line per adapter)")
    floors = data.get("floors") or []
    if not isinstance(floors, list) or not all(f in names for f in floors):
        errors.append(f"floors: {floors!r} must list methods of the plan (the no-training references each row is "
                      "compared with, e.g. [zero_shot, head_only])")
    if errors:
        raise PlanError(f"{path}:\n  " + "\n  ".join(errors))
    return Plan(str(path), data.get("experiment"), tuple(overrides), tuple(tasks), tuple(seeds), float(factor), points,
                tuple(methods), extend, tuple(head_grid), recheck_lr,   # numbers by now: anything else was refused
                tuple(floors))


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def format_lr(lr: float) -> str:
    """``3.3e-4``, ``1e-3``: a learning rate, short."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def plan_key(config: dict[str, Any]) -> str:
    """A run's identity within a plan: the digest of its ``results.json`` ``config`` without the seed and
    ``task.data_dir`` (so a report finds the runs wherever the data was read from)."""
    from .train import drop_ignored_adapter_options

    data = copy.deepcopy(config)
    drop_ignored_adapter_options(data.get("adapter"))  # recorded before such an option was left out of the hash
    for dotted in KEY_EXCLUDED:
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PlannedRun:
    method: str
    task: str
    lr: float
    seed: int
    overrides: tuple[str, ...]   # the lrzoo-train arguments
    run_dir: Path                # output_root / run_name, as lrzoo-train resolves it from this directory
    config_hash: str             # results.json's config_hash when finished
    key: str                     # plan_key of its config
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # results.json's config
    head: Optional[float] = None  # its trainer.head_lr when the plan sets one (head_grid); None: the preset's

    def label(self) -> str:
        head = f" head_lr={format_lr(self.head)}" if self.head is not None else ""
        return f"{self.method} {self.task} lr={format_lr(self.lr)}{head} seed {self.seed}"


class Composer:
    """The planned runs of a plan, composed with Hydra once per cell (call from one thread)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._cells: dict[tuple[str, str], Any] = {}
        self._runs: dict[tuple[str, str, float, int, Optional[float]], PlannedRun] = {}

    def overrides(self, method: Method, task: str, lr: float, seed: int,
                  head: Optional[float] = None) -> tuple[str, ...]:
        experiment = (f"experiment={self.plan.experiment}",) if self.plan.experiment else ()
        head_lr = (f"{HEAD_LR}{head!r}",) if head is not None else ()
        return (*experiment, *self.plan.overrides, f"adapter={method.adapter}", *method.overrides, f"task={task}",
                *head_lr, f"trainer.lr={lr!r}", f"seed={seed}")

    def preset_head(self, method: Method, task: str) -> Optional[float]:
        """The cell's ``trainer.head_lr`` without a plan head rate (None: the head trains at ``trainer.lr``)."""
        value = self._cell_config(method, task).trainer.get("head_lr")
        return float(value) if value is not None else None

    def trains_head(self, method: Method, task: str) -> bool:
        """Whether the cell's model has a task head to train: a bi-encoder (``model.similarity_head=bi_encoder``
        on a similarity task) scores by the cosine of two embeddings and has none, so a head-rate trial would
        repeat the seed-0 run under another hash."""
        from ..heads import pair_form_for
        from ..tasks import get_task

        cfg = self._cell_config(method, task)
        task_spec = get_task(cfg.task.name)
        if task_spec.kind == "generation":
            return True
        return pair_form_for(cfg.model.get("similarity_head"), task_spec) != "bi_encoder"

    def _cell_config(self, method: Method, task: str) -> Any:
        if (method.name, task) not in self._cells:
            from .overrides import compose_checked

            self._cells[(method.name, task)] = compose_checked(
                list(self.overrides(method, task, method.centre, self.plan.seeds[0])),
                f"{self.plan.path}: {method.name} on {task}")
        return self._cells[(method.name, task)]

    def run(self, method: Method, task: str, lr: float, seed: int, head: Optional[float] = None) -> PlannedRun:
        """The run of ``method`` on ``task`` at ``lr`` and ``seed`` (and head lr ``head``, None: the preset's):
        its command, directory and hashes."""
        cached = self._runs.get((method.name, task, lr, seed, head))
        if cached is None:
            from .train import _digest, hashed_config

            cfg = copy.deepcopy(self._cell_config(method, task))
            cfg.trainer.lr = lr
            if head is not None:
                cfg.trainer.head_lr = head
            cfg.seed = seed
            config = hashed_config(cfg)
            cached = PlannedRun(method.name, task, lr, seed, self.overrides(method, task, lr, seed, head),
                                Path(cfg.output_root) / cfg.run_name, _digest(config)[:16], plan_key(config), config,
                                head)
            self._runs[(method.name, task, lr, seed, head)] = cached
        return cached


# ---- what happened to a planned run, and the learning rate a cell chooses ----

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
    the seeds wait for that choice."""
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
                       lookup(composer.run(method, task, state.seed_lr, seed, state.head)) for seed in plan.seeds}
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


def read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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
