"""``export_lora`` never deletes what it did not write (issue 12 item 5)."""

from __future__ import annotations

import json
import os

import pytest

import lrzoo
from conftest import tiny_llama


def _model():
    return lrzoo.wrap(tiny_llama(), "lora", r=4, init_lora_weights=False)


def test_a_non_empty_directory_is_refused_and_left_alone(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        lrzoo.export_lora(_model(), ".")
    assert sorted(os.listdir(tmp_path)) == ["data", "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_only_the_exports_own_files(tmp_path):
    out = tmp_path / "export"
    lrzoo.export_lora(_model(), str(out))
    first = (out / "adapter_model.safetensors").read_bytes()
    (out / "README.md").write_text("model card")
    lrzoo.export_lora(lrzoo.wrap(tiny_llama(seed=1), "lora", r=2, init_lora_weights=False), str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                       "export_report.json"]
    assert (out / "README.md").read_text() == "model card"
    assert (out / "adapter_model.safetensors").read_bytes() != first
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".export.")]  # no temp dirs left


def test_an_empty_or_new_directory_needs_no_flag(tmp_path):
    (tmp_path / "empty").mkdir()
    lrzoo.export_lora(_model(), str(tmp_path / "empty"))
    lrzoo.export_lora(_model(), str(tmp_path / "new" / "nested"))
    assert (tmp_path / "new" / "nested" / "adapter_model.safetensors").is_file()
