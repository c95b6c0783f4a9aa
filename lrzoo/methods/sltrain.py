"""SLTrain (Han et al., arXiv 2406.02214; andyjm3/SLTrain): sparse plus low-rank weights, trained from scratch.

    W = s·B A + S,   B ∈ R^{m×r} (zeros),  A ∈ R^{r×n} (Kaiming-uniform, a=√5),  s = α / r,
    S = scatter(values, support),  |support| = ⌊δ·m·n⌋ positions drawn uniformly without replacement,
    values ~ U(±1/√n).

This is a *parameterisation*, not an adapter: every targeted ``nn.Linear`` of a (randomly initialised)
model is replaced by :class:`SLTrainLinear`, whose only tensors are B, A, the sparse values (all trained)
and the support (an integer buffer, fixed for the whole run). No dense W is kept, frozen or otherwise; at
step 0 the layer is the sparse S alone (B = 0), as in the official code. It is therefore not registered
with :func:`lrzoo.register_adapter` (PEFT's tuner layers always keep the base weight): a recipe selects it
with ``adapter=sltrain`` through :mod:`lrzoo.train.parameterisations`.

The support is drawn from a private generator seeded by ``(seed, layer name)``, so rebuilding the model with
the same seed gives the same support (a resumed run, a second process) without touching the global RNG;
it is also a buffer in the ``state_dict``. The forward is an autograd Function that saves (x, B, sA,
values, support) and rebuilds W in the backward, so the dense W lives only while a layer computes.

:func:`to_dense` materialises W into plain ``nn.Linear`` layers (a stock ``transformers`` model of the same
config), :func:`sltrain_memory` counts the bytes of B, A, the values and the indices against dense layers.
"""

from __future__ import annotations

import copy
import json
import math
import os
import types
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

#: the projections the official code replaces (names containing "attn"/"mlp"/"attention": every LLaMA linear
#: but ``lm_head``); embeddings and the output layer stay dense
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: what :func:`save_sltrain_model` writes beside the dense model
SLTRAIN_CONFIG_FILE = "sltrain.json"
SLTRAIN_FACTORS_FILE = "sltrain_factors.safetensors"


@dataclass(frozen=True)
class SLTrainConfig:
    """The options of :func:`apply_sltrain` (defaults: the official 60M LLaMA script, r 128, α 32, δ 0.03)."""

    r: int = 128
    alpha: float = 32.0
    density: float = 0.03
    target_modules: Optional[tuple[str, ...]] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"sltrain r={self.r!r}: the rank must be a positive integer.")
        if not 0.0 < float(self.density) < 1.0:
            raise ValueError(f"sltrain density={self.density!r}: the share of W's entries in the sparse support must "
                             "lie strictly between 0 and 1 (the paper uses 0.03).")
        if not math.isfinite(float(self.alpha)) or float(self.alpha) <= 0:
            raise ValueError(f"sltrain alpha={self.alpha!r}: must be a positive number (s = alpha / r).")


def draw_support(out_features: int, in_features: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """⌊density·m·n⌋ distinct flat indices into an m×n matrix, uniform without replacement, sorted (int64)."""
    total = out_features * in_features
    count = int(density * total)
    if count < 1:
        raise ValueError(f"sltrain density={density} keeps no entry of a {out_features}×{in_features} weight; "
                         "raise the density.")
    return torch.randperm(total, generator=generator)[:count].sort().values


def dense_weight(lora_B: torch.Tensor, scaled_A: torch.Tensor, values: torch.Tensor,
                 support: torch.Tensor) -> torch.Tensor:
    """W = B (sA) + S as a dense m×n tensor (S scattered from ``values`` at the flat ``support``)."""
    weight = lora_B @ scaled_A
    return weight.view(-1).index_add(0, support, values.to(weight.dtype)).view_as(weight)


class _SparseLowRankLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W = B (sA) + S, recomputing W in the backward instead of saving it."""

    @staticmethod
    def forward(ctx, x, lora_B, scaled_A, values, support, bias):
        ctx.save_for_backward(x, lora_B, scaled_A, values, support)
        ctx.has_bias = bias is not None
        return F.linear(x, dense_weight(lora_B, scaled_A, values, support), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_B, scaled_A, values, support = ctx.saved_tensors
        weight = dense_weight(lora_B, scaled_A, values, support)
        need_x, need_B, need_A, need_v = ctx.needs_input_grad[:4]
        # under autocast the forward ran in a lower precision than the saved tensors: compute in grad_out's dtype,
        # return each gradient in its input's
        grad_x = (grad_out @ weight.to(grad_out.dtype)).to(x.dtype) if need_x else None
        grad_W = None
        if need_B or need_A or need_v:  # G = g_yᵀ x, m×n
            grad_W = (grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
                      ).to(lora_B.dtype)
        grad_B = grad_W @ scaled_A.t() if need_B else None
        grad_A = lora_B.t() @ grad_W if need_A else None
        grad_v = grad_W.reshape(-1)[support].to(values.dtype) if need_v else None
        grad_bias = (grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(lora_B.dtype)
                     if ctx.has_bias and ctx.needs_input_grad[5] else None)
        return grad_x, grad_B, grad_A, grad_v, None, grad_bias


class SLTrainLinear(nn.Module):
    """A linear layer whose weight is B (sA) + S (see the module docstring); a drop-in for ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, density: float, *,
                 bias: bool = False, generator: Optional[torch.Generator] = None,
                 dtype: Optional[torch.dtype] = None, device: Any = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.density = r, float(alpha), float(density)
        self.scaling = self.alpha / r
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        # the official init, each tensor drawn from the layer's own generator (same support, same init per seed)
        A = torch.empty(r, in_features)
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=√5) = U(±1/√fan_in), nn.Linear's
        A.uniform_(-bound, bound, generator=generator)
        support = draw_support(out_features, in_features, density, generator)
        values = torch.empty(support.numel()).uniform_(-bound, bound, generator=generator)
        factory = {"dtype": dtype, "device": device}
        self.lora_A = nn.Parameter(A.to(**factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        self.sparse_values = nn.Parameter(values.to(**factory))
        self.register_buffer("sparse_index", support.to(device))
        if bias:  # U(±1/√out_features), as the official layer (LLaMA has no bias)
            out_bound = 1.0 / math.sqrt(out_features)
            self.bias = nn.Parameter(torch.empty(out_features).uniform_(-out_bound, out_bound, generator=generator)
                                     .to(**factory))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseLowRankLinear.apply(x, self.lora_B, self.lora_A * self.scaling, self.sparse_values,
                                          self.sparse_index, self.bias)

    @torch.no_grad()
    def materialize(self) -> torch.Tensor:
        """The dense weight W = B (sA) + S (m×n, the parameters' dtype)."""
        return dense_weight(self.lora_B, self.lora_A * self.scaling, self.sparse_values, self.sparse_index)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same map."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.lora_A.dtype, device=self.lora_A.device)
        with torch.no_grad():
            linear.weight.copy_(self.materialize())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of B, A, the sparse values and their indices, and of the dense layer they replace."""
        elem = self.lora_A.element_size()
        return {"lora_B": self.lora_B.numel() * elem, "lora_A": self.lora_A.numel() * elem,
                "sparse_values": self.sparse_values.numel() * self.sparse_values.element_size(),
                "sparse_index": self.sparse_index.numel() * self.sparse_index.element_size(),
                "dense": self.in_features * self.out_features * elem}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, density={self.density:g}, nnz={self.sparse_index.numel()}, "
                f"bias={self.bias is not None}")


def _layer_seed(seed: int, name: str) -> int:
    # a stable per-layer seed (crc32 is the same in every process, unlike hash())
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _targets(model: nn.Module, target_modules: Optional[Sequence[str]]) -> list[str]:
    wanted = tuple(target_modules or DEFAULT_TARGETS)
    found = [name for name, module in model.named_modules()
             if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in wanted]
    if not found:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"sltrain: no nn.Linear named {list(wanted)} in {type(model).__name__}; its linear layers "
                         f"are {linears}: set target_modules to some of them.")
    return found


def apply_sltrain(model: nn.Module, r: int = 128, alpha: float = 32.0, density: float = 0.03, *,
                  target_modules: Optional[Sequence[str]] = None, seed: int = 0) -> nn.Module:
    """Replace every targeted ``nn.Linear`` of ``model`` by an :class:`SLTrainLinear` (in place) and return it.

    The replaced layers' dense weights are discarded (the official code re-initialises them: B = 0, A and S
    drawn anew), so apply it to a randomly initialised model you train from scratch. Every other parameter
    (embeddings, norms, ``lm_head``) is left as it is and trained in full. ``model.save_pretrained`` then writes
    the dense export (:func:`save_sltrain_model`).
    """
    config = SLTrainConfig(r=r, alpha=alpha, density=density,
                           target_modules=tuple(target_modules) if target_modules else None, seed=seed)
    for name in _targets(model, config.target_modules):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if config.r > min(old.in_features, old.out_features):
            raise ValueError(f"sltrain r={config.r} exceeds the smaller side of {name} ({old.out_features}×"
                             f"{old.in_features}): a rank-r product could not be lower rank than W.")
        generator = torch.Generator().manual_seed(_layer_seed(config.seed, name))
        setattr(parent, child, SLTrainLinear(old.in_features, old.out_features, config.r, config.alpha,
                                             config.density, bias=old.bias is not None, generator=generator,
                                             dtype=old.weight.dtype, device=old.weight.device))
    model.lrzoo_sltrain = asdict(config)
    if hasattr(model, "save_pretrained"):  # the artifact is the dense model (loads without lrzoo)
        model.save_pretrained = types.MethodType(save_sltrain_model, model)
    return model


def sltrain_layers(model: nn.Module) -> dict[str, SLTrainLinear]:
    """The :class:`SLTrainLinear` layers of ``model`` by name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SLTrainLinear)}


def to_dense(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` with every :class:`SLTrainLinear` materialised into a plain ``nn.Linear`` (a copy unless
    ``inplace``): for a ``transformers`` model, the stock model of its config, loadable without lrzoo."""
    target = model if inplace else copy.deepcopy(model)
    for name in sltrain_layers(target):
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        setattr(parent, child, getattr(parent, child).to_linear())
    if "save_pretrained" in vars(target):  # drop the instance override: the result is a stock model
        del target.save_pretrained
    if hasattr(target, "lrzoo_sltrain"):
        del target.lrzoo_sltrain
    return target


def sltrain_memory(model: nn.Module) -> dict[str, int]:
    """Bytes of the SLTrain layers' tensors (``lora_B``, ``lora_A``, ``sparse_values``, ``sparse_index``,
    their ``total``) and of the dense layers they replace (``dense``)."""
    totals = {"lora_B": 0, "lora_A": 0, "sparse_values": 0, "sparse_index": 0, "dense": 0}
    for layer in sltrain_layers(model).values():
        for key, value in layer.memory_bytes().items():
            totals[key] += value
    totals["total"] = sum(v for k, v in totals.items() if k != "dense")
    return totals


def save_sltrain_model(model: nn.Module, save_directory: str, **kwargs: Any) -> None:
    """What ``save_pretrained`` of an SLTrain model writes: the dense export (a stock ``transformers`` model,
    ``AutoModelFor*.from_pretrained(dir)``), plus the factors (``sltrain_factors.safetensors``: B, A, the
    values and the support of each layer) and ``sltrain.json`` (the options and the measured bytes)."""
    from safetensors.torch import save_file

    kwargs.pop("state_dict", None)  # a gathered state dict of the factorised model does not fit the dense one
    os.makedirs(save_directory, exist_ok=True)
    to_dense(model).save_pretrained(save_directory, **kwargs)
    factors = {f"{name}.{key}": tensor.detach().cpu().contiguous()
               for name, layer in sltrain_layers(model).items()
               for key, tensor in (("lora_B", layer.lora_B), ("lora_A", layer.lora_A),
                                   ("sparse_values", layer.sparse_values), ("sparse_index", layer.sparse_index))}
    save_file(factors, os.path.join(save_directory, SLTRAIN_FACTORS_FILE))
    with open(os.path.join(save_directory, SLTRAIN_CONFIG_FILE), "w") as handle:
        json.dump({"method": "sltrain", **getattr(model, "lrzoo_sltrain", {}), "memory_bytes": sltrain_memory(model)},
                  handle, indent=2)


__all__ = ["DEFAULT_TARGETS", "SLTrainConfig", "SLTrainLinear", "apply_sltrain", "dense_weight", "draw_support",
           "save_sltrain_model", "sltrain_layers", "sltrain_memory", "to_dense"]
