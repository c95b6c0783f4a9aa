"""Predicted per-layer time of lrzoo's Triton kernels and of PEFT's eager ops, from tiling and published peaks.

Every figure this module prints is a PREDICTION (a roofline), not a measurement; ``make gpu-check``
prints it beside what the GPU measures.

The model, one launch at a time (launches do not overlap; launch latency is left out):

* time = max(FLOPs / peak FLOP/s, HBM bytes / peak bandwidth) / fill, with ``fill = min(1, programs /
  SMs)`` for a Triton launch whose grid cannot occupy every SM (a library kernel is assumed to fill them).
  Peaks are the datasheet figures of :mod:`lrzoo.kernels.gpus`: tensor cores for fp16/bf16, the CUDA
  cores for fp32 (lrzoo's fp32 and its merge kernels use an IEEE dot; torch's default fp32 matmul has
  TF32 off).
* **lrzoo's kernels, from their own tiling** (:mod:`lrzoo.kernels.tiles`). A program of the fused GEMM
  computes a BLOCK_M×BLOCK_N tile: it reads BLOCK_M rows of X and BLOCK_N rows of W over all of K (and
  of the low-rank S and Bm over R), and writes its tile. FLOPs are counted on whole tiles (a 16-row
  operand in a 64-row tile costs 64 rows of tensor-core work). Programs run in waves of one per SM, in
  launch order (program_id(0), the M tile, fastest: the kernel has no grouped ordering). Within a wave a
  panel of X or W used by several programs comes from HBM once (L2); across waves nothing survives
  unless the whole operand fits in half the L2, in which case it is read once. The autotuner is assumed
  to pick the tile with the lowest predicted time among those it may pick (:func:`tiles.fused_mm_tiles`).
* **PEFT's eager ops** (and torch ops in lrzoo's own path, e.g. DoRA's weight norm): each op reads its
  inputs from HBM and writes its output; matmuls are cuBLAS at compulsory traffic (each operand once).
  The op lists follow PEFT 0.21's code for LoRA (``lora/layer.py``), DoRA (``lora/dora.py``) and
  RandLoRA (``randlora/layer.py``), with autograd's backward of each op. PEFT has no LoRA-XS or TeRA:
  their "eager" rows are the same PEFT style (LoRA-XS: ``B(R(A(x)))·s`` added to the base output;
  TeRA: ΔW built by mode products and applied as a second linear), labelled so.
* The frozen ``F.linear`` (forward ``x Wᵀ + b``, backward ``dy W``) is the denominator, as in
  ``lrzoo-bench``. The benchmark's setting is modelled: bias on, dropout 0, x needing a gradient,
  adapter tensors in the activation dtype, one layer.

    python -m lrzoo.kernels.roofline                     # the protocol's shapes (docs/benchmarks.md#protocol), bf16, r = 16, A100 and H100
    python -m lrzoo.kernels.roofline --docs docs/kernels.md   # also rewrite its generated block
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Iterable, Optional

from .gpus import A100, GPUS, H100, Gpu
from .tiles import RANDLORA_DIAG, RANDLORA_MERGE, TERA_MERGE, Tile, fused_mm_block_r, fused_mm_tiles

BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
METHODS = ("lora", "dora", "lora_xs", "randlora", "tera")
#: the protocol's shapes (docs/benchmarks.md#protocol): d = 4096 at N ∈ {2048, 8192, 16384}, and Llama-3-8B's k/v, gate/up, down projections at 8192.
SHAPES = ((2048, 4096, 4096), (8192, 4096, 4096), (16384, 4096, 4096), (8192, 4096, 1024), (8192, 4096, 14336),
          (8192, 14336, 4096))


@dataclass(frozen=True)
class Op:
    """One launch: what it computes and moves. ``programs`` is the grid of a Triton launch (0: fills the GPU);
    ``fp32`` says which FLOP peak applies (CUDA cores, not tensor cores)."""

    name: str
    flops: float
    bytes: float
    programs: int = 0
    fp32: bool = False

    def seconds(self, gpu: Gpu, dtype: str) -> float:
        peak = gpu.fp32_flops if (self.fp32 or dtype == "fp32") else gpu.matmul_flops(dtype)
        fill = 1.0 if self.programs == 0 else min(1.0, self.programs / gpu.sms)
        return max(self.flops / peak, self.bytes / gpu.hbm_bytes_per_s) / fill


def total(ops: Iterable[Op], gpu: Gpu, dtype: str) -> float:
    return sum(op.seconds(gpu, dtype) for op in ops)


# ---------------------------------------------------------------------------------------------------------
# lrzoo's Triton launches, from their tiling


def wave_reads(rows: int, panel_rows: int, other_tiles: int, gpu: Gpu, row_bytes: float, along_m: bool) -> float:
    """HBM bytes read of one operand of a tiled launch (see the module docstring).

    The grid is ``tiles_m × tiles_n`` with the M index fastest. ``along_m``: the operand is indexed by the M tile
    (``rows`` = M, X and S) or by the N tile (W and Bm); ``other_tiles`` is the grid's other extent.
    """
    size = rows * row_bytes
    if size <= gpu.l2_bytes / 2:
        return size  # stays in L2 across waves: read once
    own_tiles = math.ceil(rows / panel_rows)
    tiles_m, tiles_n = (own_tiles, other_tiles) if along_m else (other_tiles, own_tiles)
    programs, wave = tiles_m * tiles_n, gpu.sms
    panels = 0
    for start in range(0, programs, wave):
        end = min(start + wave, programs)
        if along_m:
            panels += min(end - start, tiles_m)  # distinct M indices among consecutive program ids
        else:
            panels += (end - 1) // tiles_m - start // tiles_m + 1  # distinct N indices
    return panels * (rows / own_tiles) * row_bytes


def fused_mm(name: str, M: int, N: int, K: int, gpu: Gpu, dtype: str, *, R: int = 0, out_bytes: Optional[int] = None,
             reduce: bool = False, tile: Optional[Tile] = None) -> Op:
    """``triton_common.fused_mm``: ``out (M×N) = X (M×K) Wᵀ (+ S (M×R) Bmᵀ)``, with the tile the autotuner would take
    (the fastest predicted) unless ``tile`` is given. ``reduce``: the column-sum epilogue (DoRA's ∂m) reads an
    M×N tensor and writes N floats instead of the tile."""
    if tile is None:
        candidates = [fused_mm(name, M, N, K, gpu, dtype, R=R, out_bytes=out_bytes, reduce=reduce, tile=t)
                      for t in fused_mm_tiles(gpu.capability, dtype == "fp32")]
        return min(candidates, key=lambda op: op.seconds(gpu, dtype))
    b = BYTES[dtype]
    out_bytes = b if out_bytes is None else out_bytes
    tiles_m, tiles_n = math.ceil(M / tile.BLOCK_M), math.ceil(N / tile.BLOCK_N)
    block_r = fused_mm_block_r(R, dtype == "fp32") if R else 0
    padded_k = math.ceil(K / tile.BLOCK_K) * tile.BLOCK_K + (math.ceil(R / block_r) * block_r if R else 0)
    flops = 2.0 * tiles_m * tiles_n * tile.BLOCK_M * tile.BLOCK_N * padded_k
    reads = (wave_reads(M, tile.BLOCK_M, tiles_n, gpu, K * b, along_m=True)
             + wave_reads(N, tile.BLOCK_N, tiles_m, gpu, K * b, along_m=False))
    if R:
        reads += (wave_reads(M, tile.BLOCK_M, tiles_n, gpu, R * b, along_m=True)
                  + wave_reads(N, tile.BLOCK_N, tiles_m, gpu, R * b, along_m=False))
    writes = M * N * b + N * 4 if reduce else M * N * out_bytes  # reduce: reads dy (M×N), adds N floats
    return Op(f"{name} [{tile.label()}]", flops, reads + writes, programs=tiles_m * tiles_n, fp32=dtype == "fp32")


def randlora_merge(D: int, d: int, r: int, n: int, gpu: Gpu, dtype: str) -> Op:
    """``W' = W + s·Bf·Af`` (D×d, P = n·r products, IEEE fp32): each program gathers its BLOCK_D rows of Bf (all P
    columns) and the r rows of A and n rows of γ it needs for its BLOCK_d columns; reads W and writes W' once."""
    b, t = BYTES[dtype], RANDLORA_MERGE
    P = n * r
    tiles_D, tiles_d = math.ceil(D / t["BLOCK_D"]), math.ceil(d / t["BLOCK_d"])
    flops = 2.0 * tiles_D * tiles_d * t["BLOCK_D"] * t["BLOCK_d"] * math.ceil(P / t["BLOCK_C"]) * t["BLOCK_C"]
    reads = (wave_reads(D, t["BLOCK_D"], tiles_d, gpu, P * b, along_m=True)
             + wave_reads(d, t["BLOCK_d"], tiles_D, gpu, (r + n) * b, along_m=False))
    return Op("RandLoRA merge W' (fp32 FMA)", flops, reads + 2 * D * d * b, programs=tiles_D * tiles_d, fp32=True)


def randlora_diag_grad(D: int, d: int, r: int, n: int, gpu: Gpu, dtype: str) -> Op:
    """``∂λ, ∂γ`` from G (D×d fp32): a program holds a BLOCK_C×BLOCK_d tile of Bfᵀ·G over all D rows (IEEE fp32),
    then adds its ∂γ tile atomically."""
    b, t = BYTES[dtype], RANDLORA_DIAG
    P = n * r
    tiles_c, tiles_d = math.ceil(P / t["BLOCK_C"]), math.ceil(d / t["BLOCK_d"])
    flops = 2.0 * tiles_c * tiles_d * t["BLOCK_C"] * t["BLOCK_d"] * math.ceil(D / t["BLOCK_D"]) * t["BLOCK_D"]
    reads = (wave_reads(P, t["BLOCK_C"], tiles_d, gpu, D * b, along_m=True)
             + wave_reads(d, t["BLOCK_d"], tiles_c, gpu, D * 4, along_m=False))
    atomics = P * d * 4  # one fp32 ∂γ contribution per (c, column)
    return Op("RandLoRA ∂λ,∂γ (fp32 FMA)", flops, reads + atomics, programs=tiles_c * tiles_d, fp32=True)


def tera_merge(d_out: int, d_in: int, Q: int, gpu: Gpu, dtype: str) -> Op:
    b, t = BYTES[dtype], TERA_MERGE
    tiles_m, tiles_n = math.ceil(d_out / t["BLOCK_M"]), math.ceil(d_in / t["BLOCK_N"])
    flops = 2.0 * tiles_m * tiles_n * t["BLOCK_M"] * t["BLOCK_N"] * math.ceil(Q / t["BLOCK_Q"]) * t["BLOCK_Q"]
    reads = (wave_reads(d_out, t["BLOCK_M"], tiles_n, gpu, Q * b, along_m=True)
             + wave_reads(d_in, t["BLOCK_N"], tiles_m, gpu, Q * b, along_m=False))
    return Op("TeRA merge W' (fp32 FMA)", flops, reads + 2 * d_out * d_in * b, programs=tiles_m * tiles_n, fp32=True)


# ---------------------------------------------------------------------------------------------------------
# eager (library) ops


def gemm(name: str, M: int, N: int, K: int, dtype: str, out_bytes: Optional[int] = None) -> Op:
    """cuBLAS ``(M×K)·(K×N)``: 2MNK FLOPs, each operand read once, the output written once (fp32: no TF32)."""
    b = BYTES[dtype]
    return Op(name, 2.0 * M * N * K, (M * K + N * K) * b + M * N * (b if out_bytes is None else out_bytes),
              fp32=dtype == "fp32")


def pointwise(name: str, reads: float, writes: float, elem_bytes: int) -> Op:
    """An elementwise or reduction kernel: ``reads`` and ``writes`` in elements."""
    return Op(name, 0.0, (reads + writes) * elem_bytes)


# ---------------------------------------------------------------------------------------------------------
# per method: (forward ops, backward ops)


def frozen_ops(N, i, o, dtype):
    return [gemm("x Wᵀ + b", N, o, i, dtype)], [gemm("dx = dy W", N, i, o, dtype)]


def peft_ops(method: str, N: int, i: int, o: int, r: int, dtype: str) -> tuple[list[Op], list[Op]]:
    """PEFT's eager layer (or the PEFT-style eager formulation, for LoRA-XS and TeRA): forward and backward ops."""
    b = BYTES[dtype]
    Ny, Nx = N * o, N * i
    base_f, base_b = frozen_ops(N, i, o, dtype)
    add_dx = pointwise("dx = dx_base + dx_adapter", 2 * Nx, Nx, b)
    if method in ("lora", "lora_xs"):
        core = [gemm("h Rᵀ (r×r)", N, r, r, dtype)] if method == "lora_xs" else []
        fwd = [*base_f, gemm("xa = x Aᵀ", N, r, i, dtype), *core, gemm("z = xa Bᵀ", N, o, r, dtype),
               pointwise("z·s", Ny, Ny, b), pointwise("y + z", 2 * Ny, Ny, b)]
        core_b = [gemm("dh = dz_r R", N, r, r, dtype), gemm("dR = dzᵀ h", r, r, N, dtype)] if method == "lora_xs" else []
        # LoRA-XS trains only R: no dA, no dB (A and B frozen)
        grads = [] if method == "lora_xs" else [gemm("dB = dzᵀ xa", o, r, N, dtype), gemm("dA = dxaᵀ x", r, i, N, dtype)]
        bwd = [pointwise("dz = dy·s", Ny, Ny, b), gemm("dxa = dz B", N, r, o, dtype), *core_b, *grads,
               gemm("dx_a = dxa A", N, i, r, dtype), *base_b, add_dx]
        return fwd, bwd
    if method == "dora":
        dd = i * o
        fwd = [*base_f, pointwise("eye(d_in)", 0, i * i, b), gemm("A(eye)", i, r, i, dtype),
               gemm("B(A eye) = BA", i, o, r, dtype), pointwise("s·BA", dd, dd, b), pointwise("W + s·BA", 2 * dd, dd, b),
               pointwise("‖·‖ rows", dd, o, b), gemm("xa = x Aᵀ", N, r, i, dtype), gemm("z = xa Bᵀ", N, o, r, dtype),
               pointwise("y − b", Ny, Ny, b), pointwise("(g−1)·y", Ny, Ny, b), pointwise("g·z", Ny, Ny, b),
               pointwise("·s", Ny, Ny, b), pointwise("+", 2 * Ny, Ny, b), pointwise("y + dora", 2 * Ny, Ny, b)]
        bwd = [pointwise("dy·(g−1)", Ny, Ny, b), pointwise("dy·y0", 2 * Ny, Ny, b), pointwise("Σ_N", Ny, o, b),
               pointwise("dy·s", Ny, Ny, b), pointwise("·g", Ny, Ny, b), pointwise("dt·z", 2 * Ny, Ny, b),
               pointwise("Σ_N", Ny, o, b), pointwise("dy + d(y0)", 2 * Ny, Ny, b),
               gemm("dxa = dz B", N, r, o, dtype), gemm("dB = dzᵀ xa", o, r, N, dtype),
               gemm("dx_a = dxa A", N, i, r, dtype), gemm("dA = dxaᵀ x", r, i, N, dtype), *base_b, add_dx]
        return fwd, bwd
    if method == "randlora":
        d, D = min(i, o), max(i, o)
        n = math.ceil(d / r)
        P = n * r
        fwd = [*base_f, pointwise("λ·A", r * d + n * r, P * d, b), pointwise("·γ → Af", P * d + n * d, P * d, b),
               gemm("h = x Afᵀ (or x Bf)", N, P, i, dtype), gemm("z = h ·", N, o, P, dtype),
               pointwise("z·s", Ny, Ny, b), pointwise("y + z", 2 * Ny, Ny, b)]
        bwd = [pointwise("dz = dy·s", Ny, Ny, b), gemm("dh = dz ·", N, P, o, dtype),
               gemm("dAf = dhᵀ x (or dzᵀ h)", P, d, N, dtype), gemm("dx_a = dh ·", N, i, P, dtype),
               pointwise("einsum ∂λ", 3 * P * d, P * d, b), pointwise("einsum ∂γ", 3 * P * d, P * d, b),
               *base_b, add_dx]
        return fwd, bwd
    if method == "tera":
        # eager TeRA (PEFT style): ΔW = s·(G ×_n U_n Λ_n) built by mode products; the last two produce d-sized
        # tensors (d_out·R² then d_out·d_in elements), applied as a second linear; the backward needs dΔW = dzᵀx.
        R = r
        dd = i * o
        q = R * R
        fwd = [*base_f, gemm("G ×₁ U₁ ×₂ U₂ (row modes)", o, q, q, dtype), gemm("× U₃ U₄ → ΔW", o, i, q, dtype),
               pointwise("s·ΔW", dd, dd, b), gemm("z = x ΔWᵀ", N, o, i, dtype), pointwise("y + z", 2 * Ny, Ny, b)]
        bwd = [gemm("dΔW = dyᵀ x", o, i, N, dtype), pointwise("·s", dd, dd, b),
               gemm("dΔW → row-mode factor", o, q, i, dtype), gemm("→ ∂λ (core)", q, q, o, dtype),
               gemm("dx_a = dy ΔW", N, i, o, dtype), *base_b, add_dx]
        return fwd, bwd
    raise ValueError(f"no eager model for {method!r}; choose from {', '.join(METHODS)}")


def lrzoo_ops(method: str, N: int, i: int, o: int, r: int, gpu: Gpu, dtype: str) -> tuple[list[Op], list[Op]]:
    """lrzoo's Triton path as ``triton_lora``/``triton_randlora``/``triton_tera`` launch it (see their docstrings)."""
    b = BYTES[dtype]
    if method in ("lora", "lora_xs", "dora"):
        return _lrzoo_lowrank(method, N, i, o, r, gpu, dtype, a_trains=method != "lora_xs")
    if method == "randlora":
        d, D = min(i, o), max(i, o)
        n = math.ceil(d / r)
        merge = randlora_merge(D, d, r, n, gpu, dtype)
        fwd = [merge, fused_mm("y = x W'ᵀ + b", N, o, i, gpu, dtype)]
        bwd = [merge, fused_mm("dx = dy W'", N, i, o, gpu, dtype),
               fused_mm("G = dyᵀ x (fp32)", o, i, N, gpu, dtype, out_bytes=4), randlora_diag_grad(D, d, r, n, gpu, dtype)]
        return fwd, bwd
    if method == "tera":
        Q = r * r  # K = 2 modes per side (adapters/tera.yaml), rank R = r
        if _tera_merges(N, i, o, Q):
            merge = tera_merge(o, i, Q, gpu, dtype)
            fwd = [merge, fused_mm("y = x W'ᵀ + b", N, o, i, gpu, dtype)]
            bwd = [merge, fused_mm("dx = dy W'", N, i, o, gpu, dtype), fused_mm("G = dyᵀ x", o, i, N, gpu, dtype,
                                                                                  out_bytes=4),
                   fused_mm("∂T = s·G Rc", o, Q, i, gpu, "fp32")]
            return fwd, bwd
        # the low-rank form: LoRA with rank Q, A = Rcᵀ frozen, B = T (built per call in torch: L·Gλ, d_out×Q×Q)
        fwd, bwd = _lrzoo_lowrank("tera", N, i, o, Q, gpu, dtype, a_trains=False)
        build = [gemm("T = L·Gλ", o, Q, Q, dtype), pointwise("Rc = ⊙ rows", 0, i * Q, b)]
        return build + fwd, [gemm("∂Gλ = Lᵀ ∂T", Q, Q, o, dtype)] + bwd
    raise ValueError(f"no lrzoo model for {method!r}; choose from {', '.join(METHODS)}")


def _tera_merges(N, i, o, Q) -> bool:
    from .common import materialize_wins

    return materialize_wins(N, i, o, Q, True, rebuilds=True)


def _lrzoo_lowrank(method, N, i, o, r, gpu, dtype, a_trains: bool):
    fwd = [fused_mm("xa = x Aᵀ", N, r, i, gpu, dtype)]
    bwd = []
    if method == "dora":
        # dora_weight_norm in torch: W.float(), W², Σ rows, W·Aᵀ (fp32), then r×r-sized terms
        dd = i * o
        fwd += [pointwise("W.float()", dd * BYTES[dtype] / 4, dd, 4), pointwise("W²", dd, dd, 4),
                pointwise("Σ rows", dd, o, 4), gemm("W Aᵀ (fp32)", o, r, i, "fp32")]
        bwd += [fused_mm("∂m: Σ_N dy⊙(x Wᵀ + s xa Bᵀ)", N, o, i, gpu, dtype, R=r, reduce=True)]
    fwd += [fused_mm("y = x Wᵀ + s·xa Bᵀ + b", N, o, i, gpu, dtype, R=r)]
    bwd += [fused_mm("ds = s·dy B", N, r, o, gpu, dtype), fused_mm("∂B = s·dyᵀ xa", o, r, N, gpu, dtype, out_bytes=4)]
    if a_trains:
        bwd += [fused_mm("∂A = dsᵀ x", r, i, N, gpu, dtype, out_bytes=4)]
    bwd += [fused_mm("dx = dy W + ds A", N, i, o, gpu, dtype, R=r)]
    return fwd, bwd


# ---------------------------------------------------------------------------------------------------------
# the table


@dataclass
class Prediction:
    method: str
    gpu: str
    shape: tuple[int, int, int]
    frozen_ms: float
    lrzoo_ms: float  # forward + backward
    eager_ms: float
    lrzoo_fwd_ms: float
    eager_fwd_ms: float

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.lrzoo_ms


def predict(method: str, shape: tuple[int, int, int], gpu: Gpu, r: int = 16, dtype: str = "bf16") -> Prediction:
    N, i, o = shape
    frozen = total(sum(frozen_ops(N, i, o, dtype), []), gpu, dtype)
    lf, lb = lrzoo_ops(method, N, i, o, r, gpu, dtype)
    ef, eb = peft_ops(method, N, i, o, r, dtype)
    return Prediction(method, gpu.target, shape, frozen * 1e3, total(lf + lb, gpu, dtype) * 1e3,
                      total(ef + eb, gpu, dtype) * 1e3, total(lf, gpu, dtype) * 1e3, total(ef, gpu, dtype) * 1e3)


EAGER_LABEL = {"lora": "PEFT", "dora": "PEFT", "randlora": "PEFT", "lora_xs": "eager (PEFT-style)",
               "tera": "eager (ΔW built)"}


def table(predictions: list[Prediction]) -> str:
    """One row per method and shape, one column group per GPU: lrzoo's and the eager layer's fwd+bwd time as a
    multiple of the frozen linear's, and the predicted speed-up of lrzoo over the eager layer."""
    gpus = list(dict.fromkeys(p.gpu for p in predictions))
    by_key = {(p.method, p.shape, p.gpu): p for p in predictions}
    head = "| method (vs) | N, d_in→d_out |" + "".join(
        f" {GPUS[g].name}: frozen ms | lrzoo ×frozen | eager ×frozen | **speed-up** |" for g in gpus)
    lines = [head, "|---|---|" + "---:|---:|---:|---:|" * len(gpus)]
    for method, shape in dict.fromkeys((p.method, p.shape) for p in predictions):
        n, i, o = shape
        cells = ""
        for g in gpus:
            p = by_key[(method, shape, g)]
            cells += (f" {p.frozen_ms:.3f} | {p.lrzoo_ms / p.frozen_ms:.2f} | {p.eager_ms / p.frozen_ms:.2f} | "
                      f"**{p.speedup:.2f}×** |")
        lines.append(f"| {method} (vs {EAGER_LABEL[method]}) | {n}, {i}→{o} |{cells}")
    return "\n".join(lines)


def predictions(methods=METHODS, shapes=SHAPES, gpus=(A100, H100), r: int = 16, dtype: str = "bf16") -> list[Prediction]:
    return [predict(m, s, g, r, dtype) for g in gpus for m in methods for s in shapes]


def header(r: int, dtype: str) -> str:
    return (f"PREDICTED (roofline from tiling and datasheet peaks, not measured): one layer, fwd+bwd, {dtype}, r = {r}, "
            f"bias on, dropout 0; A100 SXM 80GB {A100.hbm_bytes_per_s / 1e12:.3f} TB/s, "
            f"{A100.tensor_flops[dtype] / 1e12:.0f} TFLOP/s; H100 SXM {H100.hbm_bytes_per_s / 1e12:.2f} TB/s, "
            f"{H100.tensor_flops[dtype] / 1e12:.0f} TFLOP/s (dense); fp32 FMA {A100.fp32_flops / 1e12:.1f} / "
            f"{H100.fp32_flops / 1e12:.0f} TFLOP/s.")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrzoo.kernels.roofline", description=__doc__.split("\n")[0])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(BYTES), default="bf16")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--ideal-l2", action="store_true",
                        help="every operand read from HBM once (an unbounded L2): the bound a grouped launch order "
                             "would approach")
    parser.add_argument("--docs", help="rewrite the <!-- roofline:begin/end --> block of this Markdown file "
                                       "(docs/kernels.md) with the table")
    args = parser.parse_args(argv)
    gpus = (A100, H100)
    if args.ideal_l2:
        gpus = tuple(dataclasses.replace(g, l2_bytes=math.inf) for g in gpus)
    title = header(args.r, args.dtype) + (" Ideal L2: every operand read once." if args.ideal_l2 else "")
    text = "\n".join([title, "", table(predictions(args.methods, gpus=gpus, r=args.r, dtype=args.dtype))])
    print(text)
    if args.docs:
        from .docblocks import replace_block

        replace_block(args.docs, "roofline", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
