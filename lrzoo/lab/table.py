"""The plain report of ``lrzoo-report DIR`` (:mod:`lrzoo.cli.report`): the runs under a folder as a table.

writes ``results.md`` (adapter × task, mean ± std over seeds of the primary metric ×100, or of the
test perplexity of a pre-training run, whose primary metric is ``neg_loss``; the average over tasks,
trainable parameters, peak memory and training time), ``results.csv`` (one row per
adapter, model and task) and ``results.png`` (score against trainable parameters, log scale).
A run scored on several eval sets (``commonsense/all``) gives one column per set.

Runs are grouped by configuration, not by directory name: the seeds of one configuration (its
``results.json`` ``config`` without ``seed``) are aggregated, and when an adapter was run with
several configurations on a task (a sweep over ``trainer.lr``), each is a row of its own, labelled by
the keys that differ, e.g. ``lora (trainer.lr=0.01)``. Results written before ``config`` was recorded
are grouped by model, adapter and task alone. A held-out training slice (eval set ``heldout/<task>``) is
never a column.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

from ..runs.files import HELDOUT_PREFIX, RESULTS_FILE, read_results

#: what a report writes in its output folder (the plain one and the tuned one alike)
REPORT_MD, REPORT_CSV, REPORT_PNG = "results.md", "results.csv", "results.png"
CSV_FIELDS = ("model", "adapter", "variant", "task", "metric", "n_seeds", "mean", "std", "trainable_params",
              "peak_memory_mb", "wall_time_s")
#: differing keys named in a variant's label before it is cut short (with its digest)
LABEL_KEYS = 3
#: a pre-training run's primary metric (minus the loss per token, higher better, as every lrzoo score) and what the
#: table shows for it instead: perplexity, exp(loss), as is (not ×100; lower is better)
NEG_LOSS, PERPLEXITY = "neg_loss", "perplexity"


def collect(root: Path, select: str = "final") -> list[dict[str, Any]]:
    """One row per ``results.json`` under ``root`` and eval set; ``select="best"`` takes the best evaluation."""
    rows = []
    for path in sorted(root.rglob(RESULTS_FILE)):
        result = read_results(str(path.parent), move_damaged=False)
        if result is None:  # damaged: the run is unfinished until lrzoo-train moves the file aside and redoes it
            print(f"[lrzoo-report] skipping {path}: not a JSON object (damaged); run the same lrzoo-train command "
                  "again to finish that run", file=sys.stderr)
            continue
        chosen = result.get("best", {}) if select == "best" else {"score": result.get("score"),
                                                                   "metrics": result.get("metrics", {})}
        if chosen.get("score") is None:
            continue
        # "run": a run scored on several eval sets gives a row per set, so runs are counted by their folder
        common = {"run": str(path.parent), "model": result.get("model", "?"), "adapter": result["adapter"],
                  "seed": result.get("seed"),
                  "command": _command(path.parent), "config": _flat_config(result.get("config")),
                  "trainable_params": result["trainable_params"], "peak_memory_mb": result.get("peak_memory_mb"),
                  "wall_time_s": result.get("wall_time_s"), "tuned": "selection_score" in result}
        metric = result["primary_metric"]
        shown, whole = (PERPLEXITY, math.exp(-chosen["score"]) if -chosen["score"] < 700 else math.inf) \
            if metric == NEG_LOSS else (metric, 100 * chosen["score"])
        # several eval sets: metrics are "<eval task>/<metric>"; report each set, not their mean (nor the
        # held-out training slice a tuned sweep chooses its learning rate on)
        per_set = {key[:-len(shown) - 1]: value if shown == PERPLEXITY else 100 * value
                   for key, value in (chosen.get("metrics") or {}).items()
                   if key.endswith("/" + shown) and not key.startswith(HELDOUT_PREFIX)}
        for task, score in (per_set or {result["task"]: whole}).items():
            rows.append({**common, "task": task, "metric": shown, "score": score})
    return rows


def _flat_config(config: Optional[dict[str, Any]]) -> Optional[dict[str, str]]:
    """``results.json``'s ``config`` as ``{"dotted.key": "json value"}`` without the seed (``None``: not recorded)."""
    if not isinstance(config, dict):
        return None
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = json.dumps(node, sort_keys=True)

    walk({k: v for k, v in config.items() if k != "seed"}, "")
    return flat


def label_variants(rows: Sequence[dict[str, Any]]) -> None:
    """Set each row's ``variant``: the keys that tell an adapter's configurations apart (``trainer.lr=0.01``).

    Only keys that differ between configurations run on the *same* task count, and the label is then
    given to every configuration of that model and adapter, so a learning-rate sweep lines up across
    tasks while per-task hyperparameters (one configuration per task, as in the papers' presets) keep
    one unlabelled row. Results without a recorded ``config`` are labelled only when they share a task
    with other configurations.
    """
    per_task: dict[tuple[str, str], dict[str, dict[Optional[str], Optional[dict[str, str]]]]] = defaultdict(
        lambda: defaultdict(dict))
    for row in rows:
        config = row.get("config")
        row["_variant_key"] = json.dumps(config, sort_keys=True) if config is not None else None
        per_task[(row["model"], row["adapter"])][row["task"]][row["_variant_key"]] = config
    labels: dict[tuple[str, str, str, Optional[str]], str] = {}
    for (model, adapter), tasks in per_task.items():
        differing: set[str] = set()
        for configs in tasks.values():
            recorded = [config for config in configs.values() if config is not None]
            keys = {k for config in recorded for k in config}
            differing |= {k for k in keys if len({config.get(k, "<unset>") for config in recorded}) > 1}
        for task, configs in tasks.items():
            for key, config in configs.items():
                if config is None:
                    label = "config not recorded" if len(configs) > 1 else ""
                else:
                    parts = [f"{k}={json.loads(config[k]) if k in config else '<unset>'}" for k in sorted(differing)]
                    label = ", ".join(parts[:LABEL_KEYS])
                    if len(parts) > LABEL_KEYS:
                        label += f", +{len(parts) - LABEL_KEYS} more #{hashlib.sha256(key.encode()).hexdigest()[:6]}"
                labels[(model, adapter, task, key)] = label
    for row in rows:
        row["variant"] = labels[(row["model"], row["adapter"], row["task"], row.pop("_variant_key"))]


def display_name(row: dict[str, Any]) -> str:
    """``adapter``, or ``adapter (variant)`` when it was run with several configurations."""
    return f"{row['adapter']} ({row['variant']})" if row.get("variant") else row["adapter"]


def _command(run_dir: Path) -> Optional[str]:
    """The ``lrzoo-train`` overrides of a run (Hydra's ``.hydra/overrides.yaml``), minus seed and task."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    import yaml

    kept = [o for o in yaml.safe_load(path.read_text()) or [] if not o.startswith(("seed=", "task="))]
    return "lrzoo-train " + " ".join(kept)


def commands(rows: Sequence[dict[str, Any]]) -> str:
    """How each (model, adapter) was run: its command(s), with the seeds and tasks they covered."""
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("command"):
            runs[(row["model"], row["adapter"], row["command"])].append(row)
    lines = []
    for (model, adapter, command), mine in sorted(runs.items()):
        seeds = ",".join(str(s) for s in sorted({r["seed"] for r in mine}))
        tasks = ",".join(sorted({r["task"] for r in mine}))
        lines.append(f"- {model} / {adapter}: `{command} seed={seeds}` on {tasks}")
    return ("Commands:\n\n" + "\n".join(lines) + "\n") if lines else ""


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds per (model, adapter, configuration, task)."""
    if any("variant" not in row for row in rows):
        label_variants(rows)
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["adapter"], row["variant"], row["task"])].append(row)
    table = []
    for (model, adapter, variant, task), runs in sorted(groups.items()):
        scores = [run["score"] for run in runs]
        memory = [run["peak_memory_mb"] for run in runs if run.get("peak_memory_mb") is not None]
        walls = [run["wall_time_s"] for run in runs if run.get("wall_time_s") is not None]
        table.append({"model": model, "adapter": adapter, "variant": variant, "task": task, "metric": runs[0]["metric"],
                      "n_seeds": len(scores), "mean": statistics.fmean(scores),
                      "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                      "trainable_params": runs[0]["trainable_params"],
                      "peak_memory_mb": max(memory) if memory else None,
                      "wall_time_s": statistics.fmean(walls) if walls else None})
    return table


def averages(table: Sequence[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """Mean over tasks of the per-task means, for each (model, adapter or ``adapter (variant)``) scored on
    every task of its model."""
    tasks_of: dict[str, set[str]] = defaultdict(set)
    means: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in table:
        tasks_of[row["model"]].add(row["task"])
        means[(row["model"], display_name(row))].append(row["mean"])
    return {key: statistics.fmean(values) for key, values in means.items() if len(values) == len(tasks_of[key[0]])}


def _params(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 1e5 else f"{count / 1e3:.1f}K"


def markdown(table: Sequence[dict[str, Any]]) -> str:
    """One table per model: rows = adapters, columns = tasks (cells = mean ± std (n seeds)), then the
    average over tasks, trainable parameters (range over tasks: heads differ), peak memory and time."""
    parts = []
    avg = averages(table)
    for model in sorted({row["model"] for row in table}):
        rows = [row for row in table if row["model"] == model]
        tasks = sorted({row["task"] for row in rows})
        cells = {(display_name(row), row["task"]): row for row in rows}
        metric_of = {row["task"]: row["metric"] for row in rows}
        header = ["adapter", *(f"{t} ({metric_of[t]})" for t in tasks)]
        header += ["average"] if len(tasks) > 1 else []
        header += ["trainable params", "peak memory (MB)", "train time / run (s)"]
        lines = [f"### {model}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for adapter in sorted({display_name(row) for row in rows}):
            mine = [r for r in rows if display_name(r) == adapter]
            values = [f"{c['mean']:.2f} ± {c['std']:.2f} ({c['n_seeds']})" if (c := cells.get((adapter, t))) else "–"
                      for t in tasks]
            if len(tasks) > 1:
                values.append(f"{avg[(model, adapter)]:.2f}" if (model, adapter) in avg else "–")
            params = sorted({r["trainable_params"] for r in mine})
            memory = [r["peak_memory_mb"] for r in mine if r["peak_memory_mb"] is not None]
            walls = [r["wall_time_s"] for r in mine if r["wall_time_s"] is not None]
            values += ["–".join(dict.fromkeys(_params(p) for p in (params[0], params[-1]))),
                       f"{max(memory):.0f}" if memory else "–", f"{statistics.fmean(walls):.0f}" if walls else "–"]
            lines.append("| " + " | ".join([adapter.replace("|", "\\|"), *values]) + " |")
        parts.append("\n".join(lines))
    note = ("Scores ×100, mean ± sample std over seeds (number of seeds in brackets); average = mean over the "
            "tasks of those means. Peak memory: the largest over the adapter's runs (CPU: process max RSS; "
            "CUDA: max allocated). Train time: wall time of the training loop per run, averaged over seeds then tasks.")
    if any(row["metric"] == PERPLEXITY for row in table):
        note += (" A pre-training run (primary metric neg_loss) shows its test perplexity instead, exp of its mean "
                 "loss per token, as is (not ×100; lower is better): mean ± std of the runs' perplexities.")
    if any(row.get("variant") for row in table):
        note += (" An adapter run with several configurations of a task has a row per configuration, named by the "
                 "keys in which they differ; the seeds of one configuration are aggregated.")
    return "\n\n".join(parts + [note]) + "\n"
