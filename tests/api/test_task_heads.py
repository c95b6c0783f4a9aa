"""lrzoo.wrap finds, trains and saves the task head of every transformers task family: text
classification, token classification, extractive QA, image and audio classification.

A head left out of ``modules_to_save`` is re-initialised at random when the adapter is loaded onto a
fresh copy of the pretrained model (peft#577, #876, #1070). Each case: wrap, perturb every trained
tensor (a stand-in for training), save, load onto a model whose backbone is the same "pretrained"
weights but whose head was initialised with another seed, and get the same outputs.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from peft import PeftModel, TaskType
from peft.tuners.tuners_utils import BaseTunerLayer

import lrzoo
from lrzoo.wrap import task_head_modules
from conftest import tiny_inputs

_SPEECH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, conv_dim=(8, 8),
               conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
               classifier_proj_size=16, num_labels=3)
_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, image_size=16,
               patch_size=8, num_labels=3)
_BERT = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
             max_position_embeddings=64, num_labels=3)


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


#: family -> (config, model class, inputs, expected head modules, expected targets, expected task type)
FAMILIES = {
    "vit_image": (lambda: T.ViTConfig(**_VISION), T.ViTForImageClassification,
                  lambda: {"pixel_values": _randn(2, 3, 16, 16)}, ["classifier"], ["q_proj", "v_proj"], None),
    "wav2vec2_audio": (lambda: T.Wav2Vec2Config(**_SPEECH), T.Wav2Vec2ForSequenceClassification,
                       lambda: {"input_values": _randn(2, 400)}, ["projector", "classifier"], ["q_proj", "v_proj"],
                       None),
    "whisper_audio": (lambda: T.WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=40,
                                              decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=40,
                                              num_mel_bins=8, max_source_positions=16, classifier_proj_size=16,
                                              num_labels=3),
                      T.WhisperForAudioClassification, lambda: {"input_features": _randn(2, 8, 32)},
                      ["projector", "classifier"], ["q_proj", "v_proj"], None),
    "bert_token": (lambda: T.BertConfig(**_BERT), T.BertForTokenClassification,
                   lambda: {"input_ids": tiny_inputs()}, ["classifier"], ["query", "value"], TaskType.TOKEN_CLS),
    "bert_qa": (lambda: T.BertConfig(**{**_BERT, "num_labels": 2}), T.BertForQuestionAnswering,
                lambda: {"input_ids": tiny_inputs()}, ["qa_outputs"], ["query", "value"], TaskType.QUESTION_ANS),
}


def build(family: str, seed: int):
    config, model_cls, *_ = FAMILIES[family]
    torch.manual_seed(seed)
    return model_cls(config()).eval()


def pretrained_with_fresh_head(family: str, head: list[str]):
    """The 'pretrained' backbone (seed 0) under a head initialised with another seed (1)."""
    model, pretrained = build(family, seed=1), build(family, seed=0)
    for name, child in pretrained.named_children():
        if name not in head:
            model.get_submodule(name).load_state_dict(child.state_dict())
    return model


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return torch.cat([out.logits.flatten()] if "logits" in out else [out.start_logits.flatten(), out.end_logits.flatten()])


@pytest.mark.parametrize("method", ["lora", "lora_xs"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_task_head_is_trained_saved_and_restored(family, method, tmp_path):
    *_, make_inputs, head, targets, task_type = FAMILIES[family]
    inputs = make_inputs()
    model = lrzoo.wrap(build(family, seed=0), method, r=2)

    config = model.peft_config["default"]
    assert config.task_type == task_type
    assert set(head) <= set(config.modules_to_save)
    assert sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}) == targets
    for name in head:
        trained = [p.requires_grad for n, p in model.named_parameters() if f".{name}.modules_to_save." in n]
        assert trained and all(trained), f"the {name} head is not trained"
    frozen_backbone = [p.requires_grad for n, p in model.named_parameters() if n.endswith("base_layer.weight")]
    assert frozen_backbone and not any(frozen_backbone)

    with torch.no_grad():  # stand-in for training: every trained tensor moves away from its init
        generator = torch.Generator().manual_seed(7)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    expected = outputs(model.eval(), inputs)
    model.save_pretrained(tmp_path)

    untrained = outputs(pretrained_with_fresh_head(family, head), inputs)
    assert (untrained - expected).abs().max() > 1e-3  # the fresh head really differs
    for load in (lrzoo.load, PeftModel.from_pretrained):
        reloaded = load(pretrained_with_fresh_head(family, head), str(tmp_path)).eval()
        torch.testing.assert_close(outputs(reloaded, inputs), expected, rtol=1e-5, atol=1e-5)


def test_whisper_encoder_is_the_backbone_not_part_of_the_head():
    # WhisperForAudioClassification's base_model_prefix ("model") names no child: the pretrained
    # encoder must still not be mistaken for a head (it would be trained in full and saved).
    assert task_head_modules(build("whisper_audio", seed=0)) == ["projector", "classifier"]


def test_vision_transformers_have_default_targets_matching_their_attention_names():
    from lrzoo.targets import default_targets

    model = build("vit_image", seed=0)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(default_targets(model)) <= names
