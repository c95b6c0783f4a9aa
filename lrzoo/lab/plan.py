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

A method that trains nothing (:data:`TRAINS_NOTHING`: ``zero_shot``, the checkpoint evaluated as it is) runs
once per task: the first seed at its line's ``trainer.lr`` (the run a grid would have at its centre, so the same
directory and hash), no grid, no head trials, no other seeds. Its lr and seed change nothing it computes, so more
runs would repeat one evaluation and show a "flat" lr choice and a ``±0.0`` over seeds that are not measurements.

The body's rate was chosen with the preset's head, and a faster head can move its optimum (DoRA on STS-B: 59.8
held out at the chosen 3.3e-4, 77.1 at 1e-3, both with the head at 2e-2). With ``recheck_lr: true`` a cell whose
head rate changed tries the body's rate once more at the new head: the first seed runs at the chosen lr's two
neighbours (the grid's points beside it, or one ``factor`` past an end); one of them replaces the chosen lr
only when its held-out score beats the run at (chosen lr, new head) strictly, and a winner at the end of the
rates tried grows past it (up to ``extend`` times). The head is not tuned again after that: one and a half
rounds of a coordinate search, ~2 more runs for each cell whose head changed.

Each run is the configuration ``lrzoo-train`` composes from the plan; :class:`Composer` composes it
once per cell with Hydra (:func:`lrzoo.compose.compose_checked`) and sets ``trainer.lr`` and ``seed`` on
copies, which gives the same run directory and hash (:mod:`lrzoo.runs.identity`) as the command line
(checked in ``tests/lab/test_sweep.py``). What happened to each run, and the rates a cell chooses from
them, are :mod:`lrzoo.lab.choice`.
"""

from __future__ import annotations

import copy
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from ..runs.identity import digest, hashed_config, plan_key
PLAN_KEYS = {"experiment", "overrides", "tasks", "seeds", "grid", "head_grid", "recheck_lr", "methods", "floors"}
HEAD_LR = "trainer.head_lr="
#: a method line's plan options start with this (``grid.points=3``: that method's own grid size)
METHOD_GRID = "grid."
#: ``adapter=`` options whose run trains nothing: the trainer evaluates the checkpoint once (lrzoo.train.baselines
#: records ``evaluate_only`` for exactly these; the lab may not import train/, and tests/lab/test_floor_once.py
#: checks that the two agree). Their learning rate and seed change nothing the run computes.
TRAINS_NOTHING = frozenset({"zero_shot"})


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

    @property
    def trains_nothing(self) -> bool:
        """Its run evaluates the checkpoint untrained (:data:`TRAINS_NOTHING`): one run per task, at its centre."""
        return self.adapter in TRAINS_NOTHING


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
        """The head learning rates ``method`` is tried at besides the preset's (none if its line fixes one, or if
        it trains nothing)."""
        return () if method.fixes_head or method.trains_nothing else self.head_grid

    def seeds_of(self, method: Method) -> tuple[int, ...]:
        """The seeds ``method`` runs at: the plan's, or the first alone for a method that trains nothing."""
        return self.seeds[:1] if method.trains_nothing else self.seeds

    def grid(self, method: Method) -> list[float]:
        """``centre × factor^k`` for ``k = -(points // 2) .. points // 2``, rounded to 2 significant digits
        (``points``: the method's own ``grid.points=N`` where its line sets one, else the plan's; one, the centre,
        for a method that trains nothing)."""
        half = self.points_of(method) // 2
        return [self.rounded(method.centre * self.factor ** k) for k in range(-half, half + 1)]

    def points_of(self, method: Method) -> int:
        if method.trains_nothing:
            return 1
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
            elif tokens and tokens[0] in TRAINS_NOTHING:
                errors.append(f"methods: {line!r}: {option}: {tokens[0]} trains nothing and runs once per task at "
                              "its trainer.lr, so it has no grid; drop the option")
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


@dataclass(frozen=True)
class PlannedRun:
    method: str
    task: str
    lr: float
    seed: int
    overrides: tuple[str, ...]   # the lrzoo-train arguments
    run_dir: Path                # output_root / run_name, as lrzoo-train resolves it from this directory
    config_hash: str             # results.json's config_hash when finished
    key: str                     # lrzoo.runs.identity.plan_key of its config
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
            from ..compose import compose_checked

            self._cells[(method.name, task)] = compose_checked(
                list(self.overrides(method, task, method.centre, self.plan.seeds[0])),
                f"{self.plan.path}: {method.name} on {task}")
        return self._cells[(method.name, task)]

    def run(self, method: Method, task: str, lr: float, seed: int, head: Optional[float] = None) -> PlannedRun:
        """The run of ``method`` on ``task`` at ``lr`` and ``seed`` (and head lr ``head``, None: the preset's):
        its command, directory and hashes."""
        cached = self._runs.get((method.name, task, lr, seed, head))
        if cached is None:
            cfg = copy.deepcopy(self._cell_config(method, task))
            cfg.trainer.lr = lr
            if head is not None:
                cfg.trainer.head_lr = head
            cfg.seed = seed
            config = hashed_config(cfg)
            cached = PlannedRun(method.name, task, lr, seed, self.overrides(method, task, lr, seed, head),
                                Path(cfg.output_root) / cfg.run_name, digest(config)[:16], plan_key(config), config,
                                head)
            self._runs[(method.name, task, lr, seed, head)] = cached
        return cached
