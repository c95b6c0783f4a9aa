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
import torch.nn.functional as F

from .. import kernels
from ..layer import AdapterConfig, AdapterLayer, dropout_probability
from ..registry import register_adapter


@dataclass
class LoraXSConfig(AdapterConfig):
    """LoRA-XS: ΔW = s·B R A with B, A from the truncated SVD of W, only R (r×r) trained."""

    alpha: float = field(default=16.0, metadata={"help": "s = alpha/r; the paper's GLUE runs use 16, math uses alpha = r."})
    init_std: float = field(default=1e-5, metadata={"help": "Std of R's normal init (official code: 1e-5)."})


def top_singular_triplets(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U_r (d_out×r), S_r (r,), V_rᵀ (r×d_in)`` of ``weight`` in float64 with a canonical sign.

    Each singular vector pair is flipped so the largest-magnitude entry of ``u_i`` is positive;
    LAPACK's choice of sign differs across builds, and a trained core R is only meaningful
    against the exact factors it was trained with.
    """
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    pivot = U.abs().argmax(dim=0)
    signs = torch.sign(U[pivot, torch.arange(r)])
    signs[signs == 0] = 1
    return U * signs, S, Vh * signs[:, None]


class LoraXSLayer(AdapterLayer):
    """Frozen ``B (d_out×r)``, trainable core ``R (r×r)``, frozen ``A (r×d_in)``; LoRA-SB reuses it.

    Tensors are named ``<prefix>B/R/A`` so a subclass with another prefix keeps its own checkpoint keys.
    """

    prefix = "xs_"
    adapter_layer_names = ("xs_R",)
    other_param_names = ("xs_A", "xs_B")

    def init_adapter(self, adapter_name, config, weight, tuner=None):
        U, S, Vh = top_singular_triplets(weight, config.r)
        std = config.init_std if config.init_weights else 0.1
        self.set_factors(adapter_name, U, torch.randn(config.r, config.r) * std, S[:, None] * Vh)

    def set_factors(self, adapter_name: str, B: torch.Tensor, R: torch.Tensor, A: torch.Tensor) -> None:
        """Store frozen ``B``, ``A`` and the trainable core ``R`` (float32, contiguous)."""
        self.add_frozen(self.prefix + "B", adapter_name, B.float().contiguous())
        self.add_frozen(self.prefix + "A", adapter_name, A.float().contiguous())
        self.add_trainable(self.prefix + "R", adapter_name, R.float().contiguous())

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, R, A)`` of one adapter."""
        return tuple(getattr(self, self.prefix + name)[adapter_name] for name in "BRA")

    def delta_weight(self, adapter_name):
        B, R, A = self.factors(adapter_name)
        return self.scaling[adapter_name] * (B @ R.to(B.dtype) @ A)

    def delta_forward(self, x, adapter_name):
        B, R, A = (t.to(x.dtype) for t in self.factors(adapter_name))
        return F.linear(F.linear(F.linear(self.adapter_dropout[adapter_name](x), A), R), B) * self.scaling[adapter_name]

    def fused_forward(self, x, adapter_name):
        p = dropout_probability(self.adapter_dropout[adapter_name])
        B, R, A = self.factors(adapter_name)
        return kernels.core_linear(x, self.base_weight_out_in(), self.get_base_layer().bias, A, R, B,
                                   self.scaling[adapter_name], p, self.training)

    def lora_factors(self, adapter_name):
        B, R, A = self.factors(adapter_name)
        return self.scaling[adapter_name] * (B @ R.to(B.dtype)), A


register_adapter("lora_xs", LoraXSConfig, LoraXSLayer)
