"""lrzoo-bench: the saved-activation accounting and a smoke run of the CLI on tiny shapes."""

from __future__ import annotations

import gc
import weakref

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


class _SavesTwice(torch.autograd.Function):
    """Saves its input twice (and a view of it), as several ops of a graph can save one activation."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x, x, x.view(-1))
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def test_saved_bytes_count_a_storage_saved_twice_once():
    x = torch.randn(8, 16, requires_grad=True)
    assert bench.saved_activation_bytes(lambda: _SavesTwice.apply(x), []) == x.nelement() * 4
    y = x * 1.0  # another activation: x * y saves x and y, y * y saves y twice more, the sum saves nothing
    assert bench.saved_activation_bytes(lambda: x * y + y * y, []) == 2 * x.nelement() * 4
    assert bench.saved_activation_bytes(lambda: _SavesTwice.apply(x), [x]) == 0  # excluded (a parameter, say)


def test_saved_bytes_leave_no_graph_behind():
    """An op that saves its own output (exp) must not keep it alive through the counting hooks (a leak
    of the whole forward's activations per call on a real model)."""
    x = torch.randn(64, requires_grad=True)
    outputs = []

    def forward():
        y = x.exp()
        outputs.append(weakref.ref(y))
        return y.sum()

    assert bench.saved_activation_bytes(forward, []) == 64 * 4
    gc.collect()
    assert outputs[0]() is None


def test_whole_model_mode_has_a_row_per_member_and_the_peft_ratios(capsys):
    import lrzoo

    assert bench.main(["--model", "tiny_llama", "--r", "2", "--batch", "1", "--seq-len", "8",
                       "--warmup", "0", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")][1:]
    expected = [("full", "torch")] + [(m, impl) for m in lrzoo.list_adapters()
                                      for impl in (("lrzoo", "peft") if m in ("lora", "dora", "randlora") else ("lrzoo",))]
    assert [(row[0], row[1]) for row in rows] == expected
    by_key = {(row[0], row[1]): row for row in rows}
    assert all(float(row[3].split()[0]) > 0 for row in rows)  # step ms
    assert by_key[("full", "torch")][4] == "1.00"
    for member in ("lora", "dora", "randlora"):
        assert by_key[(member, "lrzoo")][2] == by_key[(member, "peft")][2]  # same trainable parameters
        assert by_key[(member, "lrzoo")][5].endswith("×") and by_key[(member, "lrzoo")][7].endswith("×")
    ratios = dict(line.split(": lrzoo/PEFT ") for line in out.splitlines() if ": lrzoo/PEFT " in line)
    assert set(ratios) == {"lora", "dora", "randlora"}
    # RandLoRA keeps no more than PEFT end to end (its λ·A_k intermediate used to be saved per layer)
    assert float(ratios["randlora"].split("saved bytes ")[1].rstrip("×")) <= 1.0
    assert float(ratios["lora"].split("saved bytes ")[1].rstrip("×")) == 1.0


def test_block_targets_are_every_attention_and_mlp_projection():
    from lrzoo.cli.bench_model import block_linear_targets
    from lrzoo.models import load_model

    llama, _ = load_model("tiny_llama", "generation")
    assert block_linear_targets(llama) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    bert, _ = load_model("tiny_bert", "classification", num_labels=2)
    assert block_linear_targets(bert) == ["attention.self.query", "attention.self.key", "attention.self.value",
                                          "attention.output.dense", "intermediate.dense", "output.dense"]


def test_randlora_factored_path_saves_no_more_than_peft():
    """Few tokens take the two thin GEMMs through autograd; Af's λ·A_k intermediate is not kept (issue 16 item 4)."""
    assert not kernels.common.materialize_wins(8, 32, 64, 32, True)
    for shape in [(8, 32, 64), (8, 64, 32)]:
        rows = bench.run(["randlora"], [shape], 4, torch.device("cpu"), torch.float32, 0.0, 0, 1)
        saved = {row.impl: row.saved_bytes for row in rows if row.method == "randlora"}
        assert 0 < saved["lrzoo"] <= saved["peft"], (shape, saved)
