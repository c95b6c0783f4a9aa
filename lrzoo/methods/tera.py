"""TeRA (Gu et al., ACL'26, arXiv 2509.03234; guyuxuan9/TeRA): a vector-based random tensor network.

ΔW is reshaped into an order-N tensor (N = 2K: d_out = o_1⋯o_K, d_in = i_1⋯i_K, row-major) and
parameterised as a Tucker-like network whose large core and factors are random, frozen and shared
by all adapted layers; each layer trains only one diagonal per mode:

    ΔW = s · reshape_{d_out×d_in}( G ×_1 (U_1 diag λ_1) ×_2 ⋯ ×_N (U_N diag λ_N) )

    G   ∈ R^{R×⋯×R}      shared, frozen, N(0, 1)
    U_n ∈ R^{I_n×R}      shared, frozen, N(0, 1/R), the first I_n rows of a factor sized for the largest layer
    λ_n ∈ R^R            per layer, trained;  λ_1..λ_{N−1} = ``lambda_init``, λ_N = 0, so ΔW = 0 at init
    s   = α / √d_in      with unit-variance G and U_n, ΔW has entries of variance ∏λ_n², so s makes ΔW·x
                         as large as a freshly initialised linear layer times α·∏λ_n, whatever the width

Trainable: N·R per matrix. Rank of ΔW: up to min(R^K, d_out, d_in), independent of the count.
Only the abstract-level facts are confirmed from the paper (Tucker-like TN on the tensorised ΔW, large
random core and factors frozen and shared across layers, only per-layer diagonal vectors trained); the
mode split, the inits and s are lrzoo's choices (docs/adapters/tera.md).

Shared tensors live on the tuner (``base_model.tera_core`` / ``base_model.tera_factors``): written once
per checkpoint with ``shared_tensors="saved"`` (default), or left out and regenerated from ``seed`` with
``"seeded"``; the choice is in adapter_config.json. Export: merged weights, or a lossy SVD export_lora.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..kernels import tera as tera_kernels
from ..layer import AdapterConfig, AdapterLayer, dropout_probability
from ..peft_bridge import default_targets_config, frozen_tensor_dict
from ..registry import register_adapter
from ..targets import weight_shape

SHARED_POLICIES = ("saved", "seeded")


@dataclass
class TeraConfig(AdapterConfig):
    """TeRA: ΔW = s·reshape(G ×_n U_n diag λ_n) with G, U_n random, frozen, shared; only the λ_n trained."""

    r: int = field(default=8, metadata={"help": "Tucker rank R of every mode (core size R^N)."})
    alpha: float = field(default=1.0, metadata={"help": "s = alpha / sqrt(d_in)."})
    modes_per_side: int = field(default=2, metadata={"help": "K: d_out and d_in are each split into K modes (N = 2K)."})
    lambda_init: float = field(default=1.0, metadata={"help": "Init of λ_1..λ_{N-1}; λ_N starts at 0 (ΔW = 0)."})
    seed: int = field(default=0, metadata={"help": "Seed of the shared random core and factors."})
    shared_tensors: str = field(
        default="saved",
        metadata={"help": "'saved': core and factors written once in the checkpoint; 'seeded': regenerated from seed."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.shared_tensors not in SHARED_POLICIES:
            raise ValueError(f"shared_tensors must be one of {SHARED_POLICIES}, got {self.shared_tensors!r}.")
        if self.modes_per_side < 1:
            raise ValueError(f"modes_per_side must be at least 1, got {self.modes_per_side}.")


def mode_sizes(dim: int, k: int) -> tuple[int, ...]:
    """Split ``dim`` into ``k`` integer factors as equal as the prime factorisation allows (largest first)."""
    primes, rest, p = [], dim, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    sizes = [1] * k
    for prime in sorted(primes, reverse=True):
        sizes[sizes.index(min(sizes))] *= prime
    return tuple(sorted(sizes, reverse=True))


def layer_modes(d_out: int, d_in: int, k: int) -> tuple[int, ...]:
    """``(o_1..o_K, i_1..i_K)``: the mode sizes of a ``(d_out, d_in)`` ΔW."""
    return mode_sizes(d_out, k) + mode_sizes(d_in, k)


class TeraLayer(AdapterLayer):
    prefix = "tera_"
    adapter_layer_names = ("tera_lambda",)
    #: the core and factors are shared by all layers and live on the tuner (see prepare_shared)
    shares_state_across_layers = True

    @classmethod
    def prepare_shared(cls, tuner, model: nn.Module, config: TeraConfig, adapter_name: str) -> None:
        """Build G (R^N) and U (N, I_max, R) on the tuner, from ``config.seed``, for the largest mode sizes."""
        config = default_targets_config(tuner, config, model)
        # targeted_base_layers sees through layers of an adapter already injected (a second TeRA adapter).
        modes = [layer_modes(*weight_shape(module), config.modes_per_side)
                 for _, module in tuner.targeted_base_layers(model, config)]
        if not modes:
            raise ValueError(f"TeRA found no target layers for target_modules={config.target_modules!r}.")
        n_modes, rank = 2 * config.modes_per_side, config.r
        generator = torch.Generator().manual_seed(config.seed)
        core = torch.randn((rank,) * n_modes, generator=generator)
        factors = torch.randn(n_modes, max(max(m) for m in modes), rank, generator=generator) / math.sqrt(rank)
        persistent = config.shared_tensors == "saved"
        for attr, tensor in (("tera_core", core), ("tera_factors", factors)):
            if not hasattr(tuner, attr):
                setattr(tuner, attr, frozen_tensor_dict(persistent))
            getattr(tuner, attr)[adapter_name] = tensor

    def scale_for(self, config):
        return config.alpha / math.sqrt(self.in_features)

    def init_adapter(self, adapter_name, config, weight, tuner=None):
        if tuner is None or adapter_name not in getattr(tuner, "tera_core", {}):
            raise RuntimeError("TeRA layers are created by their tuner (lrzoo.wrap / PeftModel), which owns the shared core.")
        # A plain reference, not a submodule: the shared tensors must be saved once, on the tuner.
        object.__setattr__(self, "_tera_tuner", tuner)
        self.tera_modes = getattr(self, "tera_modes", {})
        self.tera_modes[adapter_name] = layer_modes(self.out_features, self.in_features, config.modes_per_side)
        n_modes = 2 * config.modes_per_side
        if config.init_weights:
            lam = torch.full((n_modes, config.r), config.lambda_init)
            lam[-1] = 0.0
        else:
            lam = torch.rand(n_modes, config.r) + 0.5
        self.add_trainable("tera_lambda", adapter_name, lam)

    def delta_weight(self, adapter_name):
        """``s·T·Rcᵀ`` (:func:`lrzoo.kernels.tera.tera_factors`): the contracted network, ``(d_out, d_in)`` in fp32."""
        tuner = self._tera_tuner
        T, Rc = tera_kernels.tera_factors(tuner.tera_factors[adapter_name], tuner.tera_core[adapter_name],
                                          self.tera_lambda[adapter_name], self.tera_modes[adapter_name], torch.float32)
        return self.scaling[adapter_name] * (T @ Rc.t())

    def delta_forward(self, x, adapter_name):
        """``s·(drop(x) Rc) Tᵀ``: ΔW's rank-R^K form, never the d_out×d_in matrix (quantized bases, several adapters)."""
        tuner = self._tera_tuner
        T, Rc = tera_kernels.tera_factors(tuner.tera_factors[adapter_name], tuner.tera_core[adapter_name],
                                          self.tera_lambda[adapter_name], self.tera_modes[adapter_name], x.dtype)
        return F.linear(F.linear(self.adapter_dropout[adapter_name](x), Rc.t()), T) * self.scaling[adapter_name]

    def fused_forward(self, x, adapter_name):
        """``x (W + ΔW)ᵀ + b`` through :func:`lrzoo.kernels.tera_linear`: ΔW = s·L·Gλ·Rcᵀ has rank ≤ R^K, so it
        is applied through x (the torch path mode by mode through its Kronecker factors, Triton as a rank-R^K
        LoRA), or merged into W when R^K nears the width."""
        tuner, base = self._tera_tuner, self.get_base_layer()
        p = dropout_probability(self.adapter_dropout[adapter_name])
        return kernels.tera_linear(x, self.base_weight_out_in(), base.bias, tuner.tera_factors[adapter_name],
                                   tuner.tera_core[adapter_name], self.tera_lambda[adapter_name],
                                   self.tera_modes[adapter_name], self.scaling[adapter_name], p, self.training)


register_adapter("tera", TeraConfig, TeraLayer)
