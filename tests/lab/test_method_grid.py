"""Per-method grid sizes in a sweep plan (``grid.points=N`` on a method line, issue 28 item 7): the commonsense
plan tunes its four smallest adapters on a held-out slice of the union of its training sets while every other
method keeps one rate; the option is a plan option, so the runs it composes are the command line's."""

from __future__ import annotations

import json

import pytest

from lrzoo.lab.choice import Outcome, cell_state
from lrzoo.lab.plan import Composer, PlanError, load_plan
from lrzoo.configs import config_dir
from recipe_helpers import compose, run_dir_of, tiny_run_overrides

SWEEPS = config_dir("recipes") / "sweeps"
SMALLEST = ("tera", "lora_xs", "loldu", "svfit")


def test_cs_question_tunes_the_four_smallest_adapters_and_nothing_else():
    plan = load_plan(SWEEPS / "cs_question.yaml")
    grids = {m.name: plan.grid(m) for m in plan.methods}
    for method in plan.methods:
        assert not any(o.startswith("grid.") for o in method.overrides)   # a plan option, never an override
        if method.name in SMALLEST:
            assert len(grids[method.name]) == 3 and grids[method.name][1] == method.centre
            assert "+task.heldout_size=400" in method.overrides
        else:
            assert grids[method.name] == [method.centre]
    assert plan.points == 1 and plan.tunes
    tera = next(m for m in plan.methods if m.name == "tera")
    assert grids["tera"] == [6.7e-3, 2e-2, 6e-2]
    # the composed run holds a 400-row slice of commonsense/all's training union
    cfg = compose(list(Composer(plan).run(tera, "commonsense/all", 6.7e-3, 0).overrides))
    assert cfg.task.heldout_size == 400 and list(cfg.task.train_tasks)[:2] == ["commonsense/boolq", "commonsense/arc_e"]


def test_the_grid_option_leaves_the_run_unchanged(tmp_path):
    """``lora grid.points=3`` composes the very run ``lora`` does at each lr (same directory, hash and key)."""
    base = [o for o in tiny_run_overrides(tmp_path / "data", tmp_path / "runs") if not o.startswith("trainer.lr=")]
    plans = []
    for name, line in (("one", "lora trainer.lr=1e-3"), ("three", "lora trainer.lr=1e-3 grid.points=3")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({"overrides": base, "tasks": ["glue/sst2"], "seeds": [0],
                                    "grid": {"factor": 3, "points": 1}, "methods": [line]}))
        plans.append(load_plan(path))
    one, three = plans
    assert one.grid(one.methods[0]) == [1e-3] and three.grid(three.methods[0]) == [3.3e-4, 1e-3, 3e-3]
    assert one.methods[0].overrides == three.methods[0].overrides and not one.tunes and three.tunes
    a = Composer(one).run(one.methods[0], "glue/sst2", 1e-3, 0)
    b = Composer(three).run(three.methods[0], "glue/sst2", 1e-3, 0)
    assert (a.run_dir, a.config_hash, a.key, a.overrides) == (b.run_dir, b.config_hash, b.key, b.overrides)
    assert str(b.run_dir) == run_dir_of(compose(list(b.overrides)))


def test_a_tuned_method_in_a_one_point_plan_chooses_on_its_held_out_score(tmp_path):
    path = tmp_path / "plan.yaml"
    base = [o for o in tiny_run_overrides(tmp_path / "data", tmp_path / "runs") if not o.startswith("trainer.lr=")]
    path.write_text(json.dumps({"overrides": base, "tasks": ["glue/sst2"], "seeds": [0],
                                "grid": {"factor": 3, "points": 1, "extend": 1},
                                "methods": ["lora trainer.lr=1e-3", "tera trainer.lr=2e-2 grid.points=3"]}))
    plan = load_plan(path)
    composer = Composer(plan)
    scores = {6.7e-3: 0.6, 2e-2: 0.7, 6e-2: 0.65}
    seen = []

    def lookup(run):
        seen.append((run.method, run.lr))
        return Outcome("done", {"selection_score": scores.get(run.lr, 0.5), "score": 0.5}, tmp_path)

    lora, tera = plan.methods
    assert cell_state(plan, composer, lora, "glue/sst2", lookup).chosen == 1e-3 and seen == [("lora", 1e-3)]
    state = cell_state(plan, composer, tera, "glue/sst2", lookup)
    assert list(state.grid) == [6.7e-3, 2e-2, 6e-2] and state.chosen == 2e-2 and state.scores[2e-2] == 0.7


@pytest.mark.parametrize("option", ["grid.points=2", "grid.points=x", "grid.factor=3", "grid.points=0"])
def test_bad_method_grid_options_are_refused(tmp_path, option):
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({"tasks": ["glue/sst2"], "seeds": [0], "methods": [f"lora trainer.lr=1e-3 {option}"]}))
    with pytest.raises(PlanError, match="grid.points=<odd positive integer>"):
        load_plan(path)
