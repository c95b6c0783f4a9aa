"""lrzoo-report --plan: bootstrap intervals over dev examples pooled over seeds, paired differences to the best
method of a task, the chosen learning rates, and missing cells; on hand-written results.json/predictions.json."""

from __future__ import annotations

import csv
import json
import os
import warnings

import numpy as np
import pytest

from lrzoo.lab import intervals
from lrzoo.lab.plan import Composer, load_plan
from lrzoo.lab.table import collect
from lrzoo.cli.report import main as report
from lrzoo.tasks.metrics import METRICS
from lrzoo.runs.lock import RunLock


@pytest.mark.parametrize("metric, kind", [("accuracy", "labels"), ("f1", "labels"), ("matthews_correlation", "labels"),
                                          ("matthews_correlation", "three"), ("pearson", "scores"),
                                          ("spearmanr", "scores")])
def test_vectorised_metrics_are_lrzoo_tasks_metrics_on_each_resample(metric, kind):
    rng = np.random.default_rng(1)
    n = 60
    if kind == "scores":
        references = rng.uniform(0, 5, n).round(1)
        predictions = references + rng.normal(0, 1.0, n)
    else:
        references = rng.integers(0, 3 if kind == "three" else 2, n)
        predictions = np.where(rng.random(n) < 0.3, rng.integers(0, 3 if kind == "three" else 2, n), references)
    indices = intervals.replicate_indices(n, "any", replicates=40)
    indices[0] = 0  # one degenerate resample: a single example repeated (MCC 0, correlation undefined)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = np.array([METRICS[metric](predictions[i], references[i]) for i in indices], dtype=float)
    np.testing.assert_allclose(intervals.metric_replicates(metric, predictions, references, indices), direct,
                               rtol=1e-9, atol=1e-12, equal_nan=True)


def _noisy(references, flip, rng):
    return np.where(rng.random(len(references)) < flip, 1 - references, references)


def test_bootstrap_interval_is_the_percentile_interval_of_seed_means_over_shared_resamples():
    rng = np.random.default_rng(0)
    references = rng.integers(0, 2, 300)
    seeds = [_noisy(references, flip, rng) for flip in (0.1, 0.15, 0.2)]
    indices = intervals.replicate_indices(300, "glue/sst2", replicates=1000)
    assert (indices == intervals.replicate_indices(300, "glue/sst2", replicates=1000)).all()   # fixed RNG
    assert not (indices == intervals.replicate_indices(300, "glue/mrpc", replicates=1000)).all()  # per task
    replicates = intervals.cell_replicates("accuracy", seeds, references, indices)
    direct = [np.mean([(p[idx] == references[idx]).mean() for p in seeds]) for idx in indices]
    np.testing.assert_allclose(replicates, direct)
    low, high = intervals.percentile_interval(replicates)
    assert (low, high) == tuple(np.percentile(direct, [2.5, 97.5]))
    mean = np.mean([(p == references).mean() for p in seeds])
    assert low < mean < high and 0.03 < high - low < 0.09   # about ±1.96·sqrt(p(1-p)/n), a bit less: seeds share rows


def test_the_paired_difference_flags_a_clearly_better_method_and_ties_identical_ones():
    rng = np.random.default_rng(0)
    references = rng.integers(0, 2, 400)
    indices = intervals.replicate_indices(400, "glue/sst2")
    good = [_noisy(references, 0.1, rng) for _ in range(3)]
    bad = [_noisy(references, 0.4, rng) for _ in range(3)]
    close = [p.copy() for p in good]
    for p in close:
        p[:2] = 1 - p[:2]
    reps = {name: intervals.cell_replicates("accuracy", preds, references, indices)
            for name, preds in (("good", good), ("bad", bad), ("same", [p.copy() for p in good]), ("close", close))}
    low, high, verdict = intervals.paired_difference(reps["bad"], reps["good"])
    assert verdict == "worse" and high < -0.2
    assert intervals.paired_difference(reps["same"], reps["good"]) == (0.0, 0.0, "tied")
    assert intervals.paired_difference(reps["close"], reps["good"])[2] == "tied"
    assert intervals.paired_difference(reps["good"], reps["bad"])[2] == "better"


# ---- the tuned report on a hand-written run tree ----

N_DEV = {"glue/sst2": 300, "glue/stsb": 200}


def _plan(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({
        "overrides": ["model=tiny_bert", "task.data_dir=/nowhere", f"output_root={tmp_path / 'runs'}",
                      "+task.heldout_size=16"],
        "tasks": ["glue/sst2", "glue/stsb"], "seeds": [0, 1, 2], "grid": {"factor": 3, "points": 3},
        "methods": ["lora trainer.lr=1e-3", "dora trainer.lr=1e-3", "lora_xs trainer.lr=1e-2"]}))
    return load_plan(path)


def _dev(task, quality, seed):
    """References and one seed's predictions: ``quality`` good/bad; the same for lora and dora (a tie)."""
    rng = np.random.default_rng(7)
    n = N_DEV[task]
    if task == "glue/sst2":
        references = rng.integers(0, 2, n)
        noise = np.random.default_rng(100 + seed).random(n)
        predictions = np.where(noise < (0.08 if quality == "good" else 0.4), 1 - references, references)
        return references.tolist(), predictions.tolist(), "accuracy", "classification"
    references = rng.uniform(0, 5, n)
    noise = np.random.default_rng(100 + seed).normal(0, 0.6 if quality == "good" else 3.0, n)
    return references.tolist(), (references + noise).tolist(), "pearson", "regression"


def _write(run, quality, selection):
    references, predictions, metric, kind = _dev(run.task, quality, run.seed)
    score = METRICS[metric](predictions, references)
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "results.json").write_text(json.dumps({
        "config_hash": run.config_hash, "config": run.config, "seed": run.seed, "adapter": run.method,
        "model": "tiny_bert", "task": run.task, "primary_metric": metric, "score": score, "selection_score": selection,
        "metrics": {f"{run.task}/{metric}": score, f"heldout/{run.task}/{metric}": selection, "score": score},
        "trainable_params": {"lora": 1000, "dora": 1100, "lora_xs": 64}[run.method],
        "wall_time_s": {"lora": 10, "dora": 20, "lora_xs": 5}[run.method] + run.seed, "peak_memory_mb": 300.0,
        "optimizer_state_mb": {"lora": 0.5, "dora": 0.6, "lora_xs": 0.01}[run.method], "peak_memory_kind": "cpu_max_rss"}))
    sets = {run.task: {"task": run.task, "kind": kind, "primary_metric": metric, "references": references,
                       "predictions": predictions},
            f"heldout/{run.task}": {"task": run.task, "kind": kind, "primary_metric": metric,
                                    "references": references[:16], "predictions": predictions[:16]}}
    (run.run_dir / "predictions.json").write_text(json.dumps({"sets": sets}))


@pytest.fixture
def tree(tmp_path):
    plan = _plan(tmp_path)
    composer = Composer(plan)
    quality = {"lora": "good", "dora": "good", "lora_xs": "bad"}
    for method in plan.methods:
        low, mid, high = plan.grid(method)
        for task in plan.tasks:
            # held-out scores: the middle lr wins, except lora_xs on sst2 where the two lowest tie (-> the lower)
            scores = {low: 0.7, mid: 0.8, high: 0.6}
            if (method.name, task) == ("lora_xs", "glue/sst2"):
                scores = {low: 0.8, mid: 0.8, high: 0.6}
            chosen = min(lr for lr in scores if scores[lr] == max(scores.values()))
            grid = [low, mid, high]
            if (method.name, task) == ("dora", "glue/stsb"):
                grid = [low, mid]                                  # missing: one grid point never ran
            for lr in grid:
                _write(composer.run(method, task, lr, 0), quality[method.name], scores[lr])
            if len(grid) < 3:
                continue
            seeds = [1] if (method.name, task) == ("lora_xs", "glue/stsb") else [1, 2]   # missing: seed 2
            for seed in seeds:
                _write(composer.run(method, task, chosen, seed), quality[method.name], scores[chosen])
    return plan, tmp_path / "runs"


def test_tuned_report_intervals_ties_chosen_lrs_and_missing_cells(tree, tmp_path, capsys):
    plan, runs = tree
    out = tmp_path / "report"
    report([str(runs), "--plan", plan.path, "--out", str(out)])
    text = (out / "results.md").read_text()
    assert capsys.readouterr().out.startswith(text)
    table = text.split("\n\n")[1].splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    # sst2: lora and dora identical -> both bold (one best, one tied); lora_xs really worse (not bold)
    assert rows["lora"].split(" | ")[1].startswith("**") and rows["dora"].split(" | ")[1].startswith("**")
    assert not rows["lora_xs"].split(" | ")[1].startswith("**")
    # missing cells are shown, with what is missing; averages only for complete rows
    assert "— (missing: lr grid 2/3 done)" in rows["dora"] and "— (missing: 2/3 seeds done)" in rows["lora_xs"]
    assert rows["lora"].split(" | ")[-1].startswith("**") and rows["dora"].endswith("| — |")
    assert "- dora × glue/stsb: lr grid 2/3 done" in text and "- lora_xs × glue/stsb: 2/3 seeds done" in text
    assert "4/6 cells complete" in text
    diffs = text.split("### Difference")[1]
    assert "+0.00 [+0.0, +0.0] tied" in diffs and "worse" in diffs and "best" in diffs
    # chosen lr: the middle of the grid, or the smaller of two tied grid points
    lrs = {line.split(" | ")[0].strip("| "): line for line in text.split("### Learning rate")[1].split("### Answer diversity")[0].splitlines()
           if line.startswith("| lo") or line.startswith("| do")}
    assert "| 1e-3 (70.0 / **80.0** / 60.0)" in lrs["lora"]
    assert "| 3.3e-3 edge (**80.0** / 80.0 / 60.0)" in lrs["lora_xs"]   # the lowest point won: flagged
    assert not any(" flat (" in line for line in lrs.values())

    with open(out / "results.csv", newline="") as handle:
        csv_rows = {(r["method"], r["task"]): r for r in csv.DictReader(handle)}
    assert set(csv_rows) == {(m, t) for m in ("lora", "dora", "lora_xs") for t in ("glue/sst2", "glue/stsb", "average")} \
        - {("dora", "average"), ("lora_xs", "average")}
    # the interval is the direct computation: the task's shared resamples, accuracy per seed, mean over seeds
    references = _dev("glue/sst2", "good", 0)[0]
    seeds = [_dev("glue/sst2", "good", s)[1] for s in (0, 1, 2)]
    indices = intervals.replicate_indices(len(references), "glue/sst2")
    direct = [np.mean([(np.array(p)[i] == np.array(references)[i]).mean() for p in seeds]) for i in indices]
    low, high = np.percentile(direct, [2.5, 97.5])
    row = csv_rows[("lora", "glue/sst2")]
    assert float(row["ci_low"]) == pytest.approx(100 * low, abs=1e-3) and float(row["ci_high"]) == pytest.approx(100 * high, abs=1e-3)
    assert float(row["mean"]) == pytest.approx(100 * np.mean([(np.array(p) == references).mean() for p in seeds]))
    assert row["chosen_lr"] == "0.001" and row["n_seeds"] == "3"
    preset_head = Composer(plan).run(plan.methods[0], "glue/sst2", 1e-3, 0).config["trainer"]["head_lr"]
    assert row["chosen_head_lr"] == ("lr" if preset_head is None else str(preset_head))   # no head_grid: the preset
    seed_sd = np.std([(np.array(p) == references).mean() for p in seeds], ddof=1)
    assert rows["lora"].split(" | ")[1].endswith(f"] ±{100 * seed_sd:.1f}")   # the spread over training seeds
    assert {csv_rows[("lora", "glue/sst2")]["verdict"], csv_rows[("dora", "glue/sst2")]["verdict"]} == {"best", "tied"}
    assert csv_rows[("lora_xs", "glue/sst2")]["verdict"] == "worse"
    assert csv_rows[("dora", "glue/stsb")]["status"] == "missing: lr grid 2/3 done"
    assert (out / "results.png").is_file()
    # answer diversity: label columns only (STS-B regresses), the modal answer's share per seed, and the majority row
    diversity = text.split("### Answer diversity")[1].split("### Cost")[0]
    assert "| method | glue/sst2 |" in diversity and "glue/stsb" not in diversity
    share = np.mean([np.bincount(p).max() / len(p) for p in seeds])
    assert f"| lora | {100 * share:.0f} |" in diversity
    assert f"answer (accuracy)* | {100 * np.bincount(references).max() / len(references):.1f} |" in diversity
    # cost per run: every finished run of the method (grid and seeds, both tasks), each counted once
    cost = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")
            for line in text.split("### Cost per run")[1].splitlines() if line.startswith("| ") and "---" not in line}
    assert cost["lora"] == ["lora", "1,000", "0.500", "300", "10 (10–12)", "10"]   # 6 grid runs at seed 0, 2 + 2 seeds
    assert cost["dora"][-1] == "7" and cost["lora_xs"][-1] == "9"   # dora's stsb: 2 grid runs; lora_xs: 1 seed short


def test_plain_report_leaves_out_the_heldout_slice(tree):
    _, runs = tree
    rows = collect(runs)
    assert rows and {row["task"] for row in rows} == {"glue/sst2", "glue/stsb"}


def test_a_one_point_plan_scored_on_several_sets_has_a_column_per_set(tmp_path):
    """commonsense/all is one run scored on 7 test sets and the cs_loglik plan has one lr per method: the report
    needs no held-out selection and shows each eval set (from predictions.json) as its own column."""
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({
        "overrides": ["model=tiny_llama", "task.data_dir=/nowhere", f"output_root={tmp_path / 'runs'}"],
        "tasks": ["commonsense/all"], "seeds": [0], "grid": {"factor": 3, "points": 1},
        "methods": ["lora trainer.lr=1e-3", "dora trainer.lr=1e-3", "tera trainer.lr=2e-2"]}))
    plan = load_plan(path)
    composer = Composer(plan)
    rng = np.random.default_rng(0)
    gold = {"commonsense/piqa": rng.integers(0, 2, 150).tolist(), "commonsense/arc_e": rng.integers(0, 4, 150).tolist()}
    for method, flip in (("lora", 0.1), ("dora", 0.6)):
        run = composer.run(next(m for m in plan.methods if m.name == method), "commonsense/all", 1e-3, 0)
        sets = {}
        for name, references in gold.items():
            noise = np.random.default_rng(len(name)).random(150)
            chosen = [(g + 1) % 2 if n < flip else g for g, n in zip(references, noise)]
            sets[name] = {"task": name, "kind": "loglik", "primary_metric": "accuracy", "references": references,
                          "predictions": chosen, "predictions_norm": chosen}
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "predictions.json").write_text(json.dumps({"sets": sets}))
        metrics = {f"{name}/accuracy": float(np.mean(np.array(s["predictions"]) == np.array(s["references"])))
                   for name, s in sets.items()}
        (run.run_dir / "results.json").write_text(json.dumps({
            "config_hash": run.config_hash, "config": run.config, "seed": 0, "adapter": method, "model": "tiny_llama",
            "task": "commonsense/all", "primary_metric": "accuracy", "score": float(np.mean(list(metrics.values()))),
            "metrics": metrics, "trainable_params": 10}))
    out = tmp_path / "report"
    tera = composer.run(next(m for m in plan.methods if m.name == "tera"), "commonsense/all", 2e-2, 0)
    with RunLock(str(tera.run_dir)):   # tera is training now (a sweep's run, or one started by hand)
        report([str(tmp_path / "runs"), "--plan", plan.path, "--out", str(out)])
    held = (out / "results.md").read_text().split("\n\n")[1]
    assert f"— (missing: not run; 1 run(s) in flight now (process {os.getpid()}))" in held
    report([str(tmp_path / "runs"), "--plan", plan.path, "--out", str(out)])
    text = (out / "results.md").read_text()
    table = text.split("\n\n")[1].splitlines()
    assert table[0].startswith("| method | commonsense/piqa (accuracy) | commonsense/arc_e (accuracy) | average")
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table[2:]}
    assert rows["lora"][1].startswith("**") and not rows["dora"][1].startswith("**")   # lora really better
    lora_piqa = np.mean(np.array(gold["commonsense/piqa"]) == np.array(
        [(g + 1) % 2 if n < 0.1 else g for g, n in zip(gold["commonsense/piqa"],
                                                        np.random.default_rng(len("commonsense/piqa")).random(150))]))
    assert rows["lora"][1].startswith(f"**{100 * lora_piqa:.2f}** [")
    assert rows["tera"][1] == "— (missing: not run)"
    assert "one learning rate (a one-point grid: nothing chosen)" in text and "2/3" not in text


def test_a_grid_whose_points_all_score_the_same_is_flagged_flat():
    from types import SimpleNamespace

    from lrzoo.lab.choice import CellState, Outcome
    from lrzoo.lab.tuned import _shown_lr

    def shown(scores):
        grid = {lr: Outcome("done") for lr in scores}
        state = CellState(None, "t", grid, chosen=min(scores, key=lambda lr: (-scores[lr], lr)), scores=scores)
        return _shown_lr(SimpleNamespace(state=state))

    assert shown({1e-3: 0.652, 3e-3: 0.652, 9e-3: 0.652}) == "1e-3 edge flat (**65.2** / 65.2 / 65.2)"
    assert shown({1e-3: 0.652, 3e-3: 0.70, 9e-3: 0.652}) == "3e-3 (65.2 / **70.0** / 65.2)"


def test_results_docs_rewrites_only_the_generated_blocks_from_the_report(tree, tmp_path):
    """``make results-docs``: docs/results.md's marked block becomes the report (headings demoted, no missing-cell
    list, the plot), each method page's bullets carry its cells' CSV values; prose, and the blocks of a comparison
    without runs, stay; a second run changes nothing."""
    from lrzoo.lab.results_docs import PAGE_BEGIN, PAGE_END, Section, refresh

    plan, runs = tree
    docs = tmp_path / "docs"
    (docs / "adapters").mkdir(parents=True)
    prose = "# Results\n\nHand-written prose.\n\n"
    (docs / "results.md").write_text(prose + "<!-- glue:begin -->\nold table\n<!-- glue:end -->\n\nMore prose.\n")
    old_cs = "- **CS** (setting): average accuracy 1.0, best."
    for method in ("lora", "dora", "lora_xs", "tera"):
        (docs / "adapters" / f"{method}.md").write_text(
            f"# {method}\n\n## Measured\n{PAGE_BEGIN}\n- **GLUE** (setting): stale.\n{old_cs}\n{PAGE_END}\n- by hand\n")
    sections = (Section("glue", "runs", "plan.yaml", "glue.png", "GLUE", "setting", True),
                Section("cs", "no-runs-yet", "plan.yaml", "cs.png", "CS", "setting", False))
    changed = refresh(tmp_path, docs, sections)
    assert set(changed) == {docs / "results.md", *(docs / "adapters" / f"{m}.md" for m in ("lora", "dora", "lora_xs", "tera"))}

    results = (docs / "results.md").read_text()
    assert results.startswith(prose) and results.endswith("<!-- glue:end -->\n\nMore prose.\n")
    block = results.split("<!-- glue:begin -->\n")[1].split("\n<!-- glue:end -->")[0]
    report_text = (runs / "results.md").read_text()
    assert block.startswith(report_text.split("\n", 1)[0].replace("### ", "#### "))
    assert "\n### " not in block and "Missing cells" not in block and "- dora × glue/stsb" not in block
    assert "| — (missing: lr grid 2/3 done) |" in block and block.endswith("![dev score (95% interval) against "
                                                                         "trainable parameters](glue.png)")
    assert (docs / "glue.png").read_bytes() == (runs / "results.png").read_bytes()

    with open(runs / "results.csv", newline="") as handle:
        cells = {(r["method"], r["task"]): r for r in csv.DictReader(handle)}

    def shown(method, task, verdict):
        r = cells[(method, task)]
        return f"{float(r['mean']):.1f} [{float(r['ci_low']):.1f}, {float(r['ci_high']):.1f}] at lr {verdict}"

    pages = {m: (docs / "adapters" / f"{m}.md").read_text() for m in ("lora", "dora", "lora_xs", "tera")}
    verdicts = {m: {"best": "best", "tied": "tied with the best"}[cells[(m, "glue/sst2")]["verdict"]] for m in ("lora", "dora")}
    assert (f"- **GLUE** (setting): SST-2 {shown('lora', 'glue/sst2', '1e-3, ' + verdicts['lora'])}; STS-B "
            f"{shown('lora', 'glue/stsb', '1e-3, the only finished cell of its column so far')}.\n{old_cs}\n") in pages["lora"]
    assert f"SST-2 {shown('dora', 'glue/sst2', '1e-3, ' + verdicts['dora'])}; STS-B not finished.\n" in pages["dora"]
    assert f"SST-2 {shown('lora_xs', 'glue/sst2', '3.3e-3, really below the best')}; STS-B not finished." in pages["lora_xs"]
    # a method outside the plan loses the plan's bullet; the comparison without runs keeps the page's bullet
    assert pages["tera"].endswith(f"## Measured\n{PAGE_BEGIN}\n{old_cs}\n{PAGE_END}\n- by hand\n")
    assert all(page.endswith(f"{PAGE_END}\n- by hand\n") for page in pages.values())

    assert refresh(tmp_path, docs, sections) == []   # idempotent
    (docs / "results.md").write_text(prose)          # markers gone: a clear error, nothing written
    with pytest.raises(ValueError, match="restore the markers"):
        refresh(tmp_path, docs, sections)


def test_seeds_resampled_draws_whole_seeds_and_catches_a_verdict_one_failed_seed_decides():
    """The pooled replicates hold the seeds fixed; resampling them too (two-level bootstrap) must average k seeds
    drawn with replacement per replicate, and turn 'worse' into 'tied' when one failed seed makes the gap."""
    from types import SimpleNamespace

    from lrzoo.lab.cells import _compare
    from lrzoo.lab.tuned import _shown_cell, _shown_diff

    per_seed = np.arange(3 * 5, dtype=float).reshape(3, 5)   # seed i, replicate r -> 5i + r
    resampled = intervals.seeds_resampled(per_seed, "glue/sst2")
    draws = np.random.default_rng([intervals.SEED, __import__("zlib").crc32(b"glue/sst2"), 1]).integers(0, 3, (5, 3))
    np.testing.assert_allclose(resampled, [per_seed[draws[r], r].mean() for r in range(5)])
    same = np.tile(np.linspace(0, 1, 7), (3, 1))
    np.testing.assert_allclose(intervals.seeds_resampled(same, "glue/sst2"), same[0])   # identical seeds: no change

    rng = np.random.default_rng(0)
    references = rng.integers(0, 2, 400)
    indices = intervals.replicate_indices(400, "glue/sst2")
    steady = [_noisy(references, 0.15, rng) for _ in range(3)]
    shaky = [_noisy(references, flip, rng) for flip in (0.05, 0.05, 0.45)]   # two good seeds, one failed

    def cell(seeds):
        per = intervals.seed_replicates("accuracy", seeds, references, indices)
        scores = [float((p == references).mean()) for p in seeds]
        return SimpleNamespace(mean=float(np.mean(scores)), scores=scores, replicates=per.mean(0),
                               interval=intervals.percentile_interval(per.mean(0)),
                               seeds_replicates=intervals.seeds_resampled(per, "glue/sst2"), diff=None, seeds_diff=None,
                               best=False)

    a, b = cell(steady), cell(shaky)
    _compare([a, b])
    assert a.best and b.diff[3] == "worse" and b.diff[2] < 0        # the pooled bootstrap: really worse
    assert b.seeds_diff[2] == "tied" and b.seeds_diff[0] < b.diff[1] # seeds resampled: a far wider interval, tied
    assert " †" in _shown_cell(b) and "seeds resampled: [" in _shown_diff(b) and _shown_diff(b).endswith("tied †")
    from lrzoo.lab.results_docs import _verdict
    assert _verdict(b, 2) == "really below the best (tied with the best once the training seeds are resampled too)"
    steady_too = cell([p.copy() for p in steady])
    steady_too.mean -= 1e-9
    _compare([a, steady_too])
    assert steady_too.seeds_diff[2] == steady_too.diff[3] == "tied" and "†" not in _shown_cell(steady_too)
