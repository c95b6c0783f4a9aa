"""The shared base of every lrzoo-native adapter: config fields, layer mechanics, merge, forward.

A method file supplies only its math (see ``lrzoo/methods/lora_xs.py`` for the smallest example):

* a config dataclass derived from :class:`AdapterConfig`,
* a layer derived from :class:`AdapterLayer` that declares its tensors
  (``adapter_layer_names`` are trained, ``other_param_names`` are frozen) and implements
  ``init_adapter`` and ``delta_weight``, optionally ``delta_forward`` (an efficient path that does
  not build ΔW) and ``lora_factors`` (an exact low-rank ΔW = B·A, used by :func:`lrzoo.export_lora`).

Injection, activation, merge/unmerge, dtype/device moves, saving and loading live here once.

Conventions: ``W`` is ``(d_out, d_in)`` in PyTorch layout (transformers' ``Conv1D`` stores its
transpose; the layer hides that), ``y = x Wᵀ + b``, and ``delta_weight`` is always ΔW against the
base weight, which no lrzoo method rewrites (unload, delete and a disabled adapter give it back bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from .peft_bridge import (check_adapters_to_merge, dequantized_weight, frozen_tensor_dict, init_tuner_layer_state,
                          move_adapter_to_base_device)
from .targets import LINEAR_TYPES, is_quantized, quantization_of, weight_shape

FROZEN_FACTOR_POLICIES = ("saved", "recomputed")



def dropout_probability(dropout: nn.Module) -> float:
    """``p`` of an adapter's dropout module, for the kernels (PEFT stores ``nn.Identity`` when p = 0)."""
    return dropout.p if isinstance(dropout, nn.Dropout) else 0.0

@dataclass
class AdapterConfig(PeftConfig):
    """Fields every lrzoo-native method shares. Method configs add their own below these."""

    r: int = field(default=8, metadata={"help": "Rank of the update (the method's page says what it bounds)."})
    alpha: float = field(default=8.0, metadata={"help": "Scale numerator: s = alpha / r unless the method says otherwise."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter branch's input."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (suffix match) or a regex; None = architecture default."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex never to adapt."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Non-adapter modules trained in full and saved (task heads)."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "Paper init. False gives random non-zero trainable tensors (for tests only)."},
    )
    frozen_factors: str = field(
        default="saved",
        metadata={
            "help": "Per-layer frozen factors derived from W: 'saved' in the checkpoint, or 'recomputed' "
            "deterministically from W at load (smaller files; needs the same base weights)."
        },
    )
    base_weights_hash: Optional[str] = field(
        default=None,
        metadata={"help": "Fingerprint of the targeted base weights, written at wrap time and checked at load."},
    )
    lrzoo_method: str = field(default="", metadata={"help": "Registry name of the method (informational)."})
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def __post_init__(self):
        super().__post_init__()
        member = getattr(type(self), "peft_type_member", None)
        if member is None:
            raise TypeError(f"{type(self).__name__} is not registered; call lrzoo.register_adapter first.")
        self.peft_type = member
        self.lrzoo_method = type(self).lrzoo_method
        if self.frozen_factors not in FROZEN_FACTOR_POLICIES:
            raise ValueError(f"frozen_factors must be one of {FROZEN_FACTOR_POLICIES}, got {self.frozen_factors!r}.")
        # The same rules as lrzoo.wrap, for configs built by hand or read from adapter_config.json.
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}.")
        alpha = getattr(self, "alpha", None)  # None: the method's own rule (LoRA-SB: alpha = r)
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or not math.isfinite(alpha) or alpha <= 0):
            raise ValueError(f"alpha must be a positive number, got {alpha!r}: alpha = 0 makes ΔW and its gradients "
                             "zero, and a negative alpha only flips the update's sign.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)


class AdapterLayer(nn.Module, BaseTunerLayer):
    """Base of lrzoo-native adapter layers wrapping a linear-like ``base_layer``."""

    #: parameter-name prefix of the method, e.g. ``"xs_"``; PEFT uses it to find adapter tensors.
    prefix: str = "lrzoo_"
    #: names of the per-adapter ParameterDicts (trained).
    adapter_layer_names: tuple[str, ...] = ()
    #: names of the per-adapter BufferDicts (frozen factors).
    other_param_names: tuple[str, ...] = ()
    #: layer types the method can replace.
    supported_layer_types: tuple[type, ...] = LINEAR_TYPES
    #: whether ΔW depends on ``config.alpha``. A method without a scale (SALT, SVFit) sets False, so that
    #: ``wrap`` refuses an alpha instead of ignoring it (:func:`lrzoo.registry.ignored_options`).
    uses_alpha: bool = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AdapterConfig, *, tuner=None, key=None):
        nn.Module.__init__(self)
        if not isinstance(base_layer, self.supported_layer_types):
            raise TypeError(
                f"{type(self).__name__} cannot adapt {key or ''} of type {type(base_layer).__name__}; supported: "
                f"{', '.join(t.__name__ for t in self.supported_layer_types)}."
            )
        self.base_layer = base_layer
        self.merged_adapters: list[str] = []
        init_tuner_layer_state(self, adapter_name)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.out_features, self.in_features = weight_shape(base_layer)
        #: a bitsandbytes base (nf4/fp4/int8): W is read dequantized, never written, and the forward is
        #: the bnb layer's own output plus the adapter branch (the kernels take a float W)
        self.quantized = is_quantized(base_layer)
        self.adapter_config: dict[str, AdapterConfig] = {}
        self.scaling: dict[str, float] = {}
        self.adapter_dropout = nn.ModuleDict()
        persistent = config.frozen_factors == "saved"
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        for name in self.other_param_names:
            setattr(self, name, frozen_tensor_dict(persistent))
        self.update_layer(adapter_name, config, tuner=tuner, key=key)

    # ----------------------------------------------------------------- what a method supplies
    @classmethod
    def prepare_shared(cls, tuner, model: nn.Module, config: AdapterConfig, adapter_name: str) -> None:
        """Build frozen tensors shared by all layers on the tuner (RandLoRA/TeRA). Default: none."""

    def scale_for(self, config: AdapterConfig) -> float:
        """The scale s of ΔW; α/r unless the method says otherwise."""
        return config.alpha / config.r

    def init_adapter(self, adapter_name: str, config: AdapterConfig, weight: torch.Tensor, tuner=None) -> None:
        """Create the adapter's tensors with :meth:`add_trainable` / :meth:`add_frozen`.

        ``weight`` is the base weight as ``(d_out, d_in)`` float32 (a copy; do not keep a view).
        """
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW in ``(d_out, d_in)`` layout (or the conv kernel's layout), including the scale."""
        raise NotImplementedError

    def delta_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The adapter's contribution to ``y`` for input ``x: (..., d_in)``; default builds ΔW."""
        delta = self.delta_weight(adapter_name)
        return F.linear(self.adapter_dropout[adapter_name](x), delta.to(x.dtype))

    def lora_factors(self, adapter_name: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(B, A)`` with ΔW = B·A exactly, or ``None`` if ΔW is not low-rank by construction."""
        return None

    # ----------------------------------------------------------------- shared mechanics
    def add_trainable(self, container: str, adapter_name: str, tensor: torch.Tensor) -> None:
        getattr(self, container)[adapter_name] = nn.Parameter(tensor)

    def add_frozen(self, container: str, adapter_name: str, tensor: torch.Tensor) -> None:
        getattr(self, container)[adapter_name] = tensor

    def base_weight_out_in(self) -> torch.Tensor:
        """The base weight as ``(d_out, d_in, ...)``; a view of the live tensor (full-precision bases only)."""
        weight = self.get_base_layer().weight
        return weight.T if self.fan_in_fan_out else weight

    def float_base_weight(self) -> torch.Tensor:
        """The base weight as a float32 ``(d_out, d_in, ...)`` tensor, dequantized for a quantized base."""
        if self.quantized:
            return dequantized_weight(self.get_base_layer())  # bnb layers are nn.Linear: (d_out, d_in)
        return self.base_weight_out_in().detach().float()

    def update_layer(self, adapter_name: str, config: AdapterConfig, *, tuner=None, key=None) -> None:
        limit = min(self.out_features, self.in_features)
        if config.r > limit:
            raise ValueError(
                f"r={config.r} is larger than layer {key or ''} allows ({self.out_features}x{self.in_features}: "
                f"at most {limit}). Lower r, or exclude this layer."
            )
        if not self.quantized and not self.base_weight_out_in().dtype.is_floating_point:
            raise TypeError(
                f"Layer {key or ''} has a {self.base_weight_out_in().dtype} weight; lrzoo adapters need a floating-point "
                "or bitsandbytes-quantized base (dequantize the model, or load it with a BitsAndBytesConfig)."
            )
        try:
            self.adapter_config[adapter_name] = config
            self.scaling[adapter_name] = self.scale_for(config)
            self.adapter_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
            with torch.no_grad():
                # one layer's float copy at a time (dequantized for a quantized base), never kept
                self.init_adapter(adapter_name, config, self.float_base_weight().clone(), tuner=tuner)
            move_adapter_to_base_device(self, adapter_name)
            self._keep_trainable_in_fp32(adapter_name)
        except BaseException:
            # A refused adapter (a zero LU pivot, a bad shape...) must leave the layer as it was: no
            # half-built tensors that a later save, merge or disable_adapter() would pick up.
            self.discard_adapter(adapter_name)
            raise
        self.set_adapter(self.active_adapters)

    def discard_adapter(self, adapter_name: str) -> None:
        """Drop every tensor and setting of ``adapter_name`` from this layer (nothing else is touched)."""
        for name in (*self.adapter_layer_names, *self.other_param_names):
            container = getattr(self, name)
            if adapter_name in container:  # (these dicts' pop takes no default)
                del container[adapter_name]
        self.adapter_config.pop(adapter_name, None)
        self.scaling.pop(adapter_name, None)
        if adapter_name in self.adapter_dropout:  # ModuleDict.pop takes no default
            del self.adapter_dropout[adapter_name]

    def _keep_trainable_in_fp32(self, adapter_name: str) -> None:
        # Tiny trained tensors (an r×r core, a diagonal) lose updates in bf16; keep them in fp32 like
        # PEFT's autocast_adapter_dtype does. The forward casts to the activation dtype.
        for name in self.adapter_layer_names:
            params = getattr(self, name)
            if adapter_name in params and params[adapter_name].dtype in (torch.float16, torch.bfloat16):
                params[adapter_name] = nn.Parameter(params[adapter_name].float())

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_config)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW in the base layer's own weight layout (PEFT's name; used by merge and convert_to_lora)."""
        delta = self.delta_weight(adapter)
        return delta.T if self.fan_in_fan_out else delta

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if self.quantized:
            raise ValueError(
                f"Cannot merge into a {quantization_of(self.get_base_layer())}-quantized base weight: rounding ΔW into "
                "the quantization grid would change the model. Keep the adapter unmerged (the forward adds it), "
                "export it with lrzoo.export_lora (stock PEFT loads it on the same quantized base), or load the base in "
                "full precision to merge."
            )
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.adapter_config:
                continue
            delta = self.get_delta_weight(name).to(base.weight.dtype)
            if safe_merge:
                merged = base.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs/infs detected in the merged weights of adapter {name!r}; not merged.")
                base.weight.data = merged
            else:
                base.weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base.weight.data -= self.get_delta_weight(name).to(base.weight.dtype)

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]):
        """PEFT's unload hook: merge if asked, then hand back the base layer."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.get_base_layer()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.adapter_config]
        # The kernels take a frozen float W: a trained base weight or a quantized one takes the path below
        # (the base layer's own output plus each adapter's branch).
        if len(active) == 1 and not args and not kwargs and not self.quantized \
                and not self.get_base_layer().weight.requires_grad:
            return self.fused_forward(x, active[0])
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            result = result + self.delta_forward(x, name).to(result.dtype)
        return result

    def fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """Base plus one adapter. Kernel-backed methods override this; the default adds the branch."""
        result = self.base_layer(x)
        return result + self.delta_forward(x, adapter_name).to(result.dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.discard_adapter(adapter_name)

    def __repr__(self) -> str:
        return f"{self.prefix.rstrip('_')}." + super().__repr__()
