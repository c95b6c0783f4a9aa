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


#: probes that change one setting of a tuned plan: (probe, the plan it varies, the overrides that are the change)
PROBES = {"probes/mrpc_cosent.yaml": ("glue_tuned_issue28.yaml", {"model.pair_loss=cosent"})}


@pytest.mark.parametrize("probe, base, change", [(p, b, c) for p, (b, c) in sorted(PROBES.items())])
def test_a_probe_changes_only_what_it_says_it_changes(probe, base, change):
    """The MRPC CoSENT probe is read against the tuned table's rows: its grid, seeds, floors and method lines must be
    the tuned plan's, and its overrides the tuned plan's plus the one change (and where its runs go)."""
    probe_plan, base_plan = (load_plan(REPO / "recipes" / "sweeps" / name) for name in (probe, base))
    assert set(probe_plan.tasks) <= set(base_plan.tasks)
    base_methods = {m.name: m for m in base_plan.methods}
    for method in probe_plan.methods:
        assert method == base_methods[method.name], f"{method.name}: its line differs from {base}'s"
    assert set(probe_plan.floors) <= set(base_plan.floors)
    extra = {o for o in probe_plan.overrides if not o.startswith("output_root=")} - set(base_plan.overrides)
    assert extra == change
    # head_grid and recheck_lr are left out: the probe's MRPC is read by a bi-encoder, which has no head whose rate
    # they could tune (the tuned plan skips that stage there too)
    protocol = lambda plan: {k: v for k, v in dataclasses.asdict(plan).items()  # noqa: E731
                             if k not in ("path", "tasks", "methods", "overrides", "floors", "head_grid", "recheck_lr")}
    assert protocol(probe_plan) == protocol(base_plan)
