"""LoRA-Pro (Wang et al., arXiv 2407.18242; mrflogs/LoRA-Pro): LoRA trained along full fine-tuning's update.

The layer is plain LoRA, ``W' = W + s·B A`` (s = α/r, PEFT's init), saved as a native PEFT ``LORA``
checkpoint that stock PEFT loads. What differs is the optimizer: each step, A and B take the steps whose
equivalent update ``s·B ĝ_A + s·ĝ_B A`` is closest to the update AdamW would make on the full weight
(:class:`lrzoo.optimizers.lora_pro.LoraProAdamW`, the closed form and where lrzoo differs from the
official code). :func:`lrzoo.make_optimizer` builds it for a model wrapped with ``"lora_pro"``, as it
builds LoRA+'s groups; lrzoo's trainer does the same through the ``lora_pro`` procedure.

Memory: the trainable tensors are LoRA's, but the optimizer keeps full-size Adam moments of the
equivalent gradient (2·d_out·d_in per adapted matrix, as full fine-tuning).
"""

from __future__ import annotations

from ..registry import register_adapter
from .lora import LORA_ALIASES, build_lora_config

#: ``wrap`` options of the procedure (see adapters/lora_pro.yaml)
LORA_PRO_TRAINING_DEFAULTS = {
    "lora_pro": True,  # make_optimizer builds LoraProAdamW for this model
    "bias_correction_offset": 0,  # 1 reproduces the official code's Adam step t + 1
}

register_adapter(
    "lora_pro",
    build_config=build_lora_config,
    aliases=LORA_ALIASES,
    training_defaults=LORA_PRO_TRAINING_DEFAULTS,
    procedure="lora_pro",
    summary="LoRA-Pro: LoRA whose A, B steps make the update closest to full fine-tuning's AdamW step.",
)
