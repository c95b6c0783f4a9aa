"""``results.png``: score against trainable parameters (log scale), for the plain and the tuned report; a
pre-training plan's perplexity against memory (:func:`plot_perplexity`).

matplotlib is the ``lab`` extra (``pip install lrzoo[lab]``; ``make install`` has it): without it, asking for a
plot is one line naming the fix (:class:`lrzoo.errors.UserError`), not an ``ImportError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from .table import PERPLEXITY, averages, display_name

#: what to install for plots
LAB_EXTRA = "lrzoo[lab]"


def pyplot(path: Path) -> Any:
    """``matplotlib.pyplot`` with the file-only Agg backend, or a :class:`UserError` saying how to get it (the plot
    is written last: the tables beside ``path`` are already there)."""
    try:
        import matplotlib
    except ImportError as err:
        raise UserError(f"the plot {path} needs matplotlib, which is not installed: pip install '{LAB_EXTRA}' "
                        f"(the tables beside it are written)") from err
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def plot(table: Sequence[dict[str, Any]], path: Path) -> None:
    """Score vs trainable parameters (log x): one colour per task, each point labelled by adapter."""
    plt = pyplot(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tasks = sorted({row["task"] for row in table})
    labelled = len(tasks) == 1  # with several tasks only the averages carry labels
    for task in tasks:
        rows = [row for row in table if row["task"] == task]
        # bars: std over seeds, or a tuned report's bootstrap interval ("ci")
        yerr = ([[r["mean"] - r["ci"][0] for r in rows], [r["ci"][1] - r["mean"] for r in rows]]
                if all(r.get("ci") for r in rows) else [r["std"] for r in rows])
        ax.errorbar([r["trainable_params"] for r in rows], [r["mean"] for r in rows],
                    yerr=yerr, fmt="o", capsize=3, label=task,
                    alpha=1.0 if labelled else 0.35, markersize=6 if labelled else 4)
        for r in rows if labelled else ():
            ax.annotate(display_name(r), (r["trainable_params"], r["mean"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    if not labelled:
        params = {(r["model"], display_name(r)): r["trainable_params"] for r in table}
        for (model, adapter), value in averages(table).items():
            ax.plot(params[(model, adapter)], value, "k*", markersize=10)
            ax.annotate(adapter, (params[(model, adapter)], value), textcoords="offset points", xytext=(5, 3),
                        fontsize=8)
        ax.plot([], [], "k*", label="average over tasks")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    perplexity = {row.get("metric") == PERPLEXITY for row in table}
    ax.set_ylabel("test perplexity (lower is better)" if perplexity == {True} else
                  "score (primary metric ×100; perplexity as is)" if True in perplexity else "score (primary metric ×100)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_perplexity(points: Sequence[dict[str, Any]], path: Path) -> None:
    """A pre-training plan's ``results.png``: test perplexity (with its 95% interval) against the memory a method
    holds (weights + optimizer state MB, the papers' trade-off; the optimizer state alone when a row lacks the
    weights), one point per method labelled by name; lower and further left is better."""
    plt = pyplot(path)
    key, label = (("weights_plus_state_mb", "weights + optimizer state (MB)")
                  if all(p["weights_plus_state_mb"] is not None for p in points) else
                  ("optimizer_state_mb", "optimizer state (MB)"))
    points = [p for p in points if p[key] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task in sorted({p["task"] for p in points}):
        mine = [p for p in points if p["task"] == task]
        yerr = ([[p["perplexity"] - p["ci"][0] for p in mine], [p["ci"][1] - p["perplexity"] for p in mine]]
                if all(p["ci"] for p in mine) else None)
        ax.errorbar([p[key] for p in mine], [p["perplexity"] for p in mine], yerr=yerr, fmt="o", capsize=3, label=task)
        for p in mine:
            ax.annotate(p["method"], (p[key], p["perplexity"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("test perplexity (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
