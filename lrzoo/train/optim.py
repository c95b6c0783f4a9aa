"""Optimizers for adapted models: LoRA+ parameter groups, a separate head learning rate.

Works with the HF ``Trainer`` (``Trainer(..., optimizers=(make_optimizer(model, lr=...), None))``)
and with plain loops.

Options: everything :func:`make_optimizer` is given wins. LoRA+'s λ and embedding lr not given are
taken from the options ``wrap`` recorded on the model (:func:`lrzoo.registry.training_options`), so
``make_optimizer(lrzoo.wrap(model, "loraplus"), lr=...)`` is LoRA+. lrzoo's trainer passes them
explicitly (the ``loraplus`` entry of :data:`lrzoo.train.procedures.PROCEDURES`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from peft.optimizers import create_loraplus_optimizer
from peft.utils.other import ModulesToSaveWrapper

from ..optimizers import create_optimizer
from ..optimizers.lora_pro import LoraProAdamW, lora_pairs
from ..registry import training_options


def make_optimizer(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.0,
    head_lr: Optional[float] = None,
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
            the adapter keeps LoRA+'s groups (lora_B at ``lr``·λ, lora_A at ``lr``).
        loraplus_lr_ratio: λ = η_B/η_A. Defaults to the value given to ``wrap(..., "loraplus")``
            (16); for other methods LoRA+ groups are built only when it is given. Likewise the
            ``loraplus_lr_embedding`` keyword (default: ``wrap``'s, else 1e-6).
        optimizer_cls, optimizer_kwargs: the optimizer (AdamW by default) and its options.
        method: a low-rank gradient optimizer from ``lrzoo.list_optimizers()`` (``"galore"``, ``"fira"``)
            over a plain model's weights, built by :func:`lrzoo.optimizers.create_optimizer`; its
            options (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``, ``target_modules``,
            ``betas``, ``eps``) go in ``optimizer_kwargs``. Not combined with LoRA+ or ``optimizer_cls``.
        lora_pro: build LoRA-Pro's optimizer (:class:`lrzoo.optimizers.lora_pro.LoraProAdamW`): every LoRA
            pair takes the step closest to full fine-tuning's, the rest plain AdamW. Defaults to what
            ``wrap(..., "lora_pro")`` recorded (with its ``bias_correction_offset``). The pairs are found under
            any adapter name (:func:`lrzoo.optimizers.lora_pro.lora_pairs`); a model with none, or with LoRA
            tensors outside LoRA-Pro's closed form (DoRA, embeddings...), is refused, never trained as AdamW.
    """
    head = head_parameter_ids(model)
    _check_lr_is_used(model, lr, head_lr, head)
    if method is not None:
        if loraplus_lr_ratio is not None or optimizer_cls is not torch.optim.AdamW:
            raise ValueError(f"method={method!r} is an optimizer of its own: drop loraplus_lr_ratio and optimizer_cls.")
        return create_optimizer(model, method, lr, weight_decay=weight_decay, head_lr=head_lr,
                                head_params=head, **optimizer_kwargs)
    training = training_options(model)  # wrap's record: defaults for what the caller did not give
    if lora_pro is None:
        lora_pro = bool(training.get("lora_pro", False))
    if lora_pro:
        optimizer_kwargs.setdefault("bias_correction_offset", training.get("bias_correction_offset", 0))
        return LoraProAdamW(_plain_groups(model, lr, weight_decay, head_lr, head), lora_pairs(model), lr=lr,
                            **optimizer_kwargs)
    if loraplus_lr_ratio is None:
        loraplus_lr_ratio = training.get("loraplus_lr_ratio")
    if loraplus_lr_ratio is not None:
        # PEFT's implementation is the reference one (it matches the paper's code): lora_B and
        # every 1-D parameter get lr·λ, LoRA embeddings get loraplus_lr_embedding.
        embedding_lr = optimizer_kwargs.pop("loraplus_lr_embedding", training.get("loraplus_lr_embedding", 1e-6))
        optimizer = create_loraplus_optimizer(
            model, optimizer_cls, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
            loraplus_weight_decay=weight_decay, loraplus_lr_embedding=embedding_lr, **optimizer_kwargs,
        )
        if head_lr is None or not head:
            return optimizer
        # The head is no adapter tensor: it gets head_lr (with the weight decay PEFT gave it), the
        # adapter keeps PEFT's groups. Rebuilt from PEFT's groups so they stay the reference ones.
        param_groups = []
        for group in optimizer.param_groups:
            options = {"lr": group["lr"], "weight_decay": group["weight_decay"]}
            for in_head in (False, True):
                params = [p for p in group["params"] if (id(p) in head) == in_head]
                if params:
                    param_groups.append({**options, "params": params, **({"lr": head_lr} if in_head else {})})
        return optimizer_cls(param_groups, lr=lr, **optimizer_kwargs)

    return optimizer_cls(_plain_groups(model, lr, weight_decay, head_lr, head), lr=lr, **optimizer_kwargs)


def _check_lr_is_used(model: nn.Module, lr: float, head_lr: Optional[float], head: set[int]) -> None:
    """Refuse an ``lr`` that would train nothing: every trainable tensor is the head, which trains at ``head_lr``.

    A head-only run swept over ``lr`` with ``head_lr`` set would otherwise repeat one run under several names
    (a learning-rate grid of identical points, reported as tuned).
    """
    if head_lr is None or head_lr == lr:
        return
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable and all(id(p) in head for p in trainable):
        raise ValueError(f"lr={lr:g} trains nothing: every trainable parameter is the task head, which trains at "
                         f"head_lr={head_lr:g}. Set head_lr=None (trainer.head_lr=null: the head trains at lr) "
                         "or make the two equal.")


def _plain_groups(model: nn.Module, lr: float, weight_decay: float, head_lr: Optional[float],
                  head: set[int]) -> list[dict]:
    """Param groups of the trainable parameters: the head (``head``: its parameter ids) at ``head_lr``,
    weight decay on ≥2-D tensors."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group_lr = head_lr if (id(param) in head and head_lr is not None) else lr
        decay = weight_decay if param.dim() >= 2 else 0.0
        groups.setdefault((group_lr, decay), []).append(param)
    if not groups:
        raise ValueError("The model has no trainable parameters; wrap it with lrzoo.wrap first.")
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]


def head_parameter_ids(model: nn.Module) -> set[int]:
    """The ids of the trainable parameters of the task head: the ``modules_to_save`` copies, or the
    modules a baseline (:mod:`lrzoo.train.baselines`) marks as ``model.lrzoo_head_modules``."""
    head_names = {
        name for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)
    } or set(getattr(model, "lrzoo_head_modules", ()))
    return {
        id(param) for name, param in model.named_parameters()
        if param.requires_grad and any(name.startswith(head + ".") for head in head_names)
    }
