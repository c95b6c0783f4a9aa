"""Benchmark tasks by name: ``get_task("glue/sst2")``, ``list_tasks()``.

A task loads validated rows (``load_split``), extracts and checks answers for generation tasks,
and computes its metrics offline. See docs/recipes_tasks.md for sources, prompts and metrics.
"""

from __future__ import annotations

from collections.abc import Callable

from . import commonsense, glue, math, pretrain
from .base import Task

_FACTORIES: dict[str, Callable[[], Task]] = {**glue.TASKS, **commonsense.TASKS, **math.TASKS, **pretrain.TASKS}


def list_tasks() -> list[str]:
    """Every task name, in family order (GLUE, commonsense, math, pre-training)."""
    return list(_FACTORIES)


def get_task(name: str) -> Task:
    """A fresh :class:`Task` for ``name`` (e.g. ``"glue/cola"``, ``"commonsense/all"``, ``"math/gsm8k"``)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}.")
    return _FACTORIES[name]()


__all__ = ["Task", "get_task", "list_tasks"]
