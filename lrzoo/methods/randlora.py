"""RandLoRA (Albert et al., ICLR'25, arXiv 2502.00987; PaulAlbert31/RandLoRA), in PEFT's native format.

    ΔW = s · Σ_{j=1..n} B_j Λ_j A Γ_j,   n = ⌈d/r⌉,   d = min(d_in, d_out),   s = α / r

A (r×d) and B_j (D×r) are random bases shared by every adapted layer (seeded by
``projection_prng_key``, sized for the largest layer, sliced per layer); only the diagonals
Λ_j = diag(λ_j) (r) and Γ_j = diag(γ_j) (d) are trained, per layer: n(r + d) parameters, full-rank ΔW.
Init (PEFT): λ = 0 (ΔW = 0), γ = 1/max(n, d). The exact flattening is in :mod:`lrzoo.kernels.randlora`.

lrzoo keeps PEFT's ``RandLoraConfig``/``RandLoraModel``, so ``save_pretrained`` writes a native
RANDLORA checkpoint (shared bases saved once as ``base_model.randlora_A/B`` when
``save_projection=True``, else regenerated from the seed; PEFT records the choice in
adapter_config.json) that stock PEFT loads, and PEFT RandLoRA checkpoints load into lrzoo
(:func:`lrzoo.load`). What lrzoo changes is the forward: :class:`FastRandLoraLinear` applies ΔW
through :func:`lrzoo.kernels.randlora_linear` (ΔW built once per step instead of two extra GEMMs).
Export: merged weights, or a lossy SVD ``export_lora`` (ΔW is full rank).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from peft import PeftConfig, PeftModel, RandLoraConfig

from .. import kernels
from ..layer import dropout_probability
from ..peft_bridge import PeftRandLoraLinear, swap_layer_class
from ..registry import register_adapter


class FastRandLoraLinear(PeftRandLoraLinear):
    """PEFT's RandLoRA ``Linear`` (same tensors, state dict and merge) with a cheaper forward."""

    def _fast_path_adapter(self, args: tuple, kwargs: dict) -> Optional[str]:
        """The single adapter the fast path can serve, or ``None`` to use PEFT's forward."""
        if args or kwargs or self.disable_adapters or self.merged or self.get_base_layer().weight.requires_grad:
            return None  # (the kernels treat W as frozen; a trained W takes PEFT's autograd path)
        active = [name for name in self.active_adapters if name in self.randlora_lambda]
        return active[0] if len(active) == 1 else None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._fast_path_adapter(args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        weight = base.weight.T if self.fan_in_fan_out else base.weight
        p = dropout_probability(self.randlora_dropout[name])
        return kernels.randlora_linear(x, weight, base.bias, self.randlora_A[name], self.randlora_B[name],
                                       self.randlora_lambda[name], self.randlora_gamma[name], self.scaling[name],
                                       p, self.training)


def attach_fast_layers(model: nn.Module) -> int:
    """Give every PEFT RandLoRA ``Linear`` in ``model`` lrzoo's forward; returns how many were switched.

    A class swap, not a copy: parameters, buffers, hooks and the state dict are untouched.
    """
    switched = 0
    for module in model.modules():
        if type(module) is PeftRandLoraLinear:
            swap_layer_class(module, FastRandLoraLinear)
            switched += 1
    return switched


def build_randlora_config(r: int = 32, randlora_alpha: Optional[float] = None, **kwargs: Any) -> RandLoraConfig:
    """PEFT's ``RandLoraConfig``; without an explicit alpha, α = 2r (the official repo's LLM example).

    PEFT's own default (α = 640 whatever r, i.e. s = 20 at r = 32) diverges at ordinary learning
    rates on small ranks (s = 80 at r = 8); pass ``alpha=`` to use it.
    """
    return RandLoraConfig(r=r, randlora_alpha=2 * r if randlora_alpha is None else randlora_alpha, **kwargs)


def _post_wrap(peft_model: PeftModel, adapter_name: str) -> None:
    attach_fast_layers(peft_model)


def _fast_layers_after_load(peft_model: PeftModel, config: PeftConfig) -> None:
    """:func:`lrzoo.load` of a ``RANDLORA`` checkpoint: PEFT builds its own layers; give them lrzoo's forward."""
    if isinstance(config, RandLoraConfig):
        attach_fast_layers(peft_model)


def peft_randlora_config(*, r: int, alpha: Optional[float] = None, dropout: float = 0.0, target_modules: Any = None,
                         task_type: Any = None) -> RandLoraConfig:
    """Stock PEFT's RandLoRA config (the benchmarks' PEFT rows; PEFT's own α when none is given)."""
    options = {} if alpha is None else {"randlora_alpha": alpha}
    return RandLoraConfig(r=r, target_modules=target_modules, randlora_dropout=dropout, task_type=task_type, **options)


register_adapter(
    "randlora",
    build_config=build_randlora_config,
    aliases={"alpha": "randlora_alpha", "dropout": "randlora_dropout", "seed": "projection_prng_key"},
    post_wrap=_post_wrap,
    after_load=_fast_layers_after_load,
    peft_reference=peft_randlora_config,
    summary="RandLoRA: full-rank ΔW = s·Σ_j B_j Λ_j A Γ_j over shared random bases (native PEFT RANDLORA).",
)
