"""Benchmark tasks by name: ``get_task("glue/sst2")``, ``list_tasks()``.

A task loads validated rows (``load_split``), extracts and checks answers for generation tasks,
and computes its metrics offline. See docs/recipes_tasks.md for sources, prompts and metrics.
"""

from __future__ import annotations

from collections.abc import Callable

from ..registry_table import Table
from . import commonsense, glue, math, pretrain
from .base import Task

_FACTORIES: Table[Callable[[], Task]] = Table("task", entries=[*glue.TASKS.items(), *commonsense.TASKS.items(),
                                                                *math.TASKS.items(), *pretrain.TASKS.items()])


def list_tasks() -> list[str]:
    """Every task name, in family order (GLUE, commonsense, math, pre-training)."""
    return _FACTORIES.names()


def get_task(name: str) -> Task:
    """A fresh :class:`Task` for ``name`` (e.g. ``"glue/cola"``, ``"commonsense/all"``, ``"math/gsm8k"``)."""
    return _FACTORIES.lookup(name)()


__all__ = ["Task", "get_task", "list_tasks"]
