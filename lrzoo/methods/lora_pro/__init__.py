"""LoRA-Pro (Wang et al., arXiv 2407.18242; mrflogs/LoRA-Pro): LoRA trained along full fine-tuning's update.

The layer is plain LoRA, ``W' = W + s·B A`` (s = α/r, PEFT's init), saved as a native PEFT ``LORA``
checkpoint that stock PEFT loads. What differs is the optimizer: each step, A and B take the steps whose
equivalent update ``s·B ĝ_A + s·ĝ_B A`` is closest to the update AdamW would make on the full weight
(:class:`~.optimizer.LoraProAdamW`, the closed form and where lrzoo differs from the official code).
:func:`lrzoo.make_optimizer` and lrzoo's trainer build it through the method's procedure
(:class:`~.procedure.LoraProProcedure`).

The layers must be plain ``W + s·B A``: ``use_dora=True`` is refused here, and the optimizer refuses any other
LoRA tensor it cannot step (:func:`~.optimizer.lora_pairs`).

Memory: the trainable tensors are LoRA's, but the optimizer keeps full-size Adam moments of the
equivalent gradient (2·d_out·d_in per adapted matrix, as full fine-tuning).

The whole method is this package: here the config and the registration, :mod:`.optimizer` the optimizer,
:mod:`.procedure` the training procedure that builds it, :mod:`.bench` its step-time benchmark
(``python -m lrzoo.methods.lora_pro.bench``).
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig

from ...registry import register_adapter
from ..lora import LORA_ALIASES, build_lora_config
from .optimizer import DELTA, LoraProAdamW, equivalent_steps, lora_pairs, solve_sylvester
from .procedure import LoraProProcedure

#: ``wrap`` options of the procedure (see adapters/lora_pro.yaml)
LORA_PRO_TRAINING_DEFAULTS = {
    # a key of adapters/lora_pro.yaml, so part of every run's hash; the procedure refuses False (wrap 'lora')
    "lora_pro": True,
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
    procedure=LoraProProcedure.name,
    bench_options={"init_lora_weights": False},
    summary="LoRA-Pro: LoRA whose A, B steps make the update closest to full fine-tuning's AdamW step.",
)

__all__ = ["DELTA", "LORA_PRO_TRAINING_DEFAULTS", "LoraProAdamW", "LoraProProcedure", "build_lora_pro_config",
           "equivalent_steps", "lora_pairs", "solve_sylvester"]
