"""LoRA-Pro's adjusted update against an independent implementation of the paper's closed form.

The reference below is written from the spec (lowrank-training.md §3) in numpy/scipy: scipy's
``solve_sylvester`` for X, explicit projections for the identity, and the official step (full-size Adam
moments of the equivalent gradient, then the closed form, then SGD) simulated step by step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lrzoo
from conftest import tiny_inputs, tiny_llama
from lrzoo.methods.lora_pro.optimizer import DELTA, LoraProAdamW, Spectrum, equivalent_steps, solve_sylvester

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


# Issue 25 item 9: the O(r³) Sylvester solve against the O(r⁶) dense one it replaced.
def dense_sylvester(P, Q, C):
    """lrzoo's solve before issue 25, kept here as the reference: ``(I ⊗ P + Qᵀ ⊗ I + δI) vec X = vec C``, one
    r²×r² LU solve (column-stacking vec)."""
    r = P.shape[0]
    eye = torch.eye(r, dtype=P.dtype)
    system = torch.kron(eye, P.contiguous()) + torch.kron(Q.T.contiguous(), eye)
    system = system + DELTA * torch.eye(r * r, dtype=P.dtype)
    return torch.linalg.solve(system, C.T.contiguous().reshape(-1, 1)).reshape(r, r).T


def _gram(g, r, k, dtype, decay=None):
    """M Mᵀ for a random r×k M (rank min(r, k)); ``decay`` sets M's singular values to 1 … decay."""
    M = torch.randn(r, k, generator=g, dtype=dtype)
    if decay is not None:
        U, _, Vh = torch.linalg.svd(M, full_matrices=False)
        M = U @ torch.diag(torch.logspace(0, math.log10(decay), U.shape[1], dtype=dtype)) @ Vh
    return M @ M.T


SYLVESTER_CASES = {  # (P = BᵀB, Q = AAᵀ) as LoRA-Pro meets them
    "well_conditioned": lambda g, r, dt: (_gram(g, r, 3 * r, dt), _gram(g, r, 2 * r, dt)),
    "B_zero": lambda g, r, dt: (torch.zeros(r, r, dtype=dt), _gram(g, r, 2 * r, dt)),  # PEFT's init
    "B_rank_deficient": lambda g, r, dt: (_gram(g, r, max(r // 2, 1), dt), _gram(g, r, 2 * r, dt)),
    "both_near_singular": lambda g, r, dt: (_gram(g, r, 3 * r, dt, decay=1e-6), _gram(g, r, 3 * r, dt, decay=1e-6)),
    "both_rank_deficient": lambda g, r, dt: (_gram(g, r, max(r // 2, 1), dt), _gram(g, r, max(r // 2, 1), dt)),
}


#: fp32 only where the system is well conditioned: with P and Q both near-singular, δ = 1e-8 is below fp32's
#: round-off and neither solve is accurate (neither was the official one; see docs/adapters/lora_pro.md)
CONDITIONED = ("well_conditioned", "B_zero", "B_rank_deficient")


@pytest.mark.parametrize("case, dtype", [(case, torch.float64) for case in sorted(SYLVESTER_CASES)]
                         + [(case, torch.float32) for case in CONDITIONED])
@pytest.mark.parametrize("r", [1, 3, 8, 24])
def test_the_eigen_solve_equals_the_dense_kronecker_solve(r, case, dtype):
    """Both solve the same linear system; they may differ by round-off times its condition number
    (largest over smallest of the divisors λ_i + μ_j + δ: up to ~1e10 where P and Q are both near-singular)."""
    eps = torch.finfo(dtype).eps
    conditioned = case in CONDITIONED
    g = torch.Generator().manual_seed(r * 100 + sorted(SYLVESTER_CASES).index(case))
    for _ in range(3):
        P, Q = SYLVESTER_CASES[case](g, r, dtype)
        C = torch.randn(r, r, generator=g, dtype=dtype)
        new, old = solve_sylvester(P, Q, C), dense_sylvester(P, Q, C)
        lam, mu = torch.linalg.eigvalsh(P.double()).clamp_min(0), torch.linalg.eigvalsh(Q.double()).clamp_min(0)
        divisors = lam[:, None] + mu[None, :] + DELTA
        condition = (divisors.max() / divisors.min()).item()
        error = ((new - old).norm() / old.norm()).item()
        assert error <= 50 * eps * condition, (error, condition)
        if conditioned:
            assert error <= 1e-12 if dtype == torch.float64 else error <= 1e-5


def test_the_solve_never_builds_the_r2_by_r2_system():
    """O(r³) time follows from O(r²) memory here: every tensor the solve makes has at most r² entries (the dense
    solve's r²×r² system was 16 GiB per layer at r = 256)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return out

    r = 32
    g = torch.Generator().manual_seed(0)
    P, Q = SYLVESTER_CASES["well_conditioned"](g, r, torch.float32)
    with LargestOutput():
        solve_sylvester(P, Q, torch.randn(r, r, generator=g))
    assert 0 < LargestOutput.largest <= r * r


def dense_equivalent_steps(A, B, s, a, b):
    """The closed form as lrzoo computed it before issue 25: pinv(M + δI) by SVD, X by the dense solve."""
    eye = torch.eye(A.shape[0])
    BtB, AAt = B.T @ B, A @ A.T
    BtB_inv, AAt_inv = torch.linalg.pinv(BtB + DELTA * eye), torch.linalg.pinv(AAt + DELTA * eye)
    X = dense_sylvester(BtB, AAt, -(s ** -2) * BtB_inv @ a @ A.T)
    grad_A = s ** -2 * BtB_inv @ a + X @ A
    grad_B = s ** -2 * (b - B @ (BtB_inv @ (B.T @ b))) @ AAt_inv - B @ X
    return grad_A, grad_B


@pytest.mark.parametrize("B_scale", [0.0, 1e-4, 1.0])
def test_lora_pro_steps_are_those_of_the_dense_solve(B_scale):
    """The whole closed form in fp32, at PEFT's init (B = 0), just after it (B tiny: BᵀB ~ 1e-6) and later."""
    g = torch.Generator().manual_seed(7)
    A, B = torch.randn(8, 40, generator=g) / 40 ** 0.5, B_scale * torch.randn(48, 8, generator=g)
    G_hat = torch.randn(48, 40, generator=g)
    s = 2.0
    a, b = s * B.T @ G_hat, s * G_hat @ A.T
    for got, want in zip(equivalent_steps(A, B, s, a, b), dense_equivalent_steps(A, B, s, a, b)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("case", sorted(SYLVESTER_CASES))
def test_the_regularised_inverse_is_pinv_of_m_plus_delta(case):
    """One eigh serves the inverse and the solve; the inverse is still the official ``pinv(M + δI)``."""
    g = torch.Generator().manual_seed(3)
    for r in (1, 4, 16):
        M = SYLVESTER_CASES[case](g, r, torch.float64)[0]
        want = torch.linalg.pinv(M + DELTA * torch.eye(r, dtype=M.dtype))
        got = Spectrum.of(M).regularised_inverse()
        assert ((got - want).norm() / want.norm()).item() < 1e-6


# Issue 25 item 3: LoRA-Pro under any adapter name, or a refusal; never a silent AdamW.
def _train_steps(model, optimizer, steps=2):
    x = tiny_inputs(batch=2, length=6)
    for _ in range(steps):
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_lora_pro_finds_its_pairs_under_any_adapter_name():
    model = lrzoo.wrap(tiny_llama(), "lora_pro", adapter_name="task1", r=4, alpha=8)
    optimizer = lrzoo.make_optimizer(model, lr=1e-2)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(optimizer.pairs) == 4 and all(".task1." in names[id(A)] for A, _, _ in optimizer.pairs)
    _train_steps(model, optimizer)
    for A, B, _ in optimizer.pairs:  # LoRA-Pro's state: full-size moments of the equivalent gradient
        assert optimizer.state[A]["exp_avg"].shape == (B.shape[0], A.shape[1])


def test_several_trained_adapters_on_different_layers_are_all_lora_pro():
    model = lrzoo.wrap(tiny_llama(), "lora_pro", adapter_name="q", r=4, target_modules=["q_proj"])
    model = lrzoo.wrap(model, "lora_pro", adapter_name="v", r=4, target_modules=["v_proj"])
    model.base_model.set_adapter(["q", "v"])  # both active and trainable
    optimizer = lrzoo.make_optimizer(model, lr=1e-2)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(A)].split(".")[-2] for A, _, _ in optimizer.pairs) == ["q", "q", "v", "v"]


def test_two_trained_adapters_on_one_layer_are_refused():
    model = lrzoo.wrap(tiny_llama(), "lora_pro", adapter_name="first", r=4)
    model = lrzoo.wrap(model, "lora_pro", adapter_name="second", r=4)
    model.base_model.set_adapter(["first", "second"])
    with pytest.raises(ValueError, match=r"q_proj trains 2 active LoRA adapters \('first', 'second'\).*one adapter"):
        lrzoo.make_optimizer(model, lr=1e-2)


def test_a_frozen_second_adapter_is_left_alone():
    model = lrzoo.wrap(tiny_llama(), "lora_pro", adapter_name="first", r=4)
    model = lrzoo.wrap(model, "lora_pro", adapter_name="second", r=4)  # added, not active: PEFT keeps it frozen
    optimizer = lrzoo.make_optimizer(model, lr=1e-2)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(optimizer.pairs) == 4 and all(".first." in names[id(A)] for A, _, _ in optimizer.pairs)


@pytest.mark.parametrize("build, message", [
    (lambda: lrzoo.make_optimizer(tiny_llama(), lr=1e-2, lora_pro=True),
     r"LoRA-Pro found no trainable LoRA pair .*so it would train plain AdamW"),
    (lambda: LoraProAdamW([torch.nn.Parameter(torch.zeros(3))], [], lr=1e-2), r"no LoRA pair .* was given"),
    (lambda: lrzoo.wrap(tiny_llama(), "lora_pro", r=4, use_dora=True),
     r"use_dora=True is refused: LoRA-Pro's closed form is derived for W \+ s·B A"),
])
def test_no_pairs_or_dora_is_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_lora_pairs_of_one_adapter_name_the_adapters_there_are():
    from lrzoo.methods.lora_pro import lora_pairs

    model = lrzoo.wrap(tiny_llama(), "lora_pro", adapter_name="task1", r=4)
    assert len(lora_pairs(model, "task1")) == 4
    with pytest.raises(ValueError, match=r"under adapter 'default' \(adapters found: task1\)"):
        lora_pairs(model, "default")


def _stock_peft(**config):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, **config))


@pytest.mark.parametrize("model, message", [
    (lambda: _stock_peft(target_modules=["q_proj"], use_dora=True), r"q_proj \(adapter 'default'\) is a DoRA layer"),
    (lambda: _stock_peft(target_modules=["embed_tokens"]), r"embed_tokens is an embedding LoRA"),
])
def test_lora_layers_outside_the_closed_form_are_refused(model, message):
    with pytest.raises(ValueError, match=message):
        lrzoo.make_optimizer(model(), lr=1e-2, lora_pro=True)


def test_a_pair_with_one_frozen_factor_is_refused():
    model = lrzoo.wrap(tiny_llama(), "lora_pro", r=4)
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)  # LoRA-FA style
    with pytest.raises(ValueError, match=r"trains one factor only \(lora_A is frozen\)"):
        lrzoo.make_optimizer(model, lr=1e-2)


@pytest.mark.parametrize("options, message", [
    ({"lr": float("nan")}, r"LoRA-Pro: lr must be a finite number > 0, got nan"),
    ({"lr": 0.0}, r"LoRA-Pro: lr must be a finite number > 0"),
    ({"betas": (0.9, float("nan"))}, r"LoRA-Pro: betas must be two numbers in \[0, 1\)"),
    ({"eps": float("inf")}, r"LoRA-Pro: eps must be a finite number > 0"),
    ({"weight_decay": -0.1}, r"LoRA-Pro: weight_decay must be a finite number ≥ 0"),
    ({"bias_correction_offset": 2}, r"bias_correction_offset must be 0 .* or 1"),
])
def test_lora_pro_options_are_checked(options, message):
    options = {"lr": 1e-2, **options}
    with pytest.raises(ValueError, match=message):
        lrzoo.make_optimizer(lrzoo.wrap(tiny_llama(), "lora_pro", r=4), **options)


def test_the_step_time_benchmark_runs_and_prints_a_row_per_rank(capsys):
    """docs/adapters/lora_pro.md#step-time comes from this command; only that it runs is tested (not its times)."""
    from lrzoo.methods.lora_pro.bench import main

    main(["--ranks", "2", "4", "--width", "16", "--layers", "1", "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["2", "4"]
