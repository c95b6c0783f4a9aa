"""LoRA-Pro (Wang et al., arXiv 2407.18242; mrflogs/LoRA-Pro): LoRA trained along full fine-tuning's update.

The layer is plain LoRA, ``W' = W + s·B A`` (s = α/r, PEFT's init), saved as a native PEFT ``LORA``
checkpoint that stock PEFT loads. What differs is the optimizer: each step, A and B take the steps whose
equivalent update ``s·B ĝ_A + s·ĝ_B A`` is closest to the update AdamW would make on the full weight
(:class:`lrzoo.optimizers.lora_pro.LoraProAdamW`, the closed form and where lrzoo differs from the
official code). :func:`lrzoo.make_optimizer` builds it for a model wrapped with ``"lora_pro"``, as it
builds LoRA+'s groups; lrzoo's trainer does the same through the ``lora_pro`` procedure.

The layers must be plain ``W + s·B A``: ``use_dora=True`` is refused here, and the optimizer refuses any other
LoRA tensor it cannot step (:func:`lrzoo.optimizers.lora_pro.lora_pairs`).

Memory: the trainable tensors are LoRA's, but the optimizer keeps full-size Adam moments of the
equivalent gradient (2·d_out·d_in per adapted matrix, as full fine-tuning).
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig

from ..registry import register_adapter
from .lora import LORA_ALIASES, build_lora_config

#: ``wrap`` options of the procedure (see adapters/lora_pro.yaml)
LORA_PRO_TRAINING_DEFAULTS = {
    "lora_pro": True,  # make_optimizer builds LoraProAdamW for this model
    "bias_correction_offset": 0,  # 1 reproduces the official code's Adam step t + 1
}



def build_lora_pro_config(use_dora: bool = False, **kwargs: Any) -> LoraConfig:
    """LoRA's config; ``use_dora=True`` is refused: the closed form is derived for ``W + s·B A`` only."""
    if use_dora:
        raise ValueError("lrzoo.wrap(..., 'lora_pro'): use_dora=True is refused: LoRA-Pro's closed form is derived "
                         "for W + s·B A, not DoRA's m ⊙ (W + s·B A)/‖W + s·B A‖, so its steps would not be the ones "
                         "closest to full fine-tuning's. Drop use_dora, or use wrap(model, 'dora') (trained with AdamW).")
    return build_lora_config(**kwargs)


register_adapter(
    "lora_pro",
    build_config=build_lora_pro_config,
    aliases=LORA_ALIASES,
    training_defaults=LORA_PRO_TRAINING_DEFAULTS,
    procedure="lora_pro",
    summary="LoRA-Pro: LoRA whose A, B steps make the update closest to full fine-tuning's AdamW step.",
)
