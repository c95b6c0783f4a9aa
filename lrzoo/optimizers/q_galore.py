"""Q-GaLore (Zhang et al., arXiv 2407.08296; VITA-Group/Q-GaLore, PyPI ``q-galore-torch`` 1.0).

GaLore with three quantized or lazy parts:

* **INT8 weights.** :func:`lrzoo.make_optimizer` (``method="q_galore"``) swaps each targeted ``nn.Linear`` of the
  model for an :class:`.int8_linear.Int8Linear` (uint8 codes, fp32 scale and zero point per group of 256): the
  model is changed in place. After each step the updated weight is re-quantized with *stochastic rounding*
  (fresh per-group min/max), so steps far below the INT8 grid still move it on average.
* **INT4 projection matrices.** P (GaLore's top-r singular vectors of G) is quantized to 4-bit group codes
  (round to nearest, groups of 256) at each refresh and dequantized at every projection.
* **Layer-adaptive lazy refresh.** At each refresh the cosine between the previous and the new *first*
  singular vector (signed) enters a FIFO of ``queue_size``; once the FIFO is full and its mean ≥
  ``cos_threshold``, that weight's gap T is multiplied by ``gamma_proj`` (the FIFO is never cleared, so T keeps
  doubling at each refresh while the mean stays high; T never shrinks). Refreshes come when step % T == 0
  (step counted from 0 before the update), with T the weight's current gap.

The step (official ``QGaLoreAdamW8bit.step``): R = proj(G); the bitsandbytes 32-bit Adam update of a zero
tensor, u = −lr·√(1−β2ᵗ)/(1−β1ᵗ) · M/(√V + ε·√(1−β2ᵗ)) (ε inside the bias correction, as torch's
AdamW); W ← W + α·back(u); W ← W − lr·wd·W; re-quantize. Groups without ``rank`` take the same Adam with the decay
first (W·(1 − lr·wd) + u). Defaults: the C4 scripts' (r 128 at 60M, T 200, α 0.25, β (0.9, 0.95), ε 1e-8).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .checks import as_real
from .group_quant import Quantized, check_group_size, nbytes, quantize
from .int8_linear import Int8Linear, to_int8_linear
from .projector import ProjectedAdamW, orthonormal_basis, project, project_back, projection_side
from .registry import register_optimizer

#: Per-weight state keys holding the INT8 weight in ``state_dict()`` (the layer holds them while training).
WEIGHT_KEYS = ("weight_codes", "weight_scales", "weight_zeros")
PROJECTOR_KEYS = ("projector_codes", "projector_scales", "projector_zeros")


class QGaLoreAdamW(ProjectedAdamW):
    """Q-GaLore: GaLore with INT4 projectors, lazy per-weight refreshes and INT8 (stochastically rounded) weights.

    Projected groups take GaLore's keys plus ``proj_bits`` (4), ``proj_group_size`` (256), ``cos_threshold``
    (0.4), ``gamma_proj`` (2), ``queue_size`` (5). ``int8_weights``: the projected weights are the carriers
    of :class:`.int8_linear.Int8Linear` layers (what ``make_optimizer`` builds); ``False`` trains float
    weights (INT4 P and the lazy refresh only). ``seed`` (default: ``torch.initial_seed()``, the run's seed)
    seeds the stochastic rounding's generator, whose state is part of ``state_dict()``.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, proj_bits: int = 4, proj_group_size: int = 256,
                 cos_threshold: float = 0.4, gamma_proj: float = 2, queue_size: int = 5, int8_weights: bool = True,
                 weight_group_size: int = 256, stochastic_round: bool = True, seed: Optional[int] = None,
                 weight_names=None):
        self.method_defaults = {"proj_bits": proj_bits, "proj_group_size": proj_group_size,
                                "cos_threshold": cos_threshold, "gamma_proj": gamma_proj, "queue_size": queue_size}
        self._check_options({**self.method_defaults, "int8_weights": int8_weights,
                             "stochastic_round": stochastic_round})
        self._check_int(weight_group_size, "weight_group_size")
        if seed is None:  # the run's seed (torch.manual_seed), so runs with other seeds round differently
            seed = torch.initial_seed()
        self._check_int(seed, "seed", minimum=0)
        self.int8_weights, self.weight_group_size = int8_weights, weight_group_size
        self.stochastic_round, self.seed = stochastic_round, seed
        self._generator: Optional[torch.Generator] = None
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, weight_names=weight_names)

    # -- options -------------------------------------------------------------------------------------------
    @staticmethod
    def _check_int(value, name: str, minimum: int = 1) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"QGaLoreAdamW: {name} must be an integer ≥ {minimum}, got {value!r}.")

    @classmethod
    def _check_options(cls, options: dict) -> None:
        for key in ("int8_weights", "stochastic_round"):
            if key in options and not isinstance(options[key], bool):
                raise ValueError(f"QGaLoreAdamW: {key} must be true or false, got {options[key]!r}.")
        if "proj_bits" in options:
            cls._check_int(options["proj_bits"], "proj_bits")
            if options["proj_bits"] > 8:
                raise ValueError(f"QGaLoreAdamW: proj_bits must be ≤ 8 (codes are stored one per byte), got "
                                 f"{options['proj_bits']!r}; the paper's is 4.")
        for key in ("proj_group_size", "queue_size"):
            if key in options:
                cls._check_int(options[key], key)
        if "cos_threshold" in options:
            value = as_real(options["cos_threshold"])
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
                raise ValueError(f"QGaLoreAdamW: cos_threshold must be a number in [-1, 1] (a mean cosine), got "
                                 f"{options['cos_threshold']!r}; the paper's is 0.4.")
        if "gamma_proj" in options:
            value = as_real(options["gamma_proj"])
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
                raise ValueError(f"QGaLoreAdamW: gamma_proj must be a finite number ≥ 1 (the gap never shrinks), "
                                 f"got {options['gamma_proj']!r}; the paper's is 2.")

    def check_method_options(self, param_group: dict) -> None:
        self._check_options(param_group)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "rank" not in group:
            return
        for param in group["params"]:
            name = self._weight_names.get(id(param), "a weight")
            side = projection_side(param.shape, group["proj_type"])
            m, n = param.shape
            check_group_size("QGaLoreAdamW", f"the projector of {name} ({'r×n' if side == 'right' else 'm×r'})",
                             group["rank"] * (n if side == "right" else m), group["proj_group_size"])
            if self.int8_weights and self.int8_layer(param) is None:
                raise ValueError(f"QGaLoreAdamW: int8_weights=True but {name} is a float weight. Build it with "
                                 "lrzoo.make_optimizer(model, lr, method='q_galore'), which stores the targeted "
                                 "weights in INT8, or pass int8_weights=False.")

    @staticmethod
    def int8_layer(param: torch.Tensor) -> Optional[Int8Linear]:
        """The :class:`Int8Linear` whose weight ``param`` carries, if any."""
        ref = getattr(param, "lrzoo_int8_layer", None)
        return ref() if ref is not None else None

    # -- state -----------------------------------------------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        """The stochastic rounding's generator (one per optimizer: the weights draw in param-group order)."""
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def state_dict(self) -> dict:
        """The usual state plus each INT8 weight's codes, scales and zero points and the rounding's RNG."""
        saved = super().state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for group in self.param_groups:
            for param in group["params"]:
                layer = self.int8_layer(param)
                if layer is not None:
                    i = index[id(param)]
                    saved["state"][i] = {**saved["state"].get(i, {}), **dict(zip(WEIGHT_KEYS, layer.quantized))}
        if self._generator is not None:
            saved["rounding_rng"] = self._generator.get_state()
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        rng = state_dict.pop("rounding_rng", None)
        # The INT8 weights go to the layers as saved: the base class would cast fp32 scales to a bf16 model's dtype.
        weights, state_dict["state"] = {}, dict(state_dict["state"])
        for index, state in state_dict["state"].items():
            if all(key in state for key in WEIGHT_KEYS):
                weights[index] = Quantized(*(state[key] for key in WEIGHT_KEYS))
                state_dict["state"][index] = {k: v for k, v in state.items() if k not in WEIGHT_KEYS}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for index, quantized in weights.items():
            layer = self.int8_layer(params[index])
            if layer is None:
                raise ValueError(f"QGaLoreAdamW.load_state_dict: the state holds INT8 codes for parameter {index}, "
                                 "which is no INT8 layer's weight here: build the optimizer with "
                                 "lrzoo.make_optimizer(model, lr, method='q_galore') before loading.")
            layer.set_quantized(Quantized(*(t.to(layer.weight_codes.device) for t in quantized)))
            if not self.state[params[index]]:
                del self.state[params[index]]
        if rng is not None:
            device = next((self.int8_layer(p).weight_codes.device for p in params if self.int8_layer(p) is not None),
                          torch.device("cpu"))
            self.generator(device).set_state(rng)

    # -- the step --------------------------------------------------------------------------------------------
    def _refresh(self, grad: torch.Tensor, state: dict, group: dict, side: str) -> None:
        basis = orthonormal_basis(grad, group["rank"], side)
        first = (basis[:1, :] if side == "right" else basis[:, :1]).clone().flatten()
        if "past_vector" in state:
            queue = state["cos_queue"].tolist()
            if len(queue) == group["queue_size"]:
                queue.pop(0)
            queue.append(F.cosine_similarity(state["past_vector"], first, dim=0).item())
            state["cos_queue"] = torch.tensor(queue, dtype=torch.float32)  # fp32 .item()s: exact
            if len(queue) == group["queue_size"] and sum(queue) / group["queue_size"] >= group["cos_threshold"]:
                state["update_proj_gap"] = int(state["update_proj_gap"] * group["gamma_proj"])
        else:
            state["cos_queue"] = torch.zeros(0, dtype=torch.float32)
        state["past_vector"] = first
        quantized = quantize(basis, group["proj_group_size"], group["proj_bits"])
        state.update(zip(PROJECTOR_KEYS, quantized))

    @staticmethod
    def projector(state: dict, group: dict, shape: tuple[int, int]) -> torch.Tensor:
        """P dequantized from its INT4 codes."""
        codes, scales, zeros = (state[key] for key in PROJECTOR_KEYS)
        return (scales * (codes.reshape(-1, group["proj_group_size"]).to(scales.dtype) - zeros)).reshape(shape)

    @staticmethod
    def _adam(grad: torch.Tensor, value: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """bitsandbytes' 32-bit Adam update of ``value`` (decoupled decay first when the group has some)."""
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        t, lr = state["step"], group["lr"]
        exp_avg = state["exp_avg"] * beta1 + (1.0 - beta1) * grad
        exp_avg_sq = state["exp_avg_sq"] * beta2 + (1.0 - beta2) * grad * grad
        correction2 = math.sqrt(1.0 - beta2 ** t)
        step_size = -lr * correction2 / (1.0 - beta1 ** t)
        if group["weight_decay"] > 0.0:
            value = value * (1.0 - lr * group["weight_decay"])
        state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq
        return value + step_size * (exp_avg / (torch.sqrt(exp_avg_sq) + group["eps"] * correction2))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if grad.is_sparse:
                    raise RuntimeError("QGaLoreAdamW does not support sparse gradients.")
                state = self.state[param]
                state.setdefault("step", 0)
                if "rank" not in group:
                    param.copy_(self._adam(grad, param.float(), state, group).to(param.dtype))
                    continue
                layer = self.int8_layer(param)
                weight = layer.dense_weight(grad.dtype) if layer is not None else param
                side = projection_side(param.shape, group["proj_type"])
                state.setdefault("update_proj_gap", group["update_proj_gap"])
                if state["step"] % state["update_proj_gap"] == 0:
                    self._refresh(grad, state, group, side)
                m, n = param.shape
                basis = self.projector(state, group, (group["rank"], n) if side == "right" else (m, group["rank"]))
                low_rank_grad = project(grad, basis, side)
                update = self._adam(low_rank_grad, torch.zeros_like(low_rank_grad), state, group)
                weight.add_(project_back(update, basis, side) * group["scale"])
                if group["weight_decay"] > 0.0:
                    weight.add_(weight, alpha=-group["lr"] * group["weight_decay"])
                if layer is not None:
                    generator = self.generator(weight.device) if self.stochastic_round else None
                    layer.set_quantized(quantize(weight.float(), layer.group_size, 8, generator))
        return loss


def prepare_int8(model, weights: list, options: dict) -> list:
    """``make_optimizer``'s hook: store the targeted weights in INT8 (unless ``int8_weights=False``).

    The options that could refuse the optimizer later are checked first, so a refused run leaves the model as it
    was (the optimizer checks them all again)."""
    QGaLoreAdamW._check_options(options)
    if not options.get("int8_weights", True):
        return weights
    group_size = options.get("weight_group_size", 256)
    QGaLoreAdamW._check_int(group_size, "weight_group_size")
    rank, proj_group_size = options.get("rank"), options.get("proj_group_size")
    if isinstance(rank, int) and isinstance(proj_group_size, int) and rank > 0 and proj_group_size > 0:
        names = {id(p): name for name, p in model.named_parameters()}
        for weight in weights:
            m, n = weight.shape
            side = projection_side(weight.shape, options.get("proj_type", "std"))
            check_group_size("QGaLoreAdamW", f"the projector of {names.get(id(weight), 'a weight')} "
                             f"({'r×n' if side == 'right' else 'm×r'})", rank * (n if side == "right" else m),
                             proj_group_size)
    return to_int8_linear(model, weights, group_size, owner="q_galore")


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer of ``model`` as stored (an :class:`Int8Linear`'s carrier counts 4)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-weight tensors (moments, INT4 projector codes, scales, ...)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


register_optimizer(
    "q_galore",
    QGaLoreAdamW,
    # run_pretrain.py / scripts/pretrain_c4 (60M): rank 128, T 200, α 0.25, INT4 P in groups of 256, cos 0.4,
    # γ 2, queue 5 (INT8 weights in groups of 256 with stochastic rounding: the optimizer's own options).
    group_defaults={"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "proj_bits": 4,
                    "proj_group_size": 256, "cos_threshold": 0.4, "gamma_proj": 2, "queue_size": 5},
    summary="Q-GaLore: GaLore with INT8 weights (stochastic rounding), INT4 projectors and lazy per-layer refreshes.",
    prepare_model=prepare_int8,
)

__all__ = ["QGaLoreAdamW", "nbytes", "optimizer_state_bytes", "weight_bytes"]
