"""PiSSA (Meng et al., arXiv 2404.02948): LoRA started from the principal singular directions of W, and the
saving of every LoRA init that moves the base weight (PiSSA, OLoRA) as a plain LoRA adapter.

PiSSA takes W's top-r singular triplets, ``A0 = √S_r V_rᵀ / √s``, ``B0 = U_r √S_r / √s`` (``s = α/r``), and
replaces the base weight by the residual ``W_res = W − s·B0 A0``: the model is unchanged at init, and training
moves the principal part of W instead of a zero update (PEFT's ``init_lora_weights="pissa"``; ``"pissa_niter_K"``
takes a randomized SVD of K subspace iterations). OLoRA does the same with a QR factorisation.

**Saving.** After training the model is ``W_res + s·B A``. An adapter file holding B and A is right only on
``W_res``, which a user loading it does not have: PEFT writes ``init_lora_weights="pissa"`` into the config,
so stock PEFT recomputes the SVD of the base it is given at load (a different ``W_res`` on any other base, a
randomized one for ``pissa_niter_K``), and its own conversion (``path_initial_model_for_weight_conversion``)
drops the task head (``modules_to_save``) from the converted file. So a model wrapped with such an init saves
the update against the *original* weight, ``ΔW = s(B A − B0 A0) = s·[B | −B0] [A ; A0]``: a plain LoRA adapter
of rank 2r at the same scale (``r`` and ``lora_alpha`` doubled; with rsLoRA, ``s = α/√r``, α times √2),
``init_lora_weights=True``, the head kept. It loads on the untouched base with stock PEFT, merges and stacks
like any LoRA adapter (:mod:`lrzoo.methods.base_moving_init`).
"""
from __future__ import annotations

from ..registry import register_adapter
from .base_moving_init import record_initial_factors
from .lora import LORA_ALIASES, build_lora_config


register_adapter(
    "pissa",
    build_config=build_lora_config,
    aliases=LORA_ALIASES,
    post_wrap=record_initial_factors,
    summary="PiSSA: LoRA from W's top-r singular directions, W -> residual; saved as a plain rank-2r LoRA adapter.",
    quantized_base_refusal="PiSSA replaces each base weight by its residual after an SVD, which a quantized weight "
                           "cannot take without re-quantization error; load the base in full precision, or use LoRA.",
)
