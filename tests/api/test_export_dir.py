"""``export_lora`` never deletes what it did not write (issue 12 item 5)."""

from __future__ import annotations

import json
import os

import pytest
import torch

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


# ----------------------------------------------------------------------------- reruns and leftovers (issues 25, 26)
def test_an_earlier_export_is_replaced_without_a_flag(tmp_path):
    """Rerunning a script that exports (README's snippet) replaces its export, as save_pretrained replaces a save."""
    out = tmp_path / "out-lora"
    lrzoo.export_lora(_model(), str(out))
    lrzoo.export_lora(lrzoo.wrap(tiny_llama(seed=1), "lora", r=2, init_lora_weights=False), str(out))
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    (out / "notes.txt").write_text("mine")  # no longer only an export: refused again
    with pytest.raises(FileExistsError, match="overwrite=True"):
        lrzoo.export_lora(_model(), str(out))
    assert (out / "notes.txt").read_text() == "mine"


def test_a_save_pretrained_folder_is_not_taken_for_an_export(tmp_path):
    out = tmp_path / "out"
    _model().save_pretrained(out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        lrzoo.export_lora(_model(), str(out))


def test_stale_temporary_folders_of_a_killed_export_are_removed(tmp_path):
    import fcntl

    out = tmp_path / "export"
    stale = tmp_path / ".export.tmp-ab12cd34"  # what a killed export leaves: nobody holds it
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"\x00" * 8)
    live = tmp_path / ".export.tmp-live5678"  # a writer still at work holds its folder locked
    live.mkdir()
    others = [tmp_path / ".other.tmp-ab12cd34", tmp_path / ".export.tmp-short"]  # not this target's, or not ours
    for path in others:
        path.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        lrzoo.export_lora(_model(), str(out))
        assert not stale.exists() and live.is_dir() and all(path.is_dir() for path in others)
    finally:
        os.close(fd)
    lrzoo.export_lora(_model(), str(out))  # its writer gone (lock released): removed on the next export
    assert not live.exists()


def test_an_old_copy_is_kept_while_it_is_the_only_complete_one(tmp_path):
    """Killed between atomic_directory's two renames: the target is gone and .old-/x holds the last export."""
    out = tmp_path / "export"
    old = tmp_path / ".export.old-ab12cd34"
    (old / "x").mkdir(parents=True)
    from lrzoo.io import remove_stale_siblings

    assert remove_stale_siblings(str(out)) == [] and old.is_dir()
    lrzoo.export_lora(_model(), str(out))
    lrzoo.export_lora(_model(), str(out))  # the target exists again: the old copy is garbage now
    assert not old.exists()


@pytest.mark.slow
def test_an_export_killed_mid_write_is_cleaned_by_the_next(tmp_path, fresh_python):
    from conftest import REPO

    out = tmp_path / "export"
    code = f"""
import os, signal, sys
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
import lrzoo, lrzoo.export
from conftest import tiny_llama
lrzoo.export.save_file = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # kill -9 mid-write
lrzoo.export_lora(lrzoo.wrap(tiny_llama(), "lora", r=4), {str(out)!r})
"""
    with pytest.raises(AssertionError, match="fresh process failed"):
        fresh_python(code, cwd=tmp_path)
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith(".export.tmp-")]
    assert leftovers, os.listdir(tmp_path)
    lrzoo.export_lora(_model(), str(out))
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".export.")]
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "export_report.json"]


def test_a_lossy_export_says_so_and_by_how_much(tmp_path):
    from lrzoo.export import LossyExportWarning

    model = lrzoo.wrap(tiny_llama(), "dora", r=4, init_lora_weights=False)
    with torch.no_grad():  # trained magnitudes: ΔW = m/‖W+sBA‖ ⊙ (W+sBA) − W is then of full rank
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(torch.linspace(0.5, 1.5, parameter.numel()))
    with pytest.warns(LossyExportWarning) as record:
        report = lrzoo.export_lora(model, str(tmp_path / "export"))
    assert len(record) == 1
    message = str(record[0].message)
    assert "\n" not in message and "lossy for this dora adapter" in message
    assert f"up to {report['max_relative_error']:.2e}" in message and report["max_relative_error"] > 1e-2


def test_an_exact_export_is_quiet(tmp_path):
    import warnings

    from lrzoo.export import LossyExportWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", LossyExportWarning)
        lrzoo.export_lora(lrzoo.wrap(tiny_llama(), "lora_xs", r=4, init_weights=False), str(tmp_path / "export"))
