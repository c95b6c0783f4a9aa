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
    monkeypatch.delitem(kernels.TRITON_OPS, "no_such_op", raising=False)
    backend.warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not backend.use_triton("no_such_op", torch.zeros(1), has_kernel=False)
        assert not backend.use_triton("no_such_op", torch.zeros(1), has_kernel=False)
    messages = [str(w.message) for w in caught if "no_such_op" in str(w.message)]
    assert len(messages) == 1 and "torch path" in messages[0]
