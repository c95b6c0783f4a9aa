"""The sweep driver of ``lrzoo-sweep`` (:mod:`lrzoo.cli.sweep`): it launches a plan's runs in order.

For every cell (method × task of the plan, :mod:`lrzoo.lab.plan`): stage 1 trains the method at each
learning rate of its grid with the first seed; once the whole grid has finished, the rate with the best
held-out score (``selection_score``; ties: the smaller rate) is chosen; with the plan's ``head_grid``, the
first seed then trains at that rate with each of its head learning rates, and the task head's rate is chosen
on the same score (the preset's unless one beats it strictly); stage 2 trains the other seeds at the chosen rate(s). Cells are completed method by method (every task of a method, then the next method): the
scheduler always starts the earliest ready run of the plan, so at most the two or three cells in flight
are incomplete when the sweep stops.

Each run is a separate ``python -m lrzoo.cli.train`` process with ``OMP_NUM_THREADS=1``, ``--jobs`` at a
time, its stdout and stderr appended to ``sweep.log`` in its run directory. Runs whose ``results.json``
holds the same configuration are not started again, so stopping the sweep (Ctrl-C, ``kill``: the runs in
flight are stopped with it) and starting the same command continues it; an interrupted run resumes from
its checkpoint if it wrote one (``trainer.save_every``), else starts over. A run that diverges is
recorded as such in its directory (``sweep-status.json``) and counts as its grid point's worst score; it
is not retried unless ``--retry-failed``. Any other failure is listed at the end (exit status 1) and
retried by the next invocation; the other runs go on.

Several sweeps of one plan share the work (a second lane started later or at the same moment, or machines
sharing the runs folder): a run directory has one writer at a time (:mod:`lrzoo.runs.lock`). A sweep
claims a run (takes its lock) before it launches it and hands the lock to the ``lrzoo-train`` it starts, so a
run another sweep looked at in the same instant is launched once: the other sweep finds it taken and starts the
next one. A sweep leaves every run that another live process holds to that process, goes on with the rest, and
before it stops waits for those runs, since the choices that follow them may need them.

A failed run's line in the summary is its own error: the exception line of the last traceback in its log
(``Type: message``), not Hydra's closing hint.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..io import atomic_file
from ..runs.files import LOG_FILE, STATUS_FILE
from ..runs.lock import RunDirInUse, RunLock
from .choice import CellState, Outcome, cell_state, outcome_in_dir
from .plan import Composer, Plan, PlannedRun, format_lr

#: what a diverged run prints (lrzoo.train.divergence): such a run is final, not a failure to retry
DIVERGED_MARK = "Training diverged"
POLL_S = 0.5
#: seconds a stopped run gets to exit after SIGTERM before SIGKILL
STOP_GRACE_S = 30
#: how often the plan is looked at again while another process holds some of its runs
HELD_POLL_S = 10.0
#: what Hydra prints after a failed job's traceback: never the reason a run failed
HYDRA_HINT = "HYDRA_FULL_ERROR"
TRACEBACK = "Traceback (most recent call last):"


def train_env(threads: int = 1) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false"}


def launch_train(run: PlannedRun, log, threads: int = 1, claim: Optional[RunLock] = None) -> subprocess.Popen:
    """``python -m lrzoo.cli.train <overrides>`` in a session of its own (stopped by :func:`run_plan`), given the
    lock the sweep ``claim``-ed for it (it adopts it: :meth:`lrzoo.runs.lock.RunLock.handover_env`)."""
    handover = claim.handover_env() if claim is not None else {}
    return subprocess.Popen([sys.executable, "-m", "lrzoo.cli.train", *run.overrides], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**train_env(threads), **handover},
                            start_new_session=True, pass_fds=(claim.fd,) if claim is not None else ())


def claim_run(run: PlannedRun) -> Optional[RunLock]:
    """Take ``run``'s lock for the process about to be launched for it, or None when another process holds it
    (another sweep of the plan took it since this one looked)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(str(run.run_dir))
    try:
        lock.acquire()
    except RunDirInUse:
        return None
    return lock


def failure_line(text: str) -> str:
    """The line that says why a run failed, from its log: the exception line (``Type: message``) of the last
    traceback, or else the last line that is not Hydra's ``HYDRA_FULL_ERROR`` hint."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip() and HYDRA_HINT not in line]
    starts = [i for i, line in enumerate(lines) if line.startswith(TRACEBACK)]
    if starts:
        # frames ("  File ...", the code, "^^^") are indented; the exception's first line is not
        exception = next((line for line in lines[starts[-1] + 1:] if not line[0].isspace()), None)
        if exception is not None:
            return exception
    return lines[-1].strip() if lines else ""


def shown_command(run: PlannedRun) -> str:
    return "OMP_NUM_THREADS=1 lrzoo-train " + " ".join(run.overrides)


@dataclass
class Running:
    run: PlannedRun
    process: subprocess.Popen
    log: object
    log_start: int
    started: float
    claim: Optional[RunLock] = None   # the run's lock, taken by the sweep and handed to the run


class Sweep:
    """The scheduler: which run is ready next, what happened to the finished ones."""

    def __init__(self, plan: Plan, composer: Optional[Composer] = None, retry_failed: bool = False):
        self.plan = plan
        self.composer = composer or Composer(plan)
        self.retry_failed = retry_failed
        self.failed: dict[Path, str] = {}          # this invocation's failures: not retried until the next one
        self.diverged: dict[Path, str] = {}        # this invocation's divergences: final even with --retry-failed
        self.running: dict[Path, Running] = {}

    def lookup(self, run: PlannedRun) -> Outcome:
        if run.run_dir in self.running:
            return Outcome("running", None, run.run_dir)
        if run.run_dir in self.failed:
            return Outcome("failed", None, run.run_dir, self.failed[run.run_dir])
        if run.run_dir in self.diverged:  # --retry-failed retries an old divergence once, not forever
            return Outcome("diverged", None, run.run_dir, self.diverged[run.run_dir])
        return outcome_in_dir(run, self.retry_failed)

    def states(self) -> list[CellState]:
        return [cell_state(self.plan, self.composer, method, task, self.lookup) for method, task in self.plan.cells()]

    def ready(self, states: Optional[list[CellState]] = None) -> list[PlannedRun]:
        """Runs that can start now, in plan order: a cell's pending grid runs, its pending head-lr trials once
        the lr is chosen, its pending lr rechecks once a new head lr is chosen (``recheck_lr``), or its pending
        seeds once both rates are final."""
        out = []
        first = self.plan.seeds[0]
        for state in states if states is not None else self.states():
            if state.chosen is None:
                lrs = [lr for lr, o in state.grid.items() if o.status == "pending"]
                out += [self.composer.run(state.method, state.task, lr, first) for lr in lrs]
            elif not state.head_chosen:
                heads = [h for h, o in state.heads.items() if o.status == "pending"]
                out += [self.composer.run(state.method, state.task, state.chosen, first, h) for h in heads]
            elif not state.settled:
                lrs = [lr for lr, o in state.rechecks.items() if o.status == "pending"]
                out += [self.composer.run(state.method, state.task, lr, first, state.head) for lr in lrs]
            else:
                seeds = [s for s, o in state.seeds.items() if o.status == "pending"]
                out += [self.composer.run(state.method, state.task, state.seed_lr, s, state.head) for s in seeds]
        return out

    def finish(self, item: Running, returncode: int) -> str:
        """Record a run that exited: done, diverged (final) or failed (retried next time)."""
        item.log.close()
        if item.claim is not None:
            item.claim.release()
        run = item.run
        status_path = run.run_dir / STATUS_FILE
        outcome = outcome_in_dir(run)
        if outcome.status == "done":
            if status_path.exists():
                status_path.unlink()
            return "done"
        if outcome.status == "running":  # another sweep started it between our look and our launch: its run
            return "held"
        with open(run.run_dir / LOG_FILE, "rb") as handle:
            handle.seek(item.log_start)
            text = handle.read().decode(errors="replace")
        diverged = DIVERGED_MARK in text
        lines = [line for line in text.splitlines() if line.strip()]
        detail = next((line.strip() for line in lines if DIVERGED_MARK in line), None) or failure_line(text)
        status = {"status": "diverged" if diverged else "failed", "returncode": returncode, "detail": detail[:500],
                  "config_hash": run.config_hash, "key": run.key, "seed": run.seed, "method": run.method,
                  "task": run.task, "lr": run.lr, "head_lr": run.head, "log": LOG_FILE,
                  "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        with atomic_file(str(status_path)) as handle:  # a sweep killed mid-write leaves the old status, not half
            handle.write(json.dumps(status, indent=1) + "\n")
        if diverged:
            self.diverged[run.run_dir] = detail[:300]
        else:
            self.failed[run.run_dir] = f"exit status {returncode}: {detail[:300]}"
        return status["status"]


def run_plan(plan: Plan, jobs: int = 2, max_minutes: Optional[float] = None, dry_run: bool = False,
             retry_failed: bool = False, threads: int = 1, composer: Optional[Composer] = None,
             launch: Optional[Callable[[PlannedRun, object], subprocess.Popen]] = None,
             out: Callable[[str], None] = print) -> int:
    """Run (or, ``dry_run``, list) what is left of ``plan``. Returns the exit status: 0 when nothing failed
    (also when ``max_minutes`` stopped it with runs left), 1 with failures, 130 when interrupted."""
    sweep = Sweep(plan, composer, retry_failed)
    claims: dict[Path, RunLock] = {}   # claimed, not launched yet: handed to the default launcher
    launch = launch or (lambda run, log: launch_train(run, log, threads, claims[run.run_dir]))
    start = time.monotonic()
    deadline = start + 60 * max_minutes if max_minutes is not None else None
    states = sweep.states()
    total = _planned_runs(plan, states)
    done = sum(s.grid_done + s.heads_done + s.rechecks_done + max(s.seeds_done - 1, 0) for s in states)
    grows = f"; a grid may grow by {plan.extend} past a winning end" if plan.extend else ""
    grows += (f"; head lr {', '.join(map(format_lr, plan.head_grid))} tried at each chosen lr" if plan.head_grid
              else "")
    grows += "; the lr rechecked where the head's changed" if plan.recheck_lr else ""
    once = [m.name for m in plan.methods if m.trains_nothing]
    grows += (f"; {', '.join(once)} {'trains' if len(once) == 1 else 'train'} nothing: one run per task, seed "
              f"{plan.seeds[0]} at the line's lr"
              if once and (plan.tunes or len(plan.seeds) > 1) else "")
    out(f"[lrzoo-sweep] {plan.path}: {len(plan.methods)} methods × {len(plan.tasks)} tasks, "
        f"{total} runs planned ({done} finished or diverged{grows})")
    if dry_run:
        for run in sweep.ready(states):
            out(shown_command(run))
        # a one-seed plan, or a method that trains nothing, has nothing to run after the choice
        waiting = [s for s in states if not s.settled and len(plan.seeds_of(s.method)) > 1]
        if waiting:
            heads = " (and head lr)" if any(s.head_trials for s in waiting) else ""
            out(f"# then, for {len(waiting)} cell(s) whose lr{heads} is not chosen yet: seeds "
                f"{','.join(map(str, plan.seeds[1:]))} at the chosen lr{heads}")
        return 0

    # Ctrl-C and kill both stop the sweep; SIGINT is installed explicitly too, as a process started in the
    # background by a non-interactive shell (or a pytest-xdist worker) inherits it ignored
    previous = {signum: signal.signal(signum, _raise_interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    launched, durations, changed = 0, [], True
    held: dict[Path, str] = {}   # runs of the plan that another live process holds, and who
    look_again = 0.0
    try:
        while True:
            before_deadline = deadline is None or time.monotonic() < deadline
            if ((changed or (held and time.monotonic() >= look_again)) and len(sweep.running) < jobs
                    and before_deadline):
                # what can start changes only when a run ends (ours, or one another process holds): no re-reading
                # the tree meanwhile
                changed = False
                states = sweep.states()
                total = _planned_runs(plan, states)
                now_held = _held_elsewhere(sweep, states)
                if now_held.keys() - held.keys():
                    out(f"[lrzoo-sweep] {len(now_held)} run(s) of the plan are held by another process, left to it: "
                        + ", ".join(f"{path} ({who})" for path, who in now_held.items()))
                held, look_again = now_held, time.monotonic() + HELD_POLL_S
                for run in sweep.ready(states):
                    if len(sweep.running) >= jobs:
                        break
                    # claimed before the launch (lrzoo-train's imports take seconds): a sweep that looked at the
                    # same moment finds the run taken and goes on with the next one
                    claim = claim_run(run)
                    if claim is None:
                        out(f"[lrzoo-sweep] {run.label()}: another process took it first; left to it")
                        held[run.run_dir], changed = "claimed by another process", True
                        continue
                    if outcome_in_dir(run, retry_failed).status in ("done", "diverged"):  # it ended meanwhile
                        claim.release()
                        changed = True
                        continue
                    log = open(run.run_dir / LOG_FILE, "ab")
                    log.write(f"\n===== lrzoo-sweep {time.strftime('%Y-%m-%d %H:%M:%S')}: {shown_command(run)}\n".encode())
                    log.flush()
                    claims[run.run_dir] = claim
                    try:
                        process = launch(run, log)
                    except BaseException:
                        claim.release()
                        log.close()
                        raise
                    finally:
                        claims.pop(run.run_dir, None)
                    sweep.running[run.run_dir] = Running(run, process, log, log.tell(), time.monotonic(), claim)
                    launched += 1
                    out(f"[lrzoo-sweep] start {run.label()} -> {run.run_dir}")
            if not sweep.running and not (held and before_deadline):
                break
            time.sleep(POLL_S)
            for key, item in list(sweep.running.items()):
                code = item.process.poll()
                if code is None:
                    continue
                del sweep.running[key]
                changed = True
                status = sweep.finish(item, code)
                took = time.monotonic() - item.started
                if status == "held":
                    out(f"[lrzoo-sweep] {item.run.label()}: another process took it first; left to it")
                    continue
                note = f" (see {item.run.run_dir / LOG_FILE})" if status != "done" else ""
                if status != "failed":
                    done += 1
                    durations.append(took)
                    left = max(total - done, 0)
                    note += (f" [{done}/{total} runs; ~{left * statistics.fmean(durations) / jobs / 3600:.1f} h left "
                             "at this pace]")
                out(f"[lrzoo-sweep] {status} {item.run.label()} in {took / 60:.1f} min{note}")
    except KeyboardInterrupt:
        stopped = _stop(sweep.running.values())
        out(f"[lrzoo-sweep] interrupted: stopped {stopped} run(s) in flight; run the same command again to continue")
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return _summary(sweep, launched, time.monotonic() - start, deadline is not None and time.monotonic() >= deadline,
                    out)


def _held_elsewhere(sweep: Sweep, states: list[CellState]) -> dict[Path, str]:
    """The plan's runs that a live process other than this sweep's own runs holds (:func:`outcome_in_dir`)."""
    return {outcome.run_dir: outcome.detail for state in states for outcome in state.outcomes()
            if outcome.status == "running" and outcome.run_dir not in sweep.running}


def _planned_runs(plan: Plan, states: list[CellState]) -> int:
    """Runs the plan needs as far as the cells' states tell: every grid point, grown ones included, the head-lr
    trials, the lr rechecks, and the seeds past the first (none for a method that trains nothing)."""
    return sum(len(s.grid) + len(s.head_trials) + len(s.rechecks) + len(plan.seeds_of(s.method)) - 1 for s in states)


def _raise_interrupt(signum, frame):  # SIGTERM (kill) and SIGINT (Ctrl-C) stop the sweep
    raise KeyboardInterrupt


def _stop(items) -> int:
    """SIGTERM every run in flight (its whole process group: the runs were started in sessions of their own),
    SIGKILL what is still there after :data:`STOP_GRACE_S`."""
    items = list(items)
    for item in items:
        try:
            os.killpg(item.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + STOP_GRACE_S
    for item in items:
        try:
            item.process.wait(timeout=max(end - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(item.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            item.process.wait()
        item.log.close()
        if item.claim is not None:
            item.claim.release()
    return len(items)


def _summary(sweep: Sweep, launched: int, seconds: float, timed_out: bool, out: Callable[[str], None]) -> int:
    states = sweep.states()
    plan = sweep.plan
    complete = sum(s.complete(len(plan.seeds_of(s.method))) for s in states)
    left = len(sweep.ready(states))
    out(f"[lrzoo-sweep] {launched} run(s) in {seconds / 60:.1f} min; {complete}/{len(states)} cells complete")
    for state in states:
        n_seeds = len(plan.seeds_of(state.method))
        if state.chosen is not None and state.complete(n_seeds):
            continue
        head = f" head_lr={format_lr(state.head)}" if state.head is not None else ""
        why = (state.why_not or state.head_why_not or state.recheck_why_not or
               f"{state.seeds_done}/{n_seeds} seeds at lr={format_lr(state.seed_lr)}{head}")
        out(f"  incomplete: {state.method.name} {state.task}: {why}")
    if timed_out and left:
        out(f"[lrzoo-sweep] --max-minutes reached with {left} run(s) ready to start: run the same command to continue")
    if sweep.failed:
        out(f"[lrzoo-sweep] {len(sweep.failed)} run(s) failed (retried when the sweep is run again):")
        for run_dir, why in sweep.failed.items():
            out(f"  {run_dir}: {why} (log: {run_dir / LOG_FILE})")
        return 1
    return 0
