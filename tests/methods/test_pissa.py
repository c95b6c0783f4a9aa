"""PiSSA and rsLoRA by name: PiSSA starts from W's top-r singular directions on the residual weight, and what
it saves is a plain LoRA adapter against the *original* weight (with the task head), which stock PEFT loads on
the untouched base in a fresh process; export_lora writes the same update; rsLoRA scales by α/√r."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft.tuners.lora import LoraLayer

import lrzoo
from conftest import REPO, run_fresh_python, tiny_bert, tiny_inputs


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]


def test_pissa_starts_from_the_top_singular_directions_on_the_residual_weight():
    original = {n: p.detach().clone() for n, p in tiny_bert(0).named_parameters()}
    model = lrzoo.wrap(tiny_bert(0), "pissa", r=4)   # alpha 8 by default: scale 2
    x = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, tiny_bert(0)(x).logits, rtol=1e-4, atol=1e-5)  # unchanged
    for name, layer in _layers(model):
        weight = original[name.removeprefix("base_model.model.") + ".weight"]
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.lora_alpha["default"] / layer.r["default"]
        U, S, Vh = torch.linalg.svd(weight)
        top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]                     # the rank-4 truncation of W
        torch.testing.assert_close(s * B @ A, top, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.get_base_layer().weight + s * B @ A, weight, rtol=1e-5, atol=1e-5)


def test_rslora_scales_by_alpha_over_the_square_root_of_r():
    for r in (4, 16):
        model = lrzoo.wrap(tiny_bert(0), "rslora", r=r, alpha=8)
        (_, layer), *_ = _layers(model)
        assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(r))
        assert model.peft_config["default"].use_rslora is True


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2"])
def test_a_trained_pissa_adapter_loads_on_the_untouched_base_in_stock_peft(init, tmp_path):
    model = lrzoo.wrap(tiny_bert(0), "pissa", r=4, init_lora_weights=init)
    torch.manual_seed(5)
    with torch.no_grad():   # "training": every trained tensor moves, the head included
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    x = tiny_inputs()
    with torch.no_grad():
        expected = model.eval()(x).logits
    tiny_bert(0).save_pretrained(tmp_path / "base")   # the original weights, as a user has them
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8 and config["lora_alpha"] == 16
    torch.save(x, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "expected.pt")
    out = run_fresh_python(f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification
        base = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'base')!r}).eval()
        before = base.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
        model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()
        with torch.no_grad():
            got = model(torch.load({str(tmp_path / 'x.pt')!r})).logits
        torch.testing.assert_close(got, torch.load({str(tmp_path / 'expected.pt')!r}), rtol=1e-4, atol=1e-5)
        layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
        assert torch.equal(layer.get_base_layer().weight, before), "loading moved the base weight"
        assert "lrzoo" not in sys.modules
        print("ok")
    """, cwd=tmp_path)
    assert out.strip().endswith("ok")
    # export_lora writes the same update against the original weight
    lrzoo.export_lora(model, str(tmp_path / "export"))
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    exported = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval(),
                                         str(tmp_path / "export")).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, expected, rtol=1e-4, atol=1e-5)


def test_a_trained_pissa_run_resumes_and_saves_through_the_trainer(tmp_path):
    from lrzoo.cli.train import run_recipe
    from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_sst2

    data = write_sst2(tmp_path / "data")
    cfg = compose([*tiny_run_overrides(data, tmp_path / "runs"), "adapter=pissa", "adapter.r=4"])
    results = run_recipe(cfg, run_dir_of(cfg))
    saved = json.loads((tmp_path / "runs" / cfg.run_name / "adapter" / "adapter_config.json").read_text())
    assert results["adapter"] == "pissa" and saved["r"] == 8 and saved["init_lora_weights"] is True


def test_dora_with_a_base_moving_init_is_refused():
    with pytest.raises(ValueError, match="DoRA"):
        lrzoo.wrap(tiny_bert(0), "dora", r=4, init_lora_weights="pissa")


def test_lora_given_pissa_by_hand_also_saves_against_the_original_weight(tmp_path):
    model = lrzoo.wrap(tiny_bert(0), "lora", r=4, init_lora_weights="pissa")
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] is True
