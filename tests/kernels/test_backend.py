"""LRZOO_BACKEND selects the kernel path; a forced triton without a kernel falls back once, loudly."""

from __future__ import annotations

import warnings

import pytest
import torch

from lrzoo import kernels
from lrzoo.kernels import backend


def lora_args():
    torch.manual_seed(0)
    return torch.randn(3, 8), torch.randn(6, 8), torch.randn(6), torch.randn(2, 8), torch.randn(6, 2), 0.5


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("LRZOO_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="auto, torch, triton"):
        kernels.lora_linear(*lora_args())


def test_auto_and_torch_use_the_reference_on_cpu(monkeypatch):
    for value in ("auto", "torch"):
        monkeypatch.setenv("LRZOO_BACKEND", value)
        assert not backend.use_triton("lora_linear", torch.zeros(1), has_kernel=True)


def test_forced_triton_without_a_kernel_warns_once_and_matches_the_reference(monkeypatch):
    monkeypatch.setenv("LRZOO_BACKEND", "triton")
    monkeypatch.delitem(kernels.TRITON_OPS, "lora_linear")  # as if its Triton kernel were not written yet
    backend.warn_once.cache_clear()
    x, weight, bias, lora_A, lora_B, scaling = lora_args()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [kernels.lora_linear(x, weight, bias, lora_A, lora_B, scaling) for _ in range(2)]
        assert not backend.use_triton("lora_linear", x, has_kernel=False)
    backend.warn_once.cache_clear()
    messages = [str(w.message) for w in caught if "lora_linear" in str(w.message)]
    assert len(messages) == 1 and "no Triton kernel" in messages[0] and "torch path" in messages[0], messages

    # The fallback computes y = x Wᵀ + b + s·(x Aᵀ) Bᵀ: recomputed here entry by entry, in float64.
    x, weight, bias, lora_A, lora_B = (t.double() for t in (x, weight, bias, lora_A, lora_B))
    expected = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        for o in range(weight.shape[0]):
            adapter = sum(lora_B[o, j] * (lora_A[j] * x[i]).sum() for j in range(lora_A.shape[0]))
            expected[i, o] = (weight[o] * x[i]).sum() + bias[o] + scaling * adapter
    assert expected.abs().max() > 1  # not trivially zero
    for out in outputs:
        assert out.dtype == torch.float32 and out.shape == expected.shape
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
