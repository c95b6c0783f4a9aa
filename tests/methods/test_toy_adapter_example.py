"""docs/adding_an_adapter.md's worked example, run: its three files written into a temporary checkout (the method
folder, the YAML, the page), the method imported from there, a tiny model wrapped with it, ΔW checked against
s·B A built from the raw tensors, saved, reloaded and exported."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import torch

import lrzoo
from conftest import REPO, tiny_bert, tiny_inputs
from lrzoo import configs, registry

DOC = REPO / "docs" / "adding_an_adapter.md"
BLOCK = re.compile(r"<!-- example-file: (\S+) -->\n```\w*\n(.*?)\n```", re.S)


def documented_files() -> dict[str, str]:
    return {path: text + "\n" for path, text in BLOCK.findall(DOC.read_text())}


@pytest.fixture
def toy_fa(tmp_path, monkeypatch):
    """The documented files in ``tmp_path`` (a checkout's layout), the method imported from there and its YAML
    read as the packaged defaults; taken out of lrzoo and PEFT afterwards."""
    for path, text in documented_files().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    real_config_dir = configs.config_dir
    monkeypatch.setattr(configs, "config_dir",
                        lambda name: tmp_path / name if name == "adapters" else real_config_dir(name))
    registry._packaged_defaults.cache_clear()
    package = tmp_path / "lrzoo" / "methods" / "toy_fa"
    spec = importlib.util.spec_from_file_location("lrzoo.methods.toy_fa", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        if "toy_fa" in lrzoo.list_adapters():
            lrzoo.registry.unregister_adapter("toy_fa")
        registry._packaged_defaults.cache_clear()


def test_the_example_touches_one_method_folder_one_yaml_and_one_page():
    assert sorted(documented_files()) == ["adapters/toy_fa.yaml", "docs/adapters/toy_fa.md",
                                          "lrzoo/methods/toy_fa/__init__.py"]


def test_the_documented_adapter_wraps_saves_reloads_and_exports(toy_fa, tmp_path):
    assert "toy_fa" in lrzoo.list_adapters()
    assert lrzoo.adapter_defaults("toy_fa") == {"r": 4, "alpha": 8.0, "dropout": 0.0, "seed": 0}  # from the YAML
    model = lrzoo.wrap(tiny_bert(0), "toy_fa", init_weights=False).eval()  # random B: a non-zero ΔW
    layers = [m for m in model.modules() if isinstance(m, toy_fa.ToyFALayer)]
    assert layers, "wrap adapted no layer"
    x = torch.randn(3, layers[0].in_features)
    for layer in layers:
        B, A = layer.toyfa_B["default"], layer.toyfa_A["default"]
        assert B.requires_grad and not A.requires_grad and B.shape[1] == 4
        reference = (8.0 / 4) * B.detach() @ A  # s·B A, materialised from the raw tensors
        with torch.no_grad():
            torch.testing.assert_close(layer(x) - layer.get_base_layer()(x), x @ reference.T)

    inputs = tiny_inputs()
    with torch.no_grad():
        expected = model(inputs).logits
        assert not torch.allclose(expected, tiny_bert(0)(inputs).logits)  # the adapter changes the model
    model.save_pretrained(tmp_path / "saved")
    reloaded = lrzoo.load(tiny_bert(0), str(tmp_path / "saved")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs).logits, expected)
    report = lrzoo.export_lora(model, str(tmp_path / "export"))
    assert report["exact"] and report["source_method"] == "toy_fa"
    assert (tmp_path / "docs" / "adapters" / "toy_fa.md").read_text().startswith("# ToyFA")
