"""lrzoo-report --plan's method comparison (PEFT method_comparison's shape, issue 28 items 5 and 7): each column
checked against values computed here from the hand-written run files."""

from __future__ import annotations

import csv
import json
import statistics

import numpy as np
import pytest

from lrzoo.lab import intervals
from lrzoo.lab.plan import Composer, load_plan
from lrzoo.cli.report import main as report
from lrzoo.tasks.metrics import METRICS

from test_tuned_report import _dev, _write

TOTAL = 2000                                           # the model's parameters in every fake run
TRAINABLE = {"lora": 100, "dora": 1500, "lora_xs": 8}  # dora trains 75% of it: grouped with full fine-tuning
FILE_BYTES = {"lora": 40_000, "dora": 6_000_000, "lora_xs": 3_000}


def _extend(run, step_s, mean_mb, peak_mb, forgetting):
    path = run.run_dir / "results.json"
    data = json.loads(path.read_text())
    data.update(trainable_params=TRAINABLE[run.method], total_params=TOTAL, steps=50, wall_time_s=50 * step_s,
                peak_memory_mb=peak_mb, memory={"kind": "cpu_rss", "mean_mb": mean_mb, "peak_mb": peak_mb, "samples": 50},
                forgetting={"data": "wikitext-2", "tokens": 1024, "base_nll": 3.0, "nll": 3.0 + forgetting,
                            "delta_nll": forgetting})
    path.write_text(json.dumps(data))
    adapter = run.run_dir / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * FILE_BYTES[run.method])
    (adapter / "tokenizer.json").write_text("{}" * 5000)   # not a weight file: not counted


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("comparison")
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({
        "overrides": ["model=tiny_bert", "task.data_dir=/nowhere", f"output_root={tmp_path / 'runs'}",
                      "+task.heldout_size=16"],
        "tasks": ["glue/sst2", "glue/stsb"], "seeds": [0, 1, 2], "grid": {"factor": 3, "points": 3},
        "methods": ["lora trainer.lr=1e-3", "dora trainer.lr=1e-3", "lora_xs trainer.lr=1e-2"], "floors": ["lora_xs"]}))
    plan = load_plan(path)
    composer = Composer(plan)
    quality = {"lora": "good", "dora": "good", "lora_xs": "bad"}
    costs = {}
    for method in plan.methods:
        low, mid, high = plan.grid(method)
        for task in plan.tasks:
            # lora on SST-2 wins at the top of its grid, with no growth left (grid.extend 0): an edge
            edge = (method.name, task) == ("lora", "glue/sst2")
            chosen = high if edge else mid
            for lr, selection in ((low, 0.6), (mid, 0.7 if edge else 0.8), (high, 0.8 if edge else 0.65)):
                _write(composer.run(method, task, lr, 0), quality[method.name], selection)
            for seed in (1, 2):
                _write(composer.run(method, task, chosen, seed), quality[method.name], 0.8)
            for seed in plan.seeds:
                k = 1 + list(TRAINABLE).index(method.name)   # every method and seed its own figures
                cost = (0.1 * (1 + seed) * k, 300.0 + 10 * seed + 7 * k, 400.0 + seed + 50 * k, 0.01 * (seed + 1) * k)
                costs[(method.name, task, seed)] = cost
                _extend(composer.run(method, task, chosen, seed), *cost)
    out = tmp_path / "report"
    report([str(tmp_path / "runs"), "--plan", plan.path, "--out", str(out)])
    text = (out / "results.md").read_text()
    table = text.split("### Method comparison")[1].split("###")[0]
    rows = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[2:] if rows[1][0].startswith("---") else rows[1:]
    with open(out / "comparison.csv", newline="") as handle:
        numbers = {(r["method"], r["task"]): r for r in csv.DictReader(handle)}
    return {(r[1], r[2]): dict(zip(header, r)) for r in body}, [r[1] for r in body], costs, table, numbers, text


def _seed_scores(task, quality):
    scores = []
    for seed in (0, 1, 2):
        references, predictions, metric, _ = _dev(task, quality, seed)
        scores.append(METRICS[metric](predictions, references))
    return scores


def test_each_column_is_what_the_run_files_say(tree):
    rows, order, costs, _, numbers, _ = tree
    quality = {"lora": "good", "dora": "good", "lora_xs": "bad"}
    for (method, task), row in rows.items():
        mean = statistics.fmean(_seed_scores(task, quality[method]))
        assert row["score [95% CI]"].startswith(f"{100 * mean:.2f} [")
        if method != "lora_xs":
            floor = statistics.fmean(_seed_scores(task, "bad"))
            assert row["Δ vs floor [95% CI]"].startswith(f"{100 * (mean - floor):+.2f} [")
            assert row["Δ vs floor [95% CI]"].endswith(" above")
        else:
            assert row["Δ vs floor [95% CI]"] == "floor"
        share = TRAINABLE[method] / TOTAL
        assert row["trainable params (% of model)"] == f"{TRAINABLE[method]:,} ({100 * share:.3g}%)"
        assert row["adapter file MB"] == f"{FILE_BYTES[method] / 1e6:.3g}"
        seeds = [costs[(method, task, s)] for s in (0, 1, 2)]
        assert row["train s/step"] == f"{statistics.median(c[0] for c in seeds):.3g}"
        assert row["mean memory MB"] == f"{statistics.median(c[1] for c in seeds):.0f}"
        assert row["peak memory MB"] == f"{statistics.median(c[2] for c in seeds):.0f}"
        assert row["forgetting ΔNLL"] == f"{statistics.fmean(c[3] for c in seeds):+.3f}"
        number = numbers[(method, task)]   # comparison.csv: the same figures unrounded
        assert float(number["mean"]) == pytest.approx(100 * mean) and int(number["adapter_bytes"]) == FILE_BYTES[method]
        assert float(number["trained_share"]) == pytest.approx(share)
        assert float(number["forgetting_delta_nll"]) == pytest.approx(statistics.fmean(c[3] for c in seeds))
        assert number["edge"] == ("lr edge" if (method, task) == ("lora", "glue/sst2") else "")
        # grouped by the share trained, not by name: dora (75% here) sits with the methods that train most weights
        assert row["group"] == ("no-training floor" if method == "lora_xs" else
                                "most weights" if share > 0.5 else "adapter")
    assert order == ["lora_xs", "lora_xs", "lora", "lora", "dora", "dora"]


def test_the_interval_is_the_bootstrap_of_the_seed_mean(tree):
    rows = tree[0]
    references = np.array(_dev("glue/sst2", "good", 0)[0])
    predictions = [np.array(_dev("glue/sst2", "good", s)[1]) for s in (0, 1, 2)]
    indices = intervals.replicate_indices(len(references), "glue/sst2")
    means = [np.mean([(p[i] == references[i]).mean() for p in predictions]) for i in indices]
    low, high = np.percentile(means, [2.5, 97.5])
    assert f"[{100 * low:.1f}, {100 * high:.1f}]" in rows[("dora", "glue/sst2")]["score [95% CI]"]


def test_a_rate_chosen_at_an_exhausted_edge_is_flagged_and_counted(tree):
    rows, _, _, table, _, _ = tree
    assert rows[("lora", "glue/sst2")]["score [95% CI]"].endswith("**lr edge**")
    assert sum("edge**" in row["score [95% CI]"] for row in rows.values()) == 1
    assert "**edge**: 1 of 6 rows" in table and "(lora × glue/sst2)" in table
    # the tuned table that heads the report carries the flag too, and counts it
    text = tree[5]
    main = text.split("### Tuned comparison")[1].split("###")[0]
    lora = next(line for line in main.splitlines() if line.startswith("| lora |")).split(" | ")
    assert lora[1].endswith("*lr edge*") and not lora[2].endswith("edge*")
    assert "*lr edge* / *head edge*: 1 cell(s)" in main


def test_a_task_scored_on_several_sets_shows_their_mean_and_its_paired_floor_difference(tmp_path):
    """commonsense/all: one run per method scored on several sets; the row is the mean over the sets, its
    difference to the floor the paired bootstrap of the set-averaged replicates."""
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({
        "overrides": ["model=tiny_llama", "task.data_dir=/nowhere", f"output_root={tmp_path / 'runs'}"],
        "tasks": ["commonsense/all"], "seeds": [0], "grid": {"factor": 3, "points": 1}, "floors": ["dora"],
        "methods": ["lora trainer.lr=1e-3", "dora trainer.lr=1e-3"]}))
    plan = load_plan(path)
    composer = Composer(plan)
    rng = np.random.default_rng(0)
    gold = {"commonsense/piqa": rng.integers(0, 2, 150), "commonsense/arc_e": rng.integers(0, 4, 150)}
    chosen = {}
    for method, flip in (("lora", 0.1), ("dora", 0.5)):
        run = composer.run(next(m for m in plan.methods if m.name == method), "commonsense/all", 1e-3, 0)
        sets = {}
        for name, references in gold.items():
            noise = np.random.default_rng(len(name) + int(10 * flip)).random(150)
            chosen[(method, name)] = np.where(noise < flip, (references + 1) % 2, references)
            sets[name] = {"task": name, "kind": "loglik", "primary_metric": "accuracy",
                          "references": references.tolist(), "predictions": chosen[(method, name)].tolist()}
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "predictions.json").write_text(json.dumps({"sets": sets}))
        (run.run_dir / "results.json").write_text(json.dumps({
            "config_hash": run.config_hash, "config": run.config, "seed": 0, "adapter": method, "model": "tiny_llama",
            "task": "commonsense/all", "primary_metric": "accuracy", "score": 0.5, "metrics": {},
            "trainable_params": 10, "total_params": 1000, "steps": 4, "wall_time_s": 2.0}))
    out = tmp_path / "report"
    report([str(tmp_path / "runs"), "--plan", plan.path, "--out", str(out)])
    with open(out / "comparison.csv", newline="") as handle:
        numbers = {r["method"]: r for r in csv.DictReader(handle)}
    accuracy = {m: np.mean([(chosen[(m, n)] == gold[n]).mean() for n in gold]) for m in ("lora", "dora")}
    lora = numbers["lora"]
    assert lora["task"] == "commonsense/all" and float(lora["mean"]) == pytest.approx(100 * accuracy["lora"])
    assert float(lora["diff_to_floor"]) == pytest.approx(100 * (accuracy["lora"] - accuracy["dora"]))
    diffs = np.zeros(intervals.REPLICATES)
    for name, references in gold.items():
        for i, index in enumerate(intervals.replicate_indices(len(references), name)):
            diffs[i] += ((chosen[("lora", name)][index] == references[index]).mean()
                         - (chosen[("dora", name)][index] == references[index]).mean()) / len(gold)
    low, high = np.percentile(diffs, [2.5, 97.5])
    assert float(lora["floor_low"]) == pytest.approx(100 * low, abs=1e-3)
    assert float(lora["floor_high"]) == pytest.approx(100 * high, abs=1e-3)
    assert lora["floor_verdict"] == "above" and numbers["dora"]["floor_verdict"] == "floor"
    assert float(lora["train_s_per_step"]) == 0.5 and lora["forgetting_delta_nll"] == "" and lora["edge"] == ""


def test_an_unfinished_cell_is_placed_by_its_finished_grid_runs(tmp_path):
    """The share trained does not depend on the rate: a cell whose seeds have not run is grouped by its grid runs,
    and one with no finished run at all is not passed off as an adapter."""
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({
        "overrides": ["model=tiny_bert", "task.data_dir=/nowhere", f"output_root={tmp_path / 'runs'}",
                      "+task.heldout_size=16"],
        "tasks": ["glue/sst2"], "seeds": [0, 1], "grid": {"factor": 3, "points": 3},
        "methods": ["lora trainer.lr=1e-3", "dora trainer.lr=1e-3"]}))
    plan = load_plan(path)
    composer = Composer(plan)
    dora = plan.methods[1]
    for lr in plan.grid(dora):
        run = composer.run(dora, "glue/sst2", lr, 0)
        _write(run, "good", 0.5)
        data = json.loads((run.run_dir / "results.json").read_text())
        data.update(trainable_params=1500, total_params=TOTAL)
        (run.run_dir / "results.json").write_text(json.dumps(data))
    out = tmp_path / "report"
    report([str(tmp_path / "runs"), "--plan", plan.path, "--out", str(out)])
    with open(out / "comparison.csv", newline="") as handle:
        groups = {r["method"]: (r["group"], r["mean"]) for r in csv.DictReader(handle)}
    assert groups == {"lora": ("no finished run yet", ""), "dora": ("most weights", "")}
