"""LoLDU (Shi et al., arXiv 2410.13618; SKDDJ/LoLDU): train the diagonal of an LDU decomposition of W.

    W = P L U (LU with partial pivoting),   D = diag(U),   U ← D⁻¹U (unit diagonal)
    L_r = L[:, :r] (d_out×r),   U_r = U[:r] (r×d_in),   D_r = D[:r]
    W_res = W − σ₀ · P L_r diag(D_r) U_r
    W' = W_res + σ · P L_r diag(z) U_r,     z₀ = D_r,   σ₀ = α / r   (so W' = W at init)
    ΔW = W' − W = P L_r diag(σ z − σ₀ D_r) U_r                        (exact rank-r LoRA export)

lrzoo applies ΔW beside the untouched base W (the same function as the paper's residual base; see
:class:`~lrzoo.core_layers.DiagonalCoreLayer` for why W is never rewritten).

Trained: the vector z (r) and the scalar σ, r + 1 parameters per matrix. The official recipe trains z
only: its ``scaling_factor`` is an ``nn.Parameter``, but ``get_loldu_params`` (``minloldu/loldu_utils.py``)
returns ``vector_z`` alone and the README freezes everything else, so σ stays at σ₀ there. lrzoo trains σ
as the spec says (the same reachable ΔW, different steps; docs/adapters/loldu.md says what it changes and
how to freeze it). Frozen per layer: L_r, U_r, D_r and the row pivot P, stored as a
permutation vector (the official code keeps a dense d_out×d_out P). The LU runs in float64 and is
deterministic given W, so ``frozen_factors="recomputed"`` rebuilds every frozen factor from W at
load time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core_layers import DiagonalCoreLayer
from ..layer import AdapterConfig
from ..registry import register_adapter


@dataclass
class LoLDUConfig(AdapterConfig):
    """LoLDU: W' = W_res + σ·P L_r diag(z) U_r from the pivoted LDU of W, only z (r) and σ trained."""

    r: int = field(default=15, metadata={"help": "Rank of the LDU part trained (README quick start; adapters/loldu.yaml)."})
    frozen_factors: str = field(default="recomputed", metadata={
        "help": "LU is deterministic given W: by default the checkpoint keeps only z and σ (see AdapterConfig)."})
    alpha: float = field(default=1.0, metadata={"help": "σ₀ = alpha / r, the initial value of the trained scalar σ "
                                                        "(official from_linear default: lora_alpha=1)."})


def pivoted_ldu(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P L_r as a row index, L_r, D_r, U_r)`` of ``weight (d_out, d_in)``, in float64.

    ``W = P L U`` with ``P L = L[rows]``: the pivot is returned as the index ``rows (d_out,)`` so
    that ``P·M == M[rows]`` for any ``M`` with d_out rows, never as a dense d_out×d_out matrix.
    """
    # lu_factor_ex: torch's lu_factor raises its own error on a zero pivot anywhere; only the first r matter
    # here, and the check below says so in lrzoo's words.
    LU, pivots, _ = torch.linalg.lu_factor_ex(weight.double())
    L = LU.tril(-1)[:, :r] + torch.eye(*LU.shape, dtype=LU.dtype)[:, :r]
    U = LU.triu()[:r]
    D = U.diagonal().clone()
    if (D.abs() <= torch.finfo(D.dtype).eps * LU.abs().max()).any():
        raise ValueError(
            f"LoLDU: W has a (numerically) zero pivot among its first r={r} LU pivots, so D⁻¹U is undefined. "
            "Lower r, or leave this layer out of target_modules."
        )
    # LAPACK's pivots are sequential row swaps (1-based): applying them gives W[order] = L U.
    order = list(range(weight.shape[0]))
    for i, p in enumerate((pivots - 1).tolist()):
        order[i], order[p] = order[p], order[i]
    rows = torch.empty(len(order), dtype=torch.long)
    rows[torch.tensor(order)] = torch.arange(len(order))  # inverse: (L U)[rows] = W
    return rows, L, D, U / D[:, None]


class LoLDULayer(DiagonalCoreLayer):
    prefix = "loldu_"
    adapter_layer_names = ("loldu_z", "loldu_sigma")
    other_param_names = ("loldu_L", "loldu_U", "loldu_D", "loldu_rows")

    def init_adapter(self, adapter_name, config, weight, tuner=None):
        rows, L, D, U = pivoted_ldu(weight, config.r)
        self.add_frozen("loldu_rows", adapter_name, rows)
        self.add_frozen("loldu_L", adapter_name, L.float().contiguous())
        self.add_frozen("loldu_U", adapter_name, U.float().contiguous())
        self.add_frozen("loldu_D", adapter_name, D.float())
        z, sigma = D.float().clone(), torch.tensor(self.scaling[adapter_name])
        if not config.init_weights:  # random non-zero ΔW for tests
            z, sigma = z * (1 + 0.5 * torch.randn_like(z)), sigma * 1.5
        self.add_trainable("loldu_z", adapter_name, z)
        self.add_trainable("loldu_sigma", adapter_name, sigma)

    def diagonal_factors(self, adapter_name):
        # self.scaling holds σ₀ = α/r (the frozen initial σ); the trained σ lives in loldu_sigma.
        B = self.loldu_L[adapter_name].index_select(0, self.loldu_rows[adapter_name])  # P L_r
        c = self.loldu_sigma[adapter_name] * self.loldu_z[adapter_name]
        c0 = self.scaling[adapter_name] * self.loldu_D[adapter_name]
        return B, c, c0, self.loldu_U[adapter_name]


register_adapter("loldu", LoLDUConfig, LoLDULayer)
