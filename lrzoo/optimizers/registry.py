"""The optimizer registry: low-rank gradient methods (GaLore, Fira, ...) by name, and the one call that builds them.

An optimizer method is not an adapter: it adds no adapter module and saves no adapter file; it trains the
model's own weights with less optimizer state (Q-GaLore also stores the targeted weights in INT8). Each method registers itself in its file under
``lrzoo/optimizers/`` with :func:`register_optimizer`; :func:`create_optimizer` (behind
``lrzoo.make_optimizer(model, lr, method=name, ...)``) picks the weights to project and builds the
param groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from ..registry_table import Table
from ..targets import LINEAR_TYPES, TargetSpec, input_embedding_parameter_ids, leaf_names, resolve_targets
from .int8_linear import Int8Linear

#: the layers a low-rank optimizer projects: a model's linear layers, and those an earlier Q-GaLore optimizer
#: already stored in INT8 (so a second optimizer over the same model finds the same weights)
PROJECTABLE_TYPES: tuple[type, ...] = (*LINEAR_TYPES, Int8Linear)


@dataclass(frozen=True)
class OptimizerSpec:
    """What the registry knows about one optimizer method."""

    name: str
    #: The optimizer class; its param groups with a ``rank`` key are projected. It takes ``weight_names``
    #: (``id(weight)`` → name, for messages) besides the param groups and AdamW's options.
    optimizer_cls: type[torch.optim.Optimizer]
    #: Options of the projected groups (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) and their defaults.
    group_defaults: dict[str, Any] = field(default_factory=dict)
    #: One line for listings and error messages.
    summary: str = ""
    #: ``(model, weights, options) -> weights``: changes the model before the groups are built (Q-GaLore stores
    #: the targeted weights in INT8) and returns the parameters that stand for ``weights``; None for most. It sees
    #: every option (group and optimizer) and should check them before it changes anything.
    prepare_model: Optional[Callable[[nn.Module, list, dict], list]] = None


_REGISTRY: Table[OptimizerSpec] = Table("optimizer method", hint="Register new ones with lrzoo.optimizers.register_optimizer.")


def register_optimizer(name: str, optimizer_cls: type[torch.optim.Optimizer], *,
                       group_defaults: Optional[dict[str, Any]] = None, summary: str = "",
                       prepare_model: Optional[Callable[[nn.Module, list, dict], list]] = None) -> OptimizerSpec:
    """Add an optimizer method under ``name`` (a lower-case identifier)."""
    if name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"Optimizer names are lower-case identifiers, got {name!r}.")
    return _REGISTRY.add(name, OptimizerSpec(name, optimizer_cls, dict(group_defaults or {}), summary, prepare_model))


def list_optimizers() -> list[str]:
    """The registered optimizer method names, sorted."""
    return _REGISTRY.names(sort=True)


def get_optimizer(name: str) -> OptimizerSpec:
    """Look an optimizer method up by name; unknown names fail with the list of known ones."""
    return _REGISTRY.lookup(name)


def create_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    *,
    weight_decay: float = 0.0,
    target_modules: TargetSpec = None,
    head_lr: Optional[float] = None,
    head_params: Iterable[int] = (),
    embedding_lr: Optional[float] = None,
    embedding_params: Optional[Iterable[int]] = None,
    **options: Any,
) -> torch.optim.Optimizer:
    """Optimizer method ``name`` over the trainable parameters of a plain (unwrapped) ``model``.

    The weights of the targeted layers are projected; everything else trainable (embeddings, norms,
    biases, the head) is plain AdamW in the same optimizer. A method with a ``prepare_model`` hook changes the
    model first: ``q_galore`` swaps each targeted ``nn.Linear`` for an INT8 ``Int8Linear``, in place.

    Args:
        model: the model whose weights are trained in full (not an ``lrzoo.wrap`` result).
        name: a name from :func:`list_optimizers`.
        lr: learning rate of every group (the head's is ``head_lr`` when given).
        weight_decay: decoupled decay of ≥2-D parameters (projected weights included); 1-D get none.
        target_modules: the layers whose weights are projected: ``None`` for every linear layer inside
            the model's repeated blocks (attention and MLP projections; not the embeddings, the
            LM head, a pooler or a classifier), else names or a regex as for ``lrzoo.wrap``.
        head_lr, head_params: learning rate of the parameters whose ids are in ``head_params``.
        embedding_lr, embedding_params: learning rate of the parameters whose ids are in ``embedding_params``
            (``None``: the trainable parameters of ``model.get_input_embeddings()``); never projected. A parameter
            in both sets takes ``embedding_lr``; the two may differ only where the sets do not meet.
        options: the method's group options (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``;
            defaults in the registry) and the optimizer's (``betas``, ``eps``, ...).
    """
    spec = get_optimizer(name)
    if getattr(model, "peft_config", None) is not None:
        raise ValueError(f"{name} trains the model's own weights: pass the plain model, not one returned by "
                         "lrzoo.wrap (training LoRA factors with a low-rank optimizer is not offered).")
    group_options = {key: options.pop(key, default) for key, default in spec.group_defaults.items()}
    targets = projection_targets(model, target_modules)
    if spec.prepare_model is not None:
        targets = spec.prepare_model(model, targets, {**group_options, **options})
    projected = {id(p) for p in targets}
    own_lr = own_rates(model, head_lr, head_params, embedding_lr, embedding_params)
    groups: dict[tuple[float, float, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            group_lr = own_lr.get(id(param), lr)
            decay = weight_decay if param.dim() >= 2 else 0.0
            groups.setdefault((group_lr, decay, id(param) in projected), []).append(param)
    param_groups = [{"params": params, "lr": group_lr, "weight_decay": decay, **(group_options if is_projected else {})}
                    for (group_lr, decay, is_projected), params in groups.items()]
    # names only for messages (a rank ≥ min(m, n) warning names the weights); not stored in the groups
    names = {id(param): name for name, param in model.named_parameters() if id(param) in projected}
    return spec.optimizer_cls(param_groups, lr=lr, weight_names=names, **options)


def own_rates(model: nn.Module, head_lr: Optional[float], head_params: Iterable[int], embedding_lr: Optional[float],
              embedding_params: Optional[Iterable[int]]) -> dict[int, float]:
    """``id(param)`` -> its rate, for the parameters with one of their own (:func:`create_optimizer`'s head and
    input embeddings); refuses a ``head_lr`` or an ``embedding_lr`` that reaches no trainable parameter, or two
    that differ on a parameter in both sets."""
    own: dict[int, float] = {}
    if head_lr is not None:
        head_params = set(head_params)
        if not head_params:   # a rate the caller believes applies, reaching nothing
            raise ValueError(f"head_lr={head_lr:g} trains nothing: head_params is empty. Pass the ids of the head's "
                             "parameters, or drop head_lr.")
        own.update(dict.fromkeys(head_params, head_lr))
    if embedding_lr is not None:
        if embedding_params is None:
            embedding_params = input_embedding_parameter_ids(model)
        embedding_params = set(embedding_params or ())
        if not embedding_params:
            raise ValueError(f"embedding_lr={embedding_lr:g} trains nothing: no trainable input embedding was found "
                             "(model.get_input_embeddings()). Drop embedding_lr or pass embedding_params.")
        clash = [i for i in embedding_params if own.get(i, embedding_lr) != embedding_lr]
        if clash:
            raise ValueError(f"head_lr={head_lr:g} and embedding_lr={embedding_lr:g} both apply to {len(clash)} "
                             "parameter(s) in head_params and embedding_params: drop one of them or make them equal.")
        own.update(dict.fromkeys(embedding_params, embedding_lr))
    return own


def projection_targets(model: nn.Module, target_modules: TargetSpec = None) -> list[nn.Parameter]:
    """The trainable weights a low-rank optimizer projects (see :func:`create_optimizer`), in model order."""
    if target_modules is None:
        modules = block_linear_layers(model)
        if not modules:
            raise ValueError(
                f"{type(model).__name__} has no linear layer inside a repeated block (an nn.ModuleList), so there "
                f"is no default to project. Pass target_modules=[...]; its linear layers are named: "
                f"{', '.join(leaf_names(model, LINEAR_TYPES)) or '(none)'}.")
    else:
        modules = resolve_targets(model, target_modules, PROJECTABLE_TYPES)
    weights = [m.weight for m in modules.values() if m.weight.requires_grad]
    if not weights:
        raise ValueError(
            "None of the targeted weights is trainable. Low-rank optimizers train the model's own weights: "
            "pass the plain model (not one returned by lrzoo.wrap) with requires_grad on the targeted layers.")
    return list({id(w): w for w in weights}.values())


def block_linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers (``nn.Linear``, GPT-2's ``Conv1D``) inside the model's repeated blocks.

    Transformer blocks live in an ``nn.ModuleList`` (``model.layers``, ``encoder.layer``,
    ``transformer.h``, ...), the embeddings, LM head, pooler and classifier outside it; the output
    embedding is left out even where it sits inside one.
    """
    lists = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, PROJECTABLE_TYPES) and module is not output
        and any(name.startswith(prefix + ".") for prefix in lists)
    }


def state_bytes(optimizer: torch.optim.Optimizer, params: Optional[Iterable[torch.Tensor]] = None) -> int:
    """Bytes of the tensors ``optimizer`` keeps per parameter (moments, projectors, step counters).

    Args:
        optimizer: any torch optimizer (after a step: state is created lazily).
        params: count only these parameters' state; default every parameter's.
    """
    chosen = None if params is None else {id(p) for p in params}
    return sum(
        value.numel() * value.element_size()
        for param, state in optimizer.state.items() if chosen is None or id(param) in chosen
        for value in state.values() if isinstance(value, torch.Tensor)
    )
