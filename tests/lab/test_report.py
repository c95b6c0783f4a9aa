"""lrzoo-report: mean ± std over seeds per adapter × task, CSV and a PNG plot."""

from __future__ import annotations

import csv
import json
import statistics

import pytest

from lrzoo.cli.report import main

SCORES = {("lora", "glue/rte"): [0.70, 0.74, 0.69], ("dora", "glue/rte"): [0.75, 0.71],
          ("lora", "glue/cola"): [0.55]}
PARAMS = {"lora": 74_500, "dora": 80_000}


@pytest.fixture
def runs(tmp_path):
    for (adapter, task), scores in SCORES.items():
        for seed, score in enumerate(scores):
            run = tmp_path / "runs" / task / "minilm" / adapter / f"seed{seed}"
            run.mkdir(parents=True)
            metric = "matthews_correlation" if task == "glue/cola" else "accuracy"
            (run / "results.json").write_text(json.dumps({
                "task": task, "adapter": adapter, "model": "minilm", "seed": seed, "primary_metric": metric,
                "score": score, "metrics": {metric: score, "score": score}, "trainable_params": PARAMS[adapter],
                "best": {"step": 1, "score": score + 0.01}, "peak_memory_mb": 1000.0 + 10 * seed,
                "wall_time_s": 30.0 + seed}))
    (tmp_path / "runs" / "unfinished").mkdir()  # no results.json: ignored
    return tmp_path / "runs"


def test_report_aggregates_seeds_into_markdown_csv_and_png(runs, tmp_path, capsys):
    out = tmp_path / "report"
    main([str(runs), "--out", str(out)])

    with open(out / "results.csv", newline="") as handle:
        table = {(r["adapter"], r["task"]): r for r in csv.DictReader(handle)}
    assert set(table) == set(SCORES)
    for key, scores in SCORES.items():
        row = table[key]
        assert int(row["n_seeds"]) == len(scores)
        assert float(row["mean"]) == pytest.approx(100 * statistics.fmean(scores))
        expected_std = 100 * statistics.stdev(scores) if len(scores) > 1 else 0.0
        assert float(row["std"]) == pytest.approx(expected_std)
        assert int(row["trainable_params"]) == PARAMS[key[0]]

    text = (out / "results.md").read_text()
    # columns: cola, rte, average over tasks, params, peak memory (max over runs), train time (mean of task means)
    assert "| lora | 55.00 ± 0.00 (1) | 71.00 ± 2.65 (3) | 63.00 | 74.5K | 1020 | 30 |" in text
    assert "| dora | – | 73.00 ± 2.83 (2) | – | 80.0K | 1010 | 30 |" in text
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"({sum(map(len, SCORES.values()))} runs, 6 scores)")


def test_report_can_select_the_best_evaluation(runs, tmp_path):
    main([str(runs), "--out", str(tmp_path / "best"), "--select", "best"])
    with open(tmp_path / "best" / "results.csv", newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["adapter"] == "lora" and r["task"] == "glue/cola")
    assert float(row["mean"]) == pytest.approx(56.0)


def test_report_without_runs_says_what_to_do(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "run lrzoo-train first" in capsys.readouterr().err


def test_a_run_on_several_eval_sets_gives_one_column_per_set(tmp_path, capsys):
    run = tmp_path / "runs" / "cs" / "seed0"
    run.mkdir(parents=True)
    metrics = {"commonsense/boolq/accuracy": 0.5, "commonsense/piqa/accuracy": 0.25, "score": 0.375}
    (run / "results.json").write_text(json.dumps({
        "task": "commonsense/all", "adapter": "lora", "model": "smollm2", "seed": 0, "primary_metric": "accuracy",
        "score": 0.375, "metrics": metrics, "trainable_params": 460_800, "peak_memory_mb": 2000.0,
        "wall_time_s": 100.0}))
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "results.md").read_text()
    assert "| lora | 50.00 ± 0.00 (1) | 25.00 ± 0.00 (1) | 37.50 | 0.46M | 2000 | 100 |" in text
    # one run scored on two sets is one run (it used to be counted once per set: "(7 runs)" for commonsense)
    assert capsys.readouterr().out.splitlines()[-1].endswith("(1 run, 2 scores)")


def test_commands_come_from_hydra_overrides_without_seed_and_task(runs, tmp_path):
    for seed in range(3):
        hydra = runs / "glue/rte/minilm/lora" / f"seed{seed}" / ".hydra"
        hydra.mkdir()
        hydra.joinpath("overrides.yaml").write_text(f"- experiment=glue_cpu\n- adapter=lora\n- seed={seed}\n- task=glue/rte\n")
    main([str(runs), "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "results.md").read_text()
    assert "- minilm / lora: `lrzoo-train experiment=glue_cpu adapter=lora seed=0,1,2` on glue/rte" in text
    assert "minilm / dora:" not in text  # its runs have no overrides file


def _result(run, adapter, task, seed, score, config):
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "task": task, "adapter": adapter, "model": "minilm", "seed": seed, "primary_metric": "accuracy",
        "score": score, "metrics": {"accuracy": score, "score": score}, "trainable_params": 74_500,
        "peak_memory_mb": 1000.0, "wall_time_s": 30.0, "config": {**config, "seed": seed}}))


def test_runs_group_by_configuration_not_by_adapter(tmp_path):
    """A sweep over lr gives a row per lr (seeds of one lr aggregated, tasks lined up); one configuration
    per task, even with per-task hyperparameters (the papers' presets), stays one row."""
    def config(task, lr):
        return {"task": {"name": task}, "adapter": {"name": "lora", "r": 8}, "trainer": {"lr": lr, "epochs": 3}}

    runs = tmp_path / "runs"
    for seed, score in enumerate([0.70, 0.74]):
        _result(runs / "glue/rte/minilm/lora" / f"seed{seed}-aaaaaaaa", "lora", "glue/rte", seed, score,
                config("glue/rte", 1e-3))
    _result(runs / "glue/rte/minilm/lora/seed0-bbbbbbbb", "lora", "glue/rte", 0, 0.50, config("glue/rte", 1e-2))
    for seed, score in enumerate([0.60, 0.64]):
        _result(runs / "glue/sst2/minilm/lora" / f"seed{seed}-cccccccc", "lora", "glue/sst2", seed, score,
                config("glue/sst2", 1e-3))
    for task, lr, score in (("glue/rte", 5e-4, 0.8), ("glue/sst2", 4e-4, 0.9)):  # one config per task
        _result(runs / task / "minilm/dora/seed0-dddddddd", "dora", task, 0, score, config(task, lr))

    main([str(runs), "--out", str(tmp_path / "report")])
    with open(tmp_path / "report" / "results.csv", newline="") as handle:
        table = {(r["adapter"], r["variant"], r["task"]): r for r in csv.DictReader(handle)}
    assert set(table) == {("lora", "trainer.lr=0.001", "glue/rte"), ("lora", "trainer.lr=0.01", "glue/rte"),
                          ("lora", "trainer.lr=0.001", "glue/sst2"), ("dora", "", "glue/rte"), ("dora", "", "glue/sst2")}
    lr3 = table[("lora", "trainer.lr=0.001", "glue/rte")]
    assert int(lr3["n_seeds"]) == 2 and float(lr3["mean"]) == pytest.approx(72.0)
    lr2 = table[("lora", "trainer.lr=0.01", "glue/rte")]
    assert int(lr2["n_seeds"]) == 1 and float(lr2["mean"]) == pytest.approx(50.0)
    text = (tmp_path / "report" / "results.md").read_text()
    # the lr=1e-3 row lines up across tasks: the sweep's key labels sst2's single configuration too
    assert "| lora (trainer.lr=0.001) | 72.00 ± 2.83 (2) | 62.00 ± 2.83 (2) | 67.00 |" in text
    assert "| lora (trainer.lr=0.01) | 50.00 ± 0.00 (1) | – | – |" in text
    assert "| dora | 80.00 ± 0.00 (1) | 90.00 ± 0.00 (1) | 85.00 |" in text


def test_a_plot_without_matplotlib_is_one_line_naming_the_lab_extra(runs, tmp_path, monkeypatch, capsys):
    """matplotlib is the ``lab`` extra: a report on a machine without it says so in one line (exit 2), after
    writing its tables, instead of an ImportError traceback."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` raises ImportError, as if absent
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exited:
        main([str(runs), "--out", str(out)])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("lrzoo-report: error: the plot ")
    assert "matplotlib, which is not installed: pip install 'lrzoo[lab]'" in error[0]
    assert (out / "results.md").is_file() and (out / "results.csv").is_file() and not (out / "results.png").exists()
