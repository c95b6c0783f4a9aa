"""LoRA-Pro (Wang et al., arXiv 2407.18242; mrflogs/LoRA-Pro): LoRA whose update approximates full fine-tuning's.

A LoRA layer ``y = W₀x + s·B A x`` (B: m×r, A: r×n) moves W by ``s·B ĝ_A + s·ĝ_B A`` when A and B take
the steps ĝ_A, ĝ_B. LoRA-Pro chooses them so that this *equivalent gradient* is as close as possible to
the update full fine-tuning would make, ``Ĝ`` (AdamW on the full m×n gradient), in Frobenius norm:

    ĝ_A = s⁻²(BᵀB)⁻¹ a + X A                     a = s Bᵀ Ĝ     (= what autograd gives A for Ĝ)
    ĝ_B = s⁻²(I − P_B) b (AAᵀ)⁻¹ − B X           b = s Ĝ Aᵀ
    s·B ĝ_A + s·ĝ_B A = P_B Ĝ + Ĝ P_A − P_B Ĝ P_A   for every X (P_B, P_A the projections on B's columns, A's rows)

and X (r×r) solves the Sylvester equation ``BᵀB X + X AAᵀ = −s⁻²(BᵀB)⁻¹ a Aᵀ``, the X that keeps
(ĝ_A, ĝ_B) closest to (a, b). The full gradient is never formed: it is estimated from the LoRA gradients
themselves (the same closed form with Ĝ's place taken by the raw G, i.e. a = g_A, b = g_B and X = 0), its
Adam moments are kept at full size (2mn numbers per matrix: LoRA-Pro's memory is full fine-tuning's
optimizer state), and ĝ_A, ĝ_B then take an SGD step of size lr, as in the official code.

Differences from the official code (spec: lowrank-training.md §3), each a choice made to be exact:
* the Adam bias correction uses the step number t (the official code uses t + 1, so its first update is
  0.744× as large); ``bias_correction_offset=1`` reproduces the official behaviour;
* s is the layer's own LoRA scale (the official code hard-codes 2 = 16/8);
* β, ε, the δ = 1e-8 regularisation of the r×r inverses and the fp32 solve follow the official code;
* the Sylvester equation is solved through the eigendecompositions of BᵀB and AAᵀ (symmetric, PSD), O(r³),
  with δ added to every λ_i + μ_j (the official code divides by λ_i + μ_j as they come, complex ``eig``s).
Every trainable parameter that is not a LoRA pair (a task head, biases) takes plain AdamW.

The pairs are found by :func:`lora_pairs` under any adapter name; a model in which it finds none, or a
trainable LoRA tensor outside the closed form (DoRA's magnitude, an embedding or conv LoRA, A without B),
is refused: LoRA-Pro never silently becomes AdamW.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, NamedTuple, Optional

import torch
import torch.nn as nn

from ...optimizers.checks import check_adamw, check_group_lr

#: the official regularisation of BᵀB and AAᵀ before inverting them (``pinv(M + δI)``)
DELTA = 1e-8


class Spectrum(NamedTuple):
    """``M = U diag(λ) Uᵀ`` of a symmetric PSD r×r Gram matrix (BᵀB or AAᵀ): one ``eigh`` serves both the
    regularised inverse and the Sylvester solve."""

    values: torch.Tensor
    vectors: torch.Tensor

    @classmethod
    def of(cls, matrix: torch.Tensor) -> "Spectrum":
        # eigh is deterministic for a given input on a given machine, as a resumed run needs
        return cls(*torch.linalg.eigh(matrix))

    def regularised_inverse(self) -> torch.Tensor:
        """``pinv(M + δI)`` as the official code takes it (by SVD there), with pinv's cut-off: a |λ + δ| at or below
        r·eps·max|λ + δ| counts as 0."""
        shifted = self.values + DELTA
        cutoff = shifted.shape[0] * torch.finfo(shifted.dtype).eps * shifted.abs().max()
        inverse = torch.where(shifted.abs() > cutoff, shifted.reciprocal(), torch.zeros_like(shifted))
        return (self.vectors * inverse) @ self.vectors.T


def solve_sylvester(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """X with ``P X + X Q + δ X = C`` for symmetric PSD r×r P, Q (the Gram matrices BᵀB, AAᵀ), in O(r³)."""
    return _sylvester(Spectrum.of(P), Spectrum.of(Q), C)


def _sylvester(P: Spectrum, Q: Spectrum, C: torch.Tensor) -> torch.Tensor:
    """With P = U diag(λ) Uᵀ and Q = V diag(μ) Vᵀ, Y = Uᵀ X V turns ``P X + X Q + δ X = C`` into r² scalar
    equations, ``(λ_i + μ_j + δ) Y_ij = (Uᵀ C V)_ij``: four r×r products instead of the (r²×r²) system
    ``(I ⊗ P + Qᵀ ⊗ I + δI) vec X = vec C`` it solves exactly (O(r⁶): 18.7 s per step at r = 64, 16 GiB per
    layer at r = 256). δ keeps it solvable where P and Q are both singular; their eigenvalues are ≥ 0 exactly
    (Gram matrices), so negative round-off ones are clamped and every divisor is ≥ δ.
    """
    (lam, U), (mu, V) = P, Q
    divisor = lam.clamp_min(0)[:, None] + mu.clamp_min(0)[None, :] + DELTA
    return U @ ((U.T @ C @ V) / divisor) @ V.T


class Grams(NamedTuple):
    """BᵀB and AAᵀ (as spectra) and their regularised inverses: computed once per step for both closed forms."""

    BtB: Spectrum
    AAt: Spectrum
    BtB_inv: torch.Tensor
    AAt_inv: torch.Tensor

    @classmethod
    def of(cls, A: torch.Tensor, B: torch.Tensor) -> "Grams":
        BtB, AAt = Spectrum.of(B.T @ B), Spectrum.of(A @ A.T)
        return cls(BtB, AAt, BtB.regularised_inverse(), AAt.regularised_inverse())


def equivalent_steps(A: torch.Tensor, B: torch.Tensor, scaling: float, a: torch.Tensor, b: torch.Tensor,
                     with_x: bool = True, grams: Optional[Grams] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ĝ_A, ĝ_B)`` from ``a = s·BᵀĜ`` and ``b = s·ĜAᵀ`` (the closed form above), in fp32.

    ``grams``: :meth:`Grams.of` the same fp32 A, B, when the caller already has them.
    """
    A, B, a, b = (t.float() for t in (A, B, a, b))
    g = grams if grams is not None else Grams.of(A, B)
    s2 = scaling ** -2
    grad_A = s2 * g.BtB_inv @ a
    residual = b - B @ (g.BtB_inv @ (B.T @ b))  # (I − P_B) b
    grad_B = s2 * residual @ g.AAt_inv
    if with_x:
        X = _sylvester(g.BtB, g.AAt, -s2 * g.BtB_inv @ a @ A.T)
        grad_A = grad_A + X @ A
        grad_B = grad_B - B @ X
    return grad_A, grad_B


class LoraProAdamW(torch.optim.Optimizer):
    """LoRA-Pro's step for every LoRA pair ``(A, B, s)`` of the model; AdamW for the other parameters.

    Args:
        params: the trainable parameters (iterable of tensors or param groups).
        lora_pairs: ``(A, B, scaling)`` per LoRA layer, A (r×n) and B (m×r) among ``params``.
        lr, betas, eps, weight_decay: as AdamW (decoupled decay, on A and B too).
        bias_correction_offset: 0 (the paper's Adam); 1 reproduces the official code's t + 1.
    """

    def __init__(self, params: Iterable[Any], lora_pairs: Iterable[tuple[torch.Tensor, torch.Tensor, float]],
                 lr: float = 2e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, bias_correction_offset: int = 0):
        check_adamw("LoRA-Pro", lr, betas, eps, weight_decay)
        if bias_correction_offset not in (0, 1) or isinstance(bias_correction_offset, bool):
            raise ValueError(f"LoRA-Pro: bias_correction_offset must be 0 (the paper's Adam step t) or 1 (the official "
                             f"code's t + 1), got {bias_correction_offset!r}.")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        check_group_lr("LoRA-Pro", self.param_groups)
        self.pairs = [(A, B, float(s)) for A, B, s in lora_pairs]
        if not self.pairs:
            raise ValueError("LoRA-Pro: no LoRA pair (A, B, s) was given, so every parameter would train as plain "
                             "AdamW. Pass lora_pairs(model), or use torch.optim.AdamW if that is what you want.")
        self.bias_correction_offset = int(bias_correction_offset)
        in_groups = {id(p) for group in self.param_groups for p in group["params"]}
        missing = [i for i, (A, B, _) in enumerate(self.pairs) if id(A) not in in_groups or id(B) not in in_groups]
        if missing:
            raise ValueError(f"LoRA-Pro: {len(missing)} LoRA pair(s) are not among the optimizer's parameters.")
        self._paired = {id(t) for A, B, _ in self.pairs for t in (A, B)}

    def _group_of(self, param: torch.Tensor) -> dict:
        return next(g for g in self.param_groups if any(p is param for p in g["params"]))

    @torch.no_grad()
    def step(self, closure: Optional[Any] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for A, B, s in self.pairs:
            if A.grad is None or B.grad is None:
                continue
            group = self._group_of(A)
            (beta1, beta2), eps, lr, wd = group["betas"], group["eps"], group["lr"], group["weight_decay"]
            grams = Grams.of(A.float(), B.float())  # A, B do not change until the update below
            # the full-size gradient estimate from the LoRA gradients (closed form with X = 0)
            gA0, gB0 = equivalent_steps(A, B, s, A.grad, B.grad, with_x=False, grams=grams)
            full = s * (B.float() @ gA0 + gB0 @ A.float())
            state = self.state[A]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(full)
                state["exp_avg_sq"] = torch.zeros_like(full)
            state["step"] += 1
            t = state["step"] + self.bias_correction_offset
            state["exp_avg"].mul_(beta1).add_(full, alpha=1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(full, full, value=1 - beta2)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
            target = (state["exp_avg"] / (1 - beta1 ** t)) / denom  # Ĝ: the full fine-tuning AdamW direction
            step_A, step_B = equivalent_steps(A, B, s, s * B.float().T @ target, s * target @ A.float().T,
                                              grams=grams)
            for param, update in ((A, step_A), (B, step_B)):
                if wd:
                    param.mul_(1 - lr * wd)
                param.add_(update.to(param.dtype), alpha=-lr)
        self._adamw_rest()
        return loss

    def _adamw_rest(self) -> None:
        """Plain AdamW on every parameter that is not half of a LoRA pair (heads, biases)."""
        for group in self.param_groups:
            rest = [p for p in group["params"] if p.grad is not None and id(p) not in self._paired]
            if not rest:
                continue
            (beta1, beta2), eps, lr, wd = group["betas"], group["eps"], group["lr"], group["weight_decay"]
            for p in rest:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                grad = p.grad.float()
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** state["step"])).add_(eps)
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(((state["exp_avg"] / (1 - beta1 ** state["step"])) / denom).to(p.dtype), alpha=-lr)


def lora_pairs(model: nn.Module, adapter_name: Optional[str] = None) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """``(A, B, s)`` of every trainable LoRA pair of ``model``, under any adapter name.

    A pair is a PEFT LoRA layer's ``lora_A[name]``/``lora_B[name]`` weights, both trainable (several adapters
    may train, on different layers). ``adapter_name`` keeps only that adapter's pairs.

    Raises:
        ValueError: no pair was found (LoRA-Pro would be plain AdamW), or a trainable LoRA tensor is outside
            the closed form, which is derived for ``W + s·B A``: a DoRA or other LoRA variant layer, an
            embedding or convolution LoRA, A or B trained without the other, or two adapters trained and
            active on one layer (each would take the whole step).
    """
    pairs, seen = [], set()
    for name, module in model.named_modules():
        lora_A, lora_B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if isinstance(lora_A, nn.ModuleDict) and isinstance(lora_B, nn.ModuleDict):
            trained = []
            for adapter in lora_A:
                seen.add(adapter)
                if adapter_name is not None and adapter != adapter_name:
                    continue
                A, B = lora_A[adapter].weight, lora_B[adapter].weight
                if not (A.requires_grad or B.requires_grad):
                    continue
                _check_pair(module, f"{name} (adapter {adapter!r})", adapter, A, B)
                trained.append(adapter)
                pairs.append((A, B, float(module.scaling[adapter])))
            active = [a for a in trained if a in getattr(module, "active_adapters", trained)]
            if len(active) > 1:
                raise ValueError(
                    f"LoRA-Pro: {name} trains {len(active)} active LoRA adapters ({', '.join(map(repr, active))}); the "
                    "closed form fits one s·B A per layer to the full step, so each would take the whole step. Train "
                    "one adapter at a time (set_adapter), or use AdamW.")
        embedding = getattr(module, "lora_embedding_A", None)
        if embedding is not None and any(p.requires_grad for p in embedding.parameters()):
            raise ValueError(f"LoRA-Pro: {name} is an embedding LoRA, which LoRA-Pro does not handle (its closed form "
                             "is for linear layers): leave the embedding out of target_modules.")
    if not pairs:
        scope = f" under adapter {adapter_name!r} (adapters found: {', '.join(sorted(seen)) or 'none'})" \
            if adapter_name is not None else ""
        raise ValueError(f"LoRA-Pro found no trainable LoRA pair (lora_A/lora_B weights){scope}, so it would train "
                         "plain AdamW. Wrap the model with lrzoo.wrap(model, 'lora_pro'), or build AdamW explicitly.")
    return pairs


def _check_pair(module: nn.Module, where: str, adapter: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """Refuse a trainable LoRA pair whose layer is not ``W + s·B A`` with A, B both trained 2-D matrices."""
    if not (A.requires_grad and B.requires_grad):
        frozen = "lora_B" if A.requires_grad else "lora_A"
        raise ValueError(f"LoRA-Pro: {where} trains one factor only ({frozen} is frozen); LoRA-Pro's closed form "
                         "steps A and B together. Make both trainable, or use AdamW.")
    magnitude = getattr(module, "lora_magnitude_vector", None)
    if getattr(module, "use_dora", {}).get(adapter) or (magnitude is not None and adapter in magnitude):
        raise ValueError(f"LoRA-Pro: {where} is a DoRA layer; LoRA-Pro's closed form is derived for W + s·B A, not "
                         "DoRA's m ⊙ (W + s·B A)/‖W + s·B A‖. Use plain LoRA layers (use_dora=False), or train DoRA "
                         "with AdamW.")
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None:
        raise ValueError(f"LoRA-Pro: {where} is a {type(variant).__name__} layer, not W + s·B A, for which LoRA-Pro's "
                         "closed form is derived. Use plain LoRA layers, or AdamW.")
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"LoRA-Pro: {where} is a convolution LoRA ({tuple(A.shape)} A); LoRA-Pro's closed form is "
                         "for linear layers: leave it out of target_modules.")
