"""SALT (arXiv 2503.16055; BioMedIA-MBZUAI/SALT, ``prompt_adapted_SAM2/modeling/Adapters/SALT.py``):
scale and shift the top-r singular values of W, and a LoRA on the rest of its spectrum.

    W = U diag(σ) Vᵀ  (thin SVD, k = min(d_out, d_in)),   U = [U_r  U_res],   V = [V_r  V_res]
    W' = U_r diag(a ⊙ σ_r + b) V_rᵀ + U_res (diag(σ_res) + X Y) V_resᵀ
    ΔW = W' − W = U_r diag((a − 1) ⊙ σ_r + b) V_rᵀ + U_res X Y V_resᵀ

a, b ∈ R^r (scale and shift of the top-r singular values) and X ∈ R^{(k−r)×r_L}, Y ∈ R^{r_L×(k−r)} (a
rank-r_L LoRA written in the residual singular basis) are trained; U, V and σ_r are frozen, per layer.
Init as the official code: a = 1, b = 0, Y = 0, X Kaiming-uniform (ReLU gain, bound √(6/r_L)), so ΔW = 0
exactly. Trainable parameters: 2r + 2(k − r)·r_L per matrix. No scale (the official code has none), so
``wrap`` refuses ``alpha`` (``lrzoo-train`` drops the one its presets set, with a notice).

lrzoo's choices where the official code and lrzoo differ (docs/adapters/salt.md):

* **No ReLU.** The official forward is ``U·ReLU(C)·Vᵀ`` with the ReLU on the whole k×k core, the
  off-diagonal X Y entries included. lrzoo adds the linear ΔW above: the same *output* as long as no core
  entry is negative (true at init), but not the same training: at init the off-diagonal core entries are
  exactly 0, where the ReLU's gradient is 0, so the official first gradient of Y keeps only the diagonal of
  the residual block (cosine with lrzoo's 0.05-0.2, docs/adapters/salt.md). lrzoo's ΔW is low-rank by
  construction, so ``export_lora`` is exact at rank r + r_L, and every X Y entry keeps its gradient.
* **One integer r** for every layer (the official code takes r = max(1, ⌊0.1·k⌋) per layer).
* ΔW is computed beside the untouched base weight (see :class:`~lrzoo.core_layers.DiagonalCoreLayer`
  for why lrzoo never rewrites W); the SVD is exact, in float64, with canonical signs
  (:func:`~lrzoo.decompositions.top_singular_triplets`), taken at wrap time rather than lazily at the
  first forward; X is drawn from the global RNG (the official constructor reseeds it with 42).

Forward: ΔW is the rank-(r + r_L) product B'·A' with

    B' = [U_r diag((a − 1) ⊙ σ_r + b),  U_res X]   (d_out × (r + r_L))
    A' = [V_rᵀ ; Y V_resᵀ]                          ((r + r_L) × d_in)

folded once per forward (O(r_L·k·(d_out + d_in))) and run through :func:`lrzoo.kernels.lora_linear`
(x → A' → B', never the d_out×d_in matrix); the same pair is the exact LoRA export.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..decompositions import top_singular_triplets
from ..layer import AdapterConfig, AdapterLayer, dropout_probability
from ..registry import register_adapter

#: relative singular-value gap (and smallest value) below which ``frozen_factors="recomputed"`` is refused
RECOMPUTE_TOL = 1e-8


@dataclass
class SALTConfig(AdapterConfig):
    """SALT: scale and shift (a ⊙ σ + b) of the top-r singular values plus a LoRA on the residual spectrum."""

    # The defaults of adapters/salt.yaml, so that a hand-built config and lrzoo.wrap(model, "salt")
    # agree (tests/api/test_defaults.py checks every method).
    r: int = field(default=8, metadata={
        "help": "Number of top singular values that are scaled and shifted (official: max(1, ⌊0.1·min(d_out, d_in)⌋) "
                "per layer; lrzoo takes one integer). Must be below min(d_out, d_in)."})
    lora_r: int = field(default=256, metadata={
        "help": "Rank r_L of the LoRA X Y on the residual spectrum (official SAM2 backbone: r_lora_g=256). From "
                "min(d_out, d_in) − r on, X Y is a full-rank update of that block with more parameters than the "
                "block itself: allowed as in the official code, with a warning from wrap naming the layers."})
    frozen_factors: str = field(default="saved", metadata={
        "help": "X and Y live in the residual singular basis: 'saved' (default) keeps U, V and σ_r in the checkpoint; "
                "'recomputed' rebuilds them from W at load (smaller files; unsafe for a W with repeated or zero "
                "singular values, whose singular vectors are not unique). See AdapterConfig."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r <= 0:
            raise ValueError(f"lora_r must be a positive integer, got {self.lora_r!r}.")


class SALTLayer(AdapterLayer):
    """Frozen thin SVD ``U (d_out×k)``, ``Vᵀ (k×d_in)``, ``σ_r``; trained ``a``, ``b`` (r) and ``X``, ``Y``."""

    prefix = "salt_"
    adapter_layer_names = ("salt_scale", "salt_shift", "salt_X", "salt_Y")
    uses_alpha = False  # no scale (scale_for): wrap refuses an alpha rather than ignore it
    other_param_names = ("salt_U", "salt_Vh", "salt_S")

    def init_adapter(self, adapter_name, config, weight, tuner=None):
        k = min(weight.shape)
        r, lora_r = config.r, config.lora_r
        if r >= k:
            raise ValueError(
                f"SALT needs r < min(d_out, d_in) = {k} (r={r} on this {weight.shape[0]}x{weight.shape[1]} layer): the "
                "LoRA lives on the k − r singular directions left after the top r. Lower r, or exclude this layer."
            )
        U, S, Vh = top_singular_triplets(weight, k)
        if config.frozen_factors == "recomputed":
            self._check_recomputable(S, weight.shape)
        self.add_frozen("salt_U", adapter_name, U.float().contiguous())
        self.add_frozen("salt_Vh", adapter_name, Vh.float().contiguous())
        self.add_frozen("salt_S", adapter_name, S[:r].float().contiguous())
        X = torch.empty(k - r, lora_r)
        nn.init.kaiming_uniform_(X, nonlinearity="relu")  # official: bound √(6/r_L)
        if config.init_weights:
            scale, shift, Y = torch.ones(r), torch.zeros(r), torch.zeros(lora_r, k - r)
        else:  # random non-zero ΔW for tests
            scale = 1 + 0.3 * torch.randn(r)
            shift = 0.1 * S[:r].float().mean() * torch.randn(r)
            Y = 0.1 * torch.randn(lora_r, k - r)
        self.add_trainable("salt_scale", adapter_name, scale)
        self.add_trainable("salt_shift", adapter_name, shift)
        self.add_trainable("salt_X", adapter_name, X)
        self.add_trainable("salt_Y", adapter_name, Y)

    @staticmethod
    def _check_recomputable(S: torch.Tensor, shape) -> None:
        """Refuse ``frozen_factors="recomputed"`` when W's singular vectors are not determined by W.

        X and Y act on the residual singular vectors themselves, so every singular pair must come back
        the same at load. Canonical signs fix each pair's sign, but a repeated singular value (any
        rotation of its vectors is as valid) or a (near-)zero one (its left vector is arbitrary in a
        tall W) has no canonical basis: the same W could give other factors elsewhere.
        """
        top = S[0].item()
        rel = S / top if top > 0 else torch.zeros_like(S)
        gap = (rel[:-1] - rel[1:]).min().item() if len(rel) > 1 else 1.0
        if top == 0 or gap < RECOMPUTE_TOL or rel[-1].item() < RECOMPUTE_TOL:
            raise ValueError(
                f"frozen_factors='recomputed' needs distinct, non-zero singular values, but this {shape[0]}x{shape[1]} "
                f"weight has a relative gap of {gap:.2g} and a smallest singular value of {rel[-1].item():.2g}·σ_max: "
                "its singular vectors are not unique, so SALT's X and Y could not be re-attached to the same basis at "
                "load. Use frozen_factors='saved' (the default), or exclude this layer."
            )

    def scale_for(self, config):
        return 1.0  # the official code has no scale: a, b act on σ itself, X Y adds to the residual core

    def lora_factors(self, adapter_name):
        """``(B', A')`` with ΔW = B'·A' exactly, rank r + r_L, in the trained tensors' dtype (fp32)."""
        scale, shift = self.salt_scale[adapter_name], self.salt_shift[adapter_name]
        X, Y = self.salt_X[adapter_name], self.salt_Y[adapter_name]
        dtype = X.dtype
        U, Vh, S = (t.to(dtype) for t in (self.salt_U[adapter_name], self.salt_Vh[adapter_name],
                                           self.salt_S[adapter_name]))
        r = S.shape[0]
        core = (scale.to(dtype) - 1) * S + shift.to(dtype)  # σ' − σ = (a − 1)σ + b: exactly 0 at init
        B = torch.cat([U[:, :r] * core, U[:, r:] @ X], dim=1)
        A = torch.cat([Vh[:r], Y.to(dtype) @ Vh[r:]], dim=0)
        return B, A

    def _folded(self, x: torch.Tensor, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        # B', A' in the adapter's dtype even under autocast (as core_linear folds its core)
        with torch.autocast(x.device.type, enabled=False):
            return self.lora_factors(adapter_name)

    def delta_weight(self, adapter_name):
        B, A = self.lora_factors(adapter_name)
        return B @ A

    def delta_forward(self, x, adapter_name):
        B, A = self._folded(x, adapter_name)
        return F.linear(F.linear(self.adapter_dropout[adapter_name](x), A.to(x.dtype)), B.to(x.dtype))

    def fused_forward(self, x, adapter_name):
        p = dropout_probability(self.adapter_dropout[adapter_name])
        B, A = self._folded(x, adapter_name)
        return kernels.lora_linear(x, self.base_weight_out_in(), self.get_base_layer().bias, A, B, 1.0, p,
                                   self.training)


def warn_full_rank_residual(peft_model: nn.Module, adapter_name: str) -> None:
    """Warn once per ``wrap`` when ``lora_r`` ≥ k − r on some layers: a full-rank update there, in disguise.

    X·Y has rank ≤ min(lora_r, k − r), so from lora_r = k − r on it is an unconstrained update of the
    whole residual block, with 2·lora_r·(k − r) parameters where the dense block has (k − r)². A warning,
    not an error: the layer still computes what was asked, and the official SAM2 backbone does exactly this
    (r_L = 256 on Hiera's 112-wide layers, k − r = 101), as lrzoo's default 256 does on narrow models.
    """
    layers = [(name, module) for name, module in peft_model.get_base_model().named_modules()
              if isinstance(module, SALTLayer) and adapter_name in module.salt_X]
    full = []
    for name, module in layers:
        residual, lora_r = module.salt_X[adapter_name].shape
        if lora_r >= residual:
            full.append((name, tuple(module.get_base_layer().weight.shape), residual, lora_r))
    if not full:
        return
    total = len(layers)
    named = ", ".join(f"{name} ({shape[0]}×{shape[1]}: k − r = {residual})" for name, shape, residual, _ in full[:3])
    smallest = min(residual for _, _, residual, _ in full)
    warnings.warn(
        f"SALT: lora_r={full[0][3]} is ≥ min(d_out, d_in) − r on {len(full)} of {total} layers ({named}"
        f"{', ...' if len(full) > 3 else ''}): X·Y there is a full-rank update of the residual spectrum, with more "
        f"parameters than the dense block. Set lora_r < {smallest} for a low-rank residual on every layer.",
        UserWarning, stacklevel=3)


register_adapter("salt", SALTConfig, SALTLayer, post_wrap=warn_full_rank_residual)
