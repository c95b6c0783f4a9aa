"""lrzoo-bench: the saved-activation accounting and a smoke run of the CLI on tiny shapes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lrzoo import kernels
from lrzoo.cli import bench


def test_saved_bytes_count_activations_once_and_skip_parameters():
    x = torch.randn(32, 16, requires_grad=True)
    weight = torch.randn(24, 16)
    assert bench.saved_activation_bytes(lambda: F.linear(x, weight), [weight]) == 0  # frozen W keeps only W
    A = torch.randn(4, 16, requires_grad=True)
    B = torch.randn(24, 4, requires_grad=True)
    saved = bench.saved_activation_bytes(lambda: kernels.lora.lora_linear(x, weight, None, A, B, 2.0), [weight, A, B])
    assert saved == x.nelement() * 4 + 32 * 4 * 4  # x and the N×r tensor xa, nothing N×d_out


def test_bench_prints_ratios_and_the_peft_comparison(capsys):
    assert bench.main(["--methods", "lora", "lora_xs", "--shape", "64", "32", "32", "--r", "4",
                       "--warmup", "0", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[1:3] for row in rows] == [[" frozen F.linear ", " torch "], [" lora ", " lrzoo "],
                                                      [" lora ", " peft "], [" lora_xs ", " lrzoo "]]
    lora = rows[1].split("|")
    assert float(lora[5]) > 0 and lora[8].strip().endswith("×")
    assert out.count("lora (64, 32, 32): fwd+bwd") == 1
