"""The trainer's side of training procedures (docs/architecture.md, "Training procedures are data").

A method's procedure lives beside the method (``lrzoo/methods/<name>/procedure.py``, or its module) and is
found in :data:`lrzoo.procedure.PROCEDURES` through the name its registration gives; the base class, the table
and what every procedure's optimizer shares are :mod:`lrzoo.procedure`. Here is what only the trainer needs:

* :func:`procedure_for` builds a run's procedure from the model's record (:func:`lrzoo.registry.record_of`, read
  there once) and the run's :class:`~lrzoo.train.config.TrainerConfig`;
* :func:`loop_data` lends a procedure the loop's own batching (:class:`lrzoo.procedure.LoopData`);
* :class:`LowRankOptimizerProcedure` trains a plain model's weights with GaLore/Fira (``adapter=galore``): an
  optimizer, not an adapter, so it has no method folder.

============  =======================  ==========================================================
procedure     hooks it fills           where
============  =======================  ==========================================================
``default``   (all, plainly)           :class:`lrzoo.procedure.Procedure`: AdamW (head at ``head_lr``,
                                       input embeddings at ``embedding_lr``), the configured LR schedule, no callback
``loraplus``  ``build_optimizer``      :class:`lrzoo.methods.lora.LoraPlusProcedure`
``relora``    ``callbacks``,           :class:`lrzoo.methods.relora.procedure.ReLoRAProcedure`
              ``make_scheduler``
``lora_sb``   ``before_training``      :class:`lrzoo.methods.lora_sb.LoraSBProcedure`
``lora_pro``  ``build_optimizer``      :class:`lrzoo.methods.lora_pro.procedure.LoraProProcedure`
``lowrank_    ``build_optimizer``      :class:`LowRankOptimizerProcedure` (here)
optimizer``
============  =======================  ==========================================================
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..heads import pair_encoding
from ..optimizers import create_optimizer
from ..procedure import LoopData, Procedure, checked_rates, procedure_of, register_procedure
from .config import TrainerConfig
from .data import collate, encode_rows, planned_steps


@register_procedure
class LowRankOptimizerProcedure(Procedure):
    """A low-rank gradient optimizer (GaLore, Fira) over every weight of a plain model: ``adapter=galore``.

    ``options`` are the recipe's: ``method`` (a name from :func:`lrzoo.list_optimizers`) and its
    options (``rank``, ``update_proj_gap``, ``scale``, ...), handed to :func:`lrzoo.optimizers.create_optimizer`.
    """

    name = "lowrank_optimizer"

    def __post_init__(self) -> None:
        if self.config is not None and self.config.strategy == "fsdp":
            raise ValueError(f"{self.options.get('method')} projects each weight's full gradient, which FSDP shards "
                             "across ranks: use trainer=ddp (or a single process) for it.")

    def build_optimizer(self, model: nn.Module, lr: float, *, weight_decay: float = 0.0,
                        head_lr: Optional[float] = None, embedding_lr: Optional[float] = None,
                        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                        **optimizer_kwargs: Any) -> torch.optim.Optimizer:
        options = {key: value for key, value in {**self.options, **optimizer_kwargs}.items() if value is not None}
        method = options.pop("method")
        if options.get("loraplus_lr_ratio") is not None or optimizer_cls is not torch.optim.AdamW:
            raise ValueError(f"method={method!r} is an optimizer of its own: drop loraplus_lr_ratio and optimizer_cls.")
        # the input embeddings are never projected (projection_targets: linear layers only): a plain AdamW group
        rates = checked_rates(model, lr, head_lr, embedding_lr)
        # a tied output layer at head_lr == embedding_lr has no tensor of its own: its rate arrives as embedding_lr
        return create_optimizer(model, method, lr, weight_decay=weight_decay,
                                head_lr=head_lr if rates.head else None, head_params=rates.head,
                                embedding_lr=embedding_lr, embedding_params=rates.embeddings, **options)


def procedure_for(model: nn.Module, config: TrainerConfig) -> Procedure:
    """The procedure of the method ``model`` was wrapped with (``AdapterSpec.procedure``), built from the
    options ``wrap`` recorded on it; the plain one for a model lrzoo did not wrap (a baseline)."""
    return procedure_of(model, config)


def loop_data(config: TrainerConfig, model: nn.Module, task: Any, tokenizer: Any) -> LoopData:
    """The loop's encoding of rows, for :meth:`lrzoo.procedure.Procedure.before_training`: tokenized as the run
    tokenizes (its ``max_length``, the model's pair encoding), cut into micro-batches of the run's size."""
    size = config.micro_batch_size or config.batch_size

    def batches(rows: Sequence[dict]) -> list[dict]:
        features = encode_rows(rows, task.kind, tokenizer, config.max_length, pairs=pair_encoding(model))
        return [collate(features[k:k + size], tokenizer.pad_token_id) for k in range(0, len(features), size)]

    return LoopData(batches=batches, planned_steps=lambda n_rows: planned_steps(n_rows, config))


__all__ = ["LowRankOptimizerProcedure", "loop_data", "procedure_for"]
