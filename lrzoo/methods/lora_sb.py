"""LoRA-SB (Ponkshe et al., arXiv 2411.19557; RaghavSinghal10/lora-sb, now CERT-Lab/lora-sb).

Same architecture as LoRA-XS, ΔW = s · B R A with only the r×r core R trained (r² per matrix),
s = α/r with α = r (s = 1, the paper's "no scaling to tune"). The difference is the init, which
approximates the first step of full fine-tuning:

    G  = Σ_{50 samples} ∇_W L                     (full-FT gradient of the base weight, summed)
    ΔŴ = −η · sign(G)                             (η: the lr of the first optimizer step)
    ΔŴ ≈ U S Vᵀ   (torch.svd_lowrank, q=r, niter=10)
    B = U (d_out×r),  A = Vᵀ (r×d_in)  (both orthonormal, frozen),   R = S / s  (trained)

so ΔW = trunc_r(ΔŴ) ≠ 0 at step 0 *by design*, and the base W is left as it is. That init needs
data, so it is a separate call, :func:`init_lora_sb`, run once after :func:`lrzoo.wrap` and before
the optimizer is built (or pass ``init_data=``/``init_lr=`` to ``wrap``). Until it runs, a LoRA-SB
layer sits on W's own top-r singular subspace with R = 0 (ΔW = 0), so it is trainable but is not
the paper's method yet.

B and A come from gradients, not from W, so they cannot be recomputed at load time:
``frozen_factors`` must stay ``"saved"``. Exact LoRA export at rank r: B' = s·B R, A' = A.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from peft import PeftModel

from ..layer import AdapterConfig
from ..peft_bridge import move_adapter_to_base_device
from ..procedure import LoopData, Procedure, register_procedure
from ..registry import record_of, register_adapter
from ..decompositions import top_singular_triplets
from .lora_xs import LoraXSLayer

#: torch.svd_lowrank is randomized; a fixed seed makes the init reproducible.
SVD_SEED = 0


@dataclass
class LoraSBConfig(AdapterConfig):
    """LoRA-SB: ΔW = s·B R A initialised from the truncated SVD of the first full-FT step, only R (r×r) trained."""

    r: int = field(default=24, metadata={"help": "Rank of B, A and the r×r core (adapters/lora_sb.yaml)."})

    alpha: Optional[float] = field(
        default=None, metadata={"help": "s = alpha/r; None means alpha = r (s = 1), as in the official code."})
    init_std: float = field(
        default=0.1, metadata={"help": "Std of R when init_weights=False (random non-zero ΔW for tests)."})

    def __post_init__(self):
        super().__post_init__()
        if self.frozen_factors != "saved":
            raise ValueError(
                "LoRA-SB's frozen B and A come from training gradients, not from W, so they cannot be recomputed "
                "at load time: use frozen_factors='saved'."
            )


class LoraSBLayer(LoraXSLayer):
    prefix = "sb_"
    adapter_layer_names = ("sb_R",)
    other_param_names = ("sb_A", "sb_B")

    def scale_for(self, config):
        return 1.0 if config.alpha is None else config.alpha / config.r

    def init_adapter(self, adapter_name, config, weight, tuner=None):
        # Data-free placeholder until init_lora_sb: W's top-r singular subspace, R = 0.
        U, _, Vh = top_singular_triplets(weight, config.r)
        R = torch.zeros(config.r, config.r) if config.init_weights else torch.randn(config.r, config.r) * config.init_std
        self.set_factors(adapter_name, U, R, Vh)

    def init_from_update(self, adapter_name: str, update: torch.Tensor) -> None:
        """Set ``B, R, A`` so that ``s·B R A`` is the best rank-r approximation of ``update (d_out, d_in)``."""
        r = self.adapter_config[adapter_name].r
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SVD_SEED)
            U, S, V = torch.svd_lowrank(update.float(), q=r, niter=10)
        self.set_factors(adapter_name, U, torch.diag(S) / self.scaling[adapter_name], V.T)
        move_adapter_to_base_device(self, adapter_name)
        self._keep_trainable_in_fp32(adapter_name)
        self.set_adapter(self.active_adapters)


def _samples(batch: Mapping, count: int) -> dict:
    """The first ``count`` samples of a batch dict (tensors sliced on dim 0, other values kept)."""
    return {k: (v[:count] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}


def _batch_size(batch: Mapping) -> int:
    sizes = {len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"Cannot tell the batch size of a batch with tensor leading sizes {sorted(sizes)}.")
    return sizes.pop()


def init_lora_sb(
    peft_model: PeftModel,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    lr: float,
    num_samples: int = 50,
    adapter_name: Optional[str] = None,
) -> int:
    """Initialise every LoRA-SB layer of ``peft_model`` from an estimate of the first full-FT update.

    Args:
        peft_model: a model from ``lrzoo.wrap(model, "lora_sb", ...)``, before its optimizer is built.
        dataloader: yields dict batches that the model accepts as ``model(**batch)`` and that give a
            ``loss`` (so they include ``labels``), e.g. the training DataLoader.
        lr: η, the learning rate of the first optimizer step. With linear warm-up over N steps that
            is ``peak_lr / N``; the official code uses ``lr / (warmup_ratio · total_steps)``.
        num_samples: how many training samples the gradient is summed over (paper: 50).
        adapter_name: which adapter (default: the active one).

    Returns:
        The number of samples used (less than ``num_samples`` if the dataloader ran out).

    The gradient is taken at the unadapted base model (adapters disabled), in train mode as the
    official code does. Each batch's mean loss is multiplied by its sample count, so G is the
    per-sample sum whenever the loss is a mean over samples (classification). The official code
    divides the mean loss by the count instead (weight 1/b² per sample): the same sign(G), so the same
    init, when all batches have one size; a differently sized batch (a trailing partial one) weighs
    differently (docs/adapters/lora_sb.md).
    """
    adapter = adapter_name or peft_model.active_adapter
    layers = {name: m for name, m in peft_model.named_modules()
              if isinstance(m, LoraSBLayer) and adapter in m.adapter_config}
    if not layers:
        raise ValueError(f"init_lora_sb: the model has no LoRA-SB layers for adapter {adapter!r}; wrap it with "
                         "lrzoo.wrap(model, 'lora_sb', ...) first.")
    # ∂L/∂W of a linear layer is Σ_tokens ∂yᵀ x: accumulated from each layer's input and output gradient
    # by hooks, so W itself needs no gradient (a frozen or a quantized base works the same). The output
    # is made to require a gradient by adding a zero that does; the function is unchanged.
    sums = {name: torch.zeros(layer.out_features, layer.in_features, dtype=torch.float32,
                              device=next(layer.parameters()).device) for name, layer in layers.items()}
    zero = torch.zeros((), requires_grad=True)
    device = next(iter(sums.values())).device

    def capture(name: str):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()

            def accumulate(grad_out):
                sums[name].add_(grad_out.reshape(-1, grad_out.shape[-1]).float().t() @ x)

            output = output + zero.to(output.dtype)
            output.register_hook(accumulate)
            return output
        return hook

    modes = {m: m.training for m in peft_model.modules()}
    handles = [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]
    seen = 0
    try:
        peft_model.train()
        with peft_model.disable_adapter():
            for batch in dataloader:
                if not isinstance(batch, Mapping):
                    raise TypeError(f"init_lora_sb needs dict batches (model(**batch)), got {type(batch).__name__}.")
                count = min(_batch_size(batch), num_samples - seen)
                batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                         for k, v in _samples(batch, count).items()}
                loss = peft_model(**batch).loss
                if loss is None:
                    raise ValueError("init_lora_sb: the model returned no loss; the batches need 'labels'.")
                torch.autograd.grad(loss * count, [zero])
                seen += count
                if seen >= num_samples:
                    break
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.train(mode)
    if seen == 0:
        raise ValueError("init_lora_sb: the dataloader yielded no samples.")
    with torch.no_grad():
        for name, layer in layers.items():  # sums are (d_out, d_in) whatever the base layer's storage
            layer.init_from_update(adapter, -lr * torch.sign(sums[name]))
    return seen


def _init_from_wrap(peft_model: PeftModel, adapter_name: str) -> None:
    """``post_wrap`` hook: run :func:`init_lora_sb` when ``wrap`` got ``init_data=``."""
    training = record_of(peft_model).options
    data = training.pop("init_data", None)  # do not keep a reference to the data on the model
    if data is None:
        return
    if training.get("init_lr") is None:
        raise ValueError("lrzoo.wrap(..., 'lora_sb', init_data=...) also needs init_lr= (the first step's lr).")
    init_lora_sb(peft_model, data, lr=training["init_lr"], num_samples=training["init_num_samples"],
                 adapter_name=adapter_name)


@register_procedure
class LoraSBProcedure(Procedure):
    """LoRA-SB in lrzoo's trainer: :func:`init_lora_sb` on the first ``init_num_samples`` training rows, batched as
    the loop batches them, with η = lr / warm-up steps as in the official code unless ``init_lr`` was given."""

    name = "lora_sb"

    def before_training(self, model: Any, train_rows: Sequence[dict], task: Any, data: LoopData) -> None:
        c = self.config
        samples = self.options.get("init_num_samples", 50)
        batches = data.batches([train_rows[i] for i in range(min(samples, len(train_rows)))])
        lr = self.options.get("init_lr")
        if lr is None:
            lr = c.lr / max(round(c.warmup_ratio * data.planned_steps(len(train_rows))), 1)
        init_lora_sb(model, batches, lr=lr, num_samples=samples)


register_adapter("lora_sb", LoraSBConfig, LoraSBLayer,
                 training_defaults={"init_data": None, "init_lr": None, "init_num_samples": 50},
                 post_wrap=_init_from_wrap, procedure=LoraSBProcedure.name)
