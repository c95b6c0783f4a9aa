"""lrzoo's trainer, in small modules (docs/architecture.md):

* :mod:`~lrzoo.train.config`: :class:`TrainerConfig` (checked by :mod:`~lrzoo.train.budget`);
* :mod:`~lrzoo.train.data`: task rows to token features, padding, the data order of each step;
* :mod:`~lrzoo.train.trainer`: the loop (:class:`Trainer`), with :mod:`~lrzoo.train.divergence`
  (non-finite steps), :mod:`~lrzoo.train.precision` and :mod:`~lrzoo.train.sharding` (FSDP2);
* :mod:`~lrzoo.train.checkpoint`: writing and loading checkpoints and the adapter;
  :mod:`~lrzoo.train.resume` (the newest intact checkpoint), :mod:`~lrzoo.train.run_dir` (every rank
  sees one run directory; its files and lock are :mod:`lrzoo.runs`);
* :mod:`~lrzoo.train.evaluation`: scores, decoding, ``results.json`` and ``predictions.json``;
  :mod:`~lrzoo.train.loglik` (multiple-choice options scored by likelihood, ``eval.mode=loglik``);
* :mod:`~lrzoo.train.procedures`: the trainer's side of a method's procedure (built from the model's record, the
  loop's batching lent to it, GaLore/Fira over a plain model); the procedures themselves live beside their
  methods (:mod:`lrzoo.procedure`); :mod:`~lrzoo.train.optim` (``lrzoo.make_optimizer``, which asks the procedure);
* :mod:`~lrzoo.train.callbacks` (hooks, loggers), :mod:`~lrzoo.train.baselines` (full fine-tuning, head only,
  zero-shot).

* :mod:`~lrzoo.train.recipe`: a composed config checked and run (:func:`~lrzoo.train.recipe.run_recipe`).

The command line that runs a recipe is :mod:`lrzoo.cli.train` (``lrzoo-train``, ``python -m lrzoo.cli.train``).
"""

from .callbacks import Callback, CSVLogger
from .config import TrainerConfig
from .divergence import DivergenceError
from .optim import make_optimizer
from .trainer import Trainer

__all__ = ["CSVLogger", "Callback", "DivergenceError", "Trainer", "TrainerConfig", "make_optimizer"]
