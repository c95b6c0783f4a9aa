"""A linear layer whose weight is stored as INT8 codes (Q-GaLore's weights), trained through ``weight.grad``.

:func:`to_int8_linear` swaps a model's ``nn.Linear`` for :class:`Int8Linear` in place. The weight then lives
as uint8 codes with fp32 per-group scales and zero points (:mod:`.group_quant`), about a quarter of fp32's
bytes; it is dequantized for each forward and again in backward (nothing full-size is kept between steps).

The gradient still arrives in ``layer.weight.grad``: ``weight`` is a *carrier*, an m×n float Parameter
whose every element is one stored NaN (a stride-0 view of 1 element, 4 bytes). Autograd accumulates ∂L/∂W
into its ``.grad`` as for any weight, so gradient accumulation, clipping, ``zero_grad`` and non-finite checks
see it. Its value is never the weight: code that reads ``layer.weight`` gets NaN (loudly wrong, not silently),
an optimizer other than Q-GaLore's fails on its first in-place update (PyTorch refuses writes to a tensor
whose elements share memory), and copying real values into it is refused (copying its own NaNs back, as a
trainer checkpoint of the trainable tensors does, is a no-op). The weight's value is
:meth:`Int8Linear.dense_weight`.

``state_dict()`` holds the *dequantized* weight under ``weight`` (so ``save_pretrained`` writes a plain dense
model, loadable without lrzoo); loading a dense ``weight`` quantizes it (round to nearest). The exact INT8
codes travel in the Q-GaLore optimizer's state, which puts them back on ``load_state_dict``.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from .group_quant import Quantized, check_group_size, dequantize, quantize

WEIGHT_BITS = 8


class _Int8LinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantized from codes; ∂L/∂W goes to the carrier's gradient."""

    @staticmethod
    def forward(ctx, x, carrier, bias, layer):
        ctx.layer = layer
        ctx.save_for_backward(x)
        ctx.has_bias = bias is not None
        out = x @ layer.dense_weight(x.dtype).t()
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        out_features, in_features = layer.out_features, layer.in_features
        grad_x = grad_out @ layer.dense_weight(grad_out.dtype) if ctx.needs_input_grad[0] else None
        flat_grad = grad_out.reshape(-1, out_features)
        grad_w = flat_grad.t() @ x.reshape(-1, in_features) if ctx.needs_input_grad[1] else None
        grad_b = flat_grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class GradientCarrier(nn.Parameter):
    """The m×n ``weight`` of an :class:`Int8Linear`: one stored NaN, a gradient of the weight's shape."""

    def copy_(self, src: torch.Tensor, non_blocking: bool = False) -> "GradientCarrier":
        # A checkpoint of the trainable tensors holds the carrier's own NaNs: copying them back is a no-op (the
        # weight itself comes back with the optimizer's state). Real values would be lost: refuse them.
        if torch.isnan(src).all():
            return self
        raise ValueError("This weight is stored as INT8 codes (Q-GaLore's Int8Linear): load values with "
                         "model.load_state_dict(...), which quantizes them, not by copying into layer.weight.")


def gradient_carrier(shape: tuple[int, int], dtype: torch.dtype, device) -> GradientCarrier:
    """An m×n Parameter over one stored NaN (see the module docstring)."""
    return GradientCarrier(torch.full((1, 1), float("nan"), dtype=dtype, device=device).expand(*shape))


class Int8Linear(nn.Module):
    """``nn.Linear`` with its weight as INT8 group codes (``weight_codes``, ``weight_scales``, ``weight_zeros``)."""

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        weight = linear.weight.detach()
        self.weight = gradient_carrier(tuple(weight.shape), weight.dtype, weight.device)
        self.weight.requires_grad_(linear.weight.requires_grad)
        self.weight.lrzoo_int8_layer = weakref.ref(self)  # how the optimizer finds the codes of the weight it steps
        self.bias = linear.bias
        codes, scales, zeros = quantize(weight.float(), group_size, WEIGHT_BITS)
        # not in state_dict as such: the dense weight is (hooks below), the exact codes are in the optimizer's state
        self.register_buffer("weight_codes", codes, persistent=False)
        self.register_buffer("weight_scales", scales, persistent=False)
        self.register_buffer("weight_zeros", zeros, persistent=False)
        self._register_state_dict_hook(_dense_weight_in_state_dict)
        self._register_load_state_dict_pre_hook(_quantize_loaded_weight, with_module=True)
        self.register_load_state_dict_post_hook(_weight_was_loaded)

    @property
    def quantized(self) -> Quantized:
        return Quantized(self.weight_codes, self.weight_scales, self.weight_zeros)

    def set_quantized(self, quantized: Quantized) -> None:
        """Replace the stored codes, scales and zero points (the optimizer's step and its reload)."""
        self.weight_codes, self.weight_scales, self.weight_zeros = quantized

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W = s·(q − z), m×n, in ``dtype``."""
        return dequantize(self.quantized, self.group_size, dtype).to(dtype)

    def weight_bytes(self) -> int:
        """Bytes the weight occupies: codes, scales, zero points and the carrier's one element."""
        tensors = (*self.quantized, self.weight)
        return sum(t.untyped_storage().nbytes() for t in tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8LinearFunction.apply(x, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 groups of {self.group_size}")


def _dense_weight_in_state_dict(module: Int8Linear, state_dict: dict, prefix: str, local_metadata) -> None:
    state_dict[prefix + "weight"] = module.dense_weight(module.weight.dtype)


def _quantize_loaded_weight(module: Int8Linear, state_dict: dict, prefix: str, *args) -> None:
    key = prefix + "weight"
    if key in state_dict:
        dense = state_dict.pop(key)
        if tuple(dense.shape) != (module.out_features, module.in_features):
            raise ValueError(f"{key}: a {tuple(dense.shape)} weight does not fit an "
                             f"{module.out_features}×{module.in_features} Int8Linear.")
        module.set_quantized(quantize(dense.to(module.weight_scales.device).float(), module.group_size,
                                      WEIGHT_BITS))
        module._loaded_key = key  # the carrier has no value to load: not a missing key (post hook)


def _weight_was_loaded(module: Int8Linear, incompatible_keys) -> None:
    key = module.__dict__.pop("_loaded_key", None)
    if key is not None and key in incompatible_keys.missing_keys:
        incompatible_keys.missing_keys.remove(key)


def to_int8_linear(model: nn.Module, weights: list[nn.Parameter], group_size: int,
                   owner: str = "q_galore") -> list[nn.Parameter]:
    """Swap the ``nn.Linear`` owning each of ``weights`` for an :class:`Int8Linear`; return their carriers.

    Every layer is checked before any is swapped (a refused one leaves the model as it was). Weights already in
    an ``Int8Linear`` (a second optimizer over the same model) are returned as they are.
    """
    wanted = {id(w) for w in weights}
    carriers: dict[int, nn.Parameter] = {}
    swaps = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            full_name = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, Int8Linear) and id(child.weight) in wanted:
                child.weight.lrzoo_int8_layer = weakref.ref(child)
                carriers[id(child.weight)] = child.weight
            elif id(getattr(child, "weight", None)) in wanted:
                if type(child) is not nn.Linear:
                    raise ValueError(f"{owner}: int8_weights stores nn.Linear weights only, got {type(child).__name__} "
                                     f"({full_name}); pass int8_weights=false or leave it out of target_modules.")
                check_group_size(owner, f"the weight of {full_name} ({child.out_features}×{child.in_features})",
                                 child.weight.numel(), group_size)
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        replacement = Int8Linear(child, group_size)
        setattr(parent, name, replacement)
        carriers[id(child.weight)] = replacement.weight
    return [carriers[id(w)] for w in weights if id(w) in carriers]
