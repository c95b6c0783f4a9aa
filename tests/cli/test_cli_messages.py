"""The command line as a new user meets it, through the real entry points in a subprocess: a refusal is one line
and a non-zero exit (``--debug``: the traceback), the console carries no third-party noise, ``--help`` lists only
selectable groups, and a refused run leaves no folder behind (and a finished one no empty train.log)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipe_helpers import tiny_run_overrides, write_sst2

pytestmark = pytest.mark.slow

NOISE = ("Traceback", "LOAD REPORT", "FutureWarning", "Skipping publisher trust check",
         "Failed to load CPU gemm_4bit_forward", "Set the environment variable HYDRA_FULL_ERROR")


def _run(tmp_path: Path, module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=600)


def _one_line_refusal(done: subprocess.CompletedProcess, *expected: str) -> str:
    assert done.returncode != 0, done.stdout[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) <= 2, done.stderr  # argparse adds its usage line
    assert not any(noise in done.stderr + done.stdout for noise in NOISE), done.stderr
    for text in expected:
        assert text in lines[-1], lines[-1]
    return lines[-1]


@pytest.mark.parametrize("args, expected", [
    (["+model.quantisation=nf4"], ["did you mean model.quantization?"]),
    (["+train_limt=16"], ["did you mean train_limit?"]),
    (["trainer.lrr=1"], ["did you mean trainer.lr?"]),
    (["adapter=lorra"], ["did you mean adapter=lora?"]),
    (["task.data_dir=/no/such/folder"], ["/no/such/folder", "is not a directory"]),
    (["adapter.r=0"], ["r must be a positive integer"]),
])
def test_lrzoo_train_refusals_are_one_line(args, expected, tmp_path):
    data = write_sst2(tmp_path / "data")
    keys = {arg.split("=")[0] for arg in args}
    overrides = [o for o in tiny_run_overrides(data, tmp_path / "runs") if o.split("=")[0] not in keys]
    done = _run(tmp_path, "lrzoo.cli.train", *overrides, *args)
    line = _one_line_refusal(done, *expected)
    assert line.startswith("lrzoo-train: error: ")
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").rglob("*")) == []  # no stub run folder


def test_a_preset_task_it_does_not_honour_and_an_offline_task_without_data(tmp_path):
    done = _run(tmp_path, "lrzoo.cli.train", "experiment=cs_cpu", "task=commonsense/hellaswag",
                f"output_root={tmp_path / 'runs'}")
    _one_line_refusal(done, "task=commonsense/hellaswag, but task.train_tasks trains on")
    # the quickstart's "real run" with the Hub offline and no local copy of its data anywhere
    done = _run(tmp_path, "lrzoo.cli.train", "adapter=dora", "task=glue/qqp", "model=tiny_bert",
                f"output_root={tmp_path / 'runs'}", LRZOO_DATA_DIR=str(tmp_path / "none"))
    _one_line_refusal(done, "glue/QQP/train.tsv", str(tmp_path / "none"), "task.data_dir=")
    assert not list((tmp_path / "runs").rglob("*.json"))


def test_debug_shows_the_traceback(tmp_path):
    data = write_sst2(tmp_path / "data")
    done = _run(tmp_path, "lrzoo.cli.train", *tiny_run_overrides(data, tmp_path / "runs"), "+model.quantisation=nf4",
                "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr and "UserError" in done.stderr


def test_sweep_report_and_bench_refusals_are_one_line(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("experiment: glue_cpu\ntasks: [glue/rte]\nseeds: [0]\nmethods:\n  - lora trainer.lr=1e-3\n"
                    "overrides: ['+trainer.lrr=1']\n")
    _one_line_refusal(_run(tmp_path, "lrzoo.cli.sweep", str(plan), "--dry-run"),
                      "lrzoo-sweep: error:", "trainer.lrr (did you mean trainer.lr?)")
    (tmp_path / "runs").mkdir()
    _one_line_refusal(_run(tmp_path, "lrzoo.cli.report", str(tmp_path / "runs"), "--plan", str(plan)),
                      "lrzoo-report: error:", "trainer.lrr")
    _one_line_refusal(_run(tmp_path, "lrzoo.cli.bench", "--device", "nonsense", "--quick"),
                      "--device nonsense: not a torch device")
    _one_line_refusal(_run(tmp_path, "lrzoo.cli.bench", "--quick", "--r", "0"), "--r must be at least 1")


def test_a_real_model_run_has_a_quiet_console_and_no_empty_train_log(tmp_path):
    data = write_sst2(tmp_path / "data", train=16, dev=8)
    done = _run(tmp_path, "lrzoo.cli.train", "model=minilm", f"task.data_dir={data}", f"output_root={tmp_path / 'runs'}",
                "trainer.batch_size=8", "trainer.max_steps=2", "trainer.eval_batch_size=8")
    output = done.stdout + done.stderr
    assert done.returncode == 0, done.stderr[-3000:]
    assert not any(noise in output for noise in NOISE), output
    # the new head, said once in words; the progress bars and the final score stay
    assert output.count("new weights, not in the checkpoint") == 1 and "classifier.weight" in output
    assert "train: 100%" in output and "accuracy = " in output
    (run_dir,) = {p.parent for p in (tmp_path / "runs").rglob("results.json")}
    assert not (run_dir / "train.log").exists()


def test_help_lists_only_groups_a_run_can_select(tmp_path):
    done = _run(tmp_path, "lrzoo.cli.train", "--help")
    assert done.returncode == 0
    groups = done.stdout.split("== Config ==")[0]
    assert "\nadapter: " in groups and "\ntask/glue: " in groups and "experiment: " in groups
    assert "sweeps" not in groups
