"""SVFit (arXiv 2409.05926; no official code was found): train the top-r singular values of W.

    W = U_r Σ_r V_rᵀ + W_e          (top-r SVD, W_e the frozen residual)
    W' = W_e + U_r diag(σ) V_rᵀ,    σ ∈ R^r trained, σ₀ = Σ_r,   so  ΔW = U_r diag(σ − Σ_r) V_rᵀ

The base weight is *replaced* by the residual W_e (what PiSSA-style methods do); U_r (d_out×r)
and V_rᵀ (r×d_in) are frozen per layer. Trainable parameters: r per matrix. ΔW against the
original W is an exact rank-r LoRA: B' = U_r diag(σ − Σ_r), A' = V_rᵀ. The paper's wording leaves
open whether σ is trained directly or as a multiplicative scale (spec [?]); lrzoo trains σ
directly. The SVD is exact with canonical signs (:func:`~lrzoo.methods.lora_xs.top_singular_triplets`),
so ``frozen_factors="recomputed"`` rebuilds the same U_r, V_r from W at load time.

:class:`ResidualCoreLayer` is the shared shape of "frozen B, trained diagonal core, frozen A, base
replaced by the residual"; LoLDU builds on it with its own B (pivoted L) and core (σ·z).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels
from ..layer import AdapterConfig, AdapterLayer, dropout_probability
from ..registry import register_adapter
from .lora_xs import top_singular_triplets


class ResidualCoreLayer(AdapterLayer):
    """``W' = W_live + B diag(c) A`` with ``W_live = W − B diag(c₀) A`` written into the base at init.

    A subclass supplies :meth:`diagonal_factors` ``(B: (d_out, r), c: (r,), c₀: (r,), A: (r, d_in))``
    and calls :meth:`replace_base` from ``init_adapter``. ΔW against the original W is
    ``B diag(c − c₀) A``; the offset the base lost is ``B diag(c₀) A``.
    """

    replaces_base_weight = True

    def diagonal_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def replace_base(self, adapter_name: str, weight: torch.Tensor, key=None) -> None:
        """Write ``W − B diag(c₀) A`` into the base layer (``weight``: the original W, float32)."""
        others = [name for name in self.adapter_config if name != adapter_name]
        if others:
            raise ValueError(
                f"{type(self).__name__} replaces the base weight of {key or 'this layer'} by a residual, so a layer "
                f"holds one such adapter; it already has {others}. Delete it (or merge_and_unload) first."
            )
        B, _, c0, A = self.diagonal_factors(adapter_name)
        residual = weight - (B * c0) @ A
        base = self.get_base_layer().weight
        base.data.copy_((residual.T if self.fan_in_fan_out else residual).to(base.dtype))

    def delta_weight(self, adapter_name):
        B, c, c0, A = self.diagonal_factors(adapter_name)
        return (B * (c - c0).to(B.dtype)) @ A

    def base_offset(self, adapter_name):
        B, _, c0, A = self.diagonal_factors(adapter_name)
        return (B * c0) @ A

    def offset_forward(self, x, adapter_name):
        B, _, c0, A = (t.to(x.dtype) for t in self.diagonal_factors(adapter_name))
        return F.linear(F.linear(x, A) * c0, B)

    def delta_forward(self, x, adapter_name):
        B, c, _, A = (t.to(x.dtype) for t in self.diagonal_factors(adapter_name))
        return F.linear(F.linear(self.adapter_dropout[adapter_name](x), A) * c, B)

    def fused_forward(self, x, adapter_name):
        p = dropout_probability(self.adapter_dropout[adapter_name])
        B, c, _, A = self.diagonal_factors(adapter_name)
        return kernels.core_linear(x, self.base_weight_out_in(), self.get_base_layer().bias, A, c, B, 1.0, p,
                                   self.training)

    def lora_factors(self, adapter_name):
        B, c, c0, A = self.diagonal_factors(adapter_name)
        return B * (c - c0).to(B.dtype), A


@dataclass
class SVFitConfig(AdapterConfig):
    """SVFit: W = W_e + U_r diag(σ) V_rᵀ with W_e the frozen residual, only the r singular values σ trained."""


class SVFitLayer(ResidualCoreLayer):
    prefix = "svfit_"
    adapter_layer_names = ("svfit_sigma",)
    other_param_names = ("svfit_U", "svfit_Vh", "svfit_S")

    def init_adapter(self, adapter_name, config, weight, tuner=None):
        U, S, Vh = top_singular_triplets(weight, config.r)
        self.add_frozen("svfit_U", adapter_name, U.float().contiguous())
        self.add_frozen("svfit_Vh", adapter_name, Vh.float().contiguous())
        self.add_frozen("svfit_S", adapter_name, S.float())
        sigma = S.float().clone()
        if not config.init_weights:  # random non-zero ΔW for tests
            sigma = sigma * (1 + 0.5 * torch.randn_like(sigma))
        self.add_trainable("svfit_sigma", adapter_name, sigma)
        self.replace_base(adapter_name, weight)

    def scale_for(self, config):
        return 1.0  # SVFit has no scale: σ are the singular values themselves

    def diagonal_factors(self, adapter_name):
        return (self.svfit_U[adapter_name], self.svfit_sigma[adapter_name], self.svfit_S[adapter_name],
                self.svfit_Vh[adapter_name])


register_adapter("svfit", SVFitConfig, SVFitLayer)
