"""One variable moves every lrzoo cache: converted models, tokenizers, data-file hashes, kernel verdicts and
compiled kernels (lrzoo.cache); each older per-cache variable still wins for its own cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from lrzoo.kernels import aot_check, verify
from lrzoo.models import cache_dir as model_cache
from lrzoo.tasks import data_identity

OWN_VARIABLES = ("LRZOO_CACHE_DIR", verify.CACHE_ENV, "LRZOO_AOT_CACHE")


def _every_cache() -> dict[str, Path]:
    return {"models": model_cache(), "data hashes": data_identity.cache_path(), "kernel verdicts": verify.cache_path(),
            "compiled kernels": aot_check._cache_dir()}


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*OWN_VARIABLES, "LRZOO_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("variable", ["LRZOO_CACHE", "XDG_CACHE_HOME"])
def test_one_variable_moves_every_cache(tmp_path, clean_env, variable):
    clean_env.setenv(variable, str(tmp_path))
    root = tmp_path if variable == "LRZOO_CACHE" else tmp_path / "lrzoo"
    for name, path in _every_cache().items():
        assert path == root or root in path.parents, (name, path)


def test_the_default_is_home_cache_lrzoo(tmp_path, clean_env):
    clean_env.setenv("HOME", str(tmp_path))
    for name, path in _every_cache().items():
        assert tmp_path / ".cache" / "lrzoo" in (path, *path.parents), (name, path)


def test_a_caches_own_variable_still_wins(tmp_path, clean_env):
    clean_env.setenv("LRZOO_CACHE", str(tmp_path / "all"))
    for name in OWN_VARIABLES:
        clean_env.setenv(name, str(tmp_path / name))
    assert data_identity.cache_path().parent == tmp_path / "LRZOO_CACHE_DIR"
    assert verify.cache_path() == tmp_path / verify.CACHE_ENV
    assert aot_check._cache_dir() == tmp_path / "LRZOO_AOT_CACHE"
    assert model_cache() == tmp_path / "all"
