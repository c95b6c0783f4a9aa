"""``lrzoo.export_lora``: write any adapter as a plain PEFT LoRA adapter that stock PEFT loads.

Each adapted layer contributes ΔW (against the *original* base weight):

* layers whose ΔW is low-rank by construction give exact factors ``B'A' = ΔW`` (LoRA, LoRA-XS,
  LoLDU, SVFit, FLoRA...), written as they are: exact up to fp error;
* the others (DoRA, RandLoRA, TeRA) are truncated by SVD to the requested rank and the relative
  Frobenius error ``‖ΔW − B'A'‖ / ‖ΔW‖`` is reported per layer, and on screen in one
  :class:`LossyExportWarning` (the largest and mean error) whenever it exceeds float32 rounding.

The checkpoint uses ``lora_alpha = r`` (scale 1), one ``target_modules`` entry per layer path, and
``rank_pattern``/``alpha_pattern`` where layers differ in rank. Conv layers become PEFT LoRA-conv
(``lora_A`` a k×k conv to r channels, ``lora_B`` a 1×1 conv). Task heads (``modules_to_save``) are
copied as they are.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from .io import refuse_foreign_files, remove_stale_siblings, replace_files_in
from .kernels.common import DORA_EPS
from .kernels.randlora import randlora_factors
from .layer import AdapterLayer
from .methods.base_moving_init import initial_factors
from .peft_bridge import PEFT_MODEL_PREFIX, LoraLayer, dequantized_weight, is_modules_to_save, transpose
from .registry import adapter_specs, record_of
from .targets import is_quantized, weight_shape

#: what an export writes into its directory (and all it may replace there).
EXPORT_FILES = ("adapter_config.json", "adapter_model.safetensors", "export_report.json")
#: a layer whose relative error is below this is exact up to float32 rounding (a full-rank SVD, say)
EXACT_TOLERANCE = 1e-6


class LossyExportWarning(UserWarning):
    """``export_lora`` truncated a ΔW that is not low-rank (DoRA, RandLoRA, TeRA): the export is an approximation."""


@dataclass
class ExportedLayer:
    name: str
    rank: int
    exact: bool
    relative_error: float


def lora_view(layer: BaseTunerLayer, adapter: str) -> tuple[Optional[tuple[torch.Tensor, torch.Tensor]], Optional[torch.Tensor]]:
    """``(exact (B, A) or None, dense ΔW or None)`` for one layer, in ``(d_out, d_in[, k...])`` layout."""
    if isinstance(layer, AdapterLayer):
        factors = layer.lora_factors(adapter)
        return (factors, None) if factors is not None else (None, layer.delta_weight(adapter))
    if isinstance(layer, LoraLayer):
        B = layer.lora_B[adapter].weight * layer.scaling[adapter]
        A = layer.lora_A[adapter].weight
        initial = initial_factors(layer, adapter)
        if initial is not None:  # PiSSA/OLoRA moved W to a residual: the update against W is s(BA - B0A0)
            A0, B0 = (t.to(A.device, A.dtype) for t in initial)
            return (torch.cat([B, -B0 * layer.scaling[adapter]], dim=1), torch.cat([A, A0], dim=0)), None
        if adapter not in getattr(layer, "lora_variant", {}):
            return (B, A), None
        return None, _dora_delta(layer, adapter)
    if hasattr(layer, "randlora_lambda"):  # PEFT's RandLoRA (its bnb layers' get_delta_weight fails off-square)
        return None, _randlora_delta(layer, adapter)
    delta = layer.get_delta_weight(adapter)
    return None, transpose(delta, getattr(layer, "fan_in_fan_out", False))


def _base_out_in(layer: BaseTunerLayer) -> torch.Tensor:
    """The base weight as float32 ``(d_out, d_in[, k...])``, dequantized for a bitsandbytes base."""
    base = layer.get_base_layer()
    if is_quantized(base):
        return dequantized_weight(base)
    return transpose(base.weight, getattr(layer, "fan_in_fan_out", False)).detach().float()


def _randlora_delta(layer: BaseTunerLayer, adapter: str) -> torch.Tensor:
    """RandLoRA's ``ΔW = s·Bf Af`` (or its transpose) in ``(d_out, d_in)``, as lrzoo's kernels build it."""
    d_out, d_in = weight_shape(layer.get_base_layer())
    Bf, Af, _ = randlora_factors(layer.randlora_A[adapter], layer.randlora_B[adapter], layer.randlora_lambda[adapter],
                                 layer.randlora_gamma[adapter], max(d_out, d_in), torch.float32)
    M = Bf @ Af
    return layer.scaling[adapter] * (M if d_in <= d_out else M.T)


def _dora_delta(layer: LoraLayer, adapter: str) -> torch.Tensor:
    """DoRA's full update ``m/‖W+sBA‖ ⊙ (W+sBA) − W`` (PEFT's get_delta_weight gives only sBA)."""
    weight = _base_out_in(layer)
    adapted = weight + transpose(layer.get_delta_weight(adapter), layer.fan_in_fan_out).float()
    # The norm of the adapted weight, taken here in (d_out, d_in) layout: PEFT's get_weight_norm expects
    # the base layer's own layout and would transpose a Conv1D weight a second time.
    norm = torch.linalg.vector_norm(adapted.reshape(adapted.shape[0], -1), dim=1).clamp_min(DORA_EPS)
    scale = layer.lora_magnitude_vector[adapter].weight.float() / norm
    return scale.view(-1, *([1] * (weight.dim() - 1))) * adapted - weight


def truncate(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``delta`` (flattened to 2-D) and the relative error."""
    flat = delta.detach().float().reshape(delta.shape[0], -1)
    U, S, Vh = torch.linalg.svd(flat, full_matrices=False)
    k = min(rank, S.numel())
    B = U[:, :k] * S[:k]
    A = Vh[:k]
    total = torch.linalg.vector_norm(S)
    error = float(torch.linalg.vector_norm(S[k:]) / total) if total > 0 else 0.0
    return B, A, error


def refactor(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``rank`` factors of ``B·A`` through two QRs and an r×r SVD (no d_out×d_in temporary)."""
    B2, A2 = B.detach().float().reshape(B.shape[0], -1), A.detach().float().reshape(A.shape[0], -1)
    QB, RB = torch.linalg.qr(B2)
    QA, RA = torch.linalg.qr(A2.T)
    U, S, Vh = torch.linalg.svd(RB @ RA.T)
    k = min(rank, S.numel())
    total = torch.linalg.vector_norm(S)
    error = float(torch.linalg.vector_norm(S[k:]) / total) if total > 0 else 0.0
    return (QB @ U[:, :k]) * S[:k], Vh[:k] @ QA.T, error


def _as_peft_shapes(B: torch.Tensor, A: torch.Tensor, weight_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape 2-D factors into PEFT LoRA's layout for the base layer (linear or conv)."""
    r = A.shape[0]
    if len(weight_shape) > 2:  # conv: A is a k×k conv to r channels, B a 1×1 conv
        A = A.reshape(r, *weight_shape[1:])
        B = B.reshape(weight_shape[0], r, *([1] * (len(weight_shape) - 2)))
    return B.contiguous(), A.contiguous()


def export_lora(
    peft_model: PeftModel,
    out_dir: str,
    rank: Optional[int] = None,
    adapter_name: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
) -> dict:
    """Write ``peft_model``'s adapter as a plain PEFT LoRA adapter in ``out_dir``.

    Args:
        peft_model: a model returned by :func:`lrzoo.wrap` (or loaded with PEFT).
        out_dir: where to write ``adapter_config.json``, ``adapter_model.safetensors`` and
            ``export_report.json`` (written atomically: a failed export leaves no partial folder).
        rank: export rank. ``None``: exact factors at their own rank, and the adapter's ``r`` for
            layers that need an SVD. An int: every layer at that rank (SVD where needed).
        adapter_name: which adapter (default: the active one).
        dtype: dtype of the written tensors (default: the adapter's own).
        overwrite: write into a directory that already holds other files, replacing only the three
            files an export writes (nothing else there is touched). Without it, a directory that holds
            anything but an earlier export is refused; an earlier export alone is replaced, as
            ``save_pretrained`` replaces an earlier save (so a script that saves and exports can run again).

    Returns:
        The report: per-layer rank, exactness and relative error, and the maximum error. A lossy export
        (a layer truncated with a relative error above 1e-6) also says so in a :class:`LossyExportWarning`.
    """
    remove_stale_siblings(out_dir)  # temporary folders of an export that was killed before it finished
    refuse_foreign_files(out_dir, overwrite or _earlier_export(out_dir), EXPORT_FILES, "export_lora")
    adapter = adapter_name or peft_model.active_adapter
    problem = export_problem(peft_model, adapter)  # ReLoRA after resets or with trained non-adapter weights
    if problem:
        raise ValueError(problem)
    config = peft_model.peft_config[adapter]
    state: dict[str, torch.Tensor] = {}
    layers: list[ExportedLayer] = []
    ranks: dict[str, int] = {}
    base_model = peft_model.get_base_model()
    for name, module in base_model.named_modules():
        if not isinstance(module, BaseTunerLayer) or adapter not in _adapters_of(module):
            continue
        if any(is_modules_to_save(parent) for parent in _parents(base_model, name)):
            continue
        with torch.no_grad():
            factors, delta = lora_view(module, adapter)
            default_rank = getattr(config, "r", 8)
            if factors is not None and rank is None:
                B, A, error = factors[0].float(), factors[1].float(), 0.0
                B, A = B.reshape(B.shape[0], -1), A.reshape(A.shape[0], -1)
            elif factors is not None:
                B, A, error = refactor(*factors, rank)
            else:
                B, A, error = truncate(delta, rank or default_rank)
        base = module.get_base_layer()
        logical = base.weight.shape if base.weight.dim() > 2 else weight_shape(base)  # conv kernels: as stored
        B, A = _as_peft_shapes(B, A, logical)
        out_dtype = dtype or _adapter_dtype(module, adapter)
        state[f"{PEFT_MODEL_PREFIX}{name}.lora_A.weight"] = A.to(out_dtype)
        state[f"{PEFT_MODEL_PREFIX}{name}.lora_B.weight"] = B.to(out_dtype)
        ranks[name] = A.shape[0]
        layers.append(ExportedLayer(name, A.shape[0], factors is not None and (rank is None or error < 1e-6), error))
    if not layers:
        raise ValueError(f"Adapter {adapter!r} has no adapted layers to export.")
    state.update(_modules_to_save_state(peft_model, adapter))

    common_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    odd = {name: r for name, r in ranks.items() if r != common_rank}
    lora_config = LoraConfig(
        r=common_rank,
        lora_alpha=common_rank,
        target_modules=sorted(ranks),
        rank_pattern={f"^{name}$": r for name, r in odd.items()},
        alpha_pattern={f"^{name}$": r for name, r in odd.items()},
        modules_to_save=getattr(config, "modules_to_save", None),
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        fan_in_fan_out=any(getattr(m, "fan_in_fan_out", False) for m in base_model.modules() if isinstance(m, BaseTunerLayer)),
    )
    report = {
        "source_method": record_of(peft_model).method or str(config.peft_type),
        "exact": all(layer.exact for layer in layers),
        "max_relative_error": max(layer.relative_error for layer in layers),
        "layers": [layer.__dict__ for layer in layers],
    }
    with replace_files_in(out_dir) as tmp:
        lora_config.save_pretrained(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                  os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "export_report.json"), "w") as f:
            json.dump(report, f, indent=2)
    _warn_if_lossy(report, layers, out_dir)
    return report


def export_problem(peft_model: PeftModel, adapter: str) -> Optional[str]:
    """Why a method says ``adapter`` of ``peft_model`` cannot be written as a LoRA file (its spec's ``export_problem``
    hook: ReLoRA after a reset), or ``None``. Every method is asked, not only the one the model was wrapped with
    last: a second adapter added with ``wrap`` does not make the first exportable."""
    for spec in adapter_specs():
        problem = spec.export_problem(peft_model, adapter) if spec.export_problem is not None else None
        if problem:
            return problem
    return None


def _earlier_export(out_dir: str) -> bool:
    """Whether ``out_dir`` holds an earlier export and nothing else (its report among its files)."""
    try:
        present = set(os.listdir(out_dir))
    except OSError:
        return False
    return "export_report.json" in present and present <= set(EXPORT_FILES)


def _warn_if_lossy(report: dict, layers: list[ExportedLayer], out_dir: str) -> None:
    """One line on screen when the export is an approximation: which method, how many layers, how far off."""
    lossy = [layer for layer in layers if layer.relative_error > EXACT_TOLERANCE]
    if not lossy:
        return
    worst = max(lossy, key=lambda layer: layer.relative_error)
    mean = sum(layer.relative_error for layer in lossy) / len(lossy)
    ranks = sorted({layer.rank for layer in lossy})
    warnings.warn(
        f"export_lora is lossy for this {report['source_method']} adapter: {len(lossy)} of {len(layers)} layers have a "
        f"ΔW of higher rank and were truncated by SVD to rank {'/'.join(map(str, ranks))}, with relative error "
        f"‖ΔW − B′A′‖/‖ΔW‖ up to {worst.relative_error:.2e} ({worst.name}; mean {mean:.2e}; every layer in "
        f"{os.path.join(out_dir, 'export_report.json')}). Pass a larger rank= for a closer export.",
        LossyExportWarning, stacklevel=3)


def _adapters_of(module: BaseTunerLayer) -> set[str]:
    names = set()
    for attr in module.adapter_layer_names:
        container = getattr(module, attr, None)
        if container is not None:
            names.update(container.keys())
    return names


def _adapter_dtype(module: BaseTunerLayer, adapter: str) -> torch.dtype:
    for attr in module.adapter_layer_names:
        container = getattr(module, attr, {})
        if adapter in container:
            item = container[adapter]
            return item.dtype if isinstance(item, torch.Tensor) else next(item.parameters()).dtype
    return torch.float32


def _parents(root: torch.nn.Module, name: str):
    parts = name.split(".")
    module = root
    for part in parts[:-1]:
        module = getattr(module, part)
        yield module


def _modules_to_save_state(peft_model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    """The saved task-head tensors, in the key format PEFT writes for ``modules_to_save``."""
    saved = get_peft_model_state_dict(peft_model, adapter_name=adapter)
    heads = [name for name, m in peft_model.get_base_model().named_modules() if is_modules_to_save(m)]
    return {k: v for k, v in saved.items() if any(k.startswith(f"{PEFT_MODEL_PREFIX}{h}.") for h in heads)}
