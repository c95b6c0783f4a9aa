"""The Hydra `task` config group: one YAML per registered task, each agreeing with its Task object."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from lrzoo.tasks import get_task, list_tasks

TASK_DIR = REPO / "recipes" / "task"


def test_the_config_group_names_exactly_the_registered_tasks():
    names = sorted(str(p.relative_to(TASK_DIR).with_suffix("")) for p in TASK_DIR.rglob("*.yaml"))
    assert names == sorted(list_tasks())


@pytest.mark.parametrize("name", list_tasks())
def test_task_config_composes_and_matches_the_task(name):
    with initialize_config_dir(config_dir=str(REPO / "recipes"), version_base=None):
        cfg = OmegaConf.to_container(compose(overrides=[f"+task={name}"]).task)
    task = get_task(cfg["name"])
    assert cfg["name"] == name
    assert cfg["metric"] == task.primary_metric
    assert cfg["eval_split"] in {"validation", "test"}
    assert isinstance(cfg["max_length"], int) and "data_dir" in cfg
    assert cfg.get("generation", {}) == task.generation_config
    assert tuple(cfg.get("eval_tasks", [name])) == task.eval_tasks
    if name != "commonsense/all":
        assert cfg["eval_split"] in task.splits
