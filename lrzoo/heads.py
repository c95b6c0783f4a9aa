"""Encoder task heads that pool the way the checkpoint was trained.

transformers' ``AutoModelForSequenceClassification`` reads a BERT through its ``pooler`` (a dense + tanh
layer over [CLS], pretrained for next-sentence prediction) and a RoBERTa through its own dense head over
<s>. A sentence-embedding checkpoint (sentence-transformers: all-MiniLM-L6-v2, ...) was instead trained to
compare sentences by a *pooled* embedding, usually the mean of its token vectors, and ships that choice in
``modules.json`` -> ``1_Pooling/config.json``. Classifying such a checkpoint from [CLS] through a pooler it
never trained starts far below what the checkpoint already knows.

* **Pooling** (``model.pooling``): ``pooler`` = the architecture's own head, i.e. transformers' class
  unchanged; ``cls`` = the first token's last hidden state; ``mean`` = the mean of the last hidden states
  over the attention mask. ``None`` reads the checkpoint's sentence-transformers config, else ``pooler``.
* **Pair form** (``model.similarity_head``, for tasks that compare two sentences: STS-B, MRPC, QQP):
  ``cross_encoder`` = the two sentences in one sequence, a trained linear head on its pooled vector;
  ``bi_encoder`` = each sentence encoded alone, their pooled embeddings compared by cosine, trained with
  sentence-transformers' ``CosineSimilarityLoss`` (``model.pair_loss=cosine``: the MSE between the cosine and
  the label scaled to [0, 1]) or its ``CoSENTLoss`` (``model.pair_loss=cosent``: a ranking loss on the cosines
  of the pairs in a batch, :func:`cosent_loss`). Regression predicts the cosine mapped back onto the label's range; a binary task predicts
  "positive" where the cosine exceeds a threshold chosen to maximise accuracy on held-out training rows
  (:func:`best_threshold`, fitted by the trainer before each evaluation).

:class:`PooledForSequenceClassification` keeps the names transformers uses (the backbone under its
``base_model_prefix``, e.g. ``bert``, and a ``classifier``), so adapter keys and PEFT's ``modules_to_save``
handling are those of the stock class; its class name ends in ``ForSequenceClassification``, so
:func:`lrzoo.wrap` treats it as a sequence classifier. What a saved model needs to be rebuilt is
:func:`head_spec` (``lrzoo_head.json`` beside a saved adapter, ``config.lrzoo_head`` in a full save).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("cls", "mean", "pooler")
PAIR_FORMS = ("cross_encoder", "bi_encoder")
#: how a bi-encoder's cosine is trained: ``cosine`` = CosineSimilarityLoss (MSE to the label), ``cosent`` = CoSENT
PAIR_LOSSES = ("cosine", "cosent")
#: CoSENT's scale on the cosine differences (Su 2022; sentence-transformers' CoSENTLoss default)
COSENT_SCALE = 20.0
#: the file beside a saved adapter that says which head it was trained with (:func:`head_spec`)
HEAD_FILE = "lrzoo_head.json"
#: the keys of the second sentence's encoding under the bi-encoder (the first keeps the usual names)
PAIR_PREFIX = "pair_"
#: the sentence-transformers pooling flags, in the order their pooling is preferred when several are set
_ST_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


def check_pooling(value: Any) -> Optional[str]:
    """``value`` if it is a pooling name or ``None`` (the checkpoint's); a one-line ValueError otherwise."""
    if value is None or value in POOLINGS:
        return value
    raise ValueError(f"model.pooling={value!r}: choose one of {list(POOLINGS)} (pooler: the architecture's own head; "
                     "cls: the first token; mean: the mean over the attention mask) or null (the checkpoint's).")


def check_pair_form(value: Any) -> str:
    """``value`` (``None``: ``cross_encoder``) if it is a pair form; a one-line ValueError otherwise."""
    if value is None:
        return "cross_encoder"
    if value in PAIR_FORMS:
        return value
    raise ValueError(f"model.similarity_head={value!r}: choose cross_encoder (both sentences in one sequence, a "
                     "trained head) or bi_encoder (each sentence alone, the cosine of their pooled embeddings).")


def check_pair_loss(value: Any) -> str:
    """``value`` (``None``: ``cosine``) if it is a bi-encoder loss; a one-line ValueError otherwise."""
    if value is None:
        return "cosine"
    if value in PAIR_LOSSES:
        return value
    raise ValueError(f"model.pair_loss={value!r}: choose cosine (the MSE between the cosine and the label) or cosent "
                     "(a ranking loss: every pair with the higher label should have the higher cosine).")


def cosent_loss(cosine: torch.Tensor, target: torch.Tensor, scale: float = COSENT_SCALE) -> torch.Tensor:
    """CoSENT (Su 2022; sentence-transformers' ``CoSENTLoss``): ``log(1 + sum exp(scale * (cos_j - cos_i)))`` over
    the pairs of the batch with ``target_i > target_j``. It asks only that a more similar pair score the higher
    cosine, not that a cosine equal its label: a binary task's negatives (MRPC's are near-paraphrases) need not
    be pushed to a cosine of 0, which the MSE of CosineSimilarityLoss demands. A batch with one label value has
    no such pair and a loss of 0 (with a gradient of 0)."""
    cosine, target = cosine.float().reshape(-1), target.float().reshape(-1)
    differences = scale * (cosine[None, :] - cosine[:, None])  # [i, j] = scale * (cos_j - cos_i)
    ordered = target[:, None] > target[None, :]  # pairs (i, j) where i should score above j
    differences = differences.masked_fill(~ordered, float("-inf"))
    # the leading 0 is the "1 +" of the log: logsumexp over [0, every ordered difference]
    return torch.logsumexp(torch.cat([differences.new_zeros(1), differences.reshape(-1)]), dim=0)


def checkpoint_pooling(path: Any) -> Optional[str]:
    """The pooling a sentence-transformers checkpoint in directory ``path`` declares (``modules.json`` naming a
    ``Pooling`` module whose ``config.json`` sets ``pooling_mode_mean_tokens`` or ``pooling_mode_cls_token``),
    a full model lrzoo saved (``config.json``'s ``lrzoo_head``), or ``None``.

    A pooling lrzoo does not implement (max, weighted mean, last token) is refused rather than replaced."""
    if path is None:
        return None
    saved = saved_head(path)
    if saved is not None and saved.get("pooling") in POOLINGS:
        return saved["pooling"]
    modules = _read_json(path, "modules.json")
    pooling_dirs = [m.get("path", "") for m in modules if isinstance(m, dict)
                    and str(m.get("type", "")).endswith(".Pooling")] if isinstance(modules, list) else []
    if not pooling_dirs:
        return None
    where = f"{pooling_dirs[0]}/config.json" if pooling_dirs[0] else "config.json"
    config = _read_json(path, where)
    for flag, name in _ST_MODES.items():
        if config.get(flag):
            return name
    set_flags = sorted(k for k, v in config.items() if k.startswith("pooling_mode") and v)
    raise ValueError(f"{path}/{where} pools by {set_flags or 'nothing'}, which lrzoo does not implement; set "
                     f"model.pooling to one of {list(POOLINGS)} explicitly.")


def _read_json(location: Any, relative: str) -> Any:
    """``relative`` under a directory or in a hub repository (transformers' cache; ``{}`` when absent)."""
    root = Path(str(location)).expanduser()
    if root.is_dir():
        path = root / relative
    else:
        from transformers.utils import cached_file

        try:
            found = cached_file(str(location), relative, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
        except (OSError, ValueError):  # not a repository id, or unreachable: nothing is declared
            found = None
        path = Path(found) if found else None
    if path is None or not path.is_file():
        return {}
    with open(path) as handle:
        return json.load(handle)


def saved_head(location: Any) -> Optional[dict[str, Any]]:
    """The head a full model lrzoo saved declares (``config.json``'s ``lrzoo_head``: :meth:`PooledForSequenceClassification.spec`),
    or ``None``."""
    if location is None:
        return None
    saved = _read_json(location, "config.json").get("lrzoo_head")
    return dict(saved) if isinstance(saved, dict) else None


def load_head_weights(model: "PooledForSequenceClassification", location: Any) -> None:
    """Load the head's tensors (``classifier.*``, ``threshold``) of a full model lrzoo saved in directory
    ``location``: ``AutoModel.from_pretrained`` reads the backbone and drops them as unexpected keys."""
    from safetensors import safe_open

    root = Path(str(location))
    index = _read_json(root, "model.safetensors.index.json").get("weight_map")
    files = sorted(set(index.values())) if index else ["model.safetensors"]
    backbone = model.base_model_prefix + "."
    state = {}
    for name in files:
        if not (root / name).is_file():
            continue
        with safe_open(str(root / name), framework="pt") as handle:
            state.update({key: handle.get_tensor(key) for key in handle.keys() if not key.startswith(backbone)})
    missing = [key for key in model.state_dict() if not key.startswith(backbone) and key not in state]
    if missing:
        raise ValueError(f"{root} declares an lrzoo head (config.json: lrzoo_head) but holds no {missing[0]}: it is not "
                         "a complete save of one; load the backbone with model.pooling/model.similarity_head instead.")
    model.load_state_dict(state, strict=False)
    if model.needs_threshold:
        model.set_threshold(float(model.threshold))


def resolve_pooling(pooling: Any, path: Any) -> str:
    """The pooling to use: ``pooling`` when given, else the checkpoint's (:func:`checkpoint_pooling`), else
    ``pooler`` (the architecture's own head: transformers' class)."""
    return check_pooling(pooling) or checkpoint_pooling(path) or "pooler"


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``hidden`` (batch, tokens, width) over the positions where ``mask`` is 1."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def best_threshold(scores: Any, labels: Any) -> float:
    """The cut that maximises accuracy of ``score > cut`` against binary ``labels``: the midpoint between two
    neighbouring sorted scores (or just outside their range); ties go to the lowest cut."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if scores.size == 0 or scores.shape != labels.shape:
        raise ValueError(f"best_threshold needs one label per score, got {scores.shape} and {labels.shape}.")
    order = np.argsort(scores, kind="stable")
    ordered, positive = scores[order], labels[order]
    # cut k: the k lowest scores are predicted negative. Correct = negatives below + positives above.
    negatives_below = np.concatenate([[0], np.cumsum(~positive)])
    positives_above = positive.sum() - np.concatenate([[0], np.cumsum(positive)])
    correct = negatives_below + positives_above
    # a cut between equal scores cannot be made: only positions where the score changes (and both ends)
    allowed = np.concatenate([[True], ordered[1:] > ordered[:-1], [True]])
    k = int(np.flatnonzero(allowed)[np.argmax(correct[allowed])])
    if k == 0:
        return float(ordered[0] - 1.0)
    if k == scores.size:
        return float(ordered[-1])
    return float((ordered[k - 1] + ordered[k]) / 2)


@dataclass
class PairSimilarityOutput(SequenceClassifierOutput):
    """A sequence-classifier output with the bi-encoder's cosine of each pair (``similarity``)."""

    similarity: Optional[torch.FloatTensor] = None


class PooledForSequenceClassification(PreTrainedModel):
    """A backbone (``AutoModel``) with a pooled head: ``cls``/``mean``/``pooler`` pooling and a linear
    classifier (cross-encoder), or the cosine of two pooled embeddings (bi-encoder).

    Args:
        backbone: the encoder, e.g. a ``BertModel``; kept under its ``base_model_prefix``.
        num_labels: classes (classification) or 1 (regression).
        pooling: ``cls``, ``mean`` or ``pooler`` (the backbone's ``pooler_output``).
        pair_form: ``cross_encoder`` or ``bi_encoder`` (binary classification or regression only).
        label_range: ``(low, high)`` of a regression label (the bi-encoder maps the cosine onto it).
        pair_loss: how the bi-encoder's cosine is trained, ``cosine`` (CosineSimilarityLoss) or ``cosent``.
    """

    config_class = PretrainedConfig
    base_model_prefix = "backbone"
    # attention is the backbone's business: these flags only keep PreTrainedModel's init checks from
    # refusing an implementation the backbone already chose (it runs on a copy of the config, see below)
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True

    def __init__(self, backbone: PreTrainedModel, num_labels: int, pooling: str, pair_form: str = "cross_encoder",
                 label_range: Optional[tuple[float, float]] = None, pair_loss: Optional[str] = None) -> None:
        # a copy: PreTrainedModel's init adjusts its config (attention implementation), which must not reach the
        # backbone's; the copy also carries num_labels and lrzoo_head into a full save's config.json
        config = copy.deepcopy(backbone.config)
        super().__init__(config)
        pooling, pair_form, pair_loss = check_pooling(pooling), check_pair_form(pair_form), check_pair_loss(pair_loss)
        if pooling is None:
            raise ValueError("PooledForSequenceClassification needs a pooling (cls, mean or pooler).")
        if pair_form == "bi_encoder" and num_labels > 2:
            raise ValueError(f"model.similarity_head=bi_encoder scores a pair by one cosine: it fits a similarity "
                             f"score or a binary label, not {num_labels} classes; use cross_encoder.")
        if pair_form != "bi_encoder" and pair_loss != "cosine":
            raise ValueError(f"model.pair_loss={pair_loss} trains a bi-encoder's cosine; this head is a {pair_form} "
                             "(a classifier, trained by cross-entropy or MSE): leave model.pair_loss=cosine.")
        if pooling == "pooler" and getattr(backbone, "pooler", None) is None:
            raise ValueError(f"model.pooling=pooler: {type(backbone).__name__} has no pooler layer; use cls or mean.")
        if pooling != "pooler" and getattr(backbone, "pooler", None) is not None:
            # an unused pooler would be a trained-nothing weight (and DDP refuses parameters without gradients)
            backbone.pooler = None
        self.base_model_prefix = backbone.base_model_prefix  # the stock class's name: adapter keys line up
        setattr(self, self.base_model_prefix, backbone)
        self._no_split_modules = getattr(backbone, "_no_split_modules", None)
        self.pooling, self.pair_form, self.pair_loss = pooling, pair_form, pair_loss
        self.num_labels = config.num_labels = num_labels
        self.label_range = tuple(label_range) if label_range is not None else (0.0, 1.0)
        if pair_form == "cross_encoder":
            dropout = getattr(config, "classifier_dropout", None)
            if dropout is None:
                dropout = getattr(config, "hidden_dropout_prob", 0.1)
            self.dropout = nn.Dropout(dropout)
            self.classifier = nn.Linear(config.hidden_size, num_labels)
            self.classifier.weight.data.normal_(0.0, getattr(config, "initializer_range", 0.02))
            self.classifier.bias.data.zero_()
            self.classifier.to(next(backbone.parameters()).dtype)
        else:
            # the cut of a binary bi-encoder (cosine > threshold -> class 1); set by the trainer (best_threshold)
            self.register_buffer("threshold", torch.tensor(0.5))
        config.lrzoo_head = self.spec()

    # ---- what a saved model needs ----------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        """``{"pooling", "pair_form", "num_labels", "label_range"[, "threshold"]}``: how to rebuild this head."""
        spec = {"pooling": self.pooling, "pair_form": self.pair_form, "num_labels": self.num_labels,
                "label_range": list(self.label_range)}
        if self.needs_threshold:
            spec["threshold"] = float(self.threshold)
        return spec

    @property
    def needs_threshold(self) -> bool:
        return self.pair_form == "bi_encoder" and self.num_labels == 2

    def set_threshold(self, value: float) -> None:
        self.threshold.fill_(float(value))
        self.config.lrzoo_head = self.spec()

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone_module.get_input_embeddings()

    @property
    def backbone_module(self) -> PreTrainedModel:
        return getattr(self, self.base_model_prefix)

    # ---- forward ---------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
              token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The pooled embedding of each sequence."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.backbone_module(input_ids=input_ids, attention_mask=attention_mask, **extra)
        if self.pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        return hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                pair_input_ids: Optional[torch.Tensor] = None, pair_attention_mask: Optional[torch.Tensor] = None,
                pair_token_type_ids: Optional[torch.Tensor] = None, **ignored: Any) -> SequenceClassifierOutput:
        if self.pair_form == "bi_encoder":
            return self._bi_encoder(input_ids, attention_mask, token_type_ids, labels,
                                    pair_input_ids, pair_attention_mask, pair_token_type_ids)
        logits = self.classifier(self.dropout(self.embed(input_ids, attention_mask, token_type_ids)))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def _bi_encoder(self, input_ids, attention_mask, token_type_ids, labels, pair_ids, pair_mask, pair_types):
        if pair_ids is None:
            raise ValueError("model.similarity_head=bi_encoder encodes each sentence alone: the batch needs "
                             "pair_input_ids (lrzoo.train.data.encode_rows(..., pairs='separate')).")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if pair_mask is None:
            pair_mask = torch.ones_like(pair_ids)
        # one forward over both sides, padded to a common width (padding is masked out of the pooling)
        width = max(input_ids.shape[1], pair_ids.shape[1])
        pad = lambda t, value: F.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
        pad_id = getattr(self.config, "pad_token_id", None) or 0
        ids = torch.cat([pad(input_ids, pad_id), pad(pair_ids, pad_id)])
        mask = torch.cat([pad(attention_mask, 0), pad(pair_mask, 0)])
        types = None
        if token_type_ids is not None:
            types = torch.cat([pad(token_type_ids, 0),
                               pad(pair_types if pair_types is not None else torch.zeros_like(pair_ids), 0)])
        u, v = self.embed(ids, mask, types).float().chunk(2)
        cosine = F.cosine_similarity(u, v, dim=-1)
        low, high = self.label_range
        loss = None
        if labels is not None:  # the label scaled to [0, 1]; CosineSimilarityLoss is the MSE to it
            target = labels.float() if self.num_labels == 2 else (labels.float() - low) / (high - low)
            loss = cosent_loss(cosine, target) if self.pair_loss == "cosent" else F.mse_loss(cosine, target)
        if self.num_labels == 2:
            margin = cosine - self.threshold.float()
            logits = torch.stack([-margin, margin], dim=-1)
        else:
            logits = (low + (high - low) * cosine).unsqueeze(-1)
        return PairSimilarityOutput(loss=loss, logits=logits, similarity=cosine)


def pair_form_for(similarity_head: Any, task: Any) -> str:
    """The pair form a run uses: ``similarity_head`` (``model.similarity_head``; ``None``: ``cross_encoder``) for a
    task whose label is a similarity (``task.similarity``), ``cross_encoder`` for any other (a preset sets it for
    every task; single sentences and NLI pairs have no similarity to take a cosine of)."""
    form = check_pair_form(similarity_head)
    return form if getattr(task, "similarity", False) else "cross_encoder"


def find_pooled_head(model: nn.Module) -> Optional[PooledForSequenceClassification]:
    """The :class:`PooledForSequenceClassification` inside ``model`` (a PeftModel, DDP wrapper...), or None."""
    for module in model.modules():
        if isinstance(module, PooledForSequenceClassification):
            return module
    return None


def pair_encoding(model: nn.Module) -> str:
    """How ``model`` reads sentence pairs: ``"separate"`` (a bi-encoder) or ``"joint"`` (one sequence)."""
    head = find_pooled_head(model)
    return "separate" if head is not None and head.pair_form == "bi_encoder" else "joint"


def head_spec(model: nn.Module) -> Optional[dict[str, Any]]:
    """How ``model`` pools and reads pairs (written to ``results.json``): its
    :meth:`PooledForSequenceClassification.spec`, ``{"pooling": "pooler", "pair_form": "cross_encoder"}`` for
    transformers' own sequence-classification head, or None for a model with no such head (a causal LM), so that
    a language model's record does not claim an encoder head it never had."""
    head = find_pooled_head(model)
    if head is not None:
        return head.spec()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(base).__name__.endswith("ForSequenceClassification"):
        return {"pooling": "pooler", "pair_form": "cross_encoder"}
    return None
