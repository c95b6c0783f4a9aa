"""TeRA: shared tensors saved once (or regenerated from the seed), high-rank ΔW, lossy export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lrzoo
from conftest import REPO, tiny_inputs, tiny_llama
from lrzoo.methods.tera import mode_sizes

LOAD = """
import torch, transformers, lrzoo
from peft import PeftModel
base = transformers.AutoModelForCausalLM.from_pretrained({base!r}).eval()
model = PeftModel.from_pretrained(base, {adapter!r})
with torch.no_grad():
    torch.save(model(torch.load({inputs!r})).logits, {out!r})
"""


def tera_model(**kwargs):
    return lrzoo.wrap(tiny_llama(0), "tera", r=4, **{"init_weights": False, **kwargs})


@pytest.mark.parametrize("dim,k,expected", [(4096, 2, (64, 64)), (32, 2, (8, 4)), (11008, 2, (128, 86)),
                                            (97, 2, (97, 1)), (4096, 3, (16, 16, 16))])
def test_mode_sizes_split_each_side_as_evenly_as_its_factors_allow(dim, k, expected):
    assert mode_sizes(dim, k) == expected


def test_delta_is_high_rank_with_few_trained_parameters():
    model = tera_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj  # 32×32: modes (8, 4 | 8, 4)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 16
    assert torch.linalg.matrix_rank(layer.delta_weight("default")) == 16  # min(R², 32) with R = 4


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["saved", "seeded"])
def test_shared_tensors_are_saved_once_or_regenerated_from_the_seed(policy, tmp_path, fresh_python):
    model = tera_model(shared_tensors=policy).eval()
    tiny_llama(0).save_pretrained(tmp_path / "base")
    if policy == "saved":  # make the saved core differ from what the seed gives: the load must read it
        model.base_model.tera_core["default"].mul_(-2.0)
    model.save_pretrained(tmp_path / "adapter")
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    shared = sorted(k for k in keys if "tera_core" in k or "tera_factors" in k)
    assert shared == (["base_model.tera_core", "base_model.tera_factors"] if policy == "saved" else [])
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["shared_tensors"] == policy

    x = tiny_inputs()
    torch.save(x, tmp_path / "x.pt")
    fresh_python(LOAD.format(base=str(tmp_path / "base"), adapter=str(tmp_path / "adapter"),
                             inputs=str(tmp_path / "x.pt"), out=str(tmp_path / "out.pt")), cwd=REPO)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt"), model(x).logits, rtol=1e-5, atol=1e-5)


def test_export_lora_is_lossy_below_full_rank_and_reports_it(tmp_path):
    model = tera_model()
    low = lrzoo.export_lora(model, str(tmp_path / "low"), rank=2)
    full = lrzoo.export_lora(model, str(tmp_path / "full"), rank=32)
    assert not low["exact"] and low["max_relative_error"] > 0.1
    assert full["max_relative_error"] < 1e-5


def test_peft_inject_adapter_in_model_refuses_the_shared_state_tuner():
    from peft import inject_adapter_in_model

    config = lrzoo.get_adapter("tera").build_config(r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError):
        inject_adapter_in_model(config, tiny_llama(0))
