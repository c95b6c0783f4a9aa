"""lrzoo-native methods inside PEFT and transformers: registration, loading paths, base-weight checks."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from safetensors.torch import load_file

import lrzoo
from lrzoo import registry
from conftest import REPO, tiny_bert, tiny_inputs, tiny_llama


def trained_xs(seed: int = 0, **kwargs):
    model = lrzoo.wrap(tiny_llama(seed), "lora_xs", r=4, init_weights=False, **kwargs)
    return model.eval()


def test_native_method_is_in_peft_tables_under_its_own_type():
    config = trained_xs().peft_config["default"]
    assert config.peft_type == "LRZOO_LORA_XS" and config.peft_type.value == "LRZOO_LORA_XS"
    assert PEFT_TYPE_TO_CONFIG_MAPPING["LRZOO_LORA_XS"] is type(config)
    assert PEFT_TYPE_TO_PREFIX_MAPPING["LRZOO_LORA_XS"] == "xs_"
    assert PEFT_TYPE_TO_TUNER_MAPPING["LRZOO_LORA_XS"].tuner_layer_cls.__name__ == "LoraXSLayer"


def test_checkpoint_records_method_policy_and_fingerprint(tmp_path):
    trained_xs().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LRZOO_LORA_XS"
    assert config["lrzoo_method"] == "lora_xs"
    assert config["frozen_factors"] == "saved"
    assert re.fullmatch(r"v2-[0-9a-f]{32}", config["base_weights_hash"])


def test_transformers_load_adapter_loads_a_native_method(tmp_path):
    model = trained_xs()
    x = tiny_inputs()
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    base = tiny_llama()
    base.load_adapter(str(tmp_path))
    torch.testing.assert_close(base.eval()(x).logits, expected)


def test_loading_onto_different_base_weights_is_refused(tmp_path):
    trained_xs(seed=0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="different base weights"):
        PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path)


def test_recomputed_factors_are_not_saved_and_reload_exactly(tmp_path):
    model = trained_xs(frozen_factors="recomputed")
    x = tiny_inputs()
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert keys and all(".xs_R" in k for k in keys), sorted(keys)
    saved_keys = load_file(tmp_path / "adapter_model.safetensors")
    reloaded = lrzoo.load(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(reloaded(x).logits, expected)
    assert sum(v.numel() for v in saved_keys.values()) == 4 * 4 * 4  # R only: 4 layers × r²


def test_loading_without_importing_lrzoo_fails_with_the_type_name(tmp_path, fresh_python):
    trained_xs().save_pretrained(tmp_path / "adapter")
    code = f"""
    import sys
    from peft import PeftConfig
    try:
        PeftConfig.from_pretrained({str(tmp_path / 'adapter')!r})
    except Exception as error:  # stock PEFT cannot know lrzoo's types
        print(type(error).__name__, error)
    assert 'lrzoo' not in sys.modules
    """
    assert "LRZOO_LORA_XS" in fresh_python(code, cwd=tmp_path)


@dataclass
class ToyConfig(lrzoo.AdapterConfig):
    """Toy: ΔW = s·diag(d) on the leading square block (tests the public extension API)."""


class ToyLayer(lrzoo.AdapterLayer):
    prefix = "toy_"
    adapter_layer_names = ("toy_d",)

    def init_adapter(self, adapter_name, config, weight, tuner=None):
        size = min(weight.shape)
        self.add_trainable("toy_d", adapter_name, torch.zeros(size) if config.init_weights else torch.randn(size))

    def delta_weight(self, adapter_name):
        d = self.toy_d[adapter_name]
        delta = torch.zeros(self.out_features, self.in_features, dtype=d.dtype, device=d.device)
        delta[range(d.numel()), range(d.numel())] = d
        return self.scaling[adapter_name] * delta


PEFT_TABLES = (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING)


@pytest.fixture
def toy_method():
    """The toy method, registered for one test and taken out of lrzoo and PEFT again afterwards."""
    registry.register_adapter("toy_diag", ToyConfig, ToyLayer)
    yield "toy_diag"
    registry.unregister_adapter("toy_diag")
    assert "toy_diag" not in lrzoo.list_adapters()
    assert not any("LRZOO_TOY_DIAG" in table for table in PEFT_TABLES)


def test_register_adapter_adds_a_working_method(toy_method, tmp_path):
    assert toy_method in lrzoo.list_adapters()
    model = lrzoo.wrap(tiny_bert(), toy_method, r=2, alpha=2, init_weights=False).eval()
    x = tiny_inputs()
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    torch.testing.assert_close(reloaded(x).logits, expected)
    report = lrzoo.export_lora(model, str(tmp_path / "export"), rank=32)
    assert report["max_relative_error"] < 1e-6


def test_register_adapter_refuses_duplicates_and_bad_names(toy_method):
    with pytest.raises(ValueError, match="already registered"):
        registry.register_adapter(toy_method, ToyConfig, ToyLayer)
    with pytest.raises(ValueError, match="lower-case"):
        registry.register_adapter("Toy-Diag", ToyConfig, ToyLayer)


def test_unregister_adapter_takes_a_method_out_of_lrzoo_and_peft(tmp_path):
    spec = registry.register_adapter("toy_diag", ToyConfig, ToyLayer)
    try:
        lrzoo.wrap(tiny_bert(), "toy_diag", r=2, init_weights=False).save_pretrained(tmp_path)
        assert all("LRZOO_TOY_DIAG" in table for table in PEFT_TABLES)
    finally:
        assert registry.unregister_adapter("toy_diag") is spec
    assert "toy_diag" not in lrzoo.list_adapters()
    assert not any("LRZOO_TOY_DIAG" in table for table in PEFT_TABLES)
    with pytest.raises(ValueError, match="Unknown adapter 'toy_diag'"):
        lrzoo.wrap(tiny_bert(), "toy_diag", r=2)
    with pytest.raises(TypeError, match="not registered"):
        ToyConfig()
    with pytest.raises(ValueError, match="LRZOO_TOY_DIAG"):  # its checkpoints are unknown again
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    with pytest.raises(ValueError, match="Unknown adapter"):
        registry.unregister_adapter("toy_diag")
    # Built-in methods are untouched, and the name can be registered again.
    assert PEFT_TYPE_TO_CONFIG_MAPPING["LRZOO_LORA_XS"] is lrzoo.get_adapter("lora_xs").build_config
    registry.register_adapter("toy_diag", ToyConfig, ToyLayer)
    registry.unregister_adapter("toy_diag")


def test_unregistered_config_cannot_be_built():
    @dataclass
    class Orphan(lrzoo.AdapterConfig):
        pass

    with pytest.raises(TypeError, match="not registered"):
        Orphan()


def _peft_load_functions():
    from peft.config import PeftConfigMixin

    return (PeftModel.load_adapter, PeftModel.from_pretrained.__func__, PeftConfigMixin.from_json_file.__func__)


def test_load_hooks_are_installed_by_import_lrzoo_once(monkeypatch):
    import importlib

    from peft.config import PeftConfigMixin

    from lrzoo import peft_bridge
    from lrzoo.peft_bridge import load_checks

    assert peft_bridge.load_hooks_installed()  # import lrzoo installed them
    assert not any(getattr(f.__wrapped__, "_lrzoo_checked", False) for f in _peft_load_functions())  # wrapped once
    # PEFT as it was before lrzoo: the module alone patches nothing, the explicit call patches once
    originals = [f.__wrapped__ for f in _peft_load_functions()]
    monkeypatch.setattr(PeftModel, "load_adapter", originals[0])
    monkeypatch.setattr(PeftModel, "from_pretrained", classmethod(originals[1]))
    monkeypatch.setattr(PeftConfigMixin, "from_json_file", classmethod(originals[2]))
    # reload re-runs the module in its own namespace: put back the objects other modules imported from it
    # (tuners.py's LOADING context variable, the warning class), or every later load in this process sees two of
    # each and its unplaced-tensor check never fires (tests/api/test_unplaced_tensors.py after this file)
    namespace = dict(vars(load_checks))
    try:
        importlib.reload(load_checks)
        assert not peft_bridge.load_hooks_installed()
        assert load_checks.install_load_hooks() is True
        assert load_checks.install_load_hooks() is False  # a second call wraps nothing
        assert [f.__wrapped__ for f in _peft_load_functions()] == originals
    finally:
        vars(load_checks).clear()
        vars(load_checks).update(namespace)


def test_partly_installed_load_hooks_are_refused(monkeypatch):
    from lrzoo.peft_bridge import install_load_hooks

    monkeypatch.setattr(PeftModel, "load_adapter", PeftModel.load_adapter.__wrapped__)  # replaced by someone else
    with pytest.raises(RuntimeError, match="some of PEFT's load functions only"):
        install_load_hooks()
