"""Tuned comparisons: the held-out training slice (task.heldout_size), sweep plans, the choice of the learning
rate, and lrzoo-sweep's scheduling (stages, skip, failures, divergence, interruption, time limit), the driver
with stand-in runs and once end to end on a tiny model."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from lrzoo.lab.choice import Outcome, RunIndex, beyond_edge, cell_state, choose_head, choose_lr, outcome_in_dir
from lrzoo.lab.plan import Composer, PlanError, format_lr, load_plan
from lrzoo.runs.files import STATUS_FILE
from lrzoo.runs.identity import plan_key
from lrzoo.lab.sweep import Sweep, run_plan
from lrzoo.cli.train import run_recipe
from lrzoo.runs.identity import config_hash
from lrzoo.train.recipe import split_heldout
from lrzoo.runs.files import HELDOUT_PREFIX
from lrzoo.configs import config_dir
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_sst2

SWEEPS = config_dir("recipes") / "sweeps"


# ---- the held-out slice ----

class Captured(Exception):
    pass


def _captured_sets(monkeypatch, cfg):
    """What run_recipe hands the trainer (train rows, eval sets), without training."""
    import lrzoo.train.trainer

    seen = {}

    class Capture:
        def __init__(self, model, tokenizer, task, train_rows, eval_sets, *args, **kwargs):
            seen["train"] = [dict(r) for r in train_rows]
            seen["eval"] = {name: [dict(r) for r in rows] for name, (_, rows) in eval_sets.items()}
            raise Captured

    monkeypatch.setattr(lrzoo.train.trainer, "Trainer", Capture)
    with pytest.raises(Captured):
        run_recipe(cfg, run_dir_of(cfg))
    return seen


def _key(row):
    return json.dumps(row, sort_keys=True)


def test_heldout_slice_is_removed_from_training_the_same_for_every_seed_and_dev_unchanged(tmp_path, monkeypatch):
    data = write_sst2(tmp_path / "data", train=60, dev=12)
    plain = _captured_sets(monkeypatch, compose(tiny_run_overrides(data, tmp_path / "runs")))
    seen = {seed: _captured_sets(monkeypatch, compose(tiny_run_overrides(
        data, tmp_path / "runs", f"seed={seed}", "+task.heldout_size=20", "trainer.lr=" + lr)))
        for seed, lr in ((0, "5e-3"), (1, "1e-2"))}
    assert list(plain["eval"]) == ["glue/sst2"]
    for run in seen.values():
        assert list(run["eval"]) == ["glue/sst2", HELDOUT_PREFIX + "glue/sst2"]
        assert run["eval"]["glue/sst2"] == plain["eval"]["glue/sst2"]            # dev unchanged
        held = run["eval"][HELDOUT_PREFIX + "glue/sst2"]
        assert len(held) == 20 and len(run["train"]) == 40
        assert sorted(map(_key, held + run["train"])) == sorted(map(_key, plain["train"]))  # a partition
    # the same rows held out whatever the seed and lr, and they are not simply the first ones
    assert seen[0]["eval"] == seen[1]["eval"] and seen[0]["train"] == seen[1]["train"]
    assert seen[0]["eval"][HELDOUT_PREFIX + "glue/sst2"] != plain["train"][:20]


def test_split_heldout_keeps_order_applies_train_limit_to_the_rest_and_refuses_bad_sizes():
    rows = [{"i": i} for i in range(50)]
    train, held = split_heldout(rows, 10, "glue/sst2", batch_size=8)
    assert [r["i"] for r in train] == sorted(r["i"] for r in train) and len(held) == 10
    assert not {r["i"] for r in train} & {r["i"] for r in held}
    limited, held_limited = split_heldout(rows, 10, "glue/sst2", batch_size=8, train_limit=5)
    assert held_limited == held and limited == train[:5]
    assert split_heldout(rows, None, "glue/sst2", 8) == (rows, None)
    for bad in (0, -3, "ten", 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            split_heldout(rows, bad, "glue/sst2", 8)
    with pytest.raises(ValueError, match="leaves 5 of the 50 training rows of glue/sst2.*fewer than one batch"):
        split_heldout(rows, 45, "glue/sst2", 8)
    # with train_tasks (commonsense/all) the slice is taken from their union: the same rows either way
    assert split_heldout(rows, 10, "commonsense/all", 8, train_tasks=["commonsense/boolq", "commonsense/arc_e"]) == \
        (train, held)


def test_a_bad_heldout_size_fails_before_the_model_is_loaded(tmp_path, monkeypatch):
    import lrzoo.models

    monkeypatch.setattr(lrzoo.models, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    data = write_sst2(tmp_path / "data", train=20)
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs", "+task.heldout_size=16"))
    with pytest.raises(ValueError, match="heldout_size=16 leaves 4 of the 20"):
        run_recipe(cfg, run_dir_of(cfg))


# ---- plans ----

def test_glue_tuned_plan_is_glue_cpu_with_a_grid_around_each_lr():
    plan = load_plan(SWEEPS / "glue_tuned.yaml")
    lines = [shlex.split(line) for line in (SWEEPS / "glue_cpu.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert [m.adapter for m in plan.methods] == [tokens[0] for tokens in lines]
    for method, tokens in zip(plan.methods, lines):
        lr = next(float(t.split("=")[1]) for t in tokens if t.startswith("trainer.lr="))
        # head-only's grid moves the head's lr itself (its head_lr would leave trainer.lr unused: refused);
        # zero-shot trains nothing, so no head rate is tried for it
        swept_head = ["trainer.head_lr=null"] if method.adapter in ("head_only", "zero_shot") else []
        assert method.centre == lr
        assert list(method.overrides) == [t for t in tokens[1:] if not t.startswith("trainer.lr=")] + swept_head
        grid = plan.grid(method)
        if method.adapter == "zero_shot":   # trains nothing: one run per task, at the line's lr
            assert grid == [lr] and plan.seeds_of(method) == (0,)
            continue
        assert len(grid) == 3 and grid[1] == lr
        assert all(2.9 < b / a < 3.1 for a, b in zip(grid, grid[1:]))       # log-spaced, x3
    assert plan.tasks == ("glue/sst2", "glue/stsb", "glue/mrpc") and plan.seeds == (0, 1, 2)
    assert plan.experiment == "glue_tuned" and plan.head_grid == (2e-2,)
    assert [m.adapter for m in plan.methods if not plan.head_lrs(m)] == ["zero_shot", "head_only"]
    assert plan.floors == ("zero_shot", "head_only")
    cfg = compose(["experiment=glue_tuned"])
    assert cfg.task.heldout_size == 400 and cfg.output_root == "runs/glue-tuned"
    assert (cfg.adapter.r, cfg.model.name) == (8, "minilm")
    lora = next(m for m in plan.methods if m.adapter == "lora")
    assert plan.grid(lora) == [3.3e-4, 1e-3, 3e-3] and format_lr(3.3e-4) == "3.3e-4"


def test_composed_runs_are_what_the_command_line_gives(tmp_path):
    plan = load_plan(SWEEPS / "glue_tuned.yaml").filtered(["relora", "loldu"], ["glue/sst2"])
    composer = Composer(plan)
    for method in plan.methods:
        for lr, seed in ((plan.grid(method)[0], 0), (plan.grid(method)[2], 2)):
            run = composer.run(method, "glue/sst2", lr, seed)
            cfg = compose(list(run.overrides))
            assert str(run.run_dir) == run_dir_of(cfg) and run.config_hash == config_hash(cfg)
            assert run.overrides[-2:] == (f"trainer.lr={lr!r}", f"seed={seed}") and cfg.trainer.lr == lr
    # a head-lr trial (plan head_grid) is the command line with trainer.head_lr set: its own directory and key
    m = plan.methods[0]
    head = composer.run(m, "glue/sst2", m.centre, 0, 2e-2)
    cfg = compose(list(head.overrides))
    assert "trainer.head_lr=0.02" in head.overrides and cfg.trainer.head_lr == 2e-2
    assert str(head.run_dir) == run_dir_of(cfg) and head.config_hash == config_hash(cfg)
    assert head.key != composer.run(m, "glue/sst2", m.centre, 0).key and composer.preset_head(m, "glue/sst2") == 2e-3
    assert "head_lr=2e-2" in head.label()
    # the seeds of a configuration share its key; the lr does not
    assert composer.run(m, "glue/sst2", m.centre, 0).key == composer.run(m, "glue/sst2", m.centre, 1).key
    assert composer.run(m, "glue/sst2", m.centre, 0).key != composer.run(m, "glue/sst2", plan.grid(m)[0], 0).key


def test_bad_plans_and_filters_are_refused(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("tasks: [glue/sst2, glue/sst2]\nseeds: []\ngrid: {factor: 1, points: 2, extend: -1, grow: 1}\n"
                    "methods: [lora, dora trainer.lr=x]\nhead_grid: [2e-2, 0]\n"
                    "extra: 1\n")
    with pytest.raises(PlanError) as err:
        load_plan(path)
    for part in ("unknown key", "tasks:", "seeds:", "head_grid:", "grid.factor", "grid.points", "grid.extend", "grid: unknown key(s) ['grow']",
                 "'lora'", "not a number"):
        assert part in str(err.value)
    plan = load_plan(SWEEPS / "glue_tuned.yaml")
    with pytest.raises(PlanError, match="--only nope"):
        plan.filtered(["nope"])
    with pytest.raises(PlanError, match="--tasks glue/rte"):
        plan.filtered(None, ["glue/rte"])


def _done(score):
    return Outcome("done", {"selection_score": score})


def test_the_best_heldout_score_wins_ties_go_to_the_smaller_lr_and_divergence_is_worst():
    assert choose_lr("t", {1e-3: _done(0.8), 3e-3: _done(0.9), 1e-2: _done(0.85)})[0] == 3e-3
    assert choose_lr("t", {1e-3: _done(0.9), 3e-3: _done(0.9), 1e-2: _done(0.85)})[0] == 1e-3
    assert choose_lr("t", {1e-3: _done(0.5), 3e-3: _done(None), 1e-2: Outcome("diverged")})[0] == 1e-3
    assert choose_lr("t", {1e-4: Outcome("diverged"), 1e-3: _done(None)})[0] == 1e-3   # null beats diverged
    chosen, why, _ = choose_lr("t", {1e-3: _done(0.5), 3e-3: Outcome("failed"), 1e-2: Outcome("pending")})
    assert chosen is None and why == "lr grid 1/3 done"
    assert choose_lr("t", {1e-3: Outcome("diverged"), 3e-3: Outcome("diverged")})[1] == "every lr of the grid diverged"
    # results written before selection_score was recorded: the held-out entry of metrics
    old = Outcome("done", {"primary_metric": "accuracy", "metrics": {"heldout/t/accuracy": 0.7, "t/accuracy": 0.9}})
    assert choose_lr("t", {1e-3: old, 3e-3: _done(0.6)})[0] == 1e-3
    unscored = Outcome("done", {"metrics": {}})
    assert "no selection_score" in choose_lr("t", {1e-3: unscored, 3e-3: unscored})[1]
    # a one-point grid (one lr per method, e.g. the cs_loglik plan) needs no held-out score
    assert choose_lr("t", {1e-3: unscored})[0] == 1e-3
    assert choose_lr("t", {1e-3: Outcome("diverged")}) == (None, "its only lr diverged", {})


# ---- the driver, with stand-in runs ----

def _plan(tmp_path, data, methods=("lora trainer.lr=1e-3", "dora trainer.lr=1e-3"), tasks=("glue/sst2",),
          seeds=(0, 1, 2), extra=(), extend=0):
    path = tmp_path / "plan.yaml"
    overrides = [*tiny_run_overrides(data, tmp_path / "runs"), "+task.heldout_size=16", *extra]
    path.write_text(json.dumps({"overrides": [o for o in overrides if not o.startswith("trainer.lr=")],
                                "tasks": list(tasks), "seeds": list(seeds),
                                "grid": {"factor": 3, "points": 3, "extend": extend},
                                "methods": list(methods)}))
    return load_plan(path)


class FakeRuns:
    """Launches ``python -c`` stand-ins of lrzoo-train: they write the run's results.json (selection score =
    ``score(run)``), or fail, diverge or hang as told."""

    def __init__(self, score=None, fail=(), diverge=(), hang=False):
        self.score = score or (lambda run: 1 - abs(math.log10(run.lr) + 2.5))  # grid 3.3e-4 < 1e-3 < 3e-3
        self.fail, self.diverge, self.hang, self.launched, self.processes = set(fail), set(diverge), hang, [], []

    def __call__(self, run, log):
        self.launched.append(run)
        which = (run.method, run.lr, run.seed)
        if self.hang:
            code = "import time; time.sleep(120)"
        elif which in self.fail:
            code = "import sys; print('Traceback: something broke'); sys.exit(1)"
        elif which in self.diverge:
            code = "import sys; print('[lrzoo] Training diverged: the loss is nan at optimizer step 3'); sys.exit(1)"
        else:
            result = {"config_hash": run.config_hash, "config": run.config, "seed": run.seed, "adapter": run.method,
                      "selection_score": self.score(run), "score": 0.5}
            code = (f"import json, pathlib; pathlib.Path({str(run.run_dir)!r}, 'results.json')"
                    f".write_text(json.dumps({result!r}))")
        process = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append(process)
        return process


def test_stages_order_skip_failures_and_divergence(tmp_path):
    plan = _plan(tmp_path, tmp_path / "data")
    composer = Composer(plan)
    lora, dora = plan.methods
    lines = []
    fake = FakeRuns(fail={("dora", 3.3e-4, 0)}, diverge={("lora", 3e-3, 0), ("lora", 1e-3, 2)})
    assert run_plan(plan, jobs=2, composer=composer, launch=fake, out=lines.append) == 1
    launched = [(r.method, r.lr, r.seed) for r in fake.launched]
    # lora's grid first, its seeds at the chosen lr (3e-3 diverged: the worst; 1e-3 beats 3.3e-4) once the grid is
    # done (dora's grid may start while lora's finishes); dora gets no seeds: its grid is incomplete
    assert launched[:3] == [("lora", lr, 0) for lr in (3.3e-4, 1e-3, 3e-3)]
    assert sorted(launched[3:]) == sorted([("lora", 1e-3, 1), ("lora", 1e-3, 2)] +
                                          [("dora", lr, 0) for lr in (3.3e-4, 1e-3, 3e-3)])
    text = "\n".join(lines)
    assert "1 run(s) failed" in text and "something broke" in text and "incomplete: dora glue/sst2: lr grid 2/3 done" in text
    assert "incomplete: lora glue/sst2: 2/3 seeds at lr=1e-3" in text
    import inspect

    import lrzoo.train.divergence
    from lrzoo.lab.sweep import DIVERGED_MARK

    assert inspect.getsource(lrzoo.train.divergence).count(f'"{DIVERGED_MARK}:') == 2   # what lrzoo-train prints
    diverged = composer.run(lora, "glue/sst2", 3e-3, 0)
    status = json.loads((diverged.run_dir / STATUS_FILE).read_text())
    assert status["status"] == "diverged" and "Training diverged" in status["detail"]
    assert "Training diverged" in (diverged.run_dir / "sweep.log").read_text()
    # Again: finished and diverged runs are not started again; the failure is retried, then dora's seeds run.
    fake = FakeRuns()
    assert run_plan(plan, jobs=2, composer=Composer(plan), launch=fake) == 0
    assert [(r.method, r.lr, r.seed) for r in fake.launched][0] == ("dora", 3.3e-4, 0)
    assert {(r.method, r.seed) for r in fake.launched} == {("dora", 0), ("dora", 1), ("dora", 2)}
    assert not (composer.run(dora, "glue/sst2", 3.3e-4, 0).run_dir / STATUS_FILE).exists()
    # --retry-failed re-runs the diverged grid point; now it finishes with the best held-out score, so lora's
    # choice moves to 3e-3 and its seeds run there (the seed run that diverged at 1e-3 is no longer needed)
    fake = FakeRuns()
    assert run_plan(plan, jobs=2, composer=Composer(plan), launch=fake, retry_failed=True) == 0
    assert [(r.method, r.lr, r.seed) for r in fake.launched][0] == ("lora", 3e-3, 0)
    assert {(r.method, r.lr, r.seed) for r in fake.launched} == {("lora", 3e-3, s) for s in (0, 1, 2)}
    fake = FakeRuns()
    assert run_plan(plan, jobs=2, composer=Composer(plan), launch=fake) == 0 and not fake.launched


def test_a_grid_grows_past_a_winning_end_before_seeds_run(tmp_path):
    """grid.extend: lora's held-out score peaks at 1e-4, below its grid (3.3e-4, 1e-3, 3e-3): the grid grows to
    1.1e-4 (which wins), then 3.7e-5 (which does not), and only then do seeds run, at 1.1e-4. dora peaks inside
    its grid: nothing grows. The report names the added points and keeps `edge` for a grid that ran out."""
    peak = {"lora": -4.0, "dora": -3.0}
    plan = _plan(tmp_path, tmp_path / "data", extend=2)
    fake = FakeRuns(score=lambda run: 1 - abs(math.log10(run.lr) - peak[run.method]))
    lines = []
    assert run_plan(plan, jobs=1, composer=Composer(plan), launch=fake, out=lines.append) == 0
    launched = [(r.method, r.lr, r.seed) for r in fake.launched]
    assert launched[:7] == [("lora", lr, 0) for lr in (3.3e-4, 1e-3, 3e-3, 1.1e-4, 3.7e-5)] + \
        [("lora", 1.1e-4, 1), ("lora", 1.1e-4, 2)]
    assert launched[7:] == [("dora", lr, 0) for lr in (3.3e-4, 1e-3, 3e-3)] + [("dora", 1e-3, 1), ("dora", 1e-3, 2)]
    assert "a grid may grow by 2 past a winning end" in lines[0]
    state = cell_state(plan, Composer(plan), plan.methods[0], "glue/sst2", RunIndex(tmp_path / "runs"))
    assert list(state.grid) == [3.7e-5, 1.1e-4, 3.3e-4, 1e-3, 3e-3] and state.chosen == 1.1e-4

    from lrzoo.lab.tuned import _shown_lr
    shown = _shown_lr(SimpleNamespace(state=state), plan.grid(plan.methods[0]))
    assert shown.startswith("1.1e-4 (3.7e-5: ") and "1.1e-4: **" in shown and "edge" not in shown
    # the growth is capped: a peak far below stops after `extend` points and stays flagged as an edge
    peak["lora"] = -7.0
    (tmp_path / "capped").mkdir()
    capped = _plan(tmp_path / "capped", tmp_path / "data", extend=1)
    fake = FakeRuns(score=lambda run: 1 - abs(math.log10(run.lr) - peak[run.method]))
    assert run_plan(capped, jobs=1, composer=Composer(capped), launch=fake, out=lines.append) == 0
    state = cell_state(capped, Composer(capped), capped.methods[0], "glue/sst2", RunIndex(tmp_path / "capped" / "runs"))
    assert list(state.grid) == [1.1e-4, 3.3e-4, 1e-3, 3e-3] and state.chosen == 1.1e-4
    assert " edge (" in _shown_lr(SimpleNamespace(state=state), capped.grid(capped.methods[0]))


def test_the_head_lr_changes_only_when_a_trial_beats_the_preset_strictly():
    preset = _done(0.80)
    assert choose_head("t", preset, {}) == (True, None, "", {})
    assert choose_head("t", preset, {2e-2: _done(0.85)})[:2] == (True, 2e-2)
    assert choose_head("t", preset, {2e-2: _done(0.80)})[:2] == (True, None)          # a tie keeps the preset
    assert choose_head("t", preset, {2e-2: Outcome("diverged")})[:2] == (True, None)
    assert choose_head("t", preset, {6e-3: _done(0.9), 2e-2: _done(0.9)})[:2] == (True, 6e-3)  # then the smaller
    assert choose_head("t", preset, {6e-3: _done(0.9), 2e-2: Outcome("failed")})[:3] == \
        (False, None, "head lr trials 1/2 done")
    assert "no selection_score" in choose_head("t", preset, {2e-2: Outcome("done", {"metrics": {}})})[2]


def test_head_lr_trials_run_at_the_chosen_lr_before_the_seeds(tmp_path):
    """head_grid: after lora's lr is chosen (1e-3), its first seed trains there with the head at 2e-2 (better
    held-out than the preset's 2e-3), so its seeds run at the pair; dora's line fixes its head lr: no trial."""
    plan_path = tmp_path / "plan.yaml"
    _plan(tmp_path, tmp_path / "data", methods=("lora trainer.lr=1e-3", "dora trainer.lr=1e-3 trainer.head_lr=5e-3"),
          extra=("trainer.head_lr=2e-3",))
    plan_path.write_text(json.dumps({**json.loads(plan_path.read_text()), "head_grid": [2e-2, 2e-3]}))
    plan = load_plan(plan_path)
    assert plan.head_grid == (2e-2, 2e-3) and plan.head_lrs(plan.methods[1]) == ()
    assert Composer(plan).preset_head(plan.methods[0], "glue/sst2") == 2e-3

    def score(run):
        bonus = 0.1 if run.head == 2e-2 else 0.0
        return 1 - abs(math.log10(run.lr) + 3) + bonus

    lines = []
    fake = FakeRuns(score=score)
    assert run_plan(plan, jobs=1, composer=Composer(plan), launch=fake, out=lines.append) == 0
    launched = [(r.method, r.lr, r.head, r.seed) for r in fake.launched]
    # the preset's own rate (2e-3) in head_grid is not run twice
    assert launched == [("lora", lr, None, 0) for lr in (3.3e-4, 1e-3, 3e-3)] + [("lora", 1e-3, 2e-2, 0)] + \
        [("lora", 1e-3, 2e-2, s) for s in (1, 2)] + \
        [("dora", lr, None, 0) for lr in (3.3e-4, 1e-3, 3e-3)] + [("dora", 1e-3, None, s) for s in (1, 2)]
    assert "head lr 2e-2, 2e-3 tried at each chosen lr" in lines[0] and "11 runs planned" in lines[0]
    assert "2/2 cells complete" in "\n".join(lines)
    # the runs at the preset's head rate are the plain command lines (their directories predate head_grid)
    assert all(not any(o.startswith("trainer.head_lr=0.02") for o in r.overrides) for r in fake.launched if r.head is None)
    # run again: everything is there, counted once (the winning trial is also seed 0)
    lines.clear()
    assert run_plan(plan, jobs=1, composer=Composer(plan), launch=FakeRuns(), out=lines.append) == 0
    assert "11 runs planned (11 finished or diverged" in lines[0]
    index = RunIndex(tmp_path / "runs")
    state = cell_state(plan, Composer(plan), plan.methods[0], "glue/sst2", index)
    assert state.complete(3) and (state.chosen, state.head, state.head_lr, state.preset_head) == (1e-3, 2e-2, 2e-2, 2e-3)
    assert all(o.result["config"]["trainer"]["head_lr"] == 2e-2 for o in state.seeds.values())

    from lrzoo.lab.tuned import _shown_lr
    assert _shown_lr(SimpleNamespace(state=state)).endswith("; head 2e-2 edge (2e-3: 100.0 / 2e-2: **110.0**)")
    from lrzoo.lab.cells import build_cells
    from lrzoo.lab.tuned import csv_rows
    rows = {r["method"]: r for r in csv_rows(build_cells(tmp_path / "runs", plan, replicates=10), plan, {})}
    assert (rows["lora"]["chosen_head_lr"], rows["dora"]["chosen_head_lr"]) == (2e-2, 5e-3)
    dora = cell_state(plan, Composer(plan), plan.methods[1], "glue/sst2", index)
    assert dora.complete(3) and dora.head is None and dora.head_lr == 5e-3 and not dora.heads
    assert "head" not in _shown_lr(SimpleNamespace(state=dora))
    # a head trial that does not beat the preset leaves the seeds at the preset: the runs already made count
    (tmp_path / "tie").mkdir()
    _plan(tmp_path / "tie", tmp_path / "data", methods=("lora trainer.lr=1e-3",), extra=("trainer.head_lr=2e-3",))
    tie_path = tmp_path / "tie" / "plan.yaml"
    tie_path.write_text(json.dumps({**json.loads(tie_path.read_text()), "head_grid": [2e-2]}))
    tie = load_plan(tie_path)
    fake = FakeRuns(score=lambda run: 1 - abs(math.log10(run.lr) + 3))
    assert run_plan(tie, jobs=1, composer=Composer(tie), launch=fake) == 0
    assert [(r.lr, r.head, r.seed) for r in fake.launched][3:] == [(1e-3, 2e-2, 0), (1e-3, None, 1), (1e-3, None, 2)]


def test_head_trials_grow_past_a_winning_end_and_not_past_the_preset(tmp_path):
    """grid.extend also grows the head rates: 2e-2 beats the preset 2e-3, so 6e-2 is tried (it wins), then
    1.8e-1 (it loses) and the seeds run at 6e-2. A preset that wins grows nothing."""
    bonus = {None: 0.0, 2e-2: 0.10, 6e-2: 0.15, 1.8e-1: 0.12}
    path = tmp_path / "plan.yaml"
    _plan(tmp_path, tmp_path / "data", methods=("lora trainer.lr=1e-3",), extend=2, extra=("trainer.head_lr=2e-3",))
    path.write_text(json.dumps({**json.loads(path.read_text()), "head_grid": [2e-2]}))
    plan = load_plan(path)
    fake = FakeRuns(score=lambda run: 1 - abs(math.log10(run.lr) + 3) + bonus[run.head])
    lines = []
    assert run_plan(plan, jobs=1, composer=Composer(plan), launch=fake, out=lines.append) == 0
    assert [(r.lr, r.head, r.seed) for r in fake.launched][3:] == \
        [(1e-3, 2e-2, 0), (1e-3, 6e-2, 0), (1e-3, 1.8e-1, 0), (1e-3, 6e-2, 1), (1e-3, 6e-2, 2)]
    state = cell_state(plan, Composer(plan), plan.methods[0], "glue/sst2", RunIndex(tmp_path / "runs"))
    assert state.complete(3) and state.head == 6e-2 and state.head_trials == (2e-2, 6e-2, 1.8e-1)

    from lrzoo.lab.tuned import _shown_lr
    assert _shown_lr(SimpleNamespace(state=state)).endswith("; head 6e-2 (2e-3: 100.0 / 2e-2: 110.0 / 6e-2: **115.0** / "
                                                            "1.8e-1: 112.0)")
    # the preset wins: no trial below it
    bonus.update({2e-2: -0.1})
    (tmp_path / "preset").mkdir()
    _plan(tmp_path / "preset", tmp_path / "data", methods=("lora trainer.lr=1e-3",), extend=2,
          extra=("trainer.head_lr=2e-3",))
    path = tmp_path / "preset" / "plan.yaml"
    path.write_text(json.dumps({**json.loads(path.read_text()), "head_grid": [2e-2]}))
    plan = load_plan(path)
    fake = FakeRuns(score=lambda run: 1 - abs(math.log10(run.lr) + 3) + bonus[run.head])
    assert run_plan(plan, jobs=1, composer=Composer(plan), launch=fake) == 0
    assert [(r.lr, r.head, r.seed) for r in fake.launched][3:] == [(1e-3, 2e-2, 0), (1e-3, None, 1), (1e-3, None, 2)]


def _recheck_plan(tmp_path, recheck=True, extend=2):
    path = tmp_path / "plan.yaml"
    _plan(tmp_path, tmp_path / "data", extend=extend, extra=("trainer.head_lr=2e-3",))
    path.write_text(json.dumps({**json.loads(path.read_text()), "head_grid": [2e-2], "recheck_lr": recheck}))
    return load_plan(path)


def test_the_lr_is_rechecked_at_a_changed_head_before_the_seeds(tmp_path):
    """recheck_lr: lora's held-out optimum moves from 1e-3 to 3e-3 once its head trains at 2e-2 (the DoRA-on-STS-B
    case), so after the head stage its first seed runs at 1e-3's neighbours with the new head, 3e-3 wins, the
    grid-like growth tries 9e-3 (it loses) and the seeds run at (3e-3, 2e-2). dora's head keeps the preset's
    rate: its lr was chosen at that head, nothing is rechecked."""
    plan = _recheck_plan(tmp_path)
    assert plan.recheck_lr

    def score(run):
        peak = -3.0 if run.head is None else -2.5
        bonus = {None: 0.0, 2e-2: 0.6 if run.method == "lora" else -0.1, 6e-2: 0.0}[run.head]
        return 1 - abs(math.log10(run.lr) - peak) + bonus

    lines = []
    fake = FakeRuns(score=score)
    assert run_plan(plan, jobs=1, composer=Composer(plan), launch=fake, out=lines.append) == 0
    launched = [(r.method, r.lr, r.head, r.seed) for r in fake.launched]
    assert launched[:10] == [("lora", lr, None, 0) for lr in (3.3e-4, 1e-3, 3e-3)] + \
        [("lora", 1e-3, 2e-2, 0), ("lora", 1e-3, 6e-2, 0)] + \
        [("lora", lr, 2e-2, 0) for lr in (3.3e-4, 3e-3, 9e-3)] + [("lora", 3e-3, 2e-2, s) for s in (1, 2)]
    assert launched[10:] == [("dora", lr, None, 0) for lr in (3.3e-4, 1e-3, 3e-3)] + [("dora", 1e-3, 2e-2, 0)] + \
        [("dora", 1e-3, None, s) for s in (1, 2)]
    assert "the lr rechecked where the head's changed" in lines[0]
    assert "2/2 cells complete" in "\n".join(lines)

    index = RunIndex(tmp_path / "runs")
    state = cell_state(plan, Composer(plan), plan.methods[0], "glue/sst2", index)
    assert state.complete(3) and (state.chosen, state.head, state.moved, state.seed_lr) == (1e-3, 2e-2, 3e-3, 3e-3)
    assert list(state.rechecks) == [3.3e-4, 3e-3, 9e-3] and state.seeds[0] is state.rechecks[3e-3]
    assert all(o.result["config"]["trainer"]["lr"] == 3e-3 for o in state.seeds.values())
    dora = cell_state(plan, Composer(plan), plan.methods[1], "glue/sst2", index)
    assert dora.complete(3) and dora.head is None and not dora.rechecks and dora.seed_lr == 1e-3

    from lrzoo.lab.cells import build_cells
    from lrzoo.lab.tuned import _shown_lr, csv_rows
    shown = _shown_lr(SimpleNamespace(state=state))
    assert shown.startswith("1e-3 (") and "; head 2e-2 (" in shown
    assert shown.endswith("; lr at the new head 3e-3 (3.3e-4: 61.9 / 1e-3: 110.0 / 3e-3: **157.7** / 9e-3: 114.6)")
    assert "new head" not in _shown_lr(SimpleNamespace(state=dora))
    rows = {r["method"]: r for r in csv_rows(build_cells(tmp_path / "runs", plan, replicates=10), plan, {})}
    assert (rows["lora"]["chosen_lr"], rows["lora"]["chosen_head_lr"]) == (3e-3, 2e-2)
    # the same runs without recheck_lr: the seeds at (1e-3, 2e-2) are missing, nothing else is
    plain = _recheck_plan(tmp_path, recheck=False)
    state = cell_state(plain, Composer(plain), plain.methods[0], "glue/sst2", index)
    assert not state.rechecks and state.seed_lr == 1e-3 and state.seeds_done == 1


def test_a_recheck_waits_for_its_runs_keeps_the_lr_on_a_tie_and_steps_past_a_grid_end(tmp_path):
    plan = _recheck_plan(tmp_path, extend=0)
    composer, lora = Composer(plan), plan.methods[0]
    scores = {}

    def lookup(run):
        key = (run.lr, run.head, run.seed)
        return _done(scores[key]) if key in scores else Outcome("pending", run_dir=run.run_dir)

    scores.update({(lr, None, 0): 0.5 for lr in (3.3e-4, 1e-3, 3e-3)})
    scores[(3e-3, None, 0)] = 0.6                     # the grid's top end wins (no growth: extend 0)
    scores[(3e-3, 2e-2, 0)] = 0.7                     # and the faster head beats the preset there
    state = cell_state(plan, composer, lora, "glue/sst2", lookup)
    assert (state.chosen, state.head, state.settled) == (3e-3, 2e-2, False)
    assert list(state.rechecks) == [1e-3, 9e-3]       # the grid's neighbour below, one factor past the top
    assert state.recheck_why_not == "lr rechecks 0/2 done" and not state.seeds
    assert [(r.lr, r.head, r.seed) for r in Sweep(plan, composer).ready([state])] == [(1e-3, 2e-2, 0), (9e-3, 2e-2, 0)]
    from lrzoo.lab.cells import Cell
    assert Cell("lora", "glue/sst2", state, 3).missing() == "lr rechecks 0/2 done"
    scores.update({(1e-3, 2e-2, 0): 0.7, (9e-3, 2e-2, 0): 0.65})   # a tie with the chosen lr keeps it
    state = cell_state(plan, composer, lora, "glue/sst2", lookup)
    assert state.settled and state.moved is None and state.seed_lr == 3e-3
    assert state.seeds[0] is state.heads[2e-2]


def test_which_methods_get_head_trials_and_which_plans_cannot_have_them(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("tasks: [glue/sst2]\nseeds: [0]\nhead_grid: ['2e-2']\n"
                    "methods: [lora trainer.lr=1e-3, dora trainer.lr=1e-3 +trainer.head_lr=5e-3, "
                    "head_only trainer.lr=2e-3 trainer.head_lr=null]\n")
    plan = load_plan(path)
    assert [plan.head_lrs(m) for m in plan.methods] == [(2e-2,), (), ()]
    path.write_text("tasks: [glue/sst2]\nseeds: [0]\ngrid: {points: 1}\nhead_grid: [2.0e-2]\n"
                    "methods: [lora trainer.lr=1e-3]\n")
    with pytest.raises(PlanError, match="head_grid with a one-point lr grid"):
        load_plan(path)
    path.write_text("tasks: [glue/sst2]\nseeds: [0]\nrecheck_lr: true\nmethods: [lora trainer.lr=1e-3]\n")
    with pytest.raises(PlanError, match="recheck_lr: true without head_grid"):
        load_plan(path)
    path.write_text("tasks: [glue/sst2]\nseeds: [0]\nhead_grid: [2e-2]\nrecheck_lr: 'yes'\n"
                    "methods: [lora trainer.lr=1e-3]\n")
    with pytest.raises(PlanError, match="recheck_lr: 'yes' must be true or false"):
        load_plan(path)


def test_retry_failed_retries_an_old_divergence_once_not_forever(tmp_path):
    plan = _plan(tmp_path, tmp_path / "data", methods=("lora trainer.lr=1e-3",), seeds=(0,))
    diverging = FakeRuns(diverge={("lora", 3e-3, 0)})
    assert run_plan(plan, jobs=1, composer=Composer(plan), launch=diverging) == 0
    again = FakeRuns(diverge={("lora", 3e-3, 0)})
    assert run_plan(plan, jobs=1, composer=Composer(plan), launch=again, retry_failed=True) == 0
    assert [(r.lr, r.seed) for r in again.launched] == [(3e-3, 0)]


def test_beyond_edge_only_past_an_end_strictly_better_than_its_neighbour():
    grid = [1e-4, 1e-3, 1e-2]
    assert beyond_edge(grid, {1e-4: 0.9, 1e-3: 0.8, 1e-2: 0.1}, 1e-4, 10) == 1e-5
    assert beyond_edge(grid, {1e-4: 0.1, 1e-3: 0.8, 1e-2: 0.9}, 1e-2, 10) == 0.1
    assert beyond_edge(grid, {1e-4: 0.8, 1e-3: 0.8, 1e-2: 0.1}, 1e-4, 10) is None   # a tie: flat, not beyond
    assert beyond_edge(grid, {1e-4: 0.1, 1e-3: 0.9, 1e-2: 0.1}, 1e-3, 10) is None   # an inner winner
    assert beyond_edge([1e-3], {1e-3: 0.5}, 1e-3, 10) is None                       # a one-point grid


def test_dry_run_filters_and_time_limit(tmp_path):
    plan = _plan(tmp_path, tmp_path / "data", tasks=("glue/sst2", "glue/cola"))
    lines = []
    fake = FakeRuns()
    assert run_plan(plan.filtered(["dora"], ["glue/cola"]), dry_run=True, launch=fake, out=lines.append) == 0
    assert not fake.launched
    commands = [line for line in lines if "lrzoo-train" in line]
    assert len(commands) == 3 and all("adapter=dora" in c and "task=glue/cola" in c and "seed=0" in c for c in commands)
    assert "seeds 1,2 at the chosen lr" in lines[-1]
    assert run_plan(plan, max_minutes=0, launch=fake, out=lines.append) == 0 and not fake.launched
    assert "--max-minutes reached with" in lines[-1]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_an_interrupted_sweep_stops_its_runs_and_continues_when_run_again(tmp_path, signum):
    plan = _plan(tmp_path, tmp_path / "data", methods=("lora trainer.lr=1e-3",), seeds=(0,))
    hanging = FakeRuns(hang=True)
    stop = threading.Event()

    def interrupt_once_both_run():  # Ctrl-C or kill, once the two runs are in flight (run_plan handles SIGTERM then)
        while len(hanging.processes) < 2 and not stop.wait(0.1):
            pass
        if not stop.is_set():
            os.kill(os.getpid(), signum)

    watcher = threading.Thread(target=interrupt_once_both_run)
    watcher.start()
    lines = []
    try:
        assert run_plan(plan, jobs=2, launch=hanging, out=lines.append) == 130
    finally:
        stop.set()
        watcher.join()
    assert len(hanging.launched) == 2 and all(r.seed == 0 for r in hanging.launched)
    assert all(p.poll() is not None for p in hanging.processes)  # stopped, not left running
    assert "interrupted: stopped 2 run(s)" in lines[-1]
    assert not list((tmp_path / "runs").rglob(STATUS_FILE))  # an interruption is not a failure
    fake = FakeRuns()
    assert run_plan(plan, jobs=2, launch=fake) == 0
    assert sorted(r.lr for r in fake.launched) == [3.3e-4, 1e-3, 3e-3]


# A run started by another process (another sweep's lane, or by hand): holds the run directory as lrzoo-train
# does, says so, finishes after a while and writes the results.
HOLDER = """
import json, pathlib, sys, time
from lrzoo.runs.lock import RunLock
run_dir, result, hold_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
with RunLock(run_dir):
    print("holding", flush=True)
    time.sleep(hold_s)
    pathlib.Path(run_dir, "results.json").write_text(result)
"""


def test_a_run_another_process_holds_is_left_to_it_and_waited_for(tmp_path, monkeypatch):
    import lrzoo.lab.sweep

    monkeypatch.setattr(lrzoo.lab.sweep, "HELD_POLL_S", 0.2)
    plan = _plan(tmp_path, tmp_path / "data", methods=("lora trainer.lr=1e-3",), seeds=(0, 1))
    composer = Composer(plan)
    taken = composer.run(plan.methods[0], "glue/sst2", 1e-3, 0)   # the grid's best point (FakeRuns' score)
    result = {"config_hash": taken.config_hash, "config": taken.config, "seed": 0, "adapter": "lora",
              "selection_score": 1.0, "score": 0.5}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(taken.run_dir), json.dumps(result), "3"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert cell_state(plan, composer, plan.methods[0], "glue/sst2", outcome_in_dir).grid[1e-3].status == "running"
        lines, fake = [], FakeRuns()
        assert run_plan(plan, jobs=2, composer=composer, launch=fake, out=lines.append) == 0
    finally:
        holder.kill()
        holder.wait()
    # never started twice: the other grid points ran here, the held one was waited for and its score (the best)
    # chose the lr of the seed run that followed
    assert [(r.lr, r.seed) for r in fake.launched[:2]] == [(3.3e-4, 0), (3e-3, 0)]
    assert [(r.lr, r.seed) for r in fake.launched[2:]] == [(1e-3, 1)]
    text = "\n".join(lines)
    assert f"held by another process, left to it: {taken.run_dir} (process {holder.pid})" in text
    assert not (taken.run_dir / STATUS_FILE).exists()


def test_a_run_taken_between_look_and_launch_is_left_to_its_taker(tmp_path, monkeypatch):
    """The other sweep claims a run after this one looked at the plan: this one's claim fails, so the run is never
    launched here (not launched, refused and counted as a failure), and its result is waited for."""
    import lrzoo.lab.sweep

    monkeypatch.setattr(lrzoo.lab.sweep, "HELD_POLL_S", 0.2)
    plan = _plan(tmp_path, tmp_path / "data", methods=("lora trainer.lr=1e-3",), seeds=(0,))
    composer = Composer(plan)
    taken = composer.run(plan.methods[0], "glue/sst2", 3.3e-4, 0)
    holder = None
    ready = Sweep.ready

    def look_then_lose_the_race(self, states=None):
        nonlocal holder
        runs = ready(self, states)
        if holder is None and taken.run_dir in {r.run_dir for r in runs}:
            result = {"config_hash": taken.config_hash, "config": taken.config, "seed": 0, "selection_score": 0.0}
            holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(taken.run_dir), json.dumps(result), "2"],
                                      stdout=subprocess.PIPE, text=True)
            assert holder.stdout.readline().strip() == "holding"
        return runs

    monkeypatch.setattr(Sweep, "ready", look_then_lose_the_race)
    lines, fake = [], FakeRuns()
    try:
        assert run_plan(plan, jobs=1, composer=composer, launch=fake, out=lines.append) == 0
    finally:
        holder.kill()
        holder.wait()
    assert taken.run_dir not in {r.run_dir for r in fake.launched} and len(fake.launched) == 2
    text = "\n".join(lines)
    assert "another process took it first; left to it" in text and "failed" not in text
    assert not (taken.run_dir / STATUS_FILE).exists()
    assert json.loads((taken.run_dir / "results.json").read_text())["selection_score"] == 0.0


# A failed lrzoo-train as Hydra prints it: the reason is the exception line, Hydra's hint comes last.
HYDRA_FAILURE = """import sys
print("[lrzoo] lora on tiny_bert: 2,114 trainable of 38,852 parameters")
print("Error executing job with overrides: ['model=tiny_bert']", file=sys.stderr)
print("Traceback (most recent call last):", file=sys.stderr)
print('  File "lrzoo/cli/train.py", line 345, in _hydra_task', file=sys.stderr)
print("    results = run_recipe(cfg, run_dir)", file=sys.stderr)
print("              ^^^^^^^^^^^^^^^^^^^^^^^^", file=sys.stderr)
print("ValueError: the real reason, named", file=sys.stderr)
print("  with a second line", file=sys.stderr)
print("", file=sys.stderr)
print("Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.", file=sys.stderr)
sys.exit(1)
"""


def test_a_failed_runs_line_is_its_own_error_not_hydras_hint(tmp_path):
    plan = _plan(tmp_path, tmp_path / "data", methods=("lora trainer.lr=1e-3",), seeds=(0,))

    def launch(run, log):
        return subprocess.Popen([sys.executable, "-c", HYDRA_FAILURE], stdout=log, stderr=subprocess.STDOUT)

    lines = []
    assert run_plan(plan, jobs=1, composer=Composer(plan), launch=launch, out=lines.append) == 1
    failures = [line for line in lines if "exit status 1" in line]
    assert len(failures) == 3 and all("ValueError: the real reason, named" in line for line in failures), lines
    assert not any("HYDRA_FULL_ERROR" in line for line in lines)
    status = json.loads(next((tmp_path / "runs").rglob(STATUS_FILE)).read_text())
    assert status["detail"] == "ValueError: the real reason, named"

    from lrzoo.lab.sweep import failure_line
    # no traceback: the last line that is not the hint; chained tracebacks: the last exception
    assert failure_line("[lrzoo] stopping: bad option\n\nSet the environment variable HYDRA_FULL_ERROR=1 for a "
                        "complete stack trace.\n") == "[lrzoo] stopping: bad option"
    assert failure_line("Traceback (most recent call last):\n  File x\nKeyError: 'a'\n\nDuring handling of the "
                        "above exception, another exception occurred:\n\nTraceback (most recent call last):\n  File y"
                        "\nlrzoo.train.resume.UnsafeCheckpoint: /r/trainer_state.pt was refused\n") == \
        "lrzoo.train.resume.UnsafeCheckpoint: /r/trainer_state.pt was refused"


# One lane of a sweep, in its own process (a sweep installs signal handlers: it must be a main thread): it loads
# the plan, says "ready", waits for "go" so that both lanes look at the plan in the same instant, then runs it
# with stand-in runs that take a second (lrzoo-train's imports) and take no lock of their own, and records
# every launch.
LANE = """
import json, math, os, subprocess, sys, time
import lrzoo.lab.sweep as sweep
from lrzoo.lab.plan import load_plan
plan_path, record, go = sys.argv[1:4]
sweep.HELD_POLL_S = 0.2

def launch(run, log):
    with open(record, "a") as handle:
        handle.write(f"{os.getpid()} {run.run_dir}\\n")
    result = {"config_hash": run.config_hash, "config": run.config, "seed": run.seed, "adapter": run.method,
              "selection_score": 1 - abs(math.log10(run.lr) + 2.5), "score": 0.5}
    code = (f"import json, pathlib, time; time.sleep(1); "
            f"pathlib.Path({str(run.run_dir)!r}, 'results.json').write_text(json.dumps({result!r}))")
    return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)

plan = load_plan(plan_path)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.005)
sys.exit(sweep.run_plan(plan, jobs=2, launch=launch))
"""


@pytest.mark.slow
def test_two_sweeps_of_one_plan_started_together_launch_each_run_once(tmp_path):
    plan = _plan(tmp_path, tmp_path / "data", methods=("lora trainer.lr=1e-3",), seeds=(0, 1, 2))
    record, go = tmp_path / "launched.txt", tmp_path / "go"
    lanes = [subprocess.Popen([sys.executable, "-c", LANE, plan.path, str(record), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        for lane in lanes:  # past its imports (whatever they print)
            assert any(line.strip() == "ready" for line in lane.stdout), lane.pid
        go.touch()
        outputs = [lane.communicate(timeout=120)[0] for lane in lanes]
    finally:
        for lane in lanes:
            lane.kill()
    assert [lane.returncode for lane in lanes] == [0, 0], outputs
    launches = [line.split() for line in record.read_text().splitlines()]
    run_dirs = [run_dir for _, run_dir in launches]
    assert len(run_dirs) == 5 and len(set(run_dirs)) == 5, launches  # 3 grid points + 2 seeds, each once
    assert {pid for pid, _ in launches} == {str(lane.pid) for lane in lanes}  # and the work was shared
    assert len(list((tmp_path / "runs").rglob("results.json"))) == 5


# ---- end to end, tiny model ----

@pytest.mark.slow
def test_lrzoo_sweep_then_report_on_a_tiny_model(tmp_path, capsys):
    """The real thing, kept short: a one-point grid (stage 1) then a second seed at the chosen lr (stage 2)."""
    from lrzoo.cli.report import main as report

    data = write_sst2(tmp_path / "data", train=48, dev=16)
    plan = _plan(tmp_path, data, methods=("lora trainer.lr=5e-3",), seeds=(0, 1),
                 extra=("trainer.max_steps=2", "trainer.eval_batch_size=32"))
    text = Path(plan.path).read_text().replace('"points": 3', '"points": 1')
    Path(plan.path).write_text(text)
    plan = load_plan(plan.path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    sweep = subprocess.run([sys.executable, "-m", "lrzoo.cli.sweep", plan.path, "--jobs", "2"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    assert sweep.stdout.count("[lrzoo-sweep] done") == 2, sweep.stdout
    results = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("results.json")]
    assert sorted(r["seed"] for r in results) == [0, 1] and all(r["config"]["trainer"]["lr"] == 5e-3 for r in results)
    assert all(r["config"]["task"]["heldout_size"] == 16 for r in results)
    assert all(any(k.startswith(HELDOUT_PREFIX) for k in r["metrics"]) for r in results)
    assert all(r["selection_score"] is not None for r in results)       # the held-out slice's accuracy
    assert all((p.parent / "predictions.json").is_file() for p in (tmp_path / "runs").rglob("results.json"))
    assert all((p.parent / "sweep.log").is_file() for p in (tmp_path / "runs").rglob("results.json"))
    lines = []
    assert run_plan(plan, out=lines.append) == 0 and not any(" start " in line for line in lines)
    assert "1/1 cells complete" in lines[-1]
    report([str(tmp_path / "runs"), "--plan", plan.path, "--out", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert "1/1 cells complete" in out and "(missing:" not in out
    assert re.search(r"^\| lora \| \*\*[0-9.]+\*\* \[[0-9.]+, [0-9.]+\] ±[0-9.]+ \|$", out, re.M), out  # mean [95% interval] ±sd
    assert (tmp_path / "report" / "results.csv").is_file() and plan_key(results[0]["config"])


def test_a_bi_encoder_cell_gets_no_head_trials(tmp_path):
    """A bi-encoder (the cosine of two pooled embeddings) has no head to train: on STS-B the head stage would rerun
    the chosen lr under another hash for the same model. A cross-encoder cell of the same plan still gets its trial."""
    path = tmp_path / "plan.yaml"
    _plan(tmp_path, tmp_path / "data", methods=("lora trainer.lr=1e-3",), tasks=("glue/stsb", "glue/sst2"),
          seeds=(0,), extra=("trainer.head_lr=2e-3", "model.pooling=mean", "model.similarity_head=bi_encoder"))
    path.write_text(json.dumps({**json.loads(path.read_text()), "head_grid": [2e-2]}))
    plan = load_plan(path)
    composer = Composer(plan)
    assert not composer.trains_head(plan.methods[0], "glue/stsb") and composer.trains_head(plan.methods[0], "glue/sst2")
    fake = FakeRuns()
    assert run_plan(plan, jobs=1, composer=composer, launch=fake) == 0
    launched = {(r.task, r.head) for r in fake.launched}
    assert ("glue/stsb", 2e-2) not in launched and ("glue/sst2", 2e-2) in launched
