"""Triton pieces every kernel family shares: the fused GEMM, its dropout mask and seed, and the
merged-weight autograd Function of the full-rank families (RandLoRA, TeRA's merged form).

The one GEMM with the fusions every adapter kernel needs (:func:`fused_mm` launches it):

    out[m, n] = c[n] · (α · Σ_k X'[m, k] W'[n, k] + β · D(Σ_q S[m, q] Bm[n, q])) + bias[n]

* ``X' = X ⊙ kscale[k]`` (DoRA's ``dy·g``) with dropout on X (``mask(m, k)``) or on W
  (``mask(k, n)``, for ``∂A = dsᵀ·drop(x)``);
* the low-rank term ``S Bmᵀ`` (K = r) is a second accumulator in the same output tile: LoRA's
  expand joins the base GEMM instead of writing an N×d_out temporary; ``D`` is dropout on that term
  (``∂x = dy W + drop(ds A)``);
* ``c`` (DoRA's m/‖W+sBA‖) and the bias are the epilogue; with ``reduce_with=dy`` the tile is not
  stored but ``Σ_m dy ⊙ tile`` is atomically added per column (DoRA's ``∂m``).

Dropout masks are never stored: ``keep(t, f) = rand(seed, t·row_len + f) ≥ p`` with Triton's
Philox, recomputed wherever needed, so forward and backward agree bit for bit.
Every operand is passed with its strides (transposed views cost nothing). Tiles are multiplied in
fp32 when the inputs are fp32 (IEEE, no TF32) or under the interpreter (whose bf16 ``tl.dot`` is
wrong), otherwise in the input dtype with fp32 accumulation; the epilogue is always fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .backend import interpreter_on
from .common import bias_grad, flatten, remember_bias
from .tiles import all_fused_mm_tiles, fused_mm_block_r, fused_mm_tiles


def _configs() -> list:
    if interpreter_on():
        # The interpreter runs programs one after another and cannot benchmark: one config, big blocks.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4)]
    return [triton.Config(t.blocks, num_warps=t.num_warps, num_stages=t.num_stages) for t in all_fused_mm_tiles()]


def _device_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Autotune prune hook: only the tiles that compile without spilling on this device for this call's dot
    (fp32 IEEE or half precision; :func:`lrzoo.kernels.tiles.fused_mm_tiles`, checked by ``make kernels-check``)."""
    major, minor = torch.cuda.get_device_capability(named_args["x_ptr"].device)
    masked = any(kwargs.get(flag) for flag in ("MASK_X", "MASK_W", "MASK_LR"))
    allowed = {(t.BLOCK_M, t.BLOCK_N, t.BLOCK_K, t.num_warps, t.num_stages)
               for t in fused_mm_tiles(10 * major + minor, bool(kwargs.get("DOT_FP32")), masked)}
    return [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in allowed]


@triton.jit
def _keep(seed, rows, cols, row_len, p):
    """Dropout keep-mask of the (rows × cols) tile of an activation with ``row_len`` features."""
    offsets = rows.to(tl.int64)[:, None] * row_len + cols.to(tl.int64)[None, :]
    return tl.rand(seed, offsets.to(tl.uint32)) >= p


@triton.autotune(configs=_configs(), key=["M", "N", "K", "R", "HAS_LR", "REDUCE"],
                 prune_configs_by={"early_config_prune": _device_configs})
@triton.jit
def _fused_mm_kernel(
    x_ptr, w_ptr, s_ptr, bm_ptr, out_ptr, colscale_ptr, bias_ptr, kscale_ptr, red_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sq, stride_bn, stride_bq,
    stride_om, stride_on, stride_rm, stride_rn,
    alpha, beta, seed, p, keep_scale, row_len,
    HAS_LR: tl.constexpr, MASK_X: tl.constexpr, MASK_W: tl.constexpr, MASK_LR: tl.constexpr,
    HAS_COLSCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KSCALE: tl.constexpr, REDUCE: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if HAS_KSCALE:
            a = (a.to(tl.float32) * tl.load(kscale_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)[None, :]).to(b.dtype)
        if MASK_X:
            a = tl.where(_keep(seed, rm, rk, row_len, p), a, tl.zeros_like(a))
        if MASK_W:
            b = tl.where(_keep(seed, rk, rn, row_len, p), b, tl.zeros_like(b))
        if DOT_FP32:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if MASK_X or MASK_W:
        acc *= keep_scale
    acc *= alpha
    if HAS_LR:
        lr = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for q0 in range(0, R, BLOCK_R):
            rq = q0 + tl.arange(0, BLOCK_R)
            q_ok = rq < R
            sa = tl.load(s_ptr + rm[:, None] * stride_sm + rq[None, :] * stride_sq,
                         mask=m_ok[:, None] & q_ok[None, :], other=0.0)
            sb = tl.load(bm_ptr + rq[:, None] * stride_bq + rn[None, :] * stride_bn,
                         mask=q_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_FP32:
                lr += tl.dot(sa.to(tl.float32), sb.to(tl.float32), input_precision="ieee")
            else:
                lr += tl.dot(sa, sb)
        if MASK_LR:
            lr = tl.where(_keep(seed, rm, rn, row_len, p), lr * keep_scale, 0.0)
        acc += beta * lr
    if HAS_COLSCALE:
        acc *= tl.load(colscale_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tile_ok = m_ok[:, None] & n_ok[None, :]
    if REDUCE:
        weights = tl.load(red_ptr + rm[:, None] * stride_rm + rn[None, :] * stride_rn, mask=tile_ok, other=0.0)
        tl.atomic_add(out_ptr + rn, tl.sum(acc * weights.to(tl.float32), axis=0), mask=n_ok)
    else:
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
                 mask=tile_ok)


def fused_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    alpha: float = 1.0,
    low_rank: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None,
    colscale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    kscale: Optional[torch.Tensor] = None,
    dropout: Optional[tuple[str, int, float, int]] = None,
    reduce_with: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``c ⊙ (α·(X⊙kscale) Wᵀ + β·S Bmᵀ) + bias`` for ``x: (M, K)``, ``w: (N, K)`` (any strides).

    ``low_rank = (S (M, R), Bm (N, R), β)``. ``dropout = (where, seed, p, row_len)`` with ``where``
    one of ``"x"``, ``"w"``, ``"low_rank"``. ``reduce_with`` (M, N) returns the fp32 vector
    ``Σ_m reduce_with ⊙ out`` instead of ``out``.
    """
    M, K = x.shape
    N, K2 = w.shape
    if K != K2:
        raise ValueError(f"fused_mm: x is {tuple(x.shape)} but w is {tuple(w.shape)}; inner sizes differ.")
    if x.device != w.device:
        raise ValueError(f"fused_mm: x on {x.device}, w on {w.device}; move them to one device.")
    dtype = x.dtype
    dot_fp32 = dtype == torch.float32 or interpreter_on()
    w = w.to(dtype)
    if reduce_with is not None:
        out = torch.zeros(N, device=x.device, dtype=torch.float32)
        stride_om, stride_on = 0, 1
    else:
        out = torch.empty(M, N, device=x.device, dtype=out_dtype or dtype)
        stride_om, stride_on = out.stride()
    if low_rank is not None:
        s_mat, bm, beta = low_rank
        s_mat, bm = s_mat.to(dtype), bm.to(dtype)
        R = s_mat.shape[1]
    else:
        s_mat, bm, beta, R = x, w, 0.0, 1
    where, seed, p, row_len = dropout if dropout is not None else ("", 0, 0.0, 0)
    red = reduce_with if reduce_with is not None else x
    block_r = fused_mm_block_r(R, dot_fp32)

    def grid(meta):
        return triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])

    _fused_mm_kernel[grid](
        x, w, s_mat, bm, out, colscale if colscale is not None else x, bias if bias is not None else x,
        kscale if kscale is not None else x, red,
        M, N, K, R,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), s_mat.stride(0), s_mat.stride(1), bm.stride(0),
        bm.stride(1), stride_om, stride_on, red.stride(0), red.stride(1),
        float(alpha), float(beta), int(seed), float(p), 1.0 / (1.0 - p) if p < 1 else 0.0, int(row_len),
        HAS_LR=low_rank is not None, MASK_X=where == "x", MASK_W=where == "w", MASK_LR=where == "low_rank",
        HAS_COLSCALE=colscale is not None, HAS_BIAS=bias is not None, HAS_KSCALE=kscale is not None,
        REDUCE=reduce_with is not None, DOT_FP32=dot_fp32, BLOCK_R=block_r,
    )
    return out


@triton.jit
def _mask_kernel(out_ptr, rows, cols, seed, p, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = (r < rows)[:, None] & (c < cols)[None, :]
    tl.store(out_ptr + r[:, None] * cols + c[None, :], _keep(seed, r, c, cols, p).to(tl.int8), mask=ok)


def dropout_keep_mask(rows: int, cols: int, seed: int, p: float, device: torch.device) -> torch.Tensor:
    """The keep-mask the kernels use for an activation of shape (rows, cols): for tests and debugging."""
    out = torch.empty(rows, cols, dtype=torch.int8, device=device)
    block = 64
    _mask_kernel[(triton.cdiv(rows, block), triton.cdiv(cols, block))](out, rows, cols, int(seed), float(p),
                                                                        BLOCK=block)
    return out.bool()


def new_seed() -> int:
    """A dropout seed drawn from torch's generator, so ``torch.manual_seed`` makes runs repeatable."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


class MergedWeightFunction(torch.autograd.Function):
    """``x W'ᵀ + b`` with ``W' = merge(W, *factors, s, dtype)``, a fused kernel of the family's.

    Backward: ``∂x = dy W'`` (one GEMM with W' merged again by the same kernel), the weight-gradient GEMM
    ``G = dyᵀ x`` (fp32, only when a factor needs a gradient), then the family's contraction
    ``contract(G, factors, s, needs) -> one gradient (or None) per factor``. Saved: x, the frozen W (a
    parameter: no new memory) and the factors. W' is not kept from forward to backward: it is a d_out×d_in
    tensor per layer alive through the whole step, where the torch RandLoRA path (which rebuilds ΔW the same
    way) keeps only x; merging again costs ``D·d·P`` multiply-adds, a small fraction of the layer's GEMMs
    where :func:`lrzoo.kernels.common.materialize_wins` (``rebuilds=True``) sends a layer here. The bias gets
    ``Σ_N dy`` when it trains.

    ``apply(x, weight, bias, scaling, merge, contract, *factors)``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scaling: float, merge, contract, *factors):
        x2 = flatten(x)
        merged = merge(weight, *factors, scaling, x2.dtype)
        out = fused_mm(x2, merged, bias=bias)
        del merged  # merged again in the backward (see the docstring)
        ctx.save_for_backward(x2, weight if ctx.needs_input_grad[0] else None, *factors)
        ctx.scaling, ctx.merge, ctx.contract, ctx.x_shape = scaling, merge, contract, x.shape
        remember_bias(ctx, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, *factors = ctx.saved_tensors
        dy = flatten(grad_out).to(x2.dtype)
        needs = ctx.needs_input_grad[6:]
        grad_x = None
        grad_factors = (None,) * len(factors)
        if ctx.needs_input_grad[0]:
            merged = ctx.merge(weight, *factors, ctx.scaling, x2.dtype)
            grad_x = fused_mm(dy, merged.t()).reshape(ctx.x_shape)
            del merged
        if any(needs):
            grad_w = fused_mm(dy.t(), x2.t(), out_dtype=torch.float32)  # (d_out, d_in)
            grad_factors = ctx.contract(grad_w, tuple(factors), ctx.scaling, needs)
        return (grad_x, None, bias_grad(ctx, dy), None, None, None, *grad_factors)
