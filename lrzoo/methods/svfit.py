"""SVFit (arXiv 2409.05926; no official code was found): train the top-r singular values of W.

    W = U_r Σ_r V_rᵀ + W_e          (top-r SVD, W_e the frozen residual)
    W' = W_e + U_r diag(σ) V_rᵀ,    σ ∈ R^r trained, σ₀ = Σ_r,   so  ΔW = U_r diag(σ − Σ_r) V_rᵀ

lrzoo computes W' as ``W + U_r diag(σ − Σ_r) V_rᵀ`` beside the untouched base (the same function;
see :class:`DiagonalCoreLayer` for why the base is not rewritten); U_r (d_out×r) and V_rᵀ (r×d_in)
are frozen per layer. Trainable parameters: r per matrix. ΔW against the
original W is an exact rank-r LoRA: B' = U_r diag(σ − Σ_r), A' = V_rᵀ. The paper's wording leaves
open whether σ is trained directly or as a multiplicative scale (spec [?]); lrzoo trains σ
directly. The SVD is exact with canonical signs (:func:`~lrzoo.methods.lora_xs.top_singular_triplets`),
so ``frozen_factors="recomputed"`` rebuilds the same U_r, V_r from W at load time.

:class:`DiagonalCoreLayer` is the shared shape of "frozen B, trained diagonal core, frozen A, ΔW against
the initial core"; LoLDU builds on it with its own B (pivoted L) and core (σ·z).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import kernels
from ..layer import AdapterConfig, AdapterLayer, dropout_probability
from ..registry import register_adapter
from .lora_xs import top_singular_triplets


class DiagonalCoreLayer(AdapterLayer):
    """``ΔW = B diag(c − c₀) A`` beside the untouched base weight: frozen B and A, trained diagonal c.

    A subclass supplies :meth:`diagonal_factors` ``(B: (d_out, r), c: (r,), c₀: (r,), A: (r, d_in))``.

    The papers write ``W' = W_res + B diag(c) A`` with the residual ``W_res = W − B diag(c₀) A`` stored
    as the new base. That is the same function as ``W + B diag(c − c₀) A``; lrzoo computes the latter and
    never writes the base weight, because rewriting it costs exactness everywhere else: ``(W − off) +
    off ≠ W`` in floating point (1 ulp in fp32, ~1e-3 in bf16), a quantized base cannot be rewritten, and a
    layer could hold only one such adapter. Here ΔW = 0 exactly at init (c = c₀), unload/delete/disable
    give back the original W bit for bit, and several adapters can share a layer.
    """

    def diagonal_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def delta_weight(self, adapter_name):
        B, c, c0, A = self.diagonal_factors(adapter_name)
        return (B * (c - c0).to(B.dtype)) @ A

    def delta_forward(self, x, adapter_name):
        B, c, c0, A = self.diagonal_factors(adapter_name)
        core = (c - c0).to(x.dtype)
        return F.linear(F.linear(self.adapter_dropout[adapter_name](x), A.to(x.dtype)) * core, B.to(x.dtype))

    def fused_forward(self, x, adapter_name):
        p = dropout_probability(self.adapter_dropout[adapter_name])
        B, c, c0, A = self.diagonal_factors(adapter_name)
        return kernels.core_linear(x, self.base_weight_out_in(), self.get_base_layer().bias, A, c - c0, B, 1.0, p,
                                   self.training)

    def lora_factors(self, adapter_name):
        B, c, c0, A = self.diagonal_factors(adapter_name)
        return B * (c - c0).to(B.dtype), A


@dataclass
class SVFitConfig(AdapterConfig):
    """SVFit: W = W_e + U_r diag(σ) V_rᵀ with W_e the frozen residual, only the r singular values σ trained."""

    frozen_factors: str = field(default="recomputed", metadata={
        "help": "The SVD is exact with canonical signs: by default the checkpoint keeps σ only (see AdapterConfig)."})


class SVFitLayer(DiagonalCoreLayer):
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

    def scale_for(self, config):
        return 1.0  # SVFit has no scale: σ are the singular values themselves

    def diagonal_factors(self, adapter_name):
        return (self.svfit_U[adapter_name], self.svfit_sigma[adapter_name], self.svfit_S[adapter_name],
                self.svfit_Vh[adapter_name])


register_adapter("svfit", SVFitConfig, SVFitLayer)
