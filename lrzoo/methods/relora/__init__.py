"""ReLoRA (Lialin et al., arXiv 2307.05695; Guitaricet/relora): high-rank training from low-rank cycles.

Within a cycle the layer is plain LoRA, ``W' = W + s·B A`` (s = α/r, A Kaiming-uniform(a=√5), B = 0; the
official wrapper zeroes A at wrap time, so its factors first train after the first reset: docs/adapters/relora.md).
Every T steps (``relora_steps``) the update is merged, ``W ← W + s·B A``, and A, B are re-initialised,
so after k cycles ``W_k = W_0 + Σ_c s·B_c A_c``: a sum of rank-r updates whose total rank grows.
Every parameter that is not an adapted weight matrix (embeddings, norms, biases, lm_head) is trained
in full, as in the paper's code.

The whole method is this package:

* :mod:`.layer` — the layer side: :func:`~.layer.merge_and_reinit`, the reset count, the non-adapter
  parameters made trainable, the ``wrap`` options' defaults;
* :mod:`.procedure` — the training procedure: when to reset, optimizer-state pruning, the jagged cosine
  schedule (:class:`~.procedure.ReLoRA`, usable from any loop; :class:`~.procedure.ReLoRAHook` for lrzoo's
  trainer, :class:`~.procedure.ReLoRACallback` for the HF ``Trainer``; :class:`~.procedure.ReLoRAProcedure`);
* :mod:`.save` — the save format: the full merged model and ``relora.json`` (``save_pretrained``), why a
  LoRA export is refused after a reset, what :func:`lrzoo.load` says when pointed at such a folder;
* here — the registration that ties them together, with its hooks.
"""

from __future__ import annotations

import types

from peft import PeftModel

from ...registry import register_adapter
from ..lora import LORA_ALIASES, build_lora_config
from .layer import (RELORA_TRAINING_DEFAULTS, adapted_base_weights, lora_layers, merge_and_reinit, resets_done,
                    set_resets_done, train_non_adapter_parameters)
from .procedure import (ReLoRA, ReLoRACallback, ReLoRAHook, ReLoRAProcedure, jagged_cosine_factor,
                        make_relora_scheduler)
from .save import (RELORA_ARTIFACT, RELORA_FORMAT, changed_since_wrap, full_model_error, lora_export_problem,
                   merged_state_dict, record_wrapped_values, save_full_model)


def _post_wrap(peft_model: PeftModel, adapter_name: str) -> None:
    train_non_adapter_parameters(peft_model)
    record_wrapped_values(peft_model, adapter_name)
    # Per instance, so only ReLoRA models change and every caller (HF Trainer, lrzoo's trainer,
    # user code) gets the full model; a bound method survives copy.deepcopy.
    peft_model.save_pretrained = types.MethodType(save_full_model, peft_model)


register_adapter(
    "relora",
    build_config=build_lora_config,
    aliases=LORA_ALIASES,
    training_defaults=RELORA_TRAINING_DEFAULTS,
    post_wrap=_post_wrap,
    procedure=ReLoRAProcedure.name,
    summary="ReLoRA: LoRA merged into W and re-initialised every T steps; all other parameters trained.",
    quantized_base_refusal="ReLoRA merges each cycle into W and trains every non-adapted weight in full, which a "
                           "quantized base can do neither of. Load the base in full precision (bf16), or use LoRA "
                           "(QLoRA) on the quantized base.",
    export_problem=lora_export_problem,
    foreign_folder=full_model_error,
    bench_options={"init_lora_weights": False},
)

__all__ = ["RELORA_ARTIFACT", "RELORA_FORMAT", "RELORA_TRAINING_DEFAULTS", "ReLoRA", "ReLoRACallback", "ReLoRAHook",
           "ReLoRAProcedure", "adapted_base_weights", "changed_since_wrap", "full_model_error", "jagged_cosine_factor",
           "lora_export_problem", "lora_layers", "make_relora_scheduler", "merge_and_reinit", "merged_state_dict",
           "resets_done", "save_full_model", "set_resets_done", "train_non_adapter_parameters"]
