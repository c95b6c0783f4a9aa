"""Non-finite training quantities and scores: what the trainer does when a number stops being one.

* **Before each update** the trainer hands the step's loss and gradient norm to
  :class:`NonfiniteGuard`. If either is NaN or ±inf (on any process: the flag is reduced, so all
  ranks decide alike), ``trainer.on_nonfinite`` decides:

  - ``stop`` (default): no update is applied, nothing of the diverged state is written (no
    checkpoint, adapter or ``results.json``), and :class:`DivergenceError` says at which step,
    which quantity, the last good checkpoint and what to try. ``lrzoo-train`` exits non-zero.
  - ``skip_step``: the step's gradients are dropped, the optimizer and scheduler do not step, and
    the skip is counted (``nonfinite_steps_skipped`` in ``results.json``). After
    :data:`MAX_CONSECUTIVE_SKIPS` skipped steps in a row the run stops as under ``stop``.

  Under ``precision=fp16`` overflowing *gradients* are the GradScaler's business (it skips the step
  and lowers the scale, as designed); only the loss is checked there.
* **Scores** that come out NaN (Pearson of a constant prediction) are reported as ``null`` in
  ``results.json`` with the reason under ``nonfinite_metrics``, a warning says why, and they never
  become the ``best`` evaluation. ``results.json`` is strict JSON (no bare ``NaN`` tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
import torch.distributed as dist

NONFINITE_POLICIES = ("stop", "skip_step")
#: ``on_nonfinite=skip_step`` gives up after this many skipped optimizer steps in a row: by then
#: the weights or the learning rate are the problem, not one bad batch.
MAX_CONSECUTIVE_SKIPS = 10


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient norm; the run was stopped before applying it.

    Attributes: ``step`` (the 1-based optimizer step that was not applied), ``quantity``
    (``"loss"`` or ``"gradient norm"``), ``checkpoint`` (the last good checkpoint, or ``None``).
    """

    def __init__(self, message: str, *, step: int, quantity: str, checkpoint: Optional[str]):
        super().__init__(message)
        self.step, self.quantity, self.checkpoint = step, quantity, checkpoint


def total_grad_norm(parameters: Iterable[torch.Tensor]) -> Optional[torch.Tensor]:
    """The 2-norm of all gradients together (as ``clip_grad_norm_`` computes it, without clipping; of
    this rank's shards under FSDP2), a 0-d float32 tensor; ``None`` when no parameter has a gradient."""
    grads = [_local(p.grad.detach()) for p in parameters if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 ``DTensor``) tensor's local part, else the tensor: a NaN/inf anywhere is a NaN/inf
    in some rank's local part, and :meth:`NonfiniteGuard.check` reduces the flag over the ranks."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class NonfiniteGuard:
    """Decides, once per optimizer step and identically on every rank, whether the update happens.

    Its counters travel in checkpoints (it has ``state_dict``/``load_state_dict``, like a callback).

    Args:
        policy: ``"stop"`` or ``"skip_step"`` (``trainer.on_nonfinite``).
        total_steps: the run's planned optimizer steps (for messages).
        last_checkpoint: returns the newest checkpoint directory of the run, or ``None``.
        settings: the trainer options quoted in the advice (lr, max_grad_norm, warmup_ratio, precision).
    """

    def __init__(self, policy: str, total_steps: int, last_checkpoint: Callable[[], Optional[str]],
                 settings: dict[str, Any]):
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"trainer.on_nonfinite must be one of {list(NONFINITE_POLICIES)}, got {policy!r}.")
        self.policy, self.total_steps = policy, total_steps
        self.last_checkpoint, self.settings = last_checkpoint, settings
        self.skipped = 0
        self.consecutive = 0
        self.first_skipped: Optional[int] = None  # first step of the current run of skips

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "first_skipped": self.first_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped, self.consecutive = state["skipped"], state["consecutive"]
        self.first_skipped = state["first_skipped"]

    def check(self, step: int, loss: torch.Tensor, grad_norm: Optional[torch.Tensor]) -> bool:
        """``True``: apply optimizer step ``step`` (1-based); ``False``: skip it. Raises
        :class:`DivergenceError` when the run must stop. ``grad_norm=None``: not checked."""
        loss = _local(loss)
        grad_norm = None if grad_norm is None else _local(grad_norm)
        bad_loss = ~torch.isfinite(loss.detach().float())
        bad_norm = (~torch.isfinite(grad_norm.detach().float()) if grad_norm is not None
                    else torch.zeros((), dtype=torch.bool, device=loss.device))
        flags = torch.stack([bad_loss, bad_norm.to(loss.device)]).to(torch.int32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # one rank's NaN stops (or skips) every rank
        loss_flag, norm_flag = (bool(v) for v in flags.tolist())
        if not (loss_flag or norm_flag):
            self.consecutive, self.first_skipped = 0, None
            return True
        quantity = "loss" if loss_flag else "gradient norm"
        value = loss if loss_flag else grad_norm
        if self.policy == "stop":
            raise self._error(step, quantity, value, self._stop_reason(step, quantity, value))
        self.skipped += 1
        self.consecutive += 1
        if self.first_skipped is None:
            self.first_skipped = step
        if self.consecutive >= MAX_CONSECUTIVE_SKIPS:
            reason = (f"Training diverged: {self.consecutive} optimizer steps in a row "
                      f"({self.first_skipped}-{step} of {self.total_steps}) had a non-finite loss or gradient "
                      f"norm (last: the {quantity}, {_shown(value)}); trainer.on_nonfinite=skip_step gives up "
                      f"after {MAX_CONSECUTIVE_SKIPS}. None of them was applied.")
            raise self._error(step, quantity, value, reason)
        return False

    def _stop_reason(self, step: int, quantity: str, value: Optional[torch.Tensor]) -> str:
        return (f"Training diverged: the {quantity} is {_shown(value)} at optimizer step {step} of "
                f"{self.total_steps} (trainer.on_nonfinite=stop). The step was not applied.")

    def _error(self, step: int, quantity: str, value: Optional[torch.Tensor], reason: str) -> DivergenceError:
        checkpoint = self.last_checkpoint()
        s = self.settings
        where = (f"Last good checkpoint: {checkpoint}. Nothing of the diverged state was written (no checkpoint, "
                 "adapter or results.json)." if checkpoint else
                 "No checkpoint had been written yet (trainer.save_every); nothing of the diverged state was "
                 "written (no adapter or results.json).")
        tries = [f"a lower trainer.lr (now {s.get('lr')})"]
        if not s.get("max_grad_norm"):
            tries.append("gradient clipping, trainer.max_grad_norm=1.0 (now off)")
        else:
            tries.append(f"a lower trainer.max_grad_norm (now {s.get('max_grad_norm')})")
        if not s.get("warmup_ratio"):
            tries.append("a warm-up, e.g. trainer.warmup_ratio=0.06")
        if s.get("precision") not in (None, "no"):
            tries.append(f"trainer.precision=no (now {s.get('precision')})")
        if self.policy == "stop":
            tries.append("trainer.on_nonfinite=skip_step to skip isolated bad batches" + (
                " (the same command with it resumes from the last good checkpoint: on_nonfinite is not part of "
                "the config hash)" if checkpoint else ""))
        if quantity == "loss" and step == 1:
            tries.append("checking the data: a NaN loss at the first step can also mean a batch with no "
                         "supervised position (every response cut off by max_length)")
        return DivergenceError(f"{reason} {where} What to try: {'; '.join(tries)}.",
                               step=step, quantity=quantity, checkpoint=checkpoint)


def _shown(value: Optional[torch.Tensor]) -> str:
    if value is None:
        return "non-finite"
    number = float(value.detach().float())
    return str(number) if not math.isfinite(number) else "non-finite on another process"


# --------------------------------------------------------------------------------------------
# Non-finite scores
# --------------------------------------------------------------------------------------------


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None``, recursively through dicts,
    lists and tuples: what strict JSON parsers accept (``json.dump`` would write bare ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
