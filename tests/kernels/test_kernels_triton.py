"""Every Triton kernel against the torch reference, forward and gradients.

On CPU the kernels run under ``TRITON_INTERPRET=1``, which only works if it is set before triton is
imported. Importing lrzoo, transformers or peft imports triton, so when another test module got
there first this module re-runs itself in a fresh process (one test) and skips its in-process
copies; run alone (``pytest tests/kernels/test_kernels_triton.py``) it runs in-process. On CUDA everything
runs on the GPU, plus the bf16 checks marked ``gpu``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lrzoo import kernels  # noqa: E402
from lrzoo.kernels import common, lora  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: the kernels can run in this process: on CUDA, or with the interpreter active since triton's import.
IN_PROCESS = torch.cuda.is_available() or type(tl.rand).__name__ == "InterpretedFunction"
SUBPROCESS_FLAG = "LRZOO_KERNEL_TESTS_SUBPROCESS"
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(autouse=True)
def _triton_backend(request, monkeypatch):
    if request.node.originalname == "test_kernels_under_the_interpreter_in_a_fresh_process":
        return
    if not IN_PROCESS:
        pytest.skip("triton was imported without TRITON_INTERPRET=1; the fresh-process test runs this module")
    monkeypatch.setenv("LRZOO_BACKEND", "triton")


def test_kernels_under_the_interpreter_in_a_fresh_process():
    if IN_PROCESS or os.environ.get(SUBPROCESS_FLAG):
        pytest.skip("the kernels run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1", SUBPROCESS_FLAG: "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def _both_paths(fn, monkeypatch, inputs: dict, grad_names: list[str]):
    """Run ``fn(**inputs)`` on the Triton and the torch backend; return (out, grads) of each."""
    results = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv("LRZOO_BACKEND", backend)
        leaves = {k: (v.detach().clone().requires_grad_(k in grad_names) if isinstance(v, torch.Tensor) else v)
                  for k, v in inputs.items()}
        out = fn(**leaves)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out)
        out.backward(grad_out)
        results.append((out.detach(), {k: leaves[k].grad for k in grad_names}))
    return results


def _assert_close(triton_result, torch_result, dtype):
    (out_t, grads_t), (out_r, grads_r) = triton_result, torch_result
    torch.testing.assert_close(out_t, out_r, **TOL[dtype])
    for name in grads_r:
        # every listed input must get a gradient on both paths (a detached bias used to get None on
        # both, which compared equal)
        assert grads_t[name] is not None and grads_r[name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(grads_t[name], grads_r[name], **TOL[dtype], msg=lambda m: f"grad of {name}: {m}")


def _rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def _lora_inputs(lead, d_in, d_out, r, dtype, bias=True, transposed_x=False):
    x = _rand(*lead, d_in, dtype=dtype)
    if transposed_x:  # a non-contiguous view with the same values layout-wise
        x = _rand(d_in, *lead, dtype=dtype).movedim(0, -1)
    return dict(x=x, weight=_rand(d_out, d_in, dtype=dtype, scale=0.2, seed=1),
                bias=_rand(d_out, dtype=dtype, seed=2) if bias else None,
                lora_A=_rand(r, d_in, scale=0.3, seed=3), lora_B=_rand(d_out, r, scale=0.3, seed=4), scaling=1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,d_in,d_out,r,bias,transposed_x", [
    ((2, 5), 24, 40, 5, True, False),   # batch dims, rank not a power of two
    ((33,), 48, 16, 16, False, True),   # non-contiguous input, d_out < d_in
])
def test_lora_matches_the_torch_path(monkeypatch, dtype, lead, d_in, d_out, r, bias, transposed_x):
    inputs = _lora_inputs(lead, d_in, d_out, r, dtype, bias, transposed_x)
    grads = ["x", "lora_A", "lora_B"] + (["bias"] if bias else [])
    _assert_close(*_both_paths(kernels.lora_linear, monkeypatch, inputs, grads), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dora_matches_the_torch_path(monkeypatch, dtype):
    inputs = _lora_inputs((3, 7), 40, 24, 6, dtype)
    inputs["magnitude"] = _rand(24, seed=5).abs() + 0.5
    fn = lambda **kw: kernels.dora_linear(**{k: kw[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")},  # noqa: E731
                                          magnitude=kw["magnitude"], scaling=kw["scaling"])
    _assert_close(*_both_paths(fn, monkeypatch, inputs, ["x", "bias", "lora_A", "lora_B", "magnitude"]), dtype)


@pytest.mark.parametrize("core_shape", [(6, 6), (6,)])
def test_core_linear_matches_the_torch_path(monkeypatch, core_shape):
    inputs = _lora_inputs((4, 9), 32, 40, 6, torch.float32)
    inputs["core"] = _rand(*core_shape, seed=6)
    _assert_close(*_both_paths(kernels.core_linear, monkeypatch, inputs, ["x", "core"]), torch.float32)


def test_core_linear_saves_no_copy_of_x(monkeypatch):
    """The r×r-core backward works from the N×r tensor: x is not among the saved activations."""
    inputs = _lora_inputs((64,), 48, 48, 4, torch.float32)
    x = inputs["x"].requires_grad_()
    core = _rand(4, 4, seed=6).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.core_linear(x, inputs["weight"], None, inputs["lora_A"], core, inputs["lora_B"], 1.0)
    assert not any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)
    assert max(t.numel() for t in saved if t.dim() == 2 and t.shape[0] == 64) == 64 * 4


def test_dropout_mask_is_seeded_and_shared_by_forward_and_backward(monkeypatch):
    from lrzoo.kernels.triton_common import dropout_keep_mask, new_seed

    p, inputs = 0.25, _lora_inputs((20,), 24, 16, 4, torch.float32)
    x, A, B = (inputs[k].clone().requires_grad_() for k in ("x", "lora_A", "lora_B"))
    torch.manual_seed(123)
    out = kernels.lora_linear(x, inputs["weight"], inputs["bias"], A, B, 2.0, p, True)
    torch.manual_seed(123)
    keep = dropout_keep_mask(20, 24, new_seed(), p, x.device)
    assert 0.5 < keep.float().mean() < 0.95
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    dropped = leaves[0] * keep / (1 - p)
    expected = leaves[0] @ inputs["weight"].t() + inputs["bias"] + 2.0 * (dropped @ leaves[1].t()) @ leaves[2].t()
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    dy = torch.randn_like(out)
    out.backward(dy)
    expected.backward(dy)
    for mine, ref in zip((x, A, B), leaves):
        torch.testing.assert_close(mine.grad, ref.grad, **TOL[torch.float32])


@pytest.mark.parametrize("d_in,d_out", [(40, 48), (48, 40)])
def test_randlora_matches_the_torch_path(monkeypatch, d_in, d_out):
    r = 8
    d, D = min(d_in, d_out), max(d_in, d_out)
    n = -(-d // r)
    inputs = _randlora_inputs(d_in, d_out, r)
    assert common.materialize_wins(64, d_in, d_out, r * n, True, rebuilds=True), "shape must take the fused path"
    _assert_close(*_both_paths(kernels.randlora_linear, monkeypatch, inputs, ["x", "bias", "lam", "gamma"]),
                  torch.float32)


def _randlora_inputs(d_in, d_out, r, lead=(2, 32)):
    d, D = min(d_in, d_out), max(d_in, d_out)
    n = -(-d // r)
    return dict(x=_rand(*lead, d_in), weight=_rand(d_out, d_in, scale=0.2, seed=1), bias=_rand(d_out, seed=2),
                basis_A=_rand(r, 1, d + 3, seed=3), basis_B=_rand(D + 2, n + 1, r, seed=4),
                lam=_rand(r, n, seed=5), gamma=_rand(n, d, seed=6), scaling=0.7)


def test_merged_weight_paths_keep_no_merged_weight_for_the_backward(monkeypatch):
    """RandLoRA's and TeRA's fused paths merge W' again in the backward: nothing d_out×d_in is saved but the
    frozen W itself (a parameter), and ∂x is still right (the torch-path comparisons above)."""
    monkeypatch.setenv("LRZOO_BACKEND", "triton")
    # TeRA with Q = 16 < 24 = d: T and Rc (24×16) are not weight-shaped, W' (24×24) would be
    tera = dict(x=_rand(2, 20, 24), weight=_rand(24, 24, scale=0.2, seed=1), bias=_rand(24, seed=2),
                factors=_rand(4, 6, 4, seed=3, scale=0.5), core=_rand(4, 4, 4, 4, seed=4), lam=_rand(4, 4, seed=5),
                modes=(4, 6, 4, 6), scaling=0.4)
    assert common.materialize_wins(40, 24, 24, 16, True, rebuilds=True), "TeRA must take the merged path"
    for fn, inputs in ((kernels.randlora_linear, _randlora_inputs(40, 48, 8)), (kernels.tera_linear, tera)):
        inputs = {k: (v.detach().clone().requires_grad_(k in ("x", "lam")) if isinstance(v, torch.Tensor) else v)
                  for k, v in inputs.items()}
        weight = inputs["weight"]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(**inputs)
        weight_sized = [t for t in saved if t.shape == weight.shape]
        assert weight_sized and all(t.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
                                    for t in weight_sized), fn.__name__
        out.sum().backward()
        assert inputs["x"].grad is not None and inputs["lam"].grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("modes,rank", [
    ((4, 4, 4, 4), 4),   # Q = 16 = width: the fused merge kernel, then one GEMM
    ((8, 8, 8, 8), 2),   # Q = 4: the LoRA kernel with A = Rcᵀ, B = T
])
def test_tera_matches_the_torch_path(monkeypatch, dtype, modes, rank):
    d_out, d_in = modes[0] * modes[1], modes[2] * modes[3]
    inputs = dict(x=_rand(2, 20, d_in, dtype=dtype), weight=_rand(d_out, d_in, dtype=dtype, scale=0.2, seed=1),
                  bias=_rand(d_out, dtype=dtype, seed=2), factors=_rand(4, max(modes) + 2, rank, seed=3, scale=0.5),
                  core=_rand(*(rank,) * 4, seed=4), lam=_rand(4, rank, seed=5), modes=modes, scaling=0.4)
    wins = common.materialize_wins(40, d_in, d_out, rank ** 2, True)
    assert wins == (rank ** 2 == d_in), "each case must take the path its comment names"
    _assert_close(*_both_paths(kernels.tera_linear, monkeypatch, inputs, ["x", "bias", "lam"]), dtype)


def test_bfloat16_is_computed_in_float32_inside_the_kernels(monkeypatch):
    inputs = _lora_inputs((16,), 32, 24, 4, torch.bfloat16)
    out = kernels.lora_linear(**inputs)
    exact = lora.lora_linear(**{k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
    # only the final rounding to bf16 remains: within one bf16 ulp of the fp32 result
    torch.testing.assert_close(out.float(), exact, atol=1e-2, rtol=8e-3)


def test_an_uncovered_dtype_falls_back_to_torch_with_one_warning(monkeypatch):
    from lrzoo.kernels.backend import warn_once

    warn_once.cache_clear()
    inputs = _lora_inputs((5,), 16, 16, 4, torch.float64)
    with pytest.warns(RuntimeWarning, match="float64"):
        out = kernels.lora_linear(**inputs)
    torch.testing.assert_close(out, lora.lora_linear(**inputs))


def _bf16_error_ratio(fn, ref_fn, inputs):
    """max|triton_bf16 − fp32| / max|torch_bf16 − fp32|: the kernel's error relative to torch's own."""
    exact = ref_fn(**{k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
    err_kernel = (fn(**inputs).float() - exact).abs().max()
    err_torch = (ref_fn(**inputs).float() - exact).abs().max()
    return (err_kernel / err_torch.clamp_min(1e-6)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["lora_linear", "core_linear"])
def test_bf16_error_on_gpu_is_within_torchs_own(monkeypatch, op):
    inputs = _lora_inputs((4, 512), 1024, 768, 16, torch.bfloat16)
    if op == "core_linear":
        inputs["core"] = _rand(16, 16, seed=6)
    assert _bf16_error_ratio(getattr(kernels, op), getattr(lora, op), inputs) < 2.0


# --- the check a kernel passes before LRZOO_BACKEND=auto trusts it on a device (lrzoo.kernels.verify) ---

@pytest.fixture
def verdicts(monkeypatch, tmp_path):
    """A fresh verdict file, and the dispatcher treating this CPU as a device Triton compiles for (as CUDA)."""
    from lrzoo.kernels import backend, verify

    path = tmp_path / "kernel-verdicts.json"
    monkeypatch.setenv("LRZOO_KERNEL_VERDICTS", str(path))
    monkeypatch.setattr(backend, "kernel_device", lambda tensor: True)
    monkeypatch.setattr(verify, "_MEMO", {})
    backend.warn_once.cache_clear()
    yield path
    backend.warn_once.cache_clear()


def _perturbed(fn):
    def wrong(*args, **kwargs):
        return fn(*args, **kwargs) * 1.01  # off by 1%: well past every dtype's bound
    return wrong


def test_every_kernel_passes_its_check_and_the_verdicts_are_cached_as_json(monkeypatch, verdicts):
    import json

    from lrzoo.kernels import verify

    results = kernels.verify_kernels("cpu")
    assert [(v.op, v.dtype, v.ok) for v in results] == [
        (op, "float32", True) for op in ("lora_linear", "dora_linear", "randlora_linear", "tera_linear")]
    assert all(v.max_error < 1e-5 and v.reason is None for v in results)
    data = json.loads(verdicts.read_text())
    (stack,) = data["stacks"].values()
    assert set(stack["stack"]) == {"device", "capability", "driver", "torch", "triton", "lrzoo"}
    assert stack["stack"]["torch"] == torch.__version__ and stack["stack"]["triton"] == triton.__version__
    assert sorted(stack["verdicts"]) == sorted(f"{v.op}/float32" for v in results)

    # another process (an empty memo) reads the file and checks nothing again
    monkeypatch.setattr(verify, "_MEMO", {})
    monkeypatch.setattr(verify, "check_kernel", lambda *a: pytest.fail("a cached verdict was checked again"))
    assert [v.ok for v in kernels.verify_kernels("cpu")] == [True] * 4


def test_every_check_reaches_the_triton_kernels_it_vouches_for(monkeypatch, verdicts):
    """A wrong shared GEMM fails all four checks; a wrong merge kernel fails its family's (the cases take the
    merged path, not a torch fallback inside the Triton side)."""
    from lrzoo.kernels import triton_common, triton_lora, triton_randlora, triton_tera, verify

    for module in (triton_common, triton_lora, triton_tera):
        monkeypatch.setattr(module, "fused_mm", _perturbed(triton_common.fused_mm))
    assert [v.ok for v in kernels.verify_kernels("cpu", refresh=True)] == [False] * 4
    monkeypatch.undo()
    for module, op in ((triton_randlora, "randlora_linear"), (triton_tera, "tera_linear")):
        with monkeypatch.context() as patch:
            patch.setenv("LRZOO_KERNEL_VERDICTS", str(verdicts))
            patch.setattr(module, "merged_weight", lambda weight, *rest: weight.to(rest[-1]) + 0.1)
            (verdict,) = kernels.verify_kernels("cpu", ops=[op], refresh=True)
            assert not verdict.ok and "merged" in verdict.reason, verdict


def test_a_wrong_kernel_fails_its_check_and_auto_runs_the_torch_path_with_one_warning(monkeypatch, verdicts):
    import json
    import warnings

    from lrzoo.kernels import triton_lora

    monkeypatch.setattr(triton_lora, "lora_linear", _perturbed(triton_lora.lora_linear))
    monkeypatch.setenv("LRZOO_BACKEND", "auto")
    inputs = _lora_inputs((6,), 16, 24, 4, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [kernels.lora_linear(**inputs) for _ in range(3)]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "lora_linear" in messages[0] and "torch path" in messages[0], messages
    for out in outputs:
        assert torch.equal(out, lora.lora_linear(**inputs))
    record = json.loads(verdicts.read_text())["stacks"]
    (stack,) = record.values()
    assert stack["verdicts"]["lora_linear/float32"]["ok"] is False
    # the other kernels were not condemned with it: DoRA still runs its own (correct) kernel
    assert kernels.dora_linear(**inputs, magnitude=torch.ones(24)) is not None
    assert json.loads(verdicts.read_text())["stacks"][next(iter(record))]["verdicts"]["dora_linear/float32"]["ok"]


def test_a_forced_triton_backend_raises_for_a_kernel_that_failed_its_check(monkeypatch, verdicts):
    from lrzoo.kernels import triton_tera

    monkeypatch.setattr(triton_tera, "tera_linear", _perturbed(triton_tera.tera_linear))
    monkeypatch.setenv("LRZOO_BACKEND", "triton")
    (case, _) = kernels.KERNELS["tera_linear"].check(torch.device(DEVICE), torch.float32)
    with pytest.raises(kernels.KernelCheckError, match="tera_linear.*float32"):
        kernels.tera_linear(**case.kwargs)


def test_a_kernel_that_fails_to_compile_is_not_trusted(monkeypatch, verdicts):
    from lrzoo.kernels import triton_randlora

    def broken(*args, **kwargs):
        raise RuntimeError("CompilationError: out of resource: shared memory, Required: 263168, Hardware limit: 232448")

    monkeypatch.setattr(triton_randlora, "randlora_linear", broken)
    monkeypatch.setenv("LRZOO_BACKEND", "auto")
    (case,) = kernels.KERNELS["randlora_linear"].check(torch.device(DEVICE), torch.float32)
    with pytest.warns(RuntimeWarning, match="randlora_linear.*shared memory"):
        out = kernels.randlora_linear(**case.kwargs)
    from lrzoo.kernels import randlora
    assert torch.equal(out, randlora.randlora_linear(**case.kwargs))


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "stacks": []}',
                                     "__import__('pathlib').Path('PWNED').write_text('x')"])
def test_a_damaged_verdict_file_is_checked_again_and_never_executed(monkeypatch, verdicts, tmp_path, content):
    import json

    verdicts.write_text(content)
    monkeypatch.chdir(tmp_path)
    (verdict,) = kernels.verify_kernels("cpu", ops=["lora_linear"])
    assert verdict.ok and not (tmp_path / "PWNED").exists()
    assert json.loads(verdicts.read_text())["format"] == 1


def test_a_first_call_under_inference_mode_still_checks_the_kernel_with_gradients(monkeypatch, verdicts):
    import json

    monkeypatch.setenv("LRZOO_BACKEND", "auto")
    inputs = _lora_inputs((6,), 16, 24, 4, torch.float32)
    with torch.inference_mode():
        out = kernels.lora_linear(**inputs)
    torch.testing.assert_close(out, lora.lora_linear(**inputs), **TOL[torch.float32])
    (stack,) = json.loads(verdicts.read_text())["stacks"].values()
    assert stack["verdicts"]["lora_linear/float32"]["ok"] is True, stack["verdicts"]
