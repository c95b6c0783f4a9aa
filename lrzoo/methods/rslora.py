"""rsLoRA (Kalajdzievski, arXiv 2312.03732): LoRA with the rank-stabilised scale ``s = α/√r``.

LoRA's ``s = α/r`` shrinks the update as the rank grows, so at a fixed learning rate a larger rank learns
slower and gains nothing; the paper shows ``α/√r`` keeps the update's size (and its learning) stable across
ranks. Everything else is LoRA (A Kaiming-uniform, B = 0); PEFT's ``LoraConfig(use_rslora=True)``, so the
checkpoint is a native PEFT LORA adapter that stock PEFT loads (the flag is in ``adapter_config.json``).
"""

from __future__ import annotations

from ..registry import register_adapter
from .lora import LORA_ALIASES, build_lora_config

register_adapter(
    "rslora",
    build_config=build_lora_config,   # use_rslora: true comes from adapters/rslora.yaml, the defaults' one source
    aliases=LORA_ALIASES,
    summary="rsLoRA: LoRA scaled by α/√r instead of α/r (native PEFT LORA, use_rslora=True).",
)
