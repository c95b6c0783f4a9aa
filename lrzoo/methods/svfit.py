"""SVFit (arXiv 2409.05926; no official code was found): train the top-r singular values of W.

    W = U_r Σ_r V_rᵀ + W_e          (top-r SVD, W_e the frozen residual)
    W' = W_e + U_r diag(σ) V_rᵀ,    σ ∈ R^r trained, σ₀ = Σ_r,   so  ΔW = U_r diag(σ − Σ_r) V_rᵀ

lrzoo computes W' as ``W + U_r diag(σ − Σ_r) V_rᵀ`` beside the untouched base (the same function;
see :class:`~lrzoo.core_layers.DiagonalCoreLayer` for why the base is not rewritten); U_r (d_out×r) and V_rᵀ (r×d_in)
are frozen per layer. Trainable parameters: r per matrix. ΔW against the
original W is an exact rank-r LoRA: B' = U_r diag(σ − Σ_r), A' = V_rᵀ. The paper's wording leaves
open whether σ is trained directly or as a multiplicative scale (spec [?]); lrzoo trains σ
directly. The SVD is exact with canonical signs (:func:`~lrzoo.decompositions.top_singular_triplets`),
so ``frozen_factors="recomputed"`` rebuilds the same U_r, V_r from W at load time.

The layer is a :class:`~lrzoo.core_layers.DiagonalCoreLayer` ("frozen B, trained diagonal core, frozen
A, ΔW against the initial core"), which LoLDU shares with its own B (pivoted L) and core (σ·z).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core_layers import DiagonalCoreLayer
from ..decompositions import top_singular_triplets
from ..layer import AdapterConfig
from ..registry import register_adapter


@dataclass
class SVFitConfig(AdapterConfig):
    """SVFit: W = W_e + U_r diag(σ) V_rᵀ with W_e the frozen residual, only the r singular values σ trained."""

    frozen_factors: str = field(default="recomputed", metadata={
        "help": "The SVD is exact with canonical signs: by default the checkpoint keeps σ only (see AdapterConfig)."})


class SVFitLayer(DiagonalCoreLayer):
    prefix = "svfit_"
    adapter_layer_names = ("svfit_sigma",)
    other_param_names = ("svfit_U", "svfit_Vh", "svfit_S")
    uses_alpha = False  # no scale (scale_for): wrap refuses an alpha rather than ignore it

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
