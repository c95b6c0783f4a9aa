"""A plan that cuts another to fit a budget (recipes/sweeps/glue_tuned_issue28.yaml from glue_tuned.yaml) must keep
its protocol setting for setting: the cut reports the same runs, so a drifted grid, seed list or method line would
silently choose other rates or miss the finished runs."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import REPO
from lrzoo.lab.plan import load_plan

CUTS = {"glue_tuned_issue28.yaml": "glue_tuned.yaml"}


@pytest.mark.parametrize("cut, full", sorted(CUTS.items()))
def test_a_cut_plan_is_its_full_plan_with_fewer_tasks_and_methods(cut, full):
    cut_plan, full_plan = (load_plan(REPO / "recipes" / "sweeps" / name) for name in (cut, full))
    assert set(cut_plan.tasks) <= set(full_plan.tasks) and cut_plan.tasks
    full_methods = {m.name: m for m in full_plan.methods}
    assert {m.name for m in cut_plan.methods} <= set(full_methods)
    for method in cut_plan.methods:
        assert method == full_methods[method.name], f"{method.name}: its line differs from {full}'s"
    protocol = lambda plan: {k: v for k, v in dataclasses.asdict(plan).items()  # noqa: E731
                             if k not in ("path", "tasks", "methods")}
    assert protocol(cut_plan) == protocol(full_plan)
