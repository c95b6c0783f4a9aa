"""lrzoo-train's config tree and command line: groups, presets, run directories, bad input, sweeps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import lrzoo
from lrzoo.cli.train import run_recipe
from lrzoo.runs.identity import config_hash, run_hash
from lrzoo.configs import config_dir
from recipe_helpers import ADAPTER_FILES, EXPERIMENTS, compose, run_dir_of, tiny_run_overrides, write_sst2


@pytest.mark.parametrize("name", ADAPTER_FILES)
def test_every_adapter_yaml_is_an_adapter_option_naming_a_registered_method(name):
    cfg = compose([f"adapter={name}"])
    assert cfg.adapter.name in lrzoo.list_adapters()
    assert cfg.adapter == OmegaConf.load(config_dir("adapters") / f"{name}.yaml")


def test_defaults_and_rank_safe_run_directory():
    cfg = compose([], return_hydra_config=True)
    assert (cfg.model.name, cfg.adapter.name, cfg.task.name, cfg.logger.name) == ("minilm", "lora", "glue/sst2", "csv")
    # No timestamps: every rank of a distributed job (and a re-run, which resumes) gets the same path.
    name = f"glue/sst2/minilm/lora/seed0-{run_hash(cfg)}"
    assert re.fullmatch(r"glue/sst2/minilm/lora/seed0-[0-9a-f]{8}", name)
    assert cfg.hydra.run.dir == f"runs/{name}"
    assert cfg.hydra.sweep.dir == "runs" and cfg.hydra.sweep.subdir == name
    assert cfg.hydra.job.chdir is False


def test_every_configuration_has_its_own_run_directory_and_the_same_one_resumes():
    base = run_dir_of(compose([]))
    # Any hyperparameter, in a group or not, gives another directory: a sweep never mixes two in one.
    others = [run_dir_of(compose(o)) for o in (["trainer.lr=1e-3"], ["trainer.lr=1e-2"], ["adapter.r=4"],
                                               ["train_limit=100"], ["adapter=dora"], ["experiment=glue_cpu"])]
    assert len({base, *others}) == 1 + len(others)
    # What does not change the computation keeps the directory, so the run resumes there.
    for same in (["trainer.stop_after=3", "resume=never", "logger=none", "trainer.progress=false"],
                 ["trainer.lr=5.0e-4"], ["seed=0"]):
        assert run_dir_of(compose(same)) == base, same
    # Override order does not matter; the seeds of one configuration share its hash.
    assert run_dir_of(compose(["trainer.lr=1e-3", "adapter.r=4"])) == run_dir_of(compose(["adapter.r=4", "trainer.lr=1e-3"]))
    seed1 = run_dir_of(compose(["seed=1"]))
    assert seed1 != base and seed1.split("seed1-")[1] == base.split("seed0-")[1]
    # The hash is the config's, resolved: the same from the Hydra node and from run_hash.
    cfg = compose(["trainer.lr=1e-3"])
    assert run_dir_of(cfg).endswith(f"/seed0-{run_hash(cfg)}")
    # run_name is the user's: taken as it is.
    assert run_dir_of(compose(["run_name=rte-r16", "trainer.lr=1e-3"])) == str(Path("runs") / "rte-r16")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes(experiment):
    cfg = compose([f"experiment={experiment}"])
    assert cfg.trainer.lr > 0 and cfg.adapter.name in lrzoo.list_adapters()


def test_lora_paper_preset_pins_table_9():
    cfg = compose(["experiment=paper/lora/roberta_base_cola"])
    assert (cfg.model.source, cfg.task.name, cfg.adapter.name) == ("FacebookAI/roberta-base", "glue/cola", "lora")
    assert (cfg.adapter.r, cfg.adapter.alpha, list(cfg.model.adapter_targets)) == (8, 8, ["query", "value"])
    assert (cfg.trainer.lr, cfg.trainer.batch_size, cfg.trainer.epochs) == (4e-4, 32, 80)
    assert (cfg.trainer.warmup_ratio, cfg.trainer.weight_decay, cfg.trainer.max_length) == (0.06, 0.1, 512)


def test_config_hash_ignores_only_bookkeeping_keys():
    base = config_hash(compose([]))
    assert config_hash(compose(["trainer.stop_after=3", "resume=never", "logger=none"])) == base
    assert config_hash(compose(["trainer.lr=1e-3"])) != base
    assert config_hash(compose(["adapter=dora"])) != base


def test_config_hash_names_the_data_folder_not_its_spelling(tmp_path, monkeypatch):
    data = tmp_path / "shared" / "data"
    data.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "shared")
    monkeypatch.chdir(tmp_path / "shared")
    spellings = [str(data), "data", "./data/", str(tmp_path / "link" / "data")]
    hashes = {config_hash(compose([f"task.data_dir={where}"])) for where in spellings}
    assert len(hashes) == 1
    assert config_hash(compose([f"task.data_dir={tmp_path}"])) not in hashes


def test_unknown_adapter_is_refused_with_the_options():
    with pytest.raises(Exception, match="(?s)adapter.*lora_xs"):
        compose(["adapter=lorra"])


@pytest.mark.parametrize("override, error, message", [
    (["model.source=/no/such/model"], OSError, "built-in"),
    (["+adapter.rank=4"], ValueError, r"unknown config key adapter\.rank"),
    (["+trainer.learning_rate=1e-3"], ValueError, r"unknown config key trainer\.learning_rate"),
])
def test_bad_input_fails_before_training(override, error, message, tmp_path):
    data = write_sst2(tmp_path / "data")
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs", *override))
    with pytest.raises(error, match=message):
        run_recipe(cfg, run_dir_of(cfg))
    assert not (Path(run_dir_of(cfg)) / "checkpoints").exists()


def test_missing_data_fails_before_the_model_is_loaded(tmp_path, monkeypatch):
    import lrzoo.models

    monkeypatch.setattr(lrzoo.models, "load_model", lambda *a, **k: pytest.fail("model loaded before data check"))
    cfg = compose(tiny_run_overrides(tmp_path, tmp_path / "runs"))
    with pytest.raises(FileNotFoundError, match="SST-2"):
        run_recipe(cfg, run_dir_of(cfg))


@pytest.mark.slow
def test_sweep_from_the_command_line_then_report(tmp_path):
    data = write_sst2(tmp_path / "data")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    overrides = [o for o in tiny_run_overrides(data, tmp_path / "runs", "trainer.max_steps=2")
                 if not o.startswith("trainer.lr=")]
    sweep = subprocess.run([sys.executable, "-m", "lrzoo.cli.train", "-m", "adapter=lora,dora", "seed=0,1",
                            "trainer.lr=5e-3", *overrides],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    # A second sweep over the learning rate: lr=5e-3 is the run above (skipped), lr=1e-2 a new directory.
    lrs = subprocess.run([sys.executable, "-m", "lrzoo.cli.train", "-m", "trainer.lr=5e-3,1e-2", "adapter=lora", "seed=0",
                          *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert lrs.returncode == 0, lrs.stderr[-3000:]
    assert lrs.stdout.count("already finished") == 1

    def name(adapter, seed, lr):
        cfg = compose([f"adapter={adapter}", f"seed={seed}", f"trainer.lr={lr}", *overrides])
        return f"glue/sst2/tiny_bert/{adapter}/seed{seed}-{run_hash(cfg)}"

    found = sorted(str(p.parent.relative_to(tmp_path / "runs")) for p in (tmp_path / "runs").rglob("results.json"))
    assert found == sorted([name(a, s, 5e-3) for a in ("dora", "lora") for s in (0, 1)] + [name("lora", 0, 1e-2)])
    assert "accuracy =" in sweep.stdout
    results = {f: json.loads((tmp_path / "runs" / f / "results.json").read_text()) for f in found}
    assert {(r["adapter"], r["seed"], r["config"]["trainer"]["lr"]) for r in results.values()} == {
        ("dora", 0, 5e-3), ("dora", 1, 5e-3), ("lora", 0, 5e-3), ("lora", 1, 5e-3), ("lora", 0, 1e-2)}

    report = subprocess.run([sys.executable, "-m", "lrzoo.cli.report", str(tmp_path / "runs")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    # Seeds of one configuration aggregate; the two learning rates of lora are two rows, not one of 3 seeds.
    assert re.search(r"^\| dora \| [-0-9.]+ ± [0-9.]+ \(2\) \|", report.stdout, re.M)
    assert re.search(r"^\| lora \(trainer.lr=0.005\) \| [-0-9.]+ ± [0-9.]+ \(2\) \|", report.stdout, re.M)
    assert re.search(r"^\| lora \(trainer.lr=0.01\) \| [-0-9.]+ ± [0-9.]+ \(1\) \|", report.stdout, re.M)
    assert "(3) |" not in report.stdout


def test_train_tasks_interleave_a_union_and_eval_tasks_override(tmp_path):
    from lrzoo.train.recipe import _train_rows
    from lrzoo.tasks import get_task

    data = write_sst2(tmp_path / "data", train=6)
    cola = tmp_path / "data" / "glue" / "CoLA"
    cola.mkdir(parents=True)
    (cola / "train.tsv").write_text("".join(f"src\t{i % 2}\t\tsentence number {i}\n" for i in range(3)))
    sst2 = list(get_task("glue/sst2").load_split("train", data))
    colas = list(get_task("glue/cola").load_split("train", data))
    union = _train_rows(get_task("glue/sst2"), ["glue/sst2", "glue/cola"], data, None)
    assert union == [sst2[0], colas[0], sst2[1], colas[1], sst2[2], colas[2], *sst2[3:]]
    assert _train_rows(get_task("glue/sst2"), ["glue/sst2", "glue/cola"], data, 4) == union[:4]
    assert list(_train_rows(get_task("glue/sst2"), None, data, 2)) == sst2[:2]
    cfg = compose(["experiment=cs_cpu"])
    assert "commonsense/hellaswag" not in cfg.task.eval_tasks and len(cfg.task.train_tasks) == 4
