"""Pre-training from scratch (experiment=pretrain_cpu): the WikiText-2 task, packed language-model blocks, perplexity
scoring, the corpus tokenizer, the per-row settings, and tiny end-to-end runs (SLTrain resumed exactly)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import lrzoo
from conftest import SHARED_DATA, tiny_llama
from lrzoo.train.recipe import run_recipe
from lrzoo.configs import config_dir
from lrzoo.tasks import get_task
from lrzoo.train.lm import block_nll, lm_blocks
from lrzoo.train.schema import check_keys
from recipe_helpers import compose, run_dir_of


WORDS = "the a of lobster sea shell claw river north south king queen war city built old new".split()


def write_wikitext(root: Path, train_lines: int = 60, test_lines: int = 12, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder = root / "wikitext-2"
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("valid.txt", train_lines), ("test.txt", test_lines)):
        lines = []
        for i in range(count):
            lines += ["", f" = Heading {i} = " if i % 10 == 0 else " " + " ".join(rng.choice(WORDS) for _ in range(12))]
        (folder / name).write_text("\n".join(lines) + "\n")
    return root


class _WordTokenizer:
    """Whitespace words -> fixed ids; eos 1: a reference that needs no trained vocabulary."""

    eos_token_id = 1

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[2 + len(word) for word in text.split()] for text in texts]}


def test_blocks_pack_rows_with_the_separator_in_order():
    rows = [{"text": "a bb ccc"}, {"text": "dddd"}, {"text": "ee f"}]
    blocks = lm_blocks(rows, _WordTokenizer(), 4)
    stream = [3, 4, 5, 1, 6, 1, 4, 3, 1]
    assert [b["input_ids"] for b in blocks] == [stream[0:4], stream[4:8]]  # the 1-token tail predicts nothing
    assert all(b["labels"] == b["input_ids"] for b in blocks)


def test_block_nll_sums_to_the_models_mean_loss():
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[2, 6:] = -100  # a padded, shorter last block
    mask[2, 6:] = 0
    sums, counts = block_nll(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert counts == [8, 8, 5]
    for row in range(3):
        n = 9 if row < 2 else 6
        expected = model(input_ids=ids[row:row + 1, :n], labels=ids[row:row + 1, :n]).loss.item() * (n - 1)
        assert math.isclose(sums[row], expected, rel_tol=1e-5)


def test_the_task_reads_lines_and_scores_perplexity(tmp_path):
    data = write_wikitext(tmp_path)
    task = get_task("pretrain/wikitext2")
    train = task.load_split("train", data)
    assert len(train) == 60 and train[0]["text"] == "= Heading 0 =" and train[1]["text"].startswith("the ") is not None
    assert len(task.load_split("test", data)) == 12
    with pytest.raises(ValueError, match="no split 'validation'"):
        task.load_split("validation", data)
    metrics = task.compute_metrics([10.0, 2.0], [4, 2])
    assert metrics["loss"] == 2.0 and metrics["neg_loss"] == -2.0 and math.isclose(metrics["perplexity"], math.exp(2.0))


def test_corpus_tokenizer_is_trained_on_the_file_and_cached(tmp_path, monkeypatch):
    from lrzoo.models import END_OF_TEXT, corpus_tokenizer

    monkeypatch.setenv("LRZOO_CACHE", str(tmp_path / "cache"))
    corpus = write_wikitext(tmp_path) / "wikitext-2" / "valid.txt"
    tokenizer = corpus_tokenizer(str(corpus), vocab_size=300)
    assert len(tokenizer) <= 300 and tokenizer.eos_token == tokenizer.pad_token == END_OF_TEXT
    assert "Ġlobster" in tokenizer.get_vocab()  # a corpus word became one token
    text = "the old lobster built a city"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    cached = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert len(cached) == 1 and corpus_tokenizer(str(corpus), vocab_size=300).get_vocab() == tokenizer.get_vocab()
    with pytest.raises(ValueError, match="tokenizer_corpus"):
        corpus_tokenizer(None)


ROWS = sorted(p.stem for p in (config_dir("recipes") / "rows" / "pretrain_cpu").glob("*.yaml"))
ADAPTER_OPTIONS = {p.stem for p in config_dir("adapters").glob("*.yaml")} | {
    p.stem for p in (config_dir("recipes") / "adapter").glob("*.yaml")}


@pytest.mark.parametrize("row", ROWS)
def test_every_row_composes_at_its_papers_rank_ratio(row):
    if row not in ADAPTER_OPTIONS:
        pytest.skip(f"adapter={row} has no recipes/adapter file yet")
    cfg = OmegaConf.to_container(compose(["experiment=pretrain_cpu", f"adapter={row}"]), resolve=True)
    check_keys(cfg)
    adapter, width = cfg["adapter"], 128  # scratch_llama's hidden size
    assert cfg["model"]["source"] == "scratch_llama" and cfg["task"]["name"] == "pretrain/wikitext2"
    rank = adapter.get("rank", adapter.get("r"))
    if row == "apollo_mini":
        assert rank == 1 and adapter["scale"] == width / 4
    elif row != "full_finetune":
        assert rank == width // 4, row
    if "alpha" in adapter:  # SLTrain's and (Re)LoRA's s = alpha / r = 0.25, as their 60M runs (32 / 128)
        assert adapter["alpha"] / adapter["r"] == 0.25
    other = OmegaConf.to_container(compose(["experiment=glue_cpu", f"adapter={row}"]), resolve=True)
    assert other["trainer"]["lr"] == 1e-3 and other["adapter"].get("rank") != 32  # rows only touch pretrain_cpu


def _tiny(data: Path, out: Path, adapter: str, *extra: str) -> list[str]:
    return ["experiment=pretrain_cpu", f"adapter={adapter}", f"task.data_dir={data}", f"output_root={out}",
            "task.heldout_size=6", "trainer.max_steps=4", "trainer.batch_size=4", "trainer.max_length=32",
            "trainer.save_every=2", "trainer.log_every=2", "trainer.eval_batch_size=8", "logger=csv",
            "+model.config_overrides.hidden_size=32", "+model.config_overrides.intermediate_size=48",
            "+model.config_overrides.num_hidden_layers=2", "+model.config_overrides.vocab_size=300", *extra]


@pytest.mark.parametrize("adapter, extra", [("sltrain", ["adapter.r=8", "adapter.alpha=2", "adapter.density=0.1"]),
                                            ("galore", ["adapter.rank=8", "adapter.update_proj_gap=2"])])
def test_a_tiny_pretraining_run_resumes_exactly(tmp_path, monkeypatch, adapter, extra):
    monkeypatch.setenv("LRZOO_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data")
    whole = compose(_tiny(data, tmp_path / "a", adapter, *extra))
    results = run_recipe(whole, run_dir_of(whole))
    assert math.isfinite(results["metrics"]["pretrain/wikitext2/perplexity"])
    assert results["metrics"]["score"] == results["metrics"]["pretrain/wikitext2/neg_loss"]
    assert "selection_score" in results and results["trainable_params"] == results["total_params"]

    parts = compose(_tiny(data, tmp_path / "b", adapter, *extra, "trainer.stop_after=2"))
    assert run_recipe(parts, run_dir_of(parts)) is None  # stopped at step 2, a checkpoint left
    resumed = run_recipe(compose(_tiny(data, tmp_path / "b", adapter, *extra)), run_dir_of(parts))
    assert resumed["metrics"] == results["metrics"]  # the same support, weights and optimizer state

    saved = Path(run_dir_of(whole)) / "adapter"
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # a stock model: SLTrain's export is dense
    if adapter == "sltrain":
        recorded = json.loads((saved / "sltrain.json").read_text())
        assert recorded["r"] == 8 and recorded["memory_bytes"]["total"] < recorded["memory_bytes"]["dense"]


def test_sltrain_options_are_checked(tmp_path, monkeypatch):
    from lrzoo.errors import UserError

    monkeypatch.setenv("LRZOO_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data")
    cfg = compose(_tiny(data, tmp_path / "a", "sltrain", "+adapter.rank=8"))
    with pytest.raises(UserError, match="adapter.rank"):
        run_recipe(cfg, run_dir_of(cfg))


@pytest.mark.slow
@pytest.mark.shared_data
def test_the_real_corpus_and_model_sizes(tmp_path, monkeypatch):
    from lrzoo.models import load_model

    monkeypatch.setenv("LRZOO_CACHE", str(tmp_path / "cache"))
    model, tokenizer = load_model("scratch_llama", "language_modeling",
                                  tokenizer_corpus=str(SHARED_DATA / "wikitext-2" / "valid.txt"))
    assert len(tokenizer) == 8192
    assert sum(p.numel() for p in model.parameters()) == 2_901_120
    rows = get_task("pretrain/wikitext2").load_split("train", SHARED_DATA)
    assert len(rows) == 2461 and len(lm_blocks(list(rows), tokenizer, 256)) > 1000


def test_the_sweep_plan_covers_every_row_with_two_seeds():
    from lrzoo.lab.plan import load_plan

    plan = load_plan(config_dir("recipes") / "sweeps" / "pretrain_cpu.yaml")
    assert plan.experiment == "pretrain_cpu" and len(plan.seeds) >= 2 and plan.points >= 3
    assert {m.name for m in plan.methods} == set(ROWS)
