"""The base-weight fingerprint covers every value (issue 25 item 14), and old sampled fingerprints still check.

The old rule hashed at most 65,536 strided values per weight: a 512×512 weight was sampled at every 4th
entry, so the other 75% could change and the adapter still loaded.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lrzoo
from lrzoo import fingerprint


def wide_llama(seed: int = 0):
    """One layer whose q/v projections are 512×512: more entries than the old rule sampled."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=512, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return AutoModelForCausalLM.from_config(config).eval()


def targeted(model):
    """``(name, weight)`` of the default targets (q/v), in model order, as the fingerprint sees them."""
    return [(name, module.weight) for name, module in model.named_modules() if name.endswith(("q_proj", "v_proj"))]


def unsampled_changed(model):
    """``model`` with 75% of the entries of one q_proj weight changed: every one the old rule skipped."""
    weight = model.model.layers[0].self_attn.q_proj.weight
    flat = weight.data.view(-1)
    assert flat.numel() == 4 * (1 << 16)  # the old rule sampled every 4th entry
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[::4] = True
    flat[~keep] += 0.5
    return model


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "adapter"
    lrzoo.wrap(wide_llama(), "lora_xs", r=4, init_weights=False).save_pretrained(path)
    return path


@pytest.mark.parametrize("loader", ["lrzoo.load", "PeftModel.from_pretrained"])
def test_a_change_to_the_unsampled_entries_is_refused(saved, loader):
    from peft import PeftModel

    load = lrzoo.load if loader == "lrzoo.load" else PeftModel.from_pretrained
    load(wide_llama(), str(saved))  # the same base: accepted
    with pytest.raises(ValueError, match="different base weights"):
        load(unsampled_changed(wide_llama()), str(saved))


def test_any_single_value_changes_the_fingerprint():
    model = wide_llama()
    before = fingerprint.weights_fingerprint(targeted(model))
    weight = model.model.layers[0].self_attn.v_proj.weight
    for index in (1, 12345, weight.numel() - 1):  # none of them on the old rule's stride of 4
        old = weight.data.view(-1)[index].item()
        weight.data.view(-1)[index] = torch.nextafter(torch.tensor(old), torch.tensor(float("inf")))  # one ulp
        assert fingerprint.weights_fingerprint(targeted(model)) != before, index
        weight.data.view(-1)[index] = old
    assert fingerprint.weights_fingerprint(targeted(model)) == before


def test_a_bf16_copy_and_its_float32_upcast_agree():
    model = wide_llama().to(torch.bfloat16)
    upcast = [(name, weight.float()) for name, weight in targeted(model)]
    assert fingerprint.weights_fingerprint(targeted(model)) == fingerprint.weights_fingerprint(upcast)


def test_an_old_sampled_fingerprint_is_checked_by_the_old_rule(saved):
    """Checkpoints saved before v2 carry the sampled sha256: still accepted on their base, refused on
    one that differs in a sampled entry; a change confined to the unsampled entries is the old rule's
    documented blind spot (docs/peft_interop.md)."""
    config_file = saved / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_weights_hash"] = fingerprint.sampled_fingerprint(targeted(wide_llama()))
    config_file.write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lrzoo.peft_bridge.UnverifiedBaseWeightsWarning)
        lrzoo.load(wide_llama(), str(saved))
    sampled_changed = wide_llama()
    sampled_changed.model.layers[0].self_attn.q_proj.weight.data.view(-1)[::4] += 0.5
    with pytest.raises(ValueError, match="different base weights"):
        lrzoo.load(sampled_changed, str(saved))
    lrzoo.load(unsampled_changed(wide_llama()), str(saved))
