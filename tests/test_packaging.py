"""The wheel ships every subpackage and the Hydra config trees; adapters/ and the registry agree."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

import lrzoo
from lrzoo.registry import training_options
from lrzoo.configs import config_dir
from conftest import REPO


def test_pyproject_lists_every_subpackage():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(path.parent.relative_to(REPO).parts)
        for path in (REPO / "lrzoo").rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert {"lrzoo.configs.adapters", "lrzoo.configs.recipes"} <= listed


def test_adapter_configs_name_exactly_the_registered_adapters():
    names = {yaml.safe_load(path.read_text())["name"]: path.stem for path in config_dir("adapters").glob("*.yaml")}
    assert all(name == stem for name, stem in names.items()), "adapters/<file>.yaml must be named after `name:`"
    assert set(names) == set(lrzoo.list_adapters())


@pytest.mark.parametrize("path", sorted(config_dir("adapters").glob("*.yaml")), ids=lambda p: p.stem)
def test_adapter_config_keys_are_accepted_by_wrap(path):
    from conftest import tiny_llama

    kwargs = yaml.safe_load(path.read_text())
    method = kwargs.pop("name")
    kwargs["r"] = min(kwargs.get("r", 2), 4)
    model = lrzoo.wrap(tiny_llama(), method, **kwargs)
    # Every key lands, with its value, in the PEFT config (under its alias) or in the training options.
    config, aliases = model.peft_config["default"], lrzoo.get_adapter(method).aliases
    for key, value in kwargs.items():
        field = aliases.get(key, key)
        landed = getattr(config, field) if hasattr(config, field) else training_options(model).get(key, "<absent>")
        assert landed == value, f"{path.name}: {key}={value!r} became {landed!r}"
