"""The predicted roofline (lrzoo.kernels.roofline) against cases small enough to derive by hand."""

from __future__ import annotations

import dataclasses

import pytest

from lrzoo.kernels import roofline
from lrzoo.kernels.gpus import A100, H100, blocks_per_sm
from lrzoo.kernels.tiles import Tile

#: a toy GPU: 2 SMs, no L2 to speak of, 1 byte/s and (nearly) unlimited FLOP/s, so times are byte counts
TOY = dataclasses.replace(H100, sms=2, l2_bytes=0, hbm_bytes_per_s=1.0,
                          tensor_flops={"bf16": 1e30, "fp16": 1e30, "tf32": 1e30}, fp32_flops=1e30)


def test_a_tiled_gemm_reads_each_panel_once_per_wave_that_uses_it():
    # 128×128 output in 64×64 tiles: 4 programs, waves of 2 (one per SM), M tile fastest:
    # wave 0 = (m0, n0), (m1, n0); wave 1 = (m0, n1), (m1, n1).
    # X panels (64 rows × 128 × 2 B = 16 KiB): 2 per wave, 4 in all; W panels: 1 per wave, 2 in all; out 32 KiB.
    op = roofline.fused_mm("t", 128, 128, 128, TOY, "bf16", tile=Tile(64, 64, 64, 4, 3))
    assert op.programs == 4
    assert op.bytes == 4 * 16384 + 2 * 16384 + 128 * 128 * 2
    assert op.flops == 2 * 128 ** 3
    assert op.seconds(TOY, "bf16") == pytest.approx(op.bytes)


def test_an_operand_that_fits_in_half_the_l2_is_read_once():
    roomy = dataclasses.replace(TOY, l2_bytes=10**9)
    op = roofline.fused_mm("t", 128, 128, 128, roomy, "bf16", tile=Tile(64, 64, 64, 4, 3))
    assert op.bytes == 3 * 128 * 128 * 2  # X, W and the output, once each


def test_flops_count_whole_tiles_and_a_small_grid_gets_its_share_of_the_sms():
    # M = 16 rows in a 64-row tile: the tensor cores compute 64 rows; 1 program of 8 SMs gets 1/8 of the peaks
    wide = dataclasses.replace(TOY, sms=8, l2_bytes=10**9)
    op = roofline.fused_mm("t", 16, 64, 128, wide, "bf16", tile=Tile(64, 64, 64, 4, 3))
    assert op.flops == 2 * 64 * 64 * 128
    assert op.bytes == (16 * 128 + 64 * 128 + 16 * 64) * 2  # only the 16 real rows are loaded
    assert op.seconds(wide, "bf16") == pytest.approx(op.bytes * 8)


def test_time_is_the_slower_of_compute_and_memory():
    op = roofline.Op("x", flops=989e12, bytes=3.35e12)  # one second of each on an H100
    assert op.seconds(H100, "bf16") == pytest.approx(1.0)
    assert roofline.Op("x", flops=989e12, bytes=0).seconds(H100, "fp32") == pytest.approx(989 / 67)


def test_the_autotuner_is_modelled_as_taking_the_fastest_tile():
    picked = roofline.fused_mm("t", 8192, 4096, 4096, H100, "bf16")
    each = [roofline.fused_mm("t", 8192, 4096, 4096, H100, "bf16", tile=t)
            for t in roofline.fused_mm_tiles(90, False)]
    assert picked.seconds(H100, "bf16") == min(op.seconds(H100, "bf16") for op in each)


def test_eager_lora_forward_moves_what_its_ops_move():
    # x Wᵀ + b, x Aᵀ, (xa) Bᵀ, ·s, + : each op reads its inputs and writes its output once (bf16, 2 B)
    N, i, o, r = 64, 32, 48, 4
    fwd, _ = roofline.peft_ops("lora", N, i, o, r, "bf16")
    expected = ((N * i + o * i + N * o) + (N * i + r * i + N * r) + (N * r + o * r + N * o) + 2 * N * o + 3 * N * o) * 2
    assert sum(op.bytes for op in fwd) == expected
    assert sum(op.flops for op in fwd) == 2 * N * (o * i + r * i + o * r)


def test_the_table_is_labelled_as_a_prediction_and_covers_every_method_shape_and_gpu():
    preds = roofline.predictions()
    assert {(p.method, p.shape, p.gpu) for p in preds} == {
        (m, s, g) for m in roofline.METHODS for s in roofline.SHAPES for g in ("sm_80", "sm_90")}
    assert all(p.lrzoo_ms > 0 and p.eager_ms > 0 and p.frozen_ms > 0 for p in preds)
    assert "PREDICTED" in roofline.header(16, "bf16")


def test_occupancy_follows_registers_shared_memory_and_warps():
    # performance spec worked example: 158 registers, 8 warps, 98,304 B on H100 -> 1 block, register-limited
    assert blocks_per_sm(H100, 158, 98_304, 8) == (1, "registers")
    # 64 registers and 4 warps: 8 blocks by registers, 2 by shared memory (73,728 + 1,024 reserved of 167,936)
    assert blocks_per_sm(A100, 64, 73_728, 4) == (2, "shared memory")
    assert blocks_per_sm(A100, 24, 0, 4) == (16, "warps")
