"""Layer shapes several methods share: a frozen B and A around a small trained core.

* :class:`MatrixCoreLayer`: ``ΔW = s·B R A`` with an r×r core R (LoRA-XS, LoRA-SB);
* :class:`DiagonalCoreLayer`: ``ΔW = B diag(c − c₀) A`` with a trained diagonal c (SVFit, LoLDU).

A method subclasses one and supplies its factors; the forward (through
:func:`lrzoo.kernels.core_linear`), ΔW and the exact LoRA export live here once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from .layer import AdapterLayer, dropout_probability


class MatrixCoreLayer(AdapterLayer):
    """``ΔW = s·B R A``: frozen ``B (d_out×r)``, trainable core ``R (r×r)``, frozen ``A (r×d_in)`` (LoRA-XS, LoRA-SB).

    A subclass sets ``prefix`` and ``adapter_layer_names = (<prefix>R,)``, ``other_param_names =
    (<prefix>A, <prefix>B)`` (its own checkpoint keys) and builds the factors in ``init_adapter`` with
    :meth:`set_factors`.
    """

    def set_factors(self, adapter_name: str, B: torch.Tensor, R: torch.Tensor, A: torch.Tensor) -> None:
        """Store frozen ``B``, ``A`` and the trainable core ``R`` (float32, contiguous)."""
        self.add_frozen(self.prefix + "B", adapter_name, B.float().contiguous())
        self.add_frozen(self.prefix + "A", adapter_name, A.float().contiguous())
        self.add_trainable(self.prefix + "R", adapter_name, R.float().contiguous())

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, R, A)`` of one adapter."""
        return tuple(getattr(self, self.prefix + name)[adapter_name] for name in "BRA")

    def delta_weight(self, adapter_name):
        B, R, A = self.factors(adapter_name)
        return self.scaling[adapter_name] * (B @ R.to(B.dtype) @ A)

    def delta_forward(self, x, adapter_name):
        B, R, A = (t.to(x.dtype) for t in self.factors(adapter_name))
        return F.linear(F.linear(F.linear(self.adapter_dropout[adapter_name](x), A), R), B) * self.scaling[adapter_name]

    def fused_forward(self, x, adapter_name):
        p = dropout_probability(self.adapter_dropout[adapter_name])
        B, R, A = self.factors(adapter_name)
        return kernels.core_linear(x, self.base_weight_out_in(), self.get_base_layer().bias, A, R, B,
                                   self.scaling[adapter_name], p, self.training)

    def lora_factors(self, adapter_name):
        B, R, A = self.factors(adapter_name)
        return self.scaling[adapter_name] * (B @ R.to(B.dtype)), A


class DiagonalCoreLayer(AdapterLayer):
    """``ΔW = B diag(c − c₀) A`` beside the untouched base weight: frozen B and A, trained diagonal c.

    A subclass supplies :meth:`diagonal_factors` ``(B: (d_out, r), c: (r,), c₀: (r,), A: (r, d_in))``.

    The papers write ``W' = W_res + B diag(c) A`` with the residual ``W_res = W − B diag(c₀) A`` stored
    as the new base. That is the same function as ``W + B diag(c − c₀) A``; lrzoo computes the latter and
    never writes the base weight, because rewriting it costs exactness everywhere else: ``(W − off) +
    off ≠ W`` in floating point (1 ulp in fp32, ~1e-3 in bf16), a quantized base cannot be rewritten, and a
    layer could hold only one such adapter. Here ΔW = 0 exactly at init (c = c₀), unload/delete/disable
    give back the original W bit for bit, and several adapters can share a layer.
    """

    def diagonal_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def delta_weight(self, adapter_name):
        B, c, c0, A = self.diagonal_factors(adapter_name)
        return (B * (c - c0).to(B.dtype)) @ A

    def delta_forward(self, x, adapter_name):
        B, c, c0, A = self.diagonal_factors(adapter_name)
        core = (c - c0).to(x.dtype)
        return F.linear(F.linear(self.adapter_dropout[adapter_name](x), A.to(x.dtype)) * core, B.to(x.dtype))

    def fused_forward(self, x, adapter_name):
        p = dropout_probability(self.adapter_dropout[adapter_name])
        B, c, c0, A = self.diagonal_factors(adapter_name)
        return kernels.core_linear(x, self.base_weight_out_in(), self.get_base_layer().bias, A, c - c0, B, 1.0, p,
                                   self.training)

    def lora_factors(self, adapter_name):
        B, c, c0, A = self.diagonal_factors(adapter_name)
        return B * (c - c0).to(B.dtype), A
