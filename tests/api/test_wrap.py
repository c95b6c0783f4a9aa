"""lrzoo.wrap: registry lookup, default and validated targets, ranks, task heads, several adapters."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, DistilBertConfig, GPT2Config

import lrzoo
from conftest import tiny_bert, tiny_inputs, tiny_llama


def adapted_names(model):
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)})


def tiny_gpt2():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def tiny_distilbert():
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, hidden_dim=48, num_labels=2,
                              max_position_embeddings=64)
    return AutoModelForSequenceClassification.from_config(config).eval()


def test_unknown_adapter_names_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown adapter 'lorra'.*Did you mean 'lora'.*Known adapters: .*dora"):
        lrzoo.wrap(tiny_llama(), "lorra")


def test_list_adapters_has_the_foundation_methods():
    assert {"lora", "loraplus", "dora"} <= set(lrzoo.list_adapters())


@pytest.mark.parametrize(
    "build, expected",
    [(tiny_llama, ["q_proj", "v_proj"]), (tiny_bert, ["query", "value"]), (tiny_gpt2, ["c_attn"]),
     (tiny_distilbert, ["q_lin", "v_lin"])],
    ids=["llama", "bert", "gpt2", "distilbert"],
)
@pytest.mark.parametrize("method", ["lora", "lora_xs"])
def test_default_targets_follow_the_architecture(build, expected, method):
    model = lrzoo.wrap(build(), method, r=2)
    assert adapted_names(model) == expected


def test_gpt2_conv1d_layers_get_fan_in_fan_out_and_stay_exact():
    model = lrzoo.wrap(tiny_gpt2(), "lora", r=2, init_lora_weights=False)
    x = tiny_inputs()
    out = model(x).logits
    model.merge_adapter()
    torch.testing.assert_close(model(x).logits, out, rtol=1e-4, atol=1e-5)


def test_targets_that_match_nothing_are_refused():
    with pytest.raises(ValueError, match=r"matched none of what was asked: \['q_proj'\].*named: .*query"):
        lrzoo.wrap(tiny_bert(), "lora", target_modules=["q_proj"])


def test_targets_that_match_only_part_are_refused():
    with pytest.raises(ValueError, match=r"matched only part of what was asked: \['c_attn'\]"):
        lrzoo.wrap(tiny_llama(), "dora", target_modules=["q_proj", "c_attn"])


def test_a_regex_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match="regex"):
        lrzoo.wrap(tiny_llama(), "lora", target_modules=r".*\.nothing_here")


def test_targets_of_an_unsupported_type_are_refused():
    with pytest.raises(ValueError, match="cannot replace"):
        lrzoo.wrap(tiny_llama(), "lora_xs", target_modules=["self_attn"])


@pytest.mark.parametrize("method", ["lora", "dora", "lora_xs"])
def test_rank_larger_than_the_layer_is_refused(method):
    with pytest.raises(ValueError, match=r"r=33 is larger .*rank at most 32"):
        lrzoo.wrap(tiny_llama(), method, r=33, target_modules=["q_proj"])


def test_unknown_method_option_names_the_options():
    with pytest.raises(TypeError, match="Known options"):
        lrzoo.wrap(tiny_llama(), "lora_xs", r=2, not_an_option=1)


def test_integer_base_weights_are_refused():
    model = tiny_llama()
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(layer.weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="floating-point or a bitsandbytes .* base"):
        lrzoo.wrap(model, "lora_xs", r=2, target_modules=["model.layers.0.self_attn.q_proj"])


def test_wrapping_a_peft_model_adds_a_second_adapter():
    model = lrzoo.wrap(tiny_llama(), "lora", r=2, init_lora_weights=False)
    model = lrzoo.wrap(model, "dora", r=2, adapter_name="second", init_lora_weights=False)
    x = tiny_inputs()
    first = model(x).logits
    model.set_adapter("second")
    second = model(x).logits
    assert set(model.peft_config) == {"default", "second"}
    assert (first - second).abs().max() > 1e-4


def test_distilbert_head_includes_pre_classifier_and_survives_reload(tmp_path):
    model = lrzoo.wrap(tiny_distilbert(), "lora", r=2)
    assert {"pre_classifier", "classifier"} <= set(model.peft_config["default"].modules_to_save)
    with torch.no_grad():  # stand-in for training: the head moves away from its init
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.3)
    x = tiny_inputs()
    expected = model.eval()(x).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_distilbert(), tmp_path).eval()  # fresh, untrained head
    torch.testing.assert_close(reloaded(x).logits, expected)


def test_classification_head_is_trainable_and_encoder_is_frozen():
    model = lrzoo.wrap(tiny_bert(), "lora_xs", r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    assert not any("embeddings" in n or n.endswith("query.base_layer.weight") for n in trainable)


def test_causal_lm_gets_no_head_and_the_right_peft_class():
    model = lrzoo.wrap(tiny_llama(), "lora", r=2)
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert model.peft_config["default"].modules_to_save is None
