"""The contract table: one row per registered adapter.

Each row names a tiny model, the ``wrap`` keywords, and two things written *independently of the
method's code*, straight from ../shared/spec/adapters.md:

* ``reference_delta(layer, adapter) -> ΔW`` in (d_out, d_in) layout, built from the layer's raw
  tensors with plain torch ops (differentiable, so gradients can be checked against it);
* ``param_count(d_out, d_in, kwargs) -> int``, the spec's trainable-parameter formula per matrix
  (the tests' only copy: test_decomposition_methods.py imports it, and test_contract.py checks the
  worked examples in docs/adapters/*.md against it).

``test_contract.py`` runs every shared behaviour on every row; adding a method adds a row here, and
a registered method without a row fails ``test_every_adapter_has_a_contract_row``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass
class Case:
    method: str
    model: str  # key of conftest.TINY_MODELS
    kwargs: dict[str, Any]
    reference_delta: Callable[[Any, str], torch.Tensor]
    param_count: Callable[[int, int, dict], int]
    #: ΔW = 0 right after wrap with the paper's init (False for LoRA-SB, by design).
    zero_init: bool = True
    #: keywords that give a random, non-zero ΔW for numerics tests.
    random_init: dict[str, Any] = field(default_factory=lambda: {"init_weights": False})
    #: export_lora is exact (ΔW low-rank by construction).
    exact_export: bool = True
    #: trainable parameters outside the adapted matrices (e.g. ReLoRA trains everything else too).
    extra_trainable: Optional[Callable[[Any], int]] = None
    #: tolerance of the no-op init check (LoRA-XS starts at ΔW ≈ 0, not exactly 0).
    init_atol: float = 1e-5
    #: save_pretrained writes one of PEFT's own formats (LORA, RANDLORA): stock PEFT loads it as is.
    native_peft_format: bool = False
    #: save_pretrained writes the whole merged model in Hugging Face format (ReLoRA: resets change W and
    #: every non-adapter tensor trains, which no adapter file holds); it loads with transformers alone.
    saves_full_model: bool = False
    #: kwargs for a short training run that must lower the loss.
    train_lr: float = 1e-2


def _lora_delta(layer, adapter):
    return layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight * layer.scaling[adapter]


def _base_weight(layer):
    weight = layer.get_base_layer().weight
    return weight.T if getattr(layer, "fan_in_fan_out", False) else weight


def _dora_delta(layer, adapter):
    weight = _base_weight(layer)
    adapted = weight + _lora_delta(layer, adapter)
    norm = torch.linalg.norm(adapted.detach().float(), dim=1).clamp_min(1e-6)
    magnitude = layer.lora_magnitude_vector[adapter].weight
    return (magnitude / norm)[:, None] * adapted - weight


def _lora_count(d_out, d_in, kw):
    return kw["r"] * (d_in + d_out)


def _core_count(d_out, d_in, kw):
    """An r×r trained core between frozen factors (LoRA-XS, LoRA-SB)."""
    return kw["r"] ** 2


LORA_RANDOM = {"init_lora_weights": False}

CASES: list[Case] = [
    Case("lora", "llama", {"r": 4, "alpha": 8}, _lora_delta, _lora_count, random_init=LORA_RANDOM,
         native_peft_format=True),
    Case("loraplus", "bert", {"r": 4, "alpha": 8}, _lora_delta, _lora_count, random_init=LORA_RANDOM,
         native_peft_format=True),
    Case("dora", "llama", {"r": 4, "alpha": 8}, _dora_delta, lambda o, i, kw: kw["r"] * (i + o) + o,
         native_peft_format=True,
         random_init=LORA_RANDOM, exact_export=False),
]

def _rslora_delta(layer, adapter):
    """rsLoRA: the LoRA product at the rank-stabilised scale α/√r, computed here from r and α, not PEFT's scaling."""
    return layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight * (
        layer.lora_alpha[adapter] / math.sqrt(layer.r[adapter]))


def _pissa_delta(layer, adapter):
    """PiSSA: the LoRA product at α/r, on top of the *residual* base weight the init left in the layer."""
    return layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight * (layer.lora_alpha[adapter] / layer.r[adapter])


CASES.extend([
    Case("rslora", "llama", {"r": 4, "alpha": 8}, _rslora_delta, _lora_count, random_init=LORA_RANDOM,
         native_peft_format=True),
    # PiSSA's init moves the principal part of W into B A: with the adapter disabled the layer is the residual,
    # so the model changes (zero_init=False), and the init itself is the non-zero product. Saved as a plain LoRA
    # adapter of rank 2r against the original weight: stock PEFT loads it on the untouched base.
    Case("pissa", "bert", {"r": 4, "alpha": 4}, _pissa_delta, _lora_count, zero_init=False, random_init={},
         native_peft_format=True),
])


def _xs_delta(layer, adapter):
    return layer.scaling[adapter] * layer.xs_B[adapter] @ layer.xs_R[adapter] @ layer.xs_A[adapter]


CASES.extend([
    Case("lora_xs", "bert", {"r": 4, "alpha": 8}, _xs_delta, _core_count, init_atol=1e-4),
])


def _randlora_delta(layer, adapter):
    """Spec §RandLoRA with PEFT's flattening: Bf column j·r+k pairs with Af row k·n+j."""
    lam, gamma = layer.randlora_lambda[adapter], layer.randlora_gamma[adapter]
    (r, n), d = lam.shape, gamma.shape[1]
    d_out, d_in = _base_weight(layer).shape
    D = max(d_out, d_in)
    B = layer.randlora_B[adapter][:D, :n, :].float().reshape(D, r, n)  # Bf = B.reshape(D, n·r), viewed as (r, n)
    A = layer.randlora_A[adapter][:, 0, :d].float()
    M = torch.einsum("pkj,kj,kq,jq->pq", B, lam, A, gamma) * layer.scaling[adapter]
    return M if d_in <= d_out else M.T


def _randlora_count(d_out, d_in, kw):
    d = min(d_out, d_in)
    n = -(-d // kw["r"])
    return n * (kw["r"] + d)


CASES.extend([
    Case("randlora", "llama", {"r": 4, "alpha": 8}, _randlora_delta, _randlora_count, exact_export=False,
         native_peft_format=True),
])


def _relora_extra(model):
    """ReLoRA trains every parameter that is not an adapted weight matrix (embeddings, norms, lm_head)."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and not n.endswith("base_layer.weight"))


CASES.extend([
    Case("relora", "llama", {"r": 4, "alpha": 8}, _lora_delta, _lora_count, random_init=LORA_RANDOM,
         extra_trainable=_relora_extra, train_lr=1e-3, saves_full_model=True),
])


# LoRA-Pro: LoRA's layer and checkpoint; only the optimizer differs (tests/methods/test_lora_pro.py checks its step).
CASES.extend([
    Case("lora_pro", "llama", {"r": 4, "alpha": 8}, _lora_delta, _lora_count, random_init=LORA_RANDOM,
         native_peft_format=True),
])


def _balanced_pair(dim):
    """(a, b), a·b = dim, a ≥ b, as close as possible: TeRA's 2-mode split of one side."""
    b = max(f for f in range(1, int(dim ** 0.5) + 1) if dim % f == 0)
    return dim // b, b


def _tera_delta(layer, adapter):
    """Spec §TeRA, order 4: ΔW[o1 o2, i1 i2] = s·Σ G[abcd] U1[o1 a]λ1[a] U2[o2 b]λ2[b] U3[i1 c]λ3[c] U4[i2 d]λ4[d]."""
    d_out, d_in = _base_weight(layer).shape
    (o1, o2), (i1, i2) = _balanced_pair(d_out), _balanced_pair(d_in)
    G = layer._tera_tuner.tera_core[adapter].float()
    U = layer._tera_tuner.tera_factors[adapter].float()
    lam = layer.tera_lambda[adapter]
    sizes = (o1, o2, i1, i2)
    M = [U[n, :size] * lam[n] for n, size in enumerate(sizes)]
    delta = torch.einsum("abcd,wa,xb,yc,zd->wxyz", G, *M).reshape(d_out, d_in)
    return delta * layer.adapter_config[adapter].alpha / d_in ** 0.5


CASES.extend([
    Case("tera", "llama", {"r": 4, "alpha": 1.0}, _tera_delta, lambda o, i, kw: 4 * kw["r"], exact_export=False),
])


# Decomposition methods (issue 3). LoLDU's and SVFit's W' = W_res + (trained core) equals W + ΔW with ΔW
# against the initial core, straight from the spec's forward; lrzoo keeps W itself as the base.
def _sb_delta(layer, adapter):
    return layer.scaling[adapter] * layer.sb_B[adapter] @ layer.sb_R[adapter] @ layer.sb_A[adapter]


def _loldu_delta(layer, adapter):
    """ΔW = W' − W = P L_r diag(σ z − σ₀ D_r) U_r with σ₀ = α/r."""
    P = torch.eye(layer.loldu_L[adapter].shape[0])[layer.loldu_rows[adapter]]  # P·M = M[rows]
    sigma0 = layer.adapter_config[adapter].alpha / layer.adapter_config[adapter].r
    core = layer.loldu_sigma[adapter] * layer.loldu_z[adapter] - sigma0 * layer.loldu_D[adapter]
    return P @ layer.loldu_L[adapter] @ torch.diag(core) @ layer.loldu_U[adapter]


def _svfit_delta(layer, adapter):
    """ΔW = W' − W = U_r diag(σ − Σ_r) V_rᵀ."""
    core = layer.svfit_sigma[adapter] - layer.svfit_S[adapter]
    return layer.svfit_U[adapter] @ torch.diag(core) @ layer.svfit_Vh[adapter]


def _flora_delta(layer, adapter):
    """s·G ×₁ F_out ×₂ F_in ×₃ F_k1 …, as one einsum over however many modes the layer has."""
    core = layer.flora_G[adapter]
    names = ["flora_out", "flora_in", "flora_k1", "flora_k2", "flora_k3"][:core.dim()]
    ranks, dims = "abcde"[:core.dim()], "oiklm"[:core.dim()]
    spec = f"{ranks}," + ",".join(f"{d}{r}" for d, r in zip(dims, ranks)) + f"->{dims}"
    return layer.scaling[adapter] * torch.einsum(spec, core, *(getattr(layer, n)[adapter] for n in names))


def _flora_count(d_out, d_in, kw):
    """Σ d_m r_m + ∏ r_m over the modes (d_out, d_in, k…); channel ranks r, kernel ranks kernel_r, each ≤ its mode."""
    kernel = kw.get("kernel_size", ())
    dims = [d_out, d_in, *kernel]
    ranks = [min(kw["r"], d) for d in (d_out, d_in)] + [min(kw.get("kernel_r", 2), k) for k in kernel]
    return sum(d * r for d, r in zip(dims, ranks)) + math.prod(ranks)


def _sb_init_batches():
    """Data for LoRA-SB's gradient init on the tiny BERT: 6 labelled samples in two batches."""
    from conftest import tiny_inputs

    return [{"input_ids": tiny_inputs(seed=s, batch=3), "labels": torch.tensor([0, 1, 2])} for s in (5, 6)]


CASES.extend([
    Case("lora_sb", "bert", {"r": 4, "init_data": _sb_init_batches(), "init_lr": 1e-2}, _sb_delta,
         _core_count, zero_init=False),
    Case("loldu", "llama", {"r": 4}, _loldu_delta, lambda o, i, kw: kw["r"] + 1, train_lr=5e-2),
    Case("svfit", "bert", {"r": 4}, _svfit_delta, lambda o, i, kw: kw["r"], train_lr=5e-2),
    Case("flora", "bert", {"r": 4, "alpha": 8}, _flora_delta, _flora_count),
    Case("flora", "conv", {"r": 4, "alpha": 8, "kernel_r": 2, "target_modules": ["conv1d", "conv2d", "conv3d"]},
         _flora_delta, _flora_count),
])

CASES_BY_METHOD = {case.method: case for case in CASES}


# SALT (issue 15 item 3): spec §4 (lowrank-training.md), the official core without its ReLU (lrzoo's choice,
# docs/adapters/salt.md): ΔW = U (C' − diag σ) Vᵀ with C' = blockdiag(diag(a ⊙ σ_r + b), diag(σ_res) + X Y).
def _salt_delta(layer, adapter):
    U, Vh, S = layer.salt_U[adapter], layer.salt_Vh[adapter], layer.salt_S[adapter]
    a, b = layer.salt_scale[adapter], layer.salt_shift[adapter]
    X, Y = layer.salt_X[adapter], layer.salt_Y[adapter]
    core_change = torch.block_diag(torch.diag(a * S + b - S), X @ Y)  # (k, k)
    return U @ core_change @ Vh


def _salt_count(d_out, d_in, kw):
    """Spec: 2r + 2(k − r)·r_L per matrix, k = min(d_out, d_in) (48×64, r=4, r_L=8: 712)."""
    return 2 * kw["r"] + 2 * (min(d_out, d_in) - kw["r"]) * kw["lora_r"]


CASES.extend([
    Case("salt", "llama", {"r": 4, "lora_r": 8}, _salt_delta, _salt_count),
])
CASES_BY_METHOD = {case.method: case for case in CASES}
