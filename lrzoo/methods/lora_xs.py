"""LoRA-XS (Bałazy et al., arXiv 2405.17604; MohammadrezaBanaei/LoRA-XS).

    ΔW = s · B R A,   W ≈ U_r Σ_r V_rᵀ (truncated SVD),   B = U_r,   A = Σ_r V_rᵀ,   s = α / r

B (d_out×r, orthonormal) and A (r×d_in, singular values folded in, as in the official code; PEFT's
TinyLoRA uses √Σ on both sides instead) are frozen per layer; only the r×r matrix R is trained,
initialised N(0, 1e-5²) so ΔW ≈ 0. Trainable parameters: r² per matrix. Exact LoRA export at
rank r: B' = s·B R, A' = A.

The official code runs sklearn's randomized TruncatedSVD; lrzoo takes the exact SVD (the value the
randomized one approximates) with each singular pair's sign fixed so that recomputing it from W at
load time (``frozen_factors="recomputed"``) gives the same factors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core_layers import MatrixCoreLayer
from ..decompositions import top_singular_triplets
from ..layer import AdapterConfig
from ..registry import register_adapter


@dataclass
class LoraXSConfig(AdapterConfig):
    """LoRA-XS: ΔW = s·B R A with B, A from the truncated SVD of W, only R (r×r) trained."""

    alpha: float = field(default=16.0, metadata={"help": "s = alpha/r; the paper's GLUE runs use 16, math uses alpha = r."})
    init_std: float = field(default=1e-5, metadata={"help": "Std of R's normal init (official code: 1e-5)."})


class LoraXSLayer(MatrixCoreLayer):
    """``B = U_r`` and ``A = Σ_r V_rᵀ`` from the SVD of W, core R ~ N(0, init_std²)."""

    prefix = "xs_"
    adapter_layer_names = ("xs_R",)
    other_param_names = ("xs_A", "xs_B")

    def init_adapter(self, adapter_name, config, weight, tuner=None):
        U, S, Vh = top_singular_triplets(weight, config.r)
        std = config.init_std if config.init_weights else 0.1
        self.set_factors(adapter_name, U, torch.randn(config.r, config.r) * std, S[:, None] * Vh)


register_adapter("lora_xs", LoraXSConfig, LoraXSLayer)
