"""bitsandbytes bases through PEFT: reading a quantized weight (PEFT's dequantization, the one its QLoRA layers
use) and keeping bnb's standard 4-bit layout, which its CPU kernel repacks in place (lossily, without a backward)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..targets import is_quantized


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight of ``layer`` as a float32 ``(d_out, d_in)`` tensor (a fresh copy for a quantized layer).

    One layer at a time: a method that reads W (an SVD, an LU, DoRA's norm, a fingerprint) never holds
    more than one layer's float copy. Uses PEFT's dequantization, the same its QLoRA layers use.
    """
    from peft.utils.integrations import dequantize_module_weight

    if not is_quantized(layer):
        return layer.weight.detach().float()
    if getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False):
        raise ValueError(
            "bitsandbytes has repacked this layer's 4-bit weight for its CPU inference kernel (it does so in place on "
            "the first eval-mode forward), and its unpacking is lossy in bitsandbytes 0.50, so W cannot be read back "
            "exactly. Reload the quantized model and wrap it (or load the adapter) before running it in eval mode; "
            "lrzoo then keeps the layers it adapts in bitsandbytes' standard layout."
        )
    return dequantize_module_weight(layer).detach().float()


def repacked_4bit_layers(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes 4-bit layers of ``model`` already repacked for bnb's CPU inference kernel."""
    return [name for name, module in model.named_modules()
            if is_quantized(module) and getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False)]


def refuse_repacked_base(model: nn.Module, what: str) -> None:
    """Refuse a 4-bit base that bitsandbytes has repacked for its CPU inference kernel (wrap and every load).

    bitsandbytes 0.50 repacks a 4-bit weight in place on the first eval-mode, no-grad forward on a CPU with
    AVX512-bf16 (a quick look at the model). A repacked layer computes through a kernel without a backward:
    the loss's gradient reaches no adapter tensor, so a run "succeeds" and trains nothing. Nor can it be
    undone exactly: unpacking keeps the block scales rounded to bf16, and it happens in place on the next
    ``state_dict()``, which every PEFT load and save calls (measured: weights move by up to 0.03, logits by
    0.2), so even an inference load would run on another base. The only fix is a fresh load of the base.
    """
    packed = repacked_4bit_layers(model)
    if packed:
        raise ValueError(
            f"{what}: {len(packed)} bitsandbytes 4-bit layer(s) (e.g. {packed[0]}) were repacked in place for "
            "bitsandbytes' CPU inference kernel by an eval-mode forward without gradients before lrzoo saw the model; "
            "that kernel has no backward (nothing would train) and the repacking cannot be undone exactly (loading or "
            "saving would change the base weights in place). Reload the quantized model and wrap it (or load the "
            "adapter) before any eval-mode forward: from then on lrzoo keeps bitsandbytes' standard layout, so "
            "looking at the model after that is safe."
        )


def keep_quantized_layout(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` in bnb's standard layout; returns how many were switched.

    On a CPU with AVX512-bf16, bitsandbytes 0.50 repacks a 4-bit weight in place on the first eval-mode
    forward (for a bf16 kernel), and every later ``state_dict()`` (each ``save_pretrained``) unpacks it
    again in place, lossily; a repacked layer also has no backward (:func:`refuse_repacked_base`, which
    wrap and every load call first). lrzoo turns that repacking off on every 4-bit layer of a model it
    wraps or loads into: bnb takes its fp32 dequantize-then-matmul path in eval too (exact; slower on
    CPU; GPUs are unaffected).
    """
    count = 0
    for module in model.modules():
        if is_quantized(module) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
