"""Reference points for the adapter tables: full fine-tuning, a trained head on a frozen model, and the
untrained base model.

They are recipe options (``adapter=full_finetune`` / ``head_only`` / ``zero_shot``), not adapters:
``lrzoo.wrap`` does not know them, the trainer runs the plain ``transformers`` model and saves it with
``save_pretrained`` (the whole model for full fine-tuning). ``zero_shot`` trains nothing: the model is
recorded as ``evaluate_only`` (:class:`lrzoo.registry.TrainingRecord`), so the trainer skips the loop (0 steps, no optimizer, no checkpoint, no
saved model) and evaluates the base model once (for a classification task, with its untrained head).
"""

from __future__ import annotations

from peft import TaskType
from torch import nn

from ..heads import find_pooled_head
from ..registry import TrainingRecord, set_record
from ..targets import is_quantized
from ..wrap import infer_task_type, task_head_modules

BASELINES = ("full_finetune", "head_only", "zero_shot")


def prepare_baseline(model: nn.Module, name: str) -> nn.Module:
    """Set ``requires_grad`` for baseline ``name`` and record the head for ``make_optimizer``'s ``head_lr``."""
    if name not in BASELINES:
        raise ValueError(f"Unknown baseline {name!r}; choose one of {list(BASELINES)}.")
    quantized = [n for n, m in model.named_modules() if is_quantized(m)]
    if name == "full_finetune" and quantized:  # (also the path of GaLore/Fira: every weight trained)
        raise ValueError(f"Training every weight needs a full-precision model, and {len(quantized)} layer(s) are "
                         f"bitsandbytes-quantized (e.g. {quantized[0]}): load it with model.quantization=none, or "
                         "train an adapter on the quantized base (QLoRA).")
    heads = task_head_modules(model)
    pooled = find_pooled_head(model)
    if name == "head_only" and pooled is not None and pooled.pair_form == "bi_encoder":
        raise ValueError("adapter=head_only trains a head on frozen features, and a bi-encoder has none (it scores the "
                         "cosine of two embeddings; adapter=zero_shot evaluates it untrained): for a linear probe "
                         "set model.similarity_head=cross_encoder.")
    if name == "head_only" and (not heads or infer_task_type(model) == TaskType.CAUSAL_LM):
        # a causal LM's "head" is its output embedding (often tied to the input one): not a task head
        raise ValueError(f"adapter=head_only needs a task head, and {type(model).__name__} has none outside its "
                         "backbone; use full_finetune or an adapter.")
    for param_name, param in model.named_parameters():
        in_head = any(param_name.startswith(head + ".") for head in heads)
        param.requires_grad_(name == "full_finetune" or (in_head and name == "head_only"))
    set_record(model, TrainingRecord(head_modules=tuple(heads), evaluate_only=name == "zero_shot"))
    return model
