"""LoRA-Pro's adjusted update against an independent implementation of the paper's closed form.

The reference below is written from the spec (lowrank-training.md §3) in numpy/scipy: scipy's
``solve_sylvester`` for X, explicit projections for the identity, and the official step (full-size Adam
moments of the equivalent gradient, then the closed form, then SGD) simulated step by step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lrzoo
from conftest import tiny_inputs, tiny_llama
from lrzoo.optimizers.lora_pro import LoraProAdamW, equivalent_steps

scipy_linalg = pytest.importorskip("scipy.linalg")


def _layer(m=12, n=10, r=3, seed=0, zero_B=False):
    g = np.random.default_rng(seed)
    A = g.normal(size=(r, n))
    B = np.zeros((m, r)) if zero_B else g.normal(size=(m, r))
    return A, B


def reference_steps(A, B, s, G_hat):
    """(ĝ_A, ĝ_B) of the paper's closed form for a full-size target Ĝ, in float64 numpy."""
    a, b = s * B.T @ G_hat, s * G_hat @ A.T
    eye_r = np.eye(A.shape[0])
    BtB_inv = np.linalg.pinv(B.T @ B + 1e-8 * eye_r)
    AAt_inv = np.linalg.pinv(A @ A.T + 1e-8 * eye_r)
    X = scipy_linalg.solve_sylvester(B.T @ B, A @ A.T, -(s ** -2) * BtB_inv @ a @ A.T)
    P_B = B @ BtB_inv @ B.T
    gA = s ** -2 * BtB_inv @ a + X @ A
    gB = s ** -2 * (np.eye(B.shape[0]) - P_B) @ b @ AAt_inv - B @ X
    return gA, gB


def test_the_closed_form_matches_an_independent_solution_and_the_projection_identity():
    A, B = _layer()
    s = 2.0
    G_hat = np.random.default_rng(1).normal(size=(B.shape[0], A.shape[1]))
    ref_A, ref_B = reference_steps(A, B, s, G_hat)
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    got_A, got_B = equivalent_steps(t(A), t(B), s, s * t(B).T @ t(G_hat), s * t(G_hat) @ t(A).T)
    np.testing.assert_allclose(got_A.numpy(), ref_A, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got_B.numpy(), ref_B, rtol=1e-3, atol=1e-4)
    # s·B ĝ_A + s·ĝ_B A = P_B Ĝ + Ĝ P_A − P_B Ĝ P_A: the best approximation of Ĝ LoRA can make
    P_B = B @ np.linalg.pinv(B.T @ B) @ B.T
    P_A = A.T @ np.linalg.pinv(A @ A.T) @ A
    equivalent = s * (B @ got_A.numpy() + got_B.numpy() @ A)
    np.testing.assert_allclose(equivalent, P_B @ G_hat + G_hat @ P_A - P_B @ G_hat @ P_A, rtol=1e-3, atol=1e-4)


def test_at_b_zero_only_b_moves_and_along_the_projection_on_a():
    A, B = _layer(zero_B=True)
    s = 2.0
    G_hat = np.random.default_rng(2).normal(size=(B.shape[0], A.shape[1]))
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    got_A, got_B = equivalent_steps(t(A), t(B), s, s * t(B).T @ t(G_hat), s * t(G_hat) @ t(A).T)
    assert got_A.abs().max() == 0
    np.testing.assert_allclose(got_B.numpy(), G_hat @ A.T @ np.linalg.inv(A @ A.T) / s, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("offset", [0, 1])
def test_three_steps_match_the_official_algorithm(offset):
    """Full-size Adam moments of the equivalent gradient, the closed form, then SGD; ``offset=1`` is the
    official code's t + 1 bias correction."""
    A0, B0 = _layer(seed=3)
    s, lr, (b1, b2), eps = 2.0, 1e-2, (0.9, 0.999), 1e-8
    grads = [np.random.default_rng(10 + k).normal(size=(B0.shape[0], A0.shape[1])) for k in range(3)]

    A, B = A0.copy(), B0.copy()
    m = v = np.zeros((B.shape[0], A.shape[1]))
    for k, G in enumerate(grads, start=1):
        gA, gB = s * B.T @ G, s * G @ A.T  # what autograd gives A and B for a full gradient G
        eye_r = np.eye(A.shape[0])
        BtB_inv, AAt_inv = np.linalg.pinv(B.T @ B + 1e-8 * eye_r), np.linalg.pinv(A @ A.T + 1e-8 * eye_r)
        full = s * (B @ (s ** -2 * BtB_inv @ gA) + (s ** -2 * (np.eye(B.shape[0]) - B @ BtB_inv @ B.T) @ gB @ AAt_inv) @ A)
        m, v = b1 * m + (1 - b1) * full, b2 * v + (1 - b2) * full ** 2
        t = k + offset
        G_hat = (m / (1 - b1 ** t)) / (np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps)
        stepA, stepB = reference_steps(A, B, s, G_hat)
        A, B = A - lr * stepA, B - lr * stepB

    pA = torch.nn.Parameter(torch.tensor(A0, dtype=torch.float32))
    pB = torch.nn.Parameter(torch.tensor(B0, dtype=torch.float32))
    optimizer = LoraProAdamW([pA, pB], [(pA, pB, s)], lr=lr, bias_correction_offset=offset)
    for G in grads:
        G = torch.tensor(G, dtype=torch.float32)
        pA.grad, pB.grad = s * pB.detach().T @ G, s * G @ pA.detach().T
        optimizer.step()
    np.testing.assert_allclose(pA.detach().numpy(), A, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(pB.detach().numpy(), B, rtol=1e-3, atol=1e-5)


def test_wrap_and_make_optimizer_build_lora_pro_and_training_lowers_the_loss():
    model = lrzoo.wrap(tiny_llama(), "lora_pro", r=4, alpha=8)
    assert model.peft_config["default"].peft_type.value == "LORA"  # a native PEFT LoRA checkpoint
    optimizer = lrzoo.make_optimizer(model, lr=1e-2)
    assert isinstance(optimizer, LoraProAdamW) and len(optimizer.pairs) == 4
    model.train()
    x = tiny_inputs(batch=4, length=8)
    losses = []
    for _ in range(10):
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


def test_state_round_trips_bit_exactly():
    def run(reload_at=None):
        torch.manual_seed(0)
        model = lrzoo.wrap(tiny_llama(), "lora_pro", r=4, alpha=8, init_lora_weights=False)
        optimizer = lrzoo.make_optimizer(model, lr=1e-2)
        x = tiny_inputs(batch=2, length=6)
        for step in range(4):
            if step == reload_at:
                state = optimizer.state_dict()
                optimizer = lrzoo.make_optimizer(model, lr=1e-2)
                optimizer.load_state_dict(state)
            loss = model(x, labels=x).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters() if p.requires_grad]

    for a, b in zip(run(), run(reload_at=2)):
        assert torch.equal(a, b)
