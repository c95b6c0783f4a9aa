"""Optimizers for adapted models: LoRA+ parameter groups, a separate head learning rate.

Works with the HF ``Trainer`` (``Trainer(..., optimizers=(make_optimizer(model, lr=...), None))``)
and with plain loops.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from peft.optimizers import create_loraplus_optimizer
from peft.utils.other import ModulesToSaveWrapper


def make_optimizer(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.0,
    head_lr: Optional[float] = None,
    loraplus_lr_ratio: Optional[float] = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters of ``model`` with the method's groups.

    Args:
        model: a model returned by :func:`lrzoo.wrap` (or any module).
        lr: learning rate of the adapter (η_A for LoRA+).
        weight_decay: applied to ≥2-D parameters only (LoRA+: PEFT's ``loraplus_weight_decay``).
        head_lr: learning rate of the fully trained task head (``modules_to_save``); default ``lr``.
            LoRA-XS/LoRA-SB tune it separately.
        loraplus_lr_ratio: λ = η_B/η_A. Defaults to the value given to ``wrap(..., "loraplus")``
            (16); for other methods LoRA+ groups are built only when it is given.
        optimizer_cls, optimizer_kwargs: the optimizer (AdamW by default) and its options.
    """
    training = getattr(model, "lrzoo_training", {}) or {}
    if loraplus_lr_ratio is None:
        loraplus_lr_ratio = training.get("loraplus_lr_ratio")
    if loraplus_lr_ratio is not None:
        # PEFT's implementation is the reference one (it matches the paper's code): lora_B and
        # every 1-D parameter get lr·λ, LoRA embeddings get loraplus_lr_embedding.
        optimizer_kwargs.setdefault("loraplus_lr_embedding", training.get("loraplus_lr_embedding", 1e-6))
        return create_loraplus_optimizer(
            model, optimizer_cls, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
            loraplus_weight_decay=weight_decay, **optimizer_kwargs,
        )

    head_names = {
        name for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)
    } or set(getattr(model, "lrzoo_head_modules", ()))  # baselines (lrzoo.train.baselines) mark their head
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_head = any(name.startswith(head + ".") for head in head_names)
        group_lr = head_lr if (in_head and head_lr is not None) else lr
        decay = weight_decay if param.dim() >= 2 else 0.0
        groups.setdefault((group_lr, decay), []).append(param)
    if not groups:
        raise ValueError("The model has no trainable parameters; wrap it with lrzoo.wrap first.")
    param_groups = [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]
    return optimizer_cls(param_groups, lr=lr, **optimizer_kwargs)
