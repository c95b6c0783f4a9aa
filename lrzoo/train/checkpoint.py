"""Checkpoints of the trainer: what an exact resume needs, written atomically, and the final adapter.

A checkpoint is written at an optimizer-step boundary, ``<run dir>/checkpoints/step-<N>/trainer_state.pt``
(:data:`lrzoo.train.resume.STATE_KEYS`): the adapter weights, every trainable tensor, the optimizer,
scheduler and callback state (a training procedure's state travels in its callbacks'), each rank's RNG
state and the run's progress. It is written by rank 0 into a temporary directory renamed into place
(:func:`lrzoo.io.atomic_directory`), so a killed run leaves the previous checkpoint intact; the newest
``keep_checkpoints`` are kept. Reading one (and skipping damaged ones) is :mod:`lrzoo.train.resume`;
one writer per run directory is :mod:`lrzoo.runs.lock`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from ..heads import HEAD_FILE, find_pooled_head
from ..io import atomic_directory
from .resume import CHECKPOINT_RE, checkpoint_dirs, read_trainer_state
from .sharding import full_state_dict


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest ``<run_dir>/checkpoints/step-N`` directory, or ``None`` (unchecked: see
    :func:`lrzoo.train.resume.resume_latest` for the newest intact one)."""
    found = checkpoint_dirs(run_dir)
    return found[0] if found else None


class CheckpointMixin:
    """:class:`lrzoo.train.trainer.Trainer`'s checkpoints and adapter saving. Uses the trainer's
    ``accelerator``, ``model``/``peft_model``, ``optimizer``, ``scheduler``, ``callbacks``, ``run_dir``,
    ``run_info``, ``rank``/``world``/``is_main`` and its progress counters."""

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    def save_checkpoint(self, step: int) -> None:
        """Write ``checkpoints/step-<step>`` atomically (rank 0), keeping the newest few."""
        rng = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if self.is_main:
            state = {
                "step": step,
                "config_hash": self.run_info.get("config_hash"),
                "world_size": self.world,
                "adapter": get_peft_model_state_dict(self.peft_model) if self._is_peft else None,
                "trainable": self._trainable_state(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in self.callbacks],
                "rng": rng,
                "progress": {"train_time": self.train_time, "tokens_seen": self.tokens_seen,
                             "best": self.best, "last_eval": self.last_eval},
            }
            path = os.path.join(self.run_dir, "checkpoints", f"step-{step:07d}")
            with atomic_directory(path) as tmp:
                torch.save(state, os.path.join(tmp, "trainer_state.pt"))
            self._prune_checkpoints()
        self.accelerator.wait_for_everyone()

    def _prune_checkpoints(self) -> None:
        root = os.path.join(self.run_dir, "checkpoints")
        steps = sorted(name for name in os.listdir(root) if CHECKPOINT_RE.match(name))
        for name in steps[:-max(self.config.keep_checkpoints, 1)]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def load_checkpoint(self, path: str) -> None:
        """Restore everything :meth:`save_checkpoint` wrote; training continues at its step.

        A missing, cut-short or garbled ``trainer_state.pt`` raises
        :class:`lrzoo.train.resume.UnreadableCheckpoint` before anything is changed."""
        state = read_trainer_state(path)
        expected = self.run_info.get("config_hash")
        if state["config_hash"] != expected:
            raise ValueError(
                f"Checkpoint {path} was written by a run with another configuration (hash {state['config_hash']} "
                f"vs {expected}). Resume with the same settings, pick a new run directory (run_name=...), "
                "or start over with resume=never."
            )
        if state["adapter"] is not None:
            set_peft_model_state_dict(self.peft_model, state["adapter"])
        params = dict(self.accelerator.unwrap_model(self.model).named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for cb, cb_state in zip(self.callbacks, state["callbacks"]):
            if cb_state is not None:
                cb.load_state_dict(cb_state)
        if state["world_size"] != self.world:
            print(f"[lrzoo] resuming a {state['world_size']}-process run on {self.world}: the data order is "
                  "unchanged, dropout randomness is not.", file=sys.stderr)
        set_rng_state(state["rng"][self.rank % len(state["rng"])])
        progress = state["progress"]
        self.start_step, self.train_time = state["step"], progress["train_time"]
        self.tokens_seen, self.best, self.last_eval = progress["tokens_seen"], progress["best"], progress["last_eval"]

    def _save_adapter(self) -> None:
        # FSDP keeps what an adapter file holds whole on every rank (lrzoo.train.sharding); a baseline
        # saves the full model: gather it (a collective: every rank calls it).
        state_dict = (full_state_dict(self.model, keep=self.is_main) if self.sharded and not self._is_peft
                      else None)
        if self.is_main:
            with atomic_directory(os.path.join(self.run_dir, "adapter")) as tmp:
                self.peft_model.save_pretrained(tmp, state_dict=state_dict)
                self.tokenizer.save_pretrained(tmp)
                head = find_pooled_head(self.peft_model)
                if head is not None:  # how to rebuild the model the adapter was trained on (lrzoo.heads)
                    with open(os.path.join(tmp, HEAD_FILE), "w") as handle:
                        json.dump(head.spec(), handle, indent=2)
        self.accelerator.wait_for_everyone()
