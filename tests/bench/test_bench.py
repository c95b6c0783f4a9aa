"""lrzoo-bench: the saved-activation accounting, a smoke run of the CLI on tiny shapes, and the verdict logic.

No test here asserts on a measured time: the verdicts are checked on injected timings.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from lrzoo import kernels
from lrzoo.bench import layers, timing
from lrzoo.cli import bench


def test_saved_bytes_count_activations_once_and_skip_parameters():
    x = torch.randn(32, 16, requires_grad=True)
    weight = torch.randn(24, 16)
    assert timing.saved_activation_bytes(lambda: F.linear(x, weight), [weight]) == 0  # frozen W keeps only W
    A = torch.randn(4, 16, requires_grad=True)
    B = torch.randn(24, 4, requires_grad=True)
    saved = timing.saved_activation_bytes(lambda: kernels.lora.lora_linear(x, weight, None, A, B, 2.0), [weight, A, B])
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
    # timings only: the verdict belongs to --check
    assert not [line for line in out.splitlines() if line.startswith(("PASS", "FAIL", "UNDECIDED"))]
    assert out.splitlines()[-1].startswith("no verdict: timings only")


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
    assert timing.saved_activation_bytes(lambda: _SavesTwice.apply(x), []) == x.nelement() * 4
    y = x * 1.0  # another activation: x * y saves x and y, y * y saves y twice more, the sum saves nothing
    assert timing.saved_activation_bytes(lambda: x * y + y * y, []) == 2 * x.nelement() * 4
    assert timing.saved_activation_bytes(lambda: _SavesTwice.apply(x), [x]) == 0  # excluded (a parameter, say)


def test_saved_bytes_leave_no_graph_behind():
    """An op that saves its own output (exp) must not keep it alive through the counting hooks (a leak
    of the whole forward's activations per call on a real model)."""
    x = torch.randn(64, requires_grad=True)
    outputs = []

    def forward():
        y = x.exp()
        outputs.append(weakref.ref(y))
        return y.sum()

    assert timing.saved_activation_bytes(forward, []) == 64 * 4
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
    from lrzoo.bench.model import block_linear_targets
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
        rows = layers.run(["randlora"], [shape], 4, torch.device("cpu"), torch.float32, 0.0, 0, 1)
        saved = {row.impl: row.saved_bytes for row in rows if row.method == "randlora"}
        assert 0 < saved["lrzoo"] <= saved["peft"], (shape, saved)


def test_quick_mode_prints_timings_and_no_verdict(capsys):
    """``make bench``: exit 0, every timed row, and no PASS/FAIL that a few rounds of a small layer cannot back.
    In-process: a subprocess spent ~40 s importing torch, PEFT and lrzoo on a loaded machine for nothing
    ``main`` does not do here (the console script is ``sys.exit(main())``)."""
    assert bench.main(["--quick", "--methods", "lora", "--iters", "2", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[1].strip() for line in lines if line.startswith("| ")][1:] == ["frozen F.linear", "lora", "lora"]
    assert not [line for line in lines if line.startswith(("PASS", "FAIL", "UNDECIDED"))]
    assert lines[-1].startswith("no verdict: --quick times 2 rounds of one small layer, too few to judge")


def _timing(samples):
    return timing.quantiles(list(samples))


def _rows(lrzoo_fwd_bwd, peft_fwd_bwd, lrzoo_bytes=100, peft_bytes=100, method="lora"):
    """Rows as ``layers.run`` returns them, with injected per-round fwd+bwd times (the forwards take a third)."""
    shape = layers.TARGET_SHAPE
    frozen = [t / 2 for t in peft_fwd_bwd]

    def row(m, impl, fwd_bwd, saved):
        return layers.Row(m, impl, shape, _timing([t / 3 for t in fwd_bwd]), _timing(fwd_bwd), saved)

    return [row("frozen F.linear", "torch", frozen, 0), row(method, "lrzoo", lrzoo_fwd_bwd, lrzoo_bytes),
            row(method, "peft", peft_fwd_bwd, peft_bytes)]


def _check(monkeypatch, capsys, rows, argv=()):
    calls = []

    def fake_run(methods, shapes, r, device, dtype, dropout, warmup, iters):
        calls.append((tuple(shapes), r, dtype, dropout, iters))
        return rows

    monkeypatch.setattr(layers, "run", fake_run)
    status = bench.main(["--check", "--device", "cpu", *argv])
    return status, capsys.readouterr().out.splitlines(), calls


PEFT = [100.0 + (i % 5) for i in range(30)]


def test_check_exits_non_zero_on_a_fail(monkeypatch, capsys):
    status, out, calls = _check(monkeypatch, capsys, _rows([1.2 * t for t in PEFT], PEFT))
    assert status == layers.EXIT_FAIL
    assert [line for line in out if line.startswith("FAIL lora")]
    assert out[-1].startswith("verdict: FAIL")
    # it measured the configuration the targets were set for, with enough rounds
    assert calls == [((layers.TARGET_SHAPE,), layers.TARGET_R, torch.float32, 0.0, layers.CHECK_CPU_ITERS)]


def test_check_fails_on_saved_bytes_whatever_the_time(monkeypatch, capsys):
    status, out, _ = _check(monkeypatch, capsys, _rows([0.9 * t for t in PEFT], PEFT, lrzoo_bytes=101))
    assert status == layers.EXIT_FAIL and out[-2].startswith("FAIL lora")


def test_check_passes_only_when_the_whole_interval_is_within_the_bound(monkeypatch, capsys):
    status, out, _ = _check(monkeypatch, capsys, _rows([0.9 * t for t in PEFT], PEFT))
    assert status == 0 and out[-2].startswith("PASS lora") and out[-1] == "verdict: every target PASS"
    # a median of 0.98 but rounds on both sides of 1.0: the 95% interval straddles the bound
    straddling = [t * (0.9 if i % 3 else 1.1) for i, t in enumerate(PEFT)]
    status, out, _ = _check(monkeypatch, capsys, _rows(straddling, PEFT))
    assert status == layers.EXIT_UNDECIDED and out[-2].startswith("UNDECIDED lora") and "straddles 1.00" in out[-2]


def test_check_pairs_rounds_so_load_drift_does_not_hide_a_difference(monkeypatch, capsys):
    """The load quadruples over the run (each round ×1.07): the two series' own spreads overlap almost
    entirely, but every lrzoo round is 5% slower than the PEFT round next to it: a FAIL, decided."""
    peft = [100.0 * 2 ** (i / 10) for i in range(30)]
    lrzoo = [1.05 * t for t in peft]
    assert timing.median_interval(lrzoo)[0] < timing.median_interval(peft)[1]  # unpaired: no verdict possible
    status, out, _ = _check(monkeypatch, capsys, _rows(lrzoo, peft))
    assert status == layers.EXIT_FAIL and "fwd+bwd 1.05× PEFT (95% interval 1.05–1.05, 30 rounds)" in out[-2]


def test_check_is_undecided_when_a_forward_outlasts_its_forward_and_backward(monkeypatch, capsys):
    rows = _rows([0.9 * t for t in PEFT], PEFT)
    rows[0] = layers.Row(rows[0].method, "torch", rows[0].shape, _timing([500.0] * 30), rows[0].fwd_bwd, 0)
    status, out, _ = _check(monkeypatch, capsys, rows)
    assert status == layers.EXIT_UNDECIDED
    assert any(line.startswith("note: frozen F.linear (torch)") for line in out)
    assert "forward timed longer than forward + backward for frozen F.linear (torch)" in out[-2]


def test_median_interval_is_the_binomial_order_statistics():
    samples = [float(x) for x in range(30, 0, -1)]
    assert timing.median_interval(samples) == (10.0, 21.0)  # the 10th and 21st smallest of 30
    assert timing.median_interval(samples[:20]) == (16.0, 25.0)  # 6th and 15th of 11..30
    assert timing.median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # 5 rounds: no 95% interval


@pytest.mark.parametrize("argv, message", [
    (["--check", "--shape", "64", "32", "32"], "drop --shape"),
    (["--check", "--r", "4"], "drop --r"),
    (["--check", "--iters", "5"], "--iters ≥ 20"),
    (["--check", "--quick"], "not allowed with argument"),
    (["--check", "--methods", "lora_xs"], "targets only for lora, dora, randlora"),
])
def test_check_refuses_what_would_judge_another_configuration(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_check_refuses_the_triton_path(monkeypatch, capsys):
    monkeypatch.setenv("LRZOO_BACKEND", "triton")
    with pytest.raises(SystemExit):
        bench.parse_args(["--check"])
    assert "torch path" in capsys.readouterr().err


def test_rounds_alternate_their_order_and_time_every_candidate_once_per_round():
    calls = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    timings = timing.time_round_robin(fns, torch.device("cpu"), warmup=1, iters=3)
    assert calls == list("abc") + list("abc") + list("cba") + list("abc")
    assert [len(t.samples) for t in timings] == [3, 3, 3]


def test_the_table_and_the_verdict_state_one_ratio(monkeypatch, capsys):
    """The speed-up column is the inverse of the verdict's paired median, not the ratio of the two medians
    (which differ here: the load drifts, and lrzoo's round is 0.9× PEFT's in two rounds of three, 1.2× in the third)."""
    peft = [100.0 * 2 ** (i / 10) for i in range(30)]
    lrzoo = [t * (0.9 if i % 3 else 1.2) for i, t in enumerate(peft)]
    rows = _rows(lrzoo, peft)
    assert abs(rows[1].fwd_bwd.median_ms / rows[2].fwd_bwd.median_ms - 0.9) > 0.05
    _, out, _ = _check(monkeypatch, capsys, rows)
    assert "fwd+bwd 0.90× PEFT" in out[-2]
    table = {tuple(cell.strip() for cell in line.split("|")[1:3]): line.split("|") for line in out if line.startswith("| ")}
    assert table[("lora", "lrzoo")][8].strip() == f"{1 / 0.9:.2f}×"


def test_stock_peft_on_a_model_with_an_lrzoo_head_is_still_stock_peft():
    """``lrzoo-bench --model minilm``: MiniLM loads with lrzoo's pooled head (lrzoo.heads), which is part of the
    base model, not a layer PEFT's wrapping brought in; the stock-PEFT rows used to be refused for it."""
    from lrzoo.bench.model import block_linear_targets, build_member
    from lrzoo.heads import PooledForSequenceClassification
    from lrzoo.models import load_model

    base, _ = load_model("tiny_bert", "classification", num_labels=2, pooling="mean")
    assert isinstance(base, PooledForSequenceClassification)
    targets = block_linear_targets(base)
    for member in ("lora", "dora", "randlora"):
        stock = build_member(base, member, "peft", 2, targets, 0.0, "classification")
        adapted = [type(m).__module__ for m in stock.modules() if hasattr(m, "base_layer")]
        assert adapted and all(module.startswith("peft.") for module in adapted), member
