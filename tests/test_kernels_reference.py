"""The torch path's hand-written backward with dropout, against plain autograd on the same mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lrzoo.kernels import reference

P, S = 0.3, 0.7


def inputs(with_magnitude: bool):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, requires_grad=True)
    W, b = torch.randn(9, 12), torch.randn(9)
    A, B = torch.randn(3, 12, requires_grad=True), torch.randn(9, 3, requires_grad=True)
    m = torch.rand(9, requires_grad=True) if with_magnitude else None
    return x, W, b, A, B, m


def mask_for(x, seed):
    # the reference path draws its mask with torch.rand_like on the flattened input
    torch.manual_seed(seed)
    return (torch.rand_like(x.reshape(-1, x.shape[-1]), dtype=torch.float32) >= P).reshape(x.shape)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dropout_backward_matches_autograd_on_the_same_mask(method):
    x, W, b, A, B, m = inputs(method == "dora")
    params = [x, A, B] + ([m] if m is not None else [])
    grad_out = torch.randn(2, 5, 9)

    torch.manual_seed(7)
    if method == "lora":
        out = reference.lora_linear(x, W, b, A, B, S, P, training=True)
    else:
        out = reference.dora_linear(x, W, b, A, B, m, S, P, training=True)
    grads = torch.autograd.grad((out * grad_out).sum(), params)

    dropped = x * mask_for(x, 7) / (1 - P)
    z = F.linear(x, W) + S * F.linear(F.linear(dropped, A), B)
    if method == "dora":
        norm = torch.linalg.norm(W + S * B @ A, dim=1).detach()
        z = (m / norm) * z
    expected_out = z + b
    expected = torch.autograd.grad((expected_out * grad_out).sum(), params)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
