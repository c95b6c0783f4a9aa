"""``make kernels-check``: its verdict (shared memory over the limit, unaccepted spills, compile errors, kernels no
scenario launches) and, with triton's ptxas, the real ahead-of-time compile for sm_80 and sm_90a on this CPU.

The compiles run in a fresh process without TRITON_INTERPRET (another test module may have set it in this one,
and the interpreter compiles nothing); the verdict tests need no compiler.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from lrzoo.kernels import aot_check
from lrzoo.kernels.gpus import A100, H100


def _result(**fields) -> aot_check.Result:
    base = dict(kernel="common._fused_mm_kernel", scenario="lora r=16 p=0.0 (bf16, same)", dtype="bf16",
                target="sm_80", config="BLOCK_M=128 BLOCK_N=128 BLOCK_K=64 w8 s3", flags="HAS_LR", regs=168,
                shared_dynamic=65_536, num_warps=8, blocks_per_sm=1, limiter="registers")
    return aot_check.Result(**{**base, **fields})


def test_a_clean_result_passes():
    assert aot_check.problems_of(_result()) == []


def test_shared_memory_over_the_targets_per_block_limit_fails():
    over_a100 = _result(shared_dynamic=A100.smem_per_block_optin + 1)
    assert any("shared memory" in p and "166,912" in p for p in aot_check.problems_of(over_a100))
    # the same bytes fit H100's larger limit
    assert aot_check.problems_of(_result(shared_dynamic=A100.smem_per_block_optin + 1, target="sm_90")) == []
    assert aot_check.problems_of(_result(shared_dynamic=H100.smem_per_block_optin - 1024, shared_static=1025,
                                         target="sm_90"))


def test_a_spill_fails_unless_it_is_accepted_with_a_reason():
    spilled = _result(regs=255, spill_stores=788, spill_loads=576)
    assert any("spills 788 B" in p for p in aot_check.problems_of(spilled, accepted={}))
    accepted = {("common._fused_mm_kernel", "sm_80", "bf16"): "measured faster than the alternatives"}
    assert aot_check.problems_of(spilled, accepted=accepted) == []
    assert aot_check.problems_of(_result(spill_loads=4), accepted={})


def test_a_compile_error_fails():
    assert any("does not compile" in p for p in aot_check.problems_of(_result(error="CompilationError: boom")))


def test_a_jit_function_no_scenario_reaches_is_reported():
    sources = {"m.kernel": "def kernel(x):\n    y = _helper(x)\n", "m._helper": "def _helper(x):\n    return _leaf(x)\n",
               "m._leaf": "def _leaf(x):\n    return x\n", "m.orphan": "def orphan(x):\n    return x\n"}
    problems = aot_check.uncovered(sources, {"m.kernel"})
    assert len(problems) == 1 and problems[0].startswith("m.orphan:")


def test_main_exits_non_zero_on_any_problem_and_zero_without(monkeypatch, capsys):
    monkeypatch.setattr(aot_check, "build_cases", lambda *a, **k: ([object()], []))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(aot_check, "compile_case", lambda case: _result(shared_dynamic=200_000))
    assert aot_check.main(["--targets", "sm_80"]) == 1
    assert "shared memory" in capsys.readouterr().err
    monkeypatch.setattr(aot_check, "compile_case", lambda case: _result())
    assert aot_check.main(["--targets", "sm_80"]) == 0


def test_the_interpreter_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="unset it"):
        aot_check.main([])


def _ptxas_missing() -> str:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return "triton is not installed"
    ptxas = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return "" if ptxas.exists() else f"triton's wheel ships no ptxas ({ptxas})"


needs_ptxas = pytest.mark.skipif(bool(_ptxas_missing()), reason=_ptxas_missing() or "ok")


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", LRZOO_AOT_CACHE=str(tmp_path / "aot"))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)


@needs_ptxas
def test_one_config_per_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    """The fast subset of ``make kernels-check``: every kernel, its first specialisation and config, both targets."""
    result = _run("""
        import sys
        from lrzoo.kernels import aot_check
        sys.exit(aot_check.main(["--subset", "--json", "subset.json"]))
    """, tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    import json

    rows = json.loads((tmp_path / "subset.json").read_text())
    kernels = {row["kernel"] for row in rows}
    assert {"common._fused_mm_kernel", "randlora._merge_kernel", "randlora._diag_grad_kernel", "tera._merge_kernel",
            "common._mask_kernel"} <= kernels
    assert {(k, t) for k in kernels for t in ("sm_80", "sm_90")} == {(row["kernel"], row["target"]) for row in rows}
    assert all(row["regs"] > 0 and not row["error"] for row in rows)


@pytest.mark.slow
@needs_ptxas
def test_an_injected_config_over_the_shared_memory_limit_or_spilling_fails_the_check(tmp_path):
    """Real compiles of deliberately bad tiles: 128×256×64 in 5 stages needs 196,608 B of shared memory on sm_80
    (A100 allows 166,912); 128×128×64 with 8 warps in fp32 spills on sm_80 (IEEE dot on the CUDA cores)."""
    result = _run("""
        import sys
        from lrzoo.kernels import tiles
        tiles.FUSED_MM_HALF = (tiles.Tile(128, 256, 64, 8, 5),)
        tiles.FUSED_MM_FP32 = (tiles.Tile(128, 128, 64, 8, 3),)
        from lrzoo.kernels import aot_check
        sys.exit(aot_check.main(["--subset", "--kernel", "_fused_mm_kernel", "--dtypes", "bf16", "--targets", "sm_80"]))
    """, tmp_path)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "196,608 B of shared memory > 166,912 B" in result.stderr
    result = _run("""
        import sys
        from lrzoo.kernels import tiles
        tiles.FUSED_MM_FP32 = (tiles.Tile(128, 128, 64, 8, 3),)
        from lrzoo.kernels import aot_check
        sys.exit(aot_check.main(["--subset", "--kernel", "_fused_mm_kernel", "--dtypes", "fp32", "--targets", "sm_80"]))
    """, tmp_path)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "spills" in result.stderr and "ACCEPTED_SPILLS" in result.stderr
