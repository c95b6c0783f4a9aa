"""LoRA (arXiv 2106.09685), LoRA+ (arXiv 2402.12354) and DoRA (arXiv 2402.09353).

All three keep PEFT's own ``LoraConfig`` and checkpoint layout, so what ``lrzoo.wrap`` saves is a
native ``LORA`` adapter (``use_dora=True`` for DoRA) that stock PEFT loads without lrzoo.

* LoRA:  ``W' = W + s·B A``, ``s = α/r``; A Kaiming-uniform(a=√5), B = 0.
* LoRA+: the same layer; only the optimizer differs (``η_B = λ·η_A``, λ = 16 by default), built by its
  procedure, :class:`LoraPlusProcedure` (behind :func:`lrzoo.make_optimizer` and lrzoo's trainer).
* DoRA:  ``W' = m ⊙ (W + sBA) / ‖W + sBA‖_row`` with the norm detached (paper §4.3), computed in
  fp32 and clamped at ``DORA_EPS`` so zero rows of W give no NaN (PEFT divides 0/0, peft#2049).

What lrzoo adds over PEFT's layer is the forward: :class:`FastLoraLinear` subclasses PEFT's
``lora.Linear`` (same parameters, same state dict, same merge) and routes the common case (one
active adapter, unmerged) through :mod:`lrzoo.kernels`, which saves fewer activations and, on
CUDA, runs fused Triton kernels. Everything else falls back to PEFT's forward.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn as nn
from peft import LoraConfig, PeftConfig
from peft.optimizers import create_loraplus_optimizer
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from .. import kernels
from ..kernels.common import DORA_EPS
from ..layer import dropout_probability
from ..peft_bridge import (DoraLinearLayer, DoraLinearVariant, PeftLoraLinear, stash, swap_layer_class, transpose,
                           unstash, use_layer_classes)
from ..procedure import Procedure, checked_rates, register_procedure
from ..registry import register_adapter
from ..targets import is_quantized, quantization_of
from .base_moving_init import record_initial_factors


class StableDoraLinearLayer(DoraLinearLayer):
    """PEFT's DoRA magnitude module with the row norm taken in fp32 and clamped at ``DORA_EPS``.

    Used by PEFT's own DoRA paths (merge, mixed-batch forward), so they agree with lrzoo's fast path.
    """

    def get_weight_norm(self, weight, lora_weight, scaling, adapter_name: Optional[str] = None) -> torch.Tensor:
        weight = transpose(weight, self.fan_in_fan_out).float() + scaling * lora_weight.float()
        return torch.linalg.norm(weight, dim=1).clamp_min(DORA_EPS)


class StableDoraLinearVariant(DoraLinearVariant):
    """PEFT's DoRA variant using :class:`StableDoraLinearLayer`, with an unmerge that survives m = 0.

    A row whose magnitude is 0 (a zero row of W at init) merges to a zero row, from which
    ``W'/g − ΔW`` cannot recover W; those rows are stashed at merge time and restored at unmerge.
    """

    @staticmethod
    def init(module, adapter_name: str, **kwargs: Any) -> None:
        DoraLinearVariant.init(module, adapter_name=adapter_name, **kwargs)
        swap_layer_class(module.lora_magnitude_vector[adapter_name], StableDoraLinearLayer)

    @staticmethod
    def _stash_zero_rows(module, active_adapter: str, weight: torch.Tensor) -> None:
        zero = (module.lora_magnitude_vector[active_adapter].weight == 0).nonzero().flatten()
        rows = transpose(weight, module.fan_in_fan_out)[zero].clone()
        stash(module, f"{active_adapter}-zero_rows", (zero, rows))

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        StableDoraLinearVariant._stash_zero_rows(module, active_adapter, orig_weight)
        return DoraLinearVariant.merge_safe(module, active_adapter, orig_weight)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        StableDoraLinearVariant._stash_zero_rows(module, active_adapter, orig_weight)
        DoraLinearVariant.merge_unsafe(module, active_adapter, orig_weight)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        restored = DoraLinearVariant.unmerge(module, active_adapter, orig_weight)
        zero, rows = unstash(module, f"{active_adapter}-zero_rows")
        if zero.numel():
            transpose(restored, module.fan_in_fan_out)[zero] = rows.to(restored.dtype)
        return restored


class FastLoraLinear(PeftLoraLinear):
    """PEFT's LoRA ``Linear`` whose common-case forward runs through :mod:`lrzoo.kernels`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        # ``fan_in_fan_out`` describes the layer, not the model: transformers' Conv1D stores Wᵀ, nn.Linear
        # does not, and one model may hold both. PEFT's default dispatch fixes the flag per layer (by
        # mutating the shared config); custom modules are not dispatched that way, so decide it here
        # from the layer, on a copy of the config.
        kwargs.pop("fan_in_fan_out", None)
        conv1d = isinstance(base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer,
                            Conv1D)
        if config.fan_in_fan_out != conv1d:
            config = copy.copy(config)
            config.fan_in_fan_out = conv1d
        kwargs["is_target_conv_1d_layer"] = conv1d
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    @property
    def lora_variants(self):
        variants = dict(super().lora_variants)
        variants[("use_dora",)] = StableDoraLinearVariant
        return variants

    def _fast_path_adapter(self, args: tuple, kwargs: dict) -> Optional[str]:
        """The single adapter the fast path can serve, or ``None`` to use PEFT's forward."""
        if args or kwargs or self.disable_adapters or self.merged or self.get_base_layer().weight.requires_grad:
            return None  # (the kernels treat W as frozen; a trained W takes PEFT's autograd path)
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        variant = self.lora_variant.get(name)
        if variant is not None and not isinstance(variant, StableDoraLinearVariant):
            return None
        if self.lora_B[name].bias is not None or not isinstance(self.lora_A[name], nn.Linear):
            return None
        return name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._fast_path_adapter(args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        weight = base.weight.T if self.fan_in_fan_out else base.weight
        p = dropout_probability(self.lora_dropout[name])
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if name in self.lora_variant:
            magnitude = self.lora_magnitude_vector[name].weight
            return kernels.dora_linear(x, weight, base.bias, A, B, magnitude, self.scaling[name], p, self.training)
        return kernels.lora_linear(x, weight, base.bias, A, B, self.scaling[name], p, self.training)


def fast_lora_layer(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> Optional[nn.Module]:
    """PEFT's custom-module hook: a :class:`FastLoraLinear`, or ``None`` for a bitsandbytes layer.

    bnb's Linear4bit/Linear8bitLt are ``nn.Linear`` subclasses; returning ``None`` hands them on to PEFT's
    own QLoRA layers (dequantize-aware merge and DoRA norm), which the next dispatcher builds.
    """
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if is_quantized(base):
        return None
    return FastLoraLinear(target, adapter_name, config=config, **kwargs)


def build_lora_config(use_dora: bool = False, **kwargs: Any) -> LoraConfig:
    """A stock ``LoraConfig`` whose nn.Linear/Conv1D targets get :class:`FastLoraLinear`.

    The custom-module mapping is not written to ``adapter_config.json``: the checkpoint stays a
    plain LORA adapter. :func:`lrzoo.load` re-applies it when loading.
    """
    config = LoraConfig(use_dora=use_dora, **kwargs)
    attach_fast_layers(config)
    return config


def attach_fast_layers(config: LoraConfig) -> LoraConfig:
    use_layer_classes(config, {nn.Linear: fast_lora_layer, Conv1D: fast_lora_layer})
    return config


LORA_ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def _base_moving_init(peft_model: Any, adapter_name: str) -> None:
    """``init_lora_weights="pissa"``/``"olora"`` given to any LoRA-family method moves the base weight: save the
    update against the original weight, as ``adapter=pissa`` does (:mod:`lrzoo.methods.base_moving_init`)."""
    record_initial_factors(peft_model, adapter_name)


def _fast_layers_on_load(config: PeftConfig) -> None:
    """:func:`lrzoo.load` of any ``LORA`` checkpoint (LoRA, DoRA, LoRA+, PiSSA... or stock PEFT's) builds lrzoo's
    layers."""
    if isinstance(config, LoraConfig):
        attach_fast_layers(config)


def peft_lora_config(*, r: int, alpha: Optional[float] = None, dropout: float = 0.0, target_modules: Any = None,
                     task_type: Any = None, use_dora: bool = False) -> LoraConfig:
    """Stock PEFT's config of the same LoRA/DoRA layer (the benchmarks' PEFT rows), B ≠ 0 as a trained adapter."""
    return LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, target_modules=target_modules,
                      lora_dropout=dropout, use_dora=use_dora, init_lora_weights=False, task_type=task_type)


@register_procedure
class LoraPlusProcedure(Procedure):
    """LoRA+ (arXiv 2402.12354): PEFT's reference parameter groups with η_B = λ·η_A (λ: ``loraplus_lr_ratio``)."""

    name = "loraplus"

    def build_optimizer(self, model: nn.Module, lr: float, *, weight_decay: float = 0.0,
                        head_lr: Optional[float] = None, embedding_lr: Optional[float] = None,
                        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                        loraplus_lr_ratio: Optional[float] = None, loraplus_lr_embedding: Optional[float] = None,
                        **optimizer_kwargs: Any) -> torch.optim.Optimizer:
        """LoRA+'s groups; λ and the embedding lr not given come from the options ``wrap`` recorded (16, 1e-6)."""
        rates = checked_rates(model, lr, head_lr, embedding_lr)
        if embedding_lr is not None:
            lora_on_embeddings = [name for name, p in model.named_parameters()
                                  if id(p) in rates.embeddings and "lora_embedding_" in name]
            if lora_on_embeddings:  # (lrzoo.wrap puts no LoRA on an embedding; a stock PEFT model may)
                raise ValueError(f"embedding_lr={embedding_lr:g} and LoRA+'s loraplus_lr_embedding both apply to "
                                 f"{lora_on_embeddings[0]}, a LoRA factor on the input embeddings: set embedding_lr="
                                 "None (trainer.embedding_lr=null) and give loraplus_lr_embedding.")
        ratio = self.options.get("loraplus_lr_ratio", 16.0) if loraplus_lr_ratio is None else loraplus_lr_ratio
        lora_embedding_lr = (self.options.get("loraplus_lr_embedding", 1e-6) if loraplus_lr_embedding is None
                             else loraplus_lr_embedding)
        # PEFT's implementation is the reference one (it matches the paper's code): lora_B and
        # every 1-D parameter get lr·λ, LoRA embeddings get loraplus_lr_embedding.
        optimizer = create_loraplus_optimizer(
            model, optimizer_cls, lr=lr, loraplus_lr_ratio=ratio,
            loraplus_weight_decay=weight_decay, loraplus_lr_embedding=lora_embedding_lr, **optimizer_kwargs,
        )
        if not rates:
            return optimizer
        # The head and the input embeddings (modules_to_save copies) are no adapter tensors: they get head_lr and
        # embedding_lr (with the weight decay PEFT gave them), the adapter keeps PEFT's groups. Rebuilt from PEFT's
        # groups so they stay the reference ones.
        param_groups = []
        for group in optimizer.param_groups:
            options = {"lr": group["lr"], "weight_decay": group["weight_decay"]}
            by_lr: dict[Optional[float], list] = {None: []}  # None: PEFT's rate for the group; then each own rate
            for p in group["params"]:
                by_lr.setdefault(rates.own_lr(p), []).append(p)
            for own_lr, params in by_lr.items():
                if params:
                    param_groups.append({**options, "params": params, **({} if own_lr is None else {"lr": own_lr})})
        return optimizer_cls(param_groups, lr=lr, **optimizer_kwargs)


register_adapter(
    "lora",
    build_config=build_lora_config,
    aliases=LORA_ALIASES,
    post_wrap=_base_moving_init,
    before_load=_fast_layers_on_load,
    peft_reference=peft_lora_config,
    bench_options={"init_lora_weights": False},  # B ≠ 0: the work of a trained adapter
    summary="LoRA: W + (α/r)·B A, A Kaiming, B = 0 (native PEFT LORA checkpoint).",
)
register_adapter(
    "loraplus",
    build_config=build_lora_config,
    aliases=LORA_ALIASES,
    training_defaults={"loraplus_lr_ratio": 16.0, "loraplus_lr_embedding": 1e-6},
    procedure=LoraPlusProcedure.name,
    post_wrap=_base_moving_init,
    bench_options={"init_lora_weights": False},
    summary="LoRA+: LoRA with η_B = λ·η_A (λ = 16); use lrzoo.make_optimizer.",
)
def _dora_quantized_refusal(layer: nn.Module) -> str:
    """PEFT's 8-bit DoRA layer breaks bitsandbytes' int8 state on CPU after the first backward (bnb 0.50)."""
    if quantization_of(layer) == "int8" and layer.weight.device.type == "cpu":
        return ("PEFT's 8-bit DoRA layer fails from the second training step on CPU (bitsandbytes 0.50 loses the "
                "int8 weight state it dequantizes for the norm). Use a 4-bit base (nf4/fp4) for DoRA, or LoRA on int8.")
    return ""


register_adapter(
    "dora",
    build_config=lambda **kw: build_lora_config(use_dora=True, **kw),
    aliases=LORA_ALIASES,
    summary="DoRA: m ⊙ (W + sBA)/‖W + sBA‖_row, detached fp32 norm (native PEFT use_dora).",
    post_wrap=_base_moving_init,  # refuses PiSSA/OLoRA inits: DoRA's update against W is not low-rank
    quantized_base_refusal=_dora_quantized_refusal,
    peft_reference=lambda **options: peft_lora_config(use_dora=True, **options),
    bench_options={"init_lora_weights": False},
)
