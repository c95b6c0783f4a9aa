"""lrzoo-report --plan on a pre-training plan (experiment=pretrain_cpu, issue 30 item 3): bootstrap intervals over
test blocks by the ratio estimator, perplexity (lower better) instead of neg_loss ×100, the difference to full-rank
AdamW, and the memory columns of the papers' tables; on hand-written run trees checked against numpy here."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from lrzoo.cli.report import main as report
from lrzoo.lab import intervals
from lrzoo.lab.plan import Composer, load_plan

TASK = "pretrain/wikitext2"
N_BLOCKS = 150
#: per method: mean loss per token on the test blocks (galore ties full-rank AdamW, sltrain is clearly worse)
LOSS = {"full_finetune": 4.00, "galore": 4.004, "sltrain": 4.60, "lora": 5.20}
#: weights_mb as results.json records it (lora's runs predate the record: none)
WEIGHTS = {"full_finetune": 11.07, "galore": 11.07, "sltrain": 6.512, "lora": None}
STATE = {"full_finetune": 22.14, "galore": 8.3, "sltrain": 13.0, "lora": 2.5}
TRAINABLE = {"full_finetune": 2_901_120, "galore": 2_901_120, "sltrain": 1_700_000, "lora": 600_000}
STEP_S = {"full_finetune": 0.60, "galore": 0.75, "sltrain": 0.70, "lora": 0.50}


def _blocks(method, seed):
    """Each test block's token count (unequal: the last block of a text is short) and summed NLL."""
    tokens = np.random.default_rng(5).integers(20, 256, N_BLOCKS)
    per_token = LOSS[method] + 0.01 * seed + np.random.default_rng(10 * seed + len(method)).normal(0, 0.5, N_BLOCKS)
    return tokens.tolist(), (tokens * per_token).tolist()


def _write(run, heldout_loss, weights=None):
    method = run.method
    tokens, nll = _blocks(method, run.seed)
    loss = sum(nll) / sum(tokens)
    run.run_dir.mkdir(parents=True)
    result = {
        "config_hash": run.config_hash, "config": run.config, "seed": run.seed, "adapter": method,
        "model": "scratch_llama", "task": TASK, "primary_metric": "neg_loss", "score": -loss,
        "selection_score": -heldout_loss,
        "metrics": {f"{TASK}/neg_loss": -loss, f"{TASK}/loss": loss, f"{TASK}/perplexity": math.exp(loss),
                    f"heldout/{TASK}/neg_loss": -heldout_loss},
        "trainable_params": TRAINABLE[method], "total_params": 2_901_120, "steps": 300,
        "wall_time_s": 300 * STEP_S[method] * (1 + 0.1 * run.seed), "train_tokens_per_s": 2048 / STEP_S[method],
        "optimizer_state_mb": STATE[method], "peak_memory_mb": 1500.0 + 100 * run.seed,
        "peak_memory_kind": "cpu_max_rss"}
    weights = WEIGHTS[method] if weights is None else weights
    if weights is not None:
        result["weights_mb"] = weights
    (run.run_dir / "results.json").write_text(json.dumps(result))
    sets = {TASK: {"task": TASK, "kind": "language_modeling", "primary_metric": "neg_loss", "references": tokens,
                   "predictions": nll},
            f"heldout/{TASK}": {"task": TASK, "kind": "language_modeling", "primary_metric": "neg_loss",
                                "references": tokens[:10], "predictions": nll[:10]}}
    (run.run_dir / "predictions.json").write_text(json.dumps({"sets": sets}))


def _tree(tmp_path, methods=("full_finetune", "galore", "sltrain", "lora")):
    """A finished two-seed sweep (the middle rate wins on the held-out slice, sltrain's top rate at its edge)."""
    centres = {"full_finetune": "1e-3", "galore": "1e-2", "sltrain": "3e-3", "lora": "1e-3"}
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({
        "experiment": "pretrain_cpu", "overrides": ["task.data_dir=/nowhere", f"output_root={tmp_path / 'runs'}"],
        "tasks": [TASK], "seeds": [0, 1], "grid": {"factor": 3, "points": 3},
        # lora listed before full_finetune: the table puts full-rank AdamW first all the same
        "methods": [f"{m} trainer.lr={centres[m]}" for m in reversed(methods)]}))
    plan = load_plan(path)
    composer = Composer(plan)
    for method in plan.methods:
        low, mid, high = plan.grid(method)
        held = {low: 5.0, mid: 4.5, high: 4.8} if method.name != "sltrain" else {low: 5.0, mid: 4.9, high: 4.7}
        chosen = min(held, key=held.get)
        for lr, loss in held.items():
            _write(composer.run(method, TASK, lr, 0), loss)
        _write(composer.run(method, TASK, chosen, 1), held[chosen])
    return plan, composer


def _table(text):
    table = text.split("### Pre-training comparison")[1].split("\n\n")[1]
    lines = [line.strip("| ").split(" | ") for line in table.splitlines()]
    return lines[0], {line[0]: dict(zip(lines[0], line)) for line in lines[2:]}, [line[0] for line in lines[2:]]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pretrain")
    plan, _ = _tree(tmp_path)
    return plan, tmp_path / "runs"


@pytest.fixture(scope="module")
def reported(tree):
    plan, runs = tree
    out = runs.parent / "report"
    report([str(runs), "--plan", plan.path, "--out", str(out)])
    text = (out / "results.md").read_text()
    with open(out / "results.csv", newline="") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    return text, rows, out


def _direct(method):
    """The perplexity, its 95% interval and the replicate perplexities, computed here block by block: each
    replicate draws the task's shared block indices, each seed's loss is its drawn blocks' NLL over their tokens."""
    indices = intervals.replicate_indices(N_BLOCKS, TASK)
    per_seed = []
    for seed in (0, 1):
        tokens, nll = (np.array(v, dtype=float) for v in _blocks(method, seed))
        per_seed.append([sum(nll[i] for i in idx) / sum(tokens[i] for i in idx) for idx in indices[:, :]])
    losses = [sum(_blocks(method, s)[1]) / sum(_blocks(method, s)[0]) for s in (0, 1)]
    replicate_losses = np.mean(per_seed, axis=0)
    return (math.exp(np.mean(losses)), np.exp(np.percentile(replicate_losses, [2.5, 97.5])), np.exp(replicate_losses),
            losses)


def test_neg_loss_replicates_are_the_ratio_of_resampled_nll_to_resampled_tokens():
    """Resampling test blocks: minus summed NLL over summed tokens, not the mean of per-block losses."""
    tokens, nll = _blocks("galore", 0)
    indices = intervals.replicate_indices(N_BLOCKS, TASK, replicates=50)
    got = intervals.metric_replicates("neg_loss", nll, tokens, indices)
    direct = [-sum(nll[i] for i in idx) / sum(tokens[i] for i in idx) for idx in indices]
    np.testing.assert_allclose(got, direct, rtol=1e-12)
    per_block_mean = [-np.mean([nll[i] / tokens[i] for i in idx]) for idx in indices]
    assert not np.allclose(got, per_block_mean, rtol=1e-4)   # the unequal blocks weigh by their tokens
    assert intervals.point_metric("neg_loss", nll, tokens) == pytest.approx(-sum(nll) / sum(tokens), rel=1e-12)
    assert np.isnan(intervals.metric_replicates("neg_loss", [0.0, 0.0], [0, 0], np.array([[0, 1]])))[0]


def test_the_table_shows_perplexity_with_its_interval_lowest_best(reported):
    text, csv_rows, out = reported
    header, rows, order = _table(text)
    assert header == ["method", "test perplexity [95% CI] ±seed sd", "Δ perplexity vs full-rank AdamW [95% CI]", "lr",
                      "trainable params", "weights MB", "optimizer state MB", "weights + state MB", "train s/step",
                      "tokens/s", "peak memory MB"]
    assert order == ["full_finetune", "lora", "sltrain", "galore"]   # full-rank first, then the plan's order
    assert "neg_loss" not in text and all(float(r["perplexity"]) > 1 for r in csv_rows.values())
    for method in LOSS:
        ppl, (low, high), _, losses = _direct(method)
        row = csv_rows[method]
        assert float(row["perplexity"]) == pytest.approx(ppl, abs=1e-6)
        assert float(row["ci_low"]) == pytest.approx(low, abs=1e-6) and float(row["ci_high"]) == pytest.approx(high, abs=1e-6)
        assert float(row["seed_std"]) == pytest.approx(np.std(np.exp(losses), ddof=1), abs=1e-6)
        shown = rows[method]["test perplexity [95% CI] ±seed sd"]
        assert shown.replace("**", "").startswith(f"{ppl:.2f} [{low:.1f}, {high:.1f}] ±")
    # the lowest perplexity is the best; galore's is within noise of it (bold, tied); sltrain and lora are worse
    best = min(LOSS, key=lambda m: float(csv_rows[m]["perplexity"]))
    assert csv_rows[best]["verdict"] == "best" and rows[best]["test perplexity [95% CI] ±seed sd"].startswith("**")
    assert {csv_rows["full_finetune"]["verdict"], csv_rows["galore"]["verdict"]} == {"best", "tied"}
    for method in ("sltrain", "lora"):
        assert csv_rows[method]["verdict"] == "worse"
        assert not rows[method]["test perplexity [95% CI] ±seed sd"].startswith("**")


def test_the_difference_to_full_rank_adamw_is_the_paired_bootstrap_of_perplexities(reported):
    text, csv_rows, _ = reported
    _, rows, _ = _table(text)
    full, _, full_reps, _ = _direct("full_finetune")
    assert rows["full_finetune"]["Δ perplexity vs full-rank AdamW [95% CI]"] == "reference"
    for method, verdict in (("sltrain", "higher"), ("lora", "higher"), ("galore", "tied")):
        ppl, _, reps, _ = _direct(method)
        low, high = np.percentile(reps - full_reps, [2.5, 97.5])
        row = csv_rows[method]
        assert float(row["diff_to_reference"]) == pytest.approx(ppl - full, abs=1e-6)
        assert float(row["diff_low"]) == pytest.approx(low, abs=1e-6)
        assert float(row["diff_high"]) == pytest.approx(high, abs=1e-6)
        assert row["reference_verdict"] == verdict and row["reference"] == "full_finetune"
        assert rows[method]["Δ perplexity vs full-rank AdamW [95% CI]"].startswith(
            f"{ppl - full:+.2f} [{low:+.1f}, {high:+.1f}] {verdict}")


def test_memory_time_and_lr_columns(reported):
    text, csv_rows, out = reported
    _, rows, _ = _table(text)
    for method in LOSS:
        row, csv_row = rows[method], csv_rows[method]
        assert row["trainable params"] == f"{TRAINABLE[method]:,}"
        assert row["optimizer state MB"] == f"{STATE[method]:.2f}"
        assert float(csv_row["train_s_per_step"]) == pytest.approx(STEP_S[method] * 1.05)   # mean of the 2 seeds
        assert float(csv_row["train_tokens_per_s"]) == pytest.approx(2048 / STEP_S[method])
        assert row["peak memory MB"] == "1,550"
        if WEIGHTS[method] is None:   # runs made before weights_mb was recorded
            assert row["weights MB"] == row["weights + state MB"] == "—"
            assert csv_row["weights_mb"] == csv_row["weights_plus_state_mb"] == ""
        else:
            assert row["weights MB"] == f"{WEIGHTS[method]:.2f}"
            assert row["weights + state MB"] == f"{WEIGHTS[method] + STATE[method]:.2f}"
            assert float(csv_row["weights_plus_state_mb"]) == pytest.approx(WEIGHTS[method] + STATE[method])
    # the chosen lr (the seeds'), flagged at the grid's exhausted edge; the held-out perplexity per rate tried
    assert rows["full_finetune"]["lr"] == "1e-3" and rows["sltrain"]["lr"] == "9e-3 *lr edge*"
    assert csv_rows["sltrain"]["lr_edge"] == "lr edge" and csv_rows["galore"]["chosen_lr"] == "0.01"
    grids = text.split("### Learning rate chosen on the held-out slice")[1]
    assert (f"| sltrain | 1e-3, 3e-3, 9e-3 | 9e-3 (1e-3: {math.exp(5.0):.1f} / 3e-3: {math.exp(4.9):.1f} / "
            f"**9e-3: {math.exp(4.7):.1f}**) |") in grids
    assert "2/2" not in text and "4/4 rows complete" in text and "Missing cells" not in text
    assert (out / "results.png").stat().st_size > 0 and not (out / "comparison.csv").exists()


def test_runs_of_one_row_that_disagree_on_their_weights_fail_loudly(tmp_path, capsys):
    plan, composer = _tree(tmp_path, methods=("full_finetune", "galore"))
    galore = next(m for m in plan.methods if m.name == "galore")
    odd = composer.run(galore, TASK, plan.grid(galore)[0], 0)   # a grid point, not even a seed's run
    data = json.loads((odd.run_dir / "results.json").read_text())
    data["weights_mb"] = 9.0
    (odd.run_dir / "results.json").write_text(json.dumps(data))
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exit_info:
        report([str(tmp_path / "runs"), "--plan", plan.path, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "galore: its runs record different weights_mb" in err and "9.0" in err
    assert not (out / "results.md").exists()


def test_an_unfinished_pretraining_row_says_what_is_missing(tmp_path):
    plan, composer = _tree(tmp_path, methods=("full_finetune", "galore"))
    galore = next(m for m in plan.methods if m.name == "galore")
    seed1 = composer.run(galore, TASK, plan.grid(galore)[1], 1)
    for name in ("results.json", "predictions.json"):
        (seed1.run_dir / name).unlink()
    out = tmp_path / "report"
    report([str(tmp_path / "runs"), "--plan", plan.path, "--out", str(out)])
    text = (out / "results.md").read_text()
    _, rows, _ = _table(text)
    assert rows["galore"]["test perplexity [95% CI] ±seed sd"] == "— (missing: 1/2 seeds done)"
    assert rows["galore"]["Δ perplexity vs full-rank AdamW [95% CI]"] == "—"
    assert rows["full_finetune"]["test perplexity [95% CI] ±seed sd"].startswith("**")   # alone: the best
    assert "- galore × pretrain/wikitext2: 1/2 seeds done" in text and "1/2 rows complete" in text


def test_a_plan_mixing_language_modelling_with_scored_tasks_is_refused(tmp_path, capsys):
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({
        "overrides": ["model=tiny_llama", "task.data_dir=/nowhere", f"output_root={tmp_path / 'runs'}"],
        "tasks": [TASK, "glue/sst2"], "seeds": [0], "grid": {"factor": 3, "points": 1},
        "methods": ["lora trainer.lr=1e-3"]}))
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit):
        report([str(tmp_path / "runs"), "--plan", str(path), "--out", str(tmp_path / "report")])
    assert "mixes language-modelling tasks (pretrain/wikitext2) with scored ones (glue/sst2)" in capsys.readouterr().err


def test_the_plain_report_shows_a_pretraining_runs_perplexity_not_neg_loss_times_100(tree, tmp_path):
    _, runs = tree
    out = tmp_path / "plain"
    report([str(runs), "--out", str(out)])
    with open(out / "results.csv", newline="") as handle:
        table = [r for r in csv.DictReader(handle)]
    for method in LOSS:   # a row per lr; the chosen lr's has both seeds
        perplexities = [math.exp(sum(_blocks(method, seed)[1]) / sum(_blocks(method, seed)[0])) for seed in (0, 1)]
        row = next(r for r in table if r["adapter"] == method and r["n_seeds"] == "2")
        assert row["metric"] == "perplexity"
        assert float(row["mean"]) == pytest.approx(np.mean(perplexities))
        assert float(row["std"]) == pytest.approx(np.std(perplexities, ddof=1))
    text = (out / "results.md").read_text()
    assert "pretrain/wikitext2 (perplexity)" in text and "neg_loss" not in text.split("\n\n")[1]
    assert "(not ×100; lower is better)" in text
