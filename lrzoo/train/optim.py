"""``lrzoo.make_optimizer``: the optimizer a wrapped model's method trains with, for any loop.

Works with the HF ``Trainer`` (``Trainer(..., optimizers=(make_optimizer(model, lr=...), None))``)
and with plain loops. It builds nothing itself: the method's training procedure does
(:meth:`lrzoo.procedure.Procedure.build_optimizer`: LoRA+'s groups, LoRA-Pro's optimizer, plain AdamW with the
head at ``head_lr`` and the input embeddings at ``embedding_lr``), from the options ``wrap`` recorded on the model
(:func:`lrzoo.registry.record_of`); everything :func:`make_optimizer` is given wins. lrzoo's trainer asks the same procedure.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..procedure import PROCEDURES, Procedure, procedure_of
from ..registry import record_of
from .procedures import LowRankOptimizerProcedure

__all__ = ["make_optimizer"]


def make_optimizer(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.0,
    head_lr: Optional[float] = None,
    embedding_lr: Optional[float] = None,
    loraplus_lr_ratio: Optional[float] = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    method: Optional[str] = None,
    lora_pro: Optional[bool] = None,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters of ``model`` with the method's groups.

    Args:
        model: a model returned by :func:`lrzoo.wrap` (or any module).
        lr: learning rate of the adapter (η_A for LoRA+).
        weight_decay: applied to ≥2-D parameters only (LoRA+: PEFT's ``loraplus_weight_decay``).
        head_lr: learning rate of the fully trained task head (``modules_to_save``); default ``lr``
            (for LoRA+: PEFT's grouping, head matrices at ``lr``, head biases at ``lr``·λ).
            LoRA-XS/LoRA-SB tune it separately. Given with LoRA+, every head parameter gets it and
            the adapter keeps LoRA+'s groups (lora_B at ``lr``·λ, lora_A at ``lr``). Refused where it reaches
            no tensor of its own: an output layer tied to the input embeddings (unless ``embedding_lr`` equals it),
            a frozen head, no head (docs/recipes.md#the-heads-rate-trainerhead_lr).
        embedding_lr: learning rate of the input embeddings (the trainable parameters of the base model's
            ``get_input_embeddings()``: the token embeddings in full training, their ``modules_to_save`` copy);
            default ``lr``. Refused for a model whose input embeddings do not train, and where the embedding is
            also the head (tied, or a ``modules_to_save`` copy) with a ``head_lr`` that differs.
        loraplus_lr_ratio: λ = η_B/η_A. Defaults to the value given to ``wrap(..., "loraplus")``
            (16); for a method trained plainly, LoRA+ groups are built only when it is given. Likewise the
            ``loraplus_lr_embedding`` keyword (default: ``wrap``'s, else 1e-6).
        optimizer_cls, optimizer_kwargs: the optimizer (AdamW by default) and its options.
        method: a low-rank gradient optimizer from ``lrzoo.list_optimizers()`` (``"galore"``, ``"fira"``)
            over a plain model's weights, built by :func:`lrzoo.optimizers.create_optimizer`; its
            options (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``, ``target_modules``,
            ``betas``, ``eps``) go in ``optimizer_kwargs``. Not combined with LoRA+ or ``optimizer_cls``.
        lora_pro: ``True`` builds LoRA-Pro's optimizer (:class:`lrzoo.methods.lora_pro.LoraProAdamW`) whatever the
            model was wrapped with, ``False`` plain AdamW even for a ``"lora_pro"`` model; ``None`` (default): the
            method's own. The pairs are found under any adapter name (:func:`lrzoo.methods.lora_pro.lora_pairs`); a
            model with none, or with LoRA tensors outside LoRA-Pro's closed form (DoRA, embeddings...), is refused.
    """
    record = record_of(model)
    if method is not None:
        procedure: Procedure = LowRankOptimizerProcedure({"method": method})
    elif lora_pro is not None:  # a method's optimizer picked by hand: LoRA-Pro's, or none
        procedure = PROCEDURES.lookup("lora_pro" if lora_pro else "default")(dict(record.options))
    else:
        procedure = procedure_of(model)
    if loraplus_lr_ratio is not None:
        optimizer_kwargs["loraplus_lr_ratio"] = loraplus_lr_ratio
        if type(procedure).build_optimizer is Procedure.build_optimizer:  # LoRA+ groups asked of a plain method
            procedure = PROCEDURES.lookup("loraplus")(dict(record.options))
    return procedure.build_optimizer(model, lr, weight_decay=weight_decay, head_lr=head_lr, embedding_lr=embedding_lr,
                                     optimizer_cls=optimizer_cls, **optimizer_kwargs)
