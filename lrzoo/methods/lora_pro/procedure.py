"""LoRA-Pro's training procedure: its optimizer, :class:`~.optimizer.LoraProAdamW`, over the model's LoRA pairs."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ...procedure import Procedure, checked_rates, plain_groups, register_procedure
from .optimizer import LoraProAdamW, lora_pairs


@register_procedure
class LoraProProcedure(Procedure):
    """LoRA-Pro (arXiv 2407.18242): every LoRA pair takes the step closest to full fine-tuning's AdamW step, the
    rest (a task head, biases) plain AdamW in the same optimizer."""

    name = "lora_pro"

    def __post_init__(self) -> None:
        if self.options.get("lora_pro", True) is not True:
            raise ValueError(f"lrzoo.wrap(..., 'lora_pro', lora_pro={self.options['lora_pro']!r}): the method is "
                             "LoRA-Pro's optimizer; for LoRA layers trained with AdamW wrap the model with 'lora'.")

    def build_optimizer(self, model: nn.Module, lr: float, *, weight_decay: float = 0.0,
                        head_lr: Optional[float] = None, embedding_lr: Optional[float] = None,
                        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                        **optimizer_kwargs: Any) -> torch.optim.Optimizer:
        """:class:`~.optimizer.LoraProAdamW` (``optimizer_cls`` does not apply: LoRA-Pro is its own AdamW). The pairs
        are found under any adapter name (:func:`~.optimizer.lora_pairs`); a model with none, or with LoRA tensors
        outside LoRA-Pro's closed form (DoRA, embeddings...), is refused, never trained as AdamW."""
        if "loraplus_lr_ratio" in optimizer_kwargs:
            raise ValueError("loraplus_lr_ratio does not apply to LoRA-Pro, whose optimizer sets the steps of A and B "
                             "itself; drop it (or wrap the model with 'loraplus').")
        optimizer_kwargs.setdefault("bias_correction_offset", self.options.get("bias_correction_offset", 0))
        # the head and the input embeddings (a modules_to_save copy) are plain AdamW groups at their own rates
        rates = checked_rates(model, lr, head_lr, embedding_lr)
        return LoraProAdamW(plain_groups(model, lr, weight_decay, rates), lora_pairs(model), lr=lr,
                            **optimizer_kwargs)
