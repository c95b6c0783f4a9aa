"""A method that trains nothing (``zero_shot``: the checkpoint evaluated as it is) runs once per task in a tuned
plan: the first seed at its line's lr (the run a grid had at its centre, so finished trees keep being found), no
grid, no head trials, no other seeds; the report's cell is that one run, and the floor comparisons and the
seed-resampled check (†) still work against it. On hand-written run trees."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from lrzoo.cli.report import main as report
from lrzoo.lab import intervals
from lrzoo.lab.choice import RunIndex, cell_state
from lrzoo.lab.plan import Composer, PlanError, load_plan
from lrzoo.lab.sweep import Sweep, run_plan
from lrzoo.tasks.metrics import METRICS

from test_sweep import FakeRuns
from test_tuned_report import _dev

TASKS = ("glue/sst2", "glue/stsb")


def _plan(tmp_path, methods, **extra):
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({
        "overrides": ["model=tiny_bert", "task.data_dir=/nowhere", f"output_root={tmp_path / 'runs'}",
                      "+task.heldout_size=16"],
        "tasks": list(TASKS), "seeds": [0, 1, 2], "grid": {"factor": 3, "points": 3, "extend": 2},
        "floors": ["zero_shot"], "methods": list(methods), **extra}))
    return load_plan(path)


def test_the_trainer_evaluates_exactly_these_adapters_untrained():
    """The lab's rule is the trainer's (lrzoo.train.baselines records evaluate_only), which the lab may not import."""
    from conftest import tiny_bert
    from lrzoo.lab.plan import TRAINS_NOTHING
    from lrzoo.registry import record_of
    from lrzoo.train.baselines import BASELINES, prepare_baseline

    assert TRAINS_NOTHING and TRAINS_NOTHING <= set(BASELINES)
    for name in BASELINES:
        assert record_of(prepare_baseline(tiny_bert(), name)).evaluate_only == (name in TRAINS_NOTHING), name


def test_a_method_that_trains_nothing_runs_once_per_task_at_its_lines_lr(tmp_path):
    # no trainer.head_lr=null on the zero_shot line: training nothing alone rules out the head trials
    plan = _plan(tmp_path, ["zero_shot trainer.lr=1e-3", "lora trainer.lr=1e-3"], head_grid=[2e-2], recheck_lr=True)
    zero, lora = plan.methods
    composer = Composer(plan)
    ready = [r for r in Sweep(plan, composer).ready() if r.method == "zero_shot"]
    # exactly the run a 3-point grid had at its centre (same directory and hash: finished trees are found)
    assert ready == [composer.run(zero, task, 1e-3, 0) for task in TASKS]
    lines = []
    assert run_plan(plan, composer=Composer(plan), dry_run=True, out=lines.append) == 0
    shown = [line for line in lines if "adapter=zero_shot" in line]
    assert len(shown) == 2 and all(line.endswith("trainer.lr=0.001 seed=0") for line in shown)
    assert "zero_shot trains nothing: one run per task" in lines[0]

    fake = FakeRuns(score=lambda run: 0.5 if run.method == "zero_shot" else 1 - abs(run.lr - 1e-3))
    assert run_plan(plan, jobs=2, composer=Composer(plan), launch=fake, out=lines.append) == 0
    launched = [(r.method, r.task, r.lr, r.seed, r.head) for r in fake.launched]
    assert [x for x in launched if x[0] == "zero_shot"] == [("zero_shot", task, 1e-3, 0, None) for task in TASKS]
    assert ("lora", "glue/sst2", 1e-3, 0, 2e-2) in launched   # a method that trains: its head trial
    assert "4/4 cells complete" in lines[-1]
    fake = FakeRuns()
    assert run_plan(plan, jobs=1, composer=Composer(plan), launch=fake) == 0 and not fake.launched
    assert zero.trains_nothing and not lora.trains_nothing
    assert plan.grid(zero) == [1e-3] and plan.seeds_of(zero) == (0,) and plan.head_lrs(zero) == ()
    assert plan.grid(lora) == [3.3e-4, 1e-3, 3e-3] and plan.seeds_of(lora) == (0, 1, 2)


def test_a_grid_option_on_a_method_that_trains_nothing_is_refused(tmp_path):
    with pytest.raises(PlanError, match="zero_shot trains nothing .* drop the option"):
        _plan(tmp_path, ["zero_shot trainer.lr=1e-3 grid.points=3", "lora trainer.lr=1e-3"])


# ---- the report ----

#: predictions per (method, task): zero_shot is the floor on SST-2 and the best of STS-B
QUALITY = {("zero_shot", "glue/sst2"): "bad", ("zero_shot", "glue/stsb"): "good",
           ("lora", "glue/sst2"): "good", ("lora", "glue/stsb"): "bad",
           ("dora", "glue/sst2"): "good", ("dora", "glue/stsb"): "bad"}


def _write(run, quality, selection, seed=None):
    """A finished run; its predictions are those of ``_dev``'s ``seed`` (default: the run's)."""
    references, predictions, metric, kind = _dev(run.task, quality, run.seed if seed is None else seed)
    score = METRICS[metric](predictions, references)
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "results.json").write_text(json.dumps({
        "config_hash": run.config_hash, "config": run.config, "seed": run.seed, "adapter": run.method,
        "model": "tiny_bert", "task": run.task, "primary_metric": metric, "score": score, "selection_score": selection,
        "metrics": {f"{run.task}/{metric}": score, f"heldout/{run.task}/{metric}": selection},
        "trainable_params": 0 if run.method == "zero_shot" else 1000, "wall_time_s": 10, "peak_memory_mb": 300.0}))
    sets = {run.task: {"task": run.task, "kind": kind, "primary_metric": metric, "references": references,
                       "predictions": predictions}}
    (run.run_dir / "predictions.json").write_text(json.dumps({"sets": sets}))


def _tree(tmp_path, old_zero_shot_runs):
    """lora and dora: a 3-point grid (the centre wins) and seeds 1, 2 there; zero_shot: its one run at the centre,
    plus, with ``old_zero_shot_runs``, what a sweep ran before it knew: the rest of the grid and seeds 1, 2 at the
    smallest lr (a flat grid's tie), with other predictions, so that reading any of them would show."""
    plan = _plan(tmp_path, ["zero_shot trainer.lr=1e-3 trainer.head_lr=null", "lora trainer.lr=1e-3",
                            "dora trainer.lr=1e-3"])
    composer = Composer(plan)
    for method in plan.methods:
        for task in TASKS:
            quality = QUALITY[(method.name, task)]
            if method.name == "zero_shot":
                _write(composer.run(method, task, 1e-3, 0), quality, 0.5)
                if old_zero_shot_runs:
                    for lr, seed in ((3.3e-4, 0), (3e-3, 0), (3.3e-4, 1), (3.3e-4, 2)):
                        _write(composer.run(method, task, lr, seed), quality, 0.5, seed=seed + 10)
                continue
            for lr, selection in ((3.3e-4, 0.7), (1e-3, 0.8), (3e-3, 0.6)):
                _write(composer.run(method, task, lr, 0), quality, selection)
            for seed in (1, 2):
                _write(composer.run(method, task, 1e-3, seed), quality, 0.8)
    return plan


def _replicates(task, quality, seeds):
    """A cell's bootstrap replicates, computed directly: the task's shared resamples, the metric per seed, the mean."""
    references = np.array(_dev(task, quality, 0)[0])
    indices = intervals.replicate_indices(len(references), task)
    metric = METRICS["accuracy" if task == "glue/sst2" else "pearson"]
    per_seed = [np.array(_dev(task, quality, s)[1]) for s in seeds]
    return np.array([np.mean([metric(p[i], references[i]) for p in per_seed]) for i in indices])


@pytest.mark.parametrize("old_zero_shot_runs", [False, True], ids=["one-run", "old-five-runs"])
def test_the_cell_of_a_method_that_trains_nothing_is_its_one_run(tmp_path, old_zero_shot_runs):
    plan = _tree(tmp_path, old_zero_shot_runs)
    zero = plan.methods[0]
    state = cell_state(plan, Composer(plan), zero, "glue/sst2", RunIndex(tmp_path / "runs"))
    assert list(state.grid) == [1e-3] and list(state.seeds) == [0] and state.complete(1)
    out = tmp_path / "report"
    report([str(tmp_path / "runs"), "--plan", plan.path, "--out", str(out)])
    text = (out / "results.md").read_text()
    with open(out / "results.csv", newline="") as handle:
        rows = {(r["method"], r["task"]): r for r in csv.DictReader(handle)}

    # score and interval: the one run at the line's lr, seed 0 (the old runs around it are not read)
    floor_sst2 = _replicates("glue/sst2", "bad", [0])
    row = rows[("zero_shot", "glue/sst2")]
    references, predictions = _dev("glue/sst2", "bad", 0)[:2]
    assert row["status"] == "complete" and row["n_seeds"] == row["planned_seeds"] == "1"
    assert float(row["chosen_lr"]) == 1e-3
    assert float(row["mean"]) == pytest.approx(100 * np.mean(np.array(predictions) == np.array(references)))
    low, high = np.percentile(floor_sst2, [2.5, 97.5])
    assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((100 * low, 100 * high), abs=1e-3)
    assert rows[("zero_shot", "average")]["n_seeds"] == "1" and rows[("lora", "average")]["n_seeds"] == "3"
    main = {line.split(" | ")[0].strip("| "): line for line in text.split("\n\n")[1].splitlines()[2:]}
    assert "(one run)" in main["zero_shot"] and "±" not in main["zero_shot"] and "±" in main["lora"]
    lrs = {line.split(" | ")[0].strip("| "): line for line in text.split("### Learning rate")[1].split("###")[0].splitlines()
           if line.startswith("| ")}
    assert lrs["zero_shot"] == "| zero_shot | — (trains nothing) | — (trains nothing) | — (trains nothing) |"
    cost = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")
            for line in text.split("### Cost per run")[1].splitlines() if line.startswith("| ") and "---" not in line}
    assert cost["zero_shot"][-1] == "2"   # one run per task, however many an older sweep left

    # Δ vs floor: lora's 3-seed replicates against the floor's one-run replicates, paired on the same resamples
    lora = rows[("lora", "glue/sst2")]
    low, high = np.percentile(_replicates("glue/sst2", "good", [0, 1, 2]) - floor_sst2, [2.5, 97.5])
    assert lora["floor_method"] == "zero_shot" and lora["floor_verdict"] == "above"
    assert (float(lora["floor_low"]), float(lora["floor_high"])) == pytest.approx((100 * low, 100 * high), abs=1e-3)
    assert row["floor_verdict"] == "floor" and rows[("lora", "average")]["floor_method"] == "zero_shot"
    # STS-B: the one-run cell is the column's best; the seed-resampled check (†) of a 3-seed cell against it
    # still runs, and the floor's seeds are the same in every draw: its replicates are its one run's
    assert rows[("zero_shot", "glue/stsb")]["verdict"] == "best"
    dora = rows[("dora", "glue/stsb")]
    assert dora["verdict"] == "worse" and dora["seeds_verdict"] == "worse" and dora["floor_verdict"] == "below"
    per_seed = np.stack([_replicates("glue/stsb", "bad", [s]) for s in (0, 1, 2)])
    best = _replicates("glue/stsb", "good", [0])
    low, high = np.percentile(intervals.seeds_resampled(per_seed, "glue/stsb") - best, [2.5, 97.5])
    assert (float(dora["seeds_diff_low"]), float(dora["seeds_diff_high"])) == \
        pytest.approx((100 * low, 100 * high), abs=1e-3)
