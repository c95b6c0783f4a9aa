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
* β, ε, the δ = 1e-8 regularisation of the r×r inverses and the fp32 solve follow the official code.
Every trainable parameter that is not a LoRA pair (a task head, biases) takes plain AdamW.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

#: the official regularisation of BᵀB and AAᵀ before inverting them (``pinv(M + δI)``)
DELTA = 1e-8


def _inverse(matrix: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return torch.linalg.pinv(matrix + DELTA * eye)


def solve_sylvester(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """X with ``P X + X Q = C`` for small square P, Q (r×r): one (r²×r²) linear solve.

    ``vec(P X + X Q) = (I ⊗ P + Qᵀ ⊗ I) vec(X)`` with column-stacking vec; r is the LoRA rank, so the
    system is at most a few thousand unknowns.
    """
    r = P.shape[0]
    eye = torch.eye(r, dtype=P.dtype, device=P.device)
    system = torch.kron(eye, P.contiguous()) + torch.kron(Q.T.contiguous(), eye)
    # P = BᵀB and Q = AAᵀ are PSD, so the system is singular only if both are; δ keeps it solvable there.
    # An LU solve, not lstsq: LAPACK's gelsy is not bit-reproducible, and a resumed run must be.
    system = system + DELTA * torch.eye(r * r, dtype=P.dtype, device=P.device)
    solution = torch.linalg.solve(system, C.T.contiguous().reshape(-1, 1))
    return solution.reshape(r, r).T


def equivalent_steps(A: torch.Tensor, B: torch.Tensor, scaling: float, a: torch.Tensor, b: torch.Tensor,
                     with_x: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ĝ_A, ĝ_B)`` from ``a = s·BᵀĜ`` and ``b = s·ĜAᵀ`` (the closed form above), in fp32."""
    A, B, a, b = (t.float() for t in (A, B, a, b))
    s2 = scaling ** -2
    BtB_inv = _inverse(B.T @ B)
    AAt_inv = _inverse(A @ A.T)
    grad_A = s2 * BtB_inv @ a
    residual = b - B @ (BtB_inv @ (B.T @ b))  # (I − P_B) b
    grad_B = s2 * residual @ AAt_inv
    if with_x:
        X = solve_sylvester(B.T @ B, A @ A.T, -s2 * BtB_inv @ a @ A.T)
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
        if lr <= 0:
            raise ValueError(f"LoRA-Pro: lr must be positive, got {lr}.")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.pairs = [(A, B, float(s)) for A, B, s in lora_pairs]
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
            # the full-size gradient estimate from the LoRA gradients (closed form with X = 0)
            gA0, gB0 = equivalent_steps(A, B, s, A.grad, B.grad, with_x=False)
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
            step_A, step_B = equivalent_steps(A, B, s, s * B.float().T @ target, s * target @ A.float().T)
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


def lora_pairs(model: nn.Module, adapter_name: str = "default") -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """``(A, B, s)`` of every PEFT LoRA layer of ``model`` holding ``adapter_name`` with trainable A and B."""
    pairs = []
    for module in model.modules():
        lora_A, lora_B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_A, nn.ModuleDict) or adapter_name not in lora_A:
            continue
        A, B = lora_A[adapter_name].weight, lora_B[adapter_name].weight
        if A.dim() != 2 or not (A.requires_grad and B.requires_grad):
            continue
        pairs.append((A, B, float(module.scaling[adapter_name])))
    return pairs
