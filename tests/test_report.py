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
    assert "results.md" in capsys.readouterr().out


def test_report_can_select_the_best_evaluation(runs, tmp_path):
    main([str(runs), "--out", str(tmp_path / "best"), "--select", "best"])
    with open(tmp_path / "best" / "results.csv", newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["adapter"] == "lora" and r["task"] == "glue/cola")
    assert float(row["mean"]) == pytest.approx(56.0)


def test_report_without_runs_says_what_to_do(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "run lrzoo-train first" in capsys.readouterr().err


def test_a_run_on_several_eval_sets_gives_one_column_per_set(tmp_path):
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


def test_commands_come_from_hydra_overrides_without_seed_and_task(runs, tmp_path):
    for seed in range(3):
        hydra = runs / "glue/rte/minilm/lora" / f"seed{seed}" / ".hydra"
        hydra.mkdir()
        hydra.joinpath("overrides.yaml").write_text(f"- experiment=glue_cpu\n- adapter=lora\n- seed={seed}\n- task=glue/rte\n")
    main([str(runs), "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "results.md").read_text()
    assert "- minilm / lora: `lrzoo-train experiment=glue_cpu adapter=lora seed=0,1,2` on glue/rte" in text
    assert "minilm / dora:" not in text  # its runs have no overrides file
