"""SLTrain (lrzoo.methods.sltrain): W = s·B A + S with a fixed random sparse support, trained from scratch.

References are written here from the paper's formula, independently of the layer: the dense W is built
with a scatter into zeros, and its gradients come from autograd through that dense form."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import tiny_inputs, tiny_llama
from lrzoo.methods.sltrain import SLTrainLinear, apply_sltrain, sltrain_layers, sltrain_memory, to_dense


def _layer(m=12, n=10, r=3, alpha=6.0, density=0.2, seed=0, bias=True):
    layer = SLTrainLinear(n, m, r, alpha, density, bias=bias, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # B = 0 at init: give it values so the low-rank path is exercised
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return layer


def _reference_weight(B, A, values, index, s, m, n):
    return B @ A * s + torch.zeros(m * n, dtype=values.dtype).scatter(0, index, values).view(m, n)


def test_forward_equals_the_dense_weight():
    layer = _layer()
    x = torch.randn(2, 5, 10, generator=torch.Generator().manual_seed(3))
    W = _reference_weight(layer.lora_B, layer.lora_A, layer.sparse_values, layer.sparse_index, 6.0 / 3, 12, 10)
    expected = x @ W.t() + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.materialize(), W.detach(), rtol=1e-6, atol=1e-6)


def test_gradients_match_autograd_on_the_dense_form():
    layer = _layer().double()
    x = torch.randn(2, 5, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    target = torch.randn(2, 5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (layer(x) * target).sum().backward()
    got = {"x": x.grad.clone(), "B": layer.lora_B.grad, "A": layer.lora_A.grad, "v": layer.sparse_values.grad,
           "bias": layer.bias.grad}

    leaves = {k: t.detach().clone().requires_grad_() for k, t in
              (("x", x), ("B", layer.lora_B), ("A", layer.lora_A), ("v", layer.sparse_values), ("bias", layer.bias))}
    W = _reference_weight(leaves["B"], leaves["A"], leaves["v"], layer.sparse_index, 2.0, 12, 10)
    ((leaves["x"] @ W.t() + leaves["bias"]) * target).sum().backward()
    for key, value in got.items():
        torch.testing.assert_close(value, leaves[key].grad, rtol=1e-10, atol=1e-12, msg=key)


def test_init_is_the_papers():
    layer = SLTrainLinear(40, 30, 4, 16.0, 0.05, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(layer.lora_B) == 0  # at step 0 the layer is the sparse part alone
    assert layer.scaling == 4.0
    assert layer.sparse_index.numel() == int(0.05 * 30 * 40) and layer.sparse_index.dtype == torch.int64
    assert torch.equal(layer.sparse_index, layer.sparse_index.unique())  # distinct, sorted
    bound = 1 / 40 ** 0.5
    assert layer.sparse_values.abs().max() <= bound and layer.lora_A.abs().max() <= bound
    W = layer.materialize()
    assert torch.count_nonzero(W) == layer.sparse_index.numel()


def test_support_is_seeded_fixed_during_training_and_restored():
    model = apply_sltrain(tiny_llama(), r=4, alpha=8, density=0.1, seed=7)
    supports = {name: layer.sparse_index.clone() for name, layer in sltrain_layers(model).items()}
    again = apply_sltrain(tiny_llama(), r=4, alpha=8, density=0.1, seed=7)
    other = apply_sltrain(tiny_llama(), r=4, alpha=8, density=0.1, seed=8)
    assert all(torch.equal(supports[n], l.sparse_index) for n, l in sltrain_layers(again).items())
    assert not all(torch.equal(supports[n], l.sparse_index) for n, l in sltrain_layers(other).items())
    # each layer draws its own support (not one pattern repeated)
    assert not torch.equal(supports["model.layers.0.self_attn.q_proj"], supports["model.layers.1.self_attn.q_proj"])

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = tiny_inputs()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    layers = sltrain_layers(model)
    assert all(torch.equal(supports[n], l.sparse_index) for n, l in layers.items())
    assert layers["model.layers.0.mlp.up_proj"].lora_B.abs().sum() > 0  # B trained away from 0

    other.load_state_dict(model.state_dict())  # the support is part of the state dict
    assert all(torch.equal(supports[n], l.sparse_index) for n, l in sltrain_layers(other).items())
    model.eval(), other.eval()
    torch.testing.assert_close(other(ids).logits, model(ids).logits)


def test_every_projection_replaced_no_dense_weight_kept():
    model = apply_sltrain(tiny_llama(), r=4, alpha=8, density=0.05)
    plain = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    assert plain == ["lm_head"]
    assert len(sltrain_layers(model)) == 2 * 7
    assert not any(name.endswith("proj.weight") for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="exceeds the smaller side"):
        apply_sltrain(tiny_llama(), r=64)
    with pytest.raises(ValueError, match="target_modules"):
        apply_sltrain(tiny_llama(), r=4, target_modules=["query"])


def test_memory_bytes_count_factors_values_and_indices():
    model = apply_sltrain(tiny_llama(), r=4, alpha=8, density=0.05)
    expected = {"lora_B": 0, "lora_A": 0, "sparse_values": 0, "sparse_index": 0, "dense": 0}
    # tiny_llama: hidden 32, intermediate 48, 4 heads of 8, 2 kv heads -> k/v are 16×32
    shapes = [(32, 32), (16, 32), (16, 32), (32, 32), (48, 32), (48, 32), (32, 48)] * 2
    for m, n in shapes:
        nnz = int(0.05 * m * n)
        expected["lora_B"] += 4 * m * 4
        expected["lora_A"] += 4 * 4 * n
        expected["sparse_values"] += 4 * nnz
        expected["sparse_index"] += 8 * nnz
        expected["dense"] += 4 * m * n
    measured = sltrain_memory(model)
    assert {k: v for k, v in measured.items() if k != "total"} == expected
    assert measured["total"] == sum(v for k, v in expected.items() if k != "dense")


def test_export_to_a_stock_model_in_a_fresh_process(tmp_path, fresh_python):
    model = apply_sltrain(tiny_llama(), r=4, alpha=8, density=0.05, seed=3)
    with torch.no_grad():
        for layer in sltrain_layers(model).values():
            layer.lora_B.normal_(std=0.1)
    ids = tiny_inputs()
    expected = model(ids).logits
    dense = to_dense(model)
    assert type(dense.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(dense(ids).logits, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "out")
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    out = fresh_python(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}).eval()
        ref = torch.load({str(tmp_path / 'expected.pt')!r})
        with torch.no_grad():
            torch.testing.assert_close(model(ref["ids"]).logits, ref["logits"], rtol=1e-5, atol=1e-5)
        print(type(model).__name__, type(model.model.layers[0].mlp.up_proj).__name__)
    """, cwd=tmp_path)
    assert out.split() == ["LlamaForCausalLM", "Linear"]
    assert (tmp_path / "out" / "sltrain_factors.safetensors").is_file()


def test_bf16_autocast_trains():
    model = apply_sltrain(tiny_llama(), r=4, alpha=8, density=0.05)
    ids = tiny_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    layer = sltrain_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_B.grad.dtype == torch.float32 and torch.isfinite(layer.sparse_values.grad).all()
    assert layer.lora_B.grad.abs().sum() > 0
