"""What a run trains and scores on: its name says exactly that (no preset's other tasks under an override), its
identity covers the bytes of its data files, a null data_dir finds the local copy offline, and undecodable data
names its file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lrzoo.runs import data as run_data
from lrzoo.runs.data import check_task_sets, data_plan, data_record
from lrzoo.cli.train import run_recipe
from lrzoo.runs.identity import config_hash, digest, hashed_config, run_hash
from lrzoo.errors import UserError
from lrzoo.tasks import get_task
from lrzoo.tasks import data_identity
from conftest import REPO
from recipe_helpers import EXPERIMENTS
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_sst2


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LRZOO_CACHE_DIR", str(tmp_path / "cache"))
    data_identity._memo.clear()


# ---- the run's name is what it trained and scored on (issue 26 item 1) ----

@pytest.mark.parametrize("task", ["commonsense/hellaswag", "commonsense/boolq"])
def test_a_preset_task_override_that_the_preset_does_not_honour_is_refused(task, tmp_path):
    cfg = compose(["experiment=cs_cpu", f"task={task}", f"output_root={tmp_path / 'runs'}"])
    assert cfg.task.name == task and cfg.task.train_tasks  # the preset's union is still there
    with pytest.raises(UserError, match=rf"task={task}, but task.train_tasks trains on .*task.train_tasks=null"):
        run_recipe(cfg, run_dir_of(cfg))
    assert list((tmp_path / "runs").rglob("*")) == []  # and no run folder named after it


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_preset_trains_and_scores_on_the_task_it_is_named_after(experiment):
    check_task_sets(compose([f"experiment={experiment}"]).task)


def test_a_task_without_data_is_an_error(tmp_path):
    data = write_sst2(tmp_path / "data")
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs", "task=glue/rte"))
    with pytest.raises(FileNotFoundError, match="RTE/train.tsv"):
        run_recipe(cfg, run_dir_of(cfg))


def test_task_metric_must_be_the_metric_the_task_is_scored_on():
    with pytest.raises(UserError, match="glue/mrpc is scored on accuracy"):
        check_task_sets({"name": "glue/mrpc", "metric": "f1"})
    for task in ("glue/mrpc", "glue/stsb", "glue/cola", "commonsense/all", "math/gsm8k"):
        check_task_sets(dict(compose([f"task={task}"]).task))


def test_results_say_what_the_run_trained_and_scored_on(tmp_path):
    data = write_sst2(tmp_path / "data")
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs"))
    results = run_recipe(cfg, run_dir_of(cfg))
    assert results["train_tasks"] == ["glue/sst2"] and results["eval_tasks"] == ["glue/sst2"]


# ---- the data's bytes are part of the run's identity (issue 25 item 5) ----

def test_an_edited_training_file_is_a_new_run_and_the_old_result_stays(tmp_path):
    data = write_sst2(tmp_path / "data")
    overrides = tiny_run_overrides(data, tmp_path / "runs")
    first_dir = run_dir_of(compose(overrides))
    first = run_recipe(compose(overrides), first_dir)
    train = data / "glue" / "SST-2" / "train.tsv"
    assert first["config"]["data"]["glue/SST-2/train.tsv"] == {
        "bytes": train.stat().st_size, "sha256": data_identity._sha256(str(train))}
    assert json.loads((Path(first_dir) / "data.json").read_text()) == first["config"]["data"]

    lines = train.read_text().splitlines()
    train.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")  # same size, other bytes
    second_dir = run_dir_of(compose(overrides))
    assert second_dir != first_dir  # not "already finished" with the stale result
    second = run_recipe(compose(overrides), second_dir)
    assert second["config"]["data"]["glue/SST-2/train.tsv"]["sha256"] != first["config"]["data"]["glue/SST-2/train.tsv"]["sha256"]
    assert json.loads((Path(first_dir) / "results.json").read_text())["config_hash"] == first["config_hash"]


def test_resuming_on_edited_data_is_refused_with_the_file_that_changed(tmp_path):
    data = write_sst2(tmp_path / "data")
    # a fixed run_name: the same directory whatever the data (the hashed name would give a new run)
    overrides = tiny_run_overrides(data, tmp_path / "runs", "run_name=fixed", "trainer.save_every=2")
    assert run_recipe(compose([*overrides, "trainer.stop_after=4"]), str(tmp_path / "runs" / "fixed")) is None
    train = data / "glue" / "SST-2" / "train.tsv"
    train.write_text(train.read_text() + "good good good\t1\n")
    with pytest.raises(UserError, match=r"started on other data: glue/SST-2/train\.tsv changed \(\d[\d,]* -> [\d,]+ bytes"):
        run_recipe(compose(overrides), str(tmp_path / "runs" / "fixed"))
    checkpoint = next((tmp_path / "runs" / "fixed" / "checkpoints").iterdir())
    elsewhere = tiny_run_overrides(data, tmp_path / "runs", "run_name=other", "trainer.save_every=2",
                                   f"resume={checkpoint}")
    with pytest.raises(UserError, match=r"that run was trained on other data: glue/SST-2/train\.tsv changed"):
        run_recipe(compose(elsewhere), str(tmp_path / "runs" / "other"))
    # starting over on the new data is allowed, and recorded
    assert run_recipe(compose([*overrides, "resume=never"]), str(tmp_path / "runs" / "fixed"))["steps"] == 8


def test_file_hashes_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    data = write_sst2(tmp_path / "data")
    train = data / "glue" / "SST-2" / "train.tsv"
    first = data_identity.fingerprint([train], data)
    assert json.loads(data_identity.cache_path().read_text())[os.path.realpath(train)]["sha256"] == \
        first["glue/SST-2/train.tsv"]["sha256"]
    data_identity._memo.clear()
    monkeypatch.setattr(data_identity, "_sha256", lambda path: pytest.fail("hashed again"))
    assert data_identity.fingerprint([train], data) == first


# ---- the tokenizer corpus is the file, not its spelling, and its bytes (model.tokenizer_corpus) ----

def write_wikitext(root: Path) -> Path:
    (root / "wikitext-2").mkdir(parents=True)
    for name in ("valid.txt", "test.txt"):
        (root / "wikitext-2" / name).write_text(f" = {name} =\n the old city by the river\n")
    return root


def pretrain(*extra: str) -> list[str]:
    return ["experiment=pretrain_cpu", "adapter=full_finetune", *extra]


def test_one_tokenizer_corpus_spelled_several_ways_is_one_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LRZOO_DATA_DIR", raising=False)
    data = write_wikitext(tmp_path / "data")
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    corpus = data / "wikitext-2" / "valid.txt"
    # the preset's corpus interpolates task.data_dir: each spelling of the folder was another run
    spellings = [pretrain("task.data_dir=data"), pretrain(f"task.data_dir={data}/"), pretrain("task.data_dir=link"),
                 pretrain("task.data_dir=./data/../data"),
                 pretrain(f"task.data_dir={data}", f"model.tokenizer_corpus={corpus}"),
                 pretrain("task.data_dir=data", "model.tokenizer_corpus=link/wikitext-2/./valid.txt")]
    monkeypatch.setenv("LRZOO_DATA_DIR", str(data))
    spellings.append(pretrain())  # ${oc.env:LRZOO_DATA_DIR,../shared/data}
    configs = [compose(overrides) for overrides in spellings]
    assert len({c.model.tokenizer_corpus for c in configs}) > 1
    assert len({run_hash(c) for c in configs}) == 1 and len({config_hash(c) for c in configs}) == 1
    assert hashed_config(configs[0])["model"]["tokenizer_corpus"] == "../shared/data/wikitext-2/valid.txt"
    # a corpus outside the data folder: its real path, however it is spelled
    (tmp_path / "corpus.txt").write_text("some other text\n")
    (tmp_path / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
    outside = [compose(pretrain("task.data_dir=data", f"model.tokenizer_corpus={spelt}"))
               for spelt in ("corpus.txt", tmp_path / "corpus.txt", "elsewhere/./corpus.txt")]
    assert len({run_hash(c) for c in outside}) == 1 and run_hash(outside[0]) != run_hash(configs[0])
    assert hashed_config(outside[0])["model"]["tokenizer_corpus"] == os.path.realpath(tmp_path / "corpus.txt")


@pytest.mark.parametrize("where", ["data/wikitext-2/other.txt", "corpus.txt"])
def test_an_edited_tokenizer_corpus_is_a_new_run(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    data = write_wikitext(tmp_path / "data")
    corpus = tmp_path / where
    corpus.write_text("the old city by the river\n")
    overrides = pretrain(f"task.data_dir={data}", f"model.tokenizer_corpus={where}")
    before, first = hashed_config(compose(overrides)), run_hash(compose(overrides))
    corpus.write_text("the new city by the sea\n")
    after = hashed_config(compose(overrides))
    assert run_hash(compose(overrides)) != first  # not "already finished" with the old tokenizer
    key = "wikitext-2/other.txt" if where.startswith("data/") else os.path.realpath(corpus)
    assert after["data"][key] == {"bytes": corpus.stat().st_size, "sha256": data_identity._sha256(str(corpus))}
    assert after["data"][key]["sha256"] != before["data"][key]["sha256"]
    # the record a run directory keeps (data.json: resuming on other data is refused) holds it too
    assert data_record(data_plan(compose(overrides).task), [where]) == after["data"]


def test_the_presets_corpus_hashes_as_the_runs_made_before_its_normalisation(tmp_path, monkeypatch):
    # the finished pre-training runs were started from a checkout beside shared/data, LRZOO_DATA_DIR unset
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    write_wikitext(tmp_path / "shared" / "data")
    monkeypatch.chdir(checkout)
    monkeypatch.delenv("LRZOO_DATA_DIR", raising=False)
    cfg = compose(pretrain())
    assert cfg.model.tokenizer_corpus == "../shared/data/wikitext-2/valid.txt"
    # what they hashed: the corpus as the preset resolves it, and no data file but the task's two (the corpus is
    # the task's training text)
    unnormalised = compose(pretrain("model.tokenizer_corpus=null"))
    expected = hashed_config(unnormalised)
    assert sorted(expected["data"]) == ["wikitext-2/test.txt", "wikitext-2/valid.txt"]
    expected["model"]["tokenizer_corpus"] = cfg.model.tokenizer_corpus
    assert hashed_config(cfg) == expected
    expected.pop("seed")
    assert run_hash(cfg) == digest(expected)[:8]


# ---- a null data_dir offline reads the local copy, or says where it looked (issue 26 item 2) ----

def test_offline_a_null_data_dir_reads_the_local_copy(tmp_path, monkeypatch):
    data = write_sst2(tmp_path / "elsewhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LRZOO_DATA_DIR", str(data))
    plan = data_plan({"name": "glue/sst2", "data_dir": None})
    assert plan.data_dir == str(data) and plan.found_by == "$LRZOO_DATA_DIR"
    cfg = compose([*tiny_run_overrides(data, tmp_path / "runs"), "task.data_dir=null"])
    assert hashed_config(cfg)["task"]["data_dir"] == os.path.realpath(data)  # the same data as naming it
    assert config_hash(cfg) == config_hash(compose(tiny_run_overrides(data, tmp_path / "runs")))
    assert run_recipe(cfg, run_dir_of(cfg))["steps"] == 8


def test_offline_with_no_local_copy_one_line_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    places = [("$LRZOO_DATA_DIR", tmp_path / "a"), ("../shared/data from the working directory", tmp_path / "b")]
    monkeypatch.setattr(run_data, "local_data_dirs", lambda: places)
    cfg = compose(["model=tiny_bert", f"output_root={tmp_path / 'runs'}"])
    with pytest.raises(UserError) as refused:
        run_recipe(cfg, run_dir_of(cfg))
    text = str(refused.value)
    assert "\n" not in text and "glue/SST-2/train.tsv" in text and "task.data_dir=" in text
    assert str(tmp_path / "a") in text and str(tmp_path / "b") in text


def test_the_places_a_null_data_dir_is_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("LRZOO_DATA_DIR", str(tmp_path / "mine"))
    monkeypatch.chdir(tmp_path)
    assert data_identity.local_data_dirs() == [
        ("$LRZOO_DATA_DIR", tmp_path / "mine"),
        ("../shared/data from the working directory", tmp_path.parent / "shared" / "data"),
        ("../shared/data from the checkout", REPO.parent / "shared" / "data")]


# ---- undecodable data names its file and line (issue 25 item 11) ----

@pytest.mark.parametrize("task, relative, text, line", [
    ("glue/sst2", "glue/SST-2/train.tsv", b"sentence\tlabel\ngood good\t1\nbad caf\xe9\t0\n", 3),
    ("math/gsm8k", "gsm8k/train.jsonl",
     b'{"question": "1+1?", "answer": "#### 2"}\n{"question": "caf\xe9", "answer": "#### 3"}\n', 2),
    ("commonsense/boolq", "commonsense/boolq/test.json", b'[\n{"instruction": "caf\xe9"}\n]', 2),
])
def test_non_utf8_data_names_the_file_and_line(task, relative, text, line, tmp_path):
    path = tmp_path / relative
    path.parent.mkdir(parents=True)
    path.write_bytes(text)
    split = "test" if relative.endswith("test.json") else "train"
    with pytest.raises(UserError, match=rf"{path} line {line} is not UTF-8 text \(byte 0xe9 at column \d+\)"):
        get_task(task).load_split(split, tmp_path)
