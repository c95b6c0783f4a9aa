"""lrzoo-report --plan: every row's difference to the no-training floor (the plan's ``floors``) with a paired
bootstrap interval, and the truncated share per task; on hand-written results.json/predictions.json."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from lrzoo.lab import intervals
from lrzoo.lab.plan import Composer, PlanError, load_plan
from lrzoo.cli.report import main as report

from test_tuned_report import _dev, _write


def _floor_plan(tmp_path, floors):
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({
        "overrides": ["model=tiny_bert", "task.data_dir=/nowhere", f"output_root={tmp_path / 'runs'}",
                      "+task.heldout_size=16"],
        "tasks": ["glue/sst2", "glue/stsb"], "seeds": [0, 1, 2], "grid": {"factor": 3, "points": 3},
        "methods": ["lora trainer.lr=1e-3", "dora trainer.lr=1e-3", "lora_xs trainer.lr=1e-2"], "floors": floors}))
    return load_plan(path)


def test_each_row_shows_its_difference_to_the_floor_with_a_paired_interval(tmp_path):
    plan = _floor_plan(tmp_path, ["lora_xs"])   # the "bad" method stands for the untrained checkpoint here
    composer = Composer(plan)
    quality = {"lora": "good", "dora": "good", "lora_xs": "bad"}
    for method in plan.methods:
        low, mid, high = plan.grid(method)
        for task in plan.tasks:
            for lr, selection in ((low, 0.7), (mid, 0.8), (high, 0.6)):
                _write(composer.run(method, task, lr, 0), quality[method.name], selection)
            for seed in (1, 2):
                _write(composer.run(method, task, mid, seed), quality[method.name], 0.8)
            result = composer.run(method, task, mid, 0).run_dir / "results.json"
            data = json.loads(result.read_text())
            data.update(max_length=128, truncated={"train": 0.004, task: 0.01, f"heldout/{task}": 0.0})
            result.write_text(json.dumps(data))
    out = tmp_path / "report"
    report([str(tmp_path / "runs"), "--plan", plan.path, "--out", str(out)])
    text = (out / "results.md").read_text()
    floor_table = text.split("### Difference to the no-training floor")[1].split("###")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in floor_table.splitlines() if line.startswith("| ")}
    assert "floor (lora_xs)" in rows["lora_xs"] and " above (lora_xs)" in rows["lora"]
    with open(out / "results.csv", newline="") as handle:
        by_cell = {(r["method"], r["task"]): r for r in csv.DictReader(handle)}
    # the interval is the paired bootstrap computed directly: the same resamples for both cells, seed means
    references = _dev("glue/sst2", "good", 0)[0]
    good = [np.array(_dev("glue/sst2", "good", s)[1]) for s in (0, 1, 2)]
    bad = [np.array(_dev("glue/sst2", "bad", s)[1]) for s in (0, 1, 2)]
    indices = intervals.replicate_indices(len(references), "glue/sst2")
    refs = np.array(references)
    diffs = [np.mean([(p[i] == refs[i]).mean() for p in good]) - np.mean([(p[i] == refs[i]).mean() for p in bad])
             for i in indices]
    low, high = np.percentile(diffs, [2.5, 97.5])
    row = by_cell[("lora", "glue/sst2")]
    assert row["floor_method"] == "lora_xs" and row["floor_verdict"] == "above"
    assert float(row["floor_low"]) == pytest.approx(100 * low, abs=1e-3)
    assert float(row["floor_high"]) == pytest.approx(100 * high, abs=1e-3)
    assert by_cell[("lora_xs", "glue/sst2")]["floor_verdict"] == "floor"
    assert by_cell[("lora", "average")]["floor_verdict"] == "above"
    # the truncated share per task, the largest over the task's runs
    lengths = text.split("### Sequence length")[1]
    assert "| glue/sst2 | 128 | 0.40% | 1.00% | 0.00% |" in lengths


def test_floors_must_be_methods_of_the_plan(tmp_path):
    with pytest.raises(PlanError, match="floors"):
        _floor_plan(tmp_path, ["zero_shot"])
