"""``make results-docs`` for the pre-training comparison (issue 30): docs/results.md's ``pretrain-cpu`` block is the
perplexity report, and each method page's bullet gives test perplexity and the paired difference to full-rank
AdamW, never ``neg_loss`` ×100; on the hand-written run trees of test_perplexity_report.py."""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

from test_docs import heading_anchors
from test_perplexity_report import TASK, _tree

from lrzoo.lab.plan import format_lr, load_plan
from lrzoo.lab.results_docs import (PAGE_BEGIN, PAGE_END, PERPLEXITY_PLOT, SECTIONS, method_bullet, method_pages,
                                    refresh, results_block)
from lrzoo.lab.tuned import write_report

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = next(s for s in SECTIONS if s.marker == "pretrain-cpu")
GLUE = next(s for s in SECTIONS if s.marker == "tuned-glue")
PAGES = {"galore": "optimizers", "sltrain": "adapters", "lora": "adapters", "apollo": "optimizers"}
OTHER = f"- **{GLUE.label}** (setting): SST-2 80.0 [78.0, 82.0] at lr 1e-3, best."


def _docs(tmp_path, pretrain_bullet=""):
    """A docs/ folder: results.md with the pre-training markers amid prose, and method pages whose blocks hold
    another comparison's bullet (apollo is not in the synthetic plan)."""
    docs = tmp_path / "docs"
    (docs / "results.md").parent.mkdir(parents=True)
    (docs / "results.md").write_text("# Results\n\nProse.\n\n<!-- pretrain-cpu:begin -->\nold\n<!-- pretrain-cpu:end -->"
                                     "\n\nMore prose.\n")
    (docs / "adapters").mkdir()
    (docs / "adapters" / "pissa.md").write_text(f"# pissa\n\n## Measured\n{PAGE_BEGIN}\n{PAGE_END}\n")   # nothing yet
    for method, folder in PAGES.items():
        (docs / folder).mkdir(exist_ok=True)
        bullets = "\n".join(b for b in (OTHER, pretrain_bullet) if b)
        (docs / folder / f"{method}.md").write_text(f"# {method}\n\n## Measured\n{PAGE_BEGIN}\n{bullets}\n{PAGE_END}\n"
                                                    "- by hand\n")
    return docs


def _expected(row):
    """A pre-training bullet's text, from the report's results.csv row, rounded as the report's table is."""
    text = (f"test perplexity {float(row['perplexity']):.2f} [{float(row['ci_low']):.1f}, {float(row['ci_high']):.1f}]"
            f" at lr {format_lr(float(row['chosen_lr']))}" + (f" *{row['lr_edge']}*" if row["lr_edge"] else ""))
    if row["reference_verdict"] == "reference":
        return text + "."
    return (text + f", Δ vs full-rank AdamW {float(row['diff_to_reference']):+.2f} [{float(row['diff_low']):+.1f}, "
            f"{float(row['diff_high']):+.1f}] ({row['reference_verdict']}).")


def test_results_docs_shows_the_pretraining_comparison_as_perplexity_and_is_idempotent(tmp_path):
    plan, _ = _tree(tmp_path)
    # the GLUE comparison has no runs here: its bullets stay, the pre-training bullet follows them
    sections = (dataclasses.replace(GLUE, runs="no-runs-yet"), dataclasses.replace(PRETRAIN, runs="runs",
                                                                                  plan="plan.yaml"))
    docs = _docs(tmp_path)
    changed = refresh(tmp_path, docs, sections)
    assert set(changed) == {docs / "results.md", *(docs / PAGES[m] / f"{m}.md" for m in PAGES if m != "apollo")}
    runs = tmp_path / "runs"

    results = (docs / "results.md").read_text()
    block = results.split("<!-- pretrain-cpu:begin -->\n")[1].split("\n<!-- pretrain-cpu:end -->")[0]
    assert results.startswith("# Results\n\nProse.\n\n") and results.endswith("end -->\n\nMore prose.\n")
    assert block == results_block((runs / "results.md").read_text(), PRETRAIN.image, PERPLEXITY_PLOT)
    assert block.startswith("#### Pre-training comparison on pretrain/wikitext2") and "\n### " not in block
    assert "#### Learning rate chosen on the held-out slice" in block
    assert block.endswith(f"![test perplexity (95% interval, lower is better) against memory held (MB)]"
                          f"({PRETRAIN.image})")
    assert "dev score" not in block and "Missing cells" not in block
    assert (docs / PRETRAIN.image).read_bytes() == (runs / "results.png").read_bytes()

    with open(runs / "results.csv", newline="") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert rows["galore"]["reference_verdict"] == "tied" and rows["sltrain"]["reference_verdict"] == "higher"
    assert rows["sltrain"]["lr_edge"]   # the edge flag reaches the bullet too
    head = f"- **Pre-training from scratch** ({PRETRAIN.setting}): "
    for method in ("galore", "sltrain", "lora"):
        page = (docs / PAGES[method] / f"{method}.md").read_text()
        assert page == (f"# {method}\n\n## Measured\n{PAGE_BEGIN}\n{OTHER}\n{head}{_expected(rows[method])}\n"
                        f"{PAGE_END}\n- by hand\n")
        # neg_loss ×100 (about -400 to -520 here) appears nowhere
        assert not re.search(r"-[45]\d\d\.\d", page.split(PAGE_BEGIN)[1])
    # a method outside the plan gets no pre-training bullet; its other comparison's bullet stays, an empty block
    # stays the marker pair alone
    assert (docs / "adapters" / "pissa.md").read_text() == f"# pissa\n\n## Measured\n{PAGE_BEGIN}\n{PAGE_END}\n"
    assert (docs / "optimizers" / "apollo.md").read_text().endswith(f"{PAGE_BEGIN}\n{OTHER}\n{PAGE_END}\n- by hand\n")
    # full-rank AdamW (no page) is the reference: its perplexity, no difference to itself
    report = write_report(runs, load_plan(tmp_path / "plan.yaml"), tmp_path / "again")
    assert method_bullet(report, PRETRAIN, "full_finetune") == head + _expected(rows["full_finetune"])
    assert method_bullet(report, PRETRAIN, "apollo") is None

    before = {p: p.read_bytes() for p in docs.rglob("*") if p.is_file()}
    assert refresh(tmp_path, docs, sections) == []   # idempotent
    assert {p: p.read_bytes() for p in docs.rglob("*") if p.is_file()} == before


def test_an_unfinished_pretraining_row_reads_not_finished_and_its_difference_waits_for_the_reference(tmp_path):
    plan, composer = _tree(tmp_path, methods=("full_finetune", "galore", "sltrain"))
    for name, seed in (("galore", 1), ("full_finetune", 1)):   # a seed of each not finished
        method = next(m for m in plan.methods if m.name == name)
        run = composer.run(method, TASK, plan.grid(method)[1], seed)
        for file in ("results.json", "predictions.json"):
            (run.run_dir / file).unlink()
    report = write_report(tmp_path / "runs", plan, tmp_path / "report")
    head = f"- **Pre-training from scratch** ({PRETRAIN.setting}): "
    assert method_bullet(report, PRETRAIN, "galore") == head + "not finished yet (the sweep resumes where it stopped)."
    sltrain = method_bullet(report, PRETRAIN, "sltrain")
    assert sltrain.startswith(head + "test perplexity ")
    assert sltrain.endswith(", Δ vs full-rank AdamW not yet (full_finetune not finished).")


def test_a_pretraining_section_without_runs_keeps_its_blocks(tmp_path):
    """Another comparison is reported; the pre-training one has no run directory: its results.md block and its
    bullets on the method pages stay as they are."""
    _tree(tmp_path, methods=("full_finetune", "galore"))
    kept = f"- **{PRETRAIN.label}** ({PRETRAIN.setting}): test perplexity 1.00 [0.9, 1.1] at lr 1e-2."
    docs = _docs(tmp_path, pretrain_bullet=kept)
    (docs / "results.md").write_text((docs / "results.md").read_text() + "\n<!-- other:begin -->\n<!-- other:end -->\n")
    other = dataclasses.replace(PRETRAIN, marker="other", runs="runs", plan="plan.yaml", label="Other",
                                setting="setting")
    refresh(tmp_path, docs, (other, dataclasses.replace(PRETRAIN, runs="runs/pretrain-cpu")))
    assert "<!-- pretrain-cpu:begin -->\nold\n<!-- pretrain-cpu:end -->" in (docs / "results.md").read_text()
    galore = (docs / "optimizers" / "galore.md").read_text()
    assert galore.startswith(f"# galore\n\n## Measured\n{PAGE_BEGIN}\n- **Other** (setting): test perplexity ")
    assert galore.endswith(f".\n{kept}\n{PAGE_END}\n- by hand\n")


def test_the_real_docs_have_every_sections_markers_and_a_block_on_each_pretraining_method_page():
    """docs/results.md holds each section's marker pair once and the heading its setting links to; every method of
    the pre-training plan but full-rank AdamW has a page with a generated block (else its bullet has nowhere to go)."""
    results = (REPO / "docs" / "results.md").read_text()
    for section in SECTIONS:
        for end in ("begin", "end"):
            assert results.count(f"<!-- {section.marker}:{end} -->") == 1, section.marker
        anchor = re.search(r"\(\.\./results\.md#([^)]+)\)", section.setting).group(1)
        assert anchor in heading_anchors(results), section.marker
    methods = {m.name for m in load_plan(REPO / PRETRAIN.plan).methods}
    assert methods - {"full_finetune"} <= set(method_pages(REPO / "docs"))
