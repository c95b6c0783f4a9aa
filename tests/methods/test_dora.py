"""DoRA numerics: detached fp32 norm, eps clamp on zero rows, norm without forming B·A."""

from __future__ import annotations

import torch

import lrzoo
from lrzoo.kernels.lora import dora_weight_norm
from conftest import tiny_inputs, tiny_llama


def test_norm_without_forming_ba_matches_the_dense_norm():
    torch.manual_seed(0)
    W, A, B = torch.randn(24, 40), torch.randn(5, 40), torch.randn(24, 5)
    dense = torch.linalg.norm(W + 0.7 * B @ A, dim=1)
    torch.testing.assert_close(dora_weight_norm(W, A, B, 0.7), dense, rtol=1e-5, atol=1e-5)


def test_zero_rows_give_no_nan_forward_backward_merge_unmerge():
    model = tiny_llama()
    q_proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.weight[:5] = 0.0  # like Llama-3.1-8B's o_proj (peft#2049)
    original = q_proj.weight.detach().clone()
    peft_model = lrzoo.wrap(model, "dora", r=4, target_modules=["q_proj"])
    peft_model.train()
    x = tiny_inputs()
    out = peft_model(x, labels=x)
    assert torch.isfinite(out.logits).all()
    out.loss.backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)

    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(x).logits
        peft_model.merge_adapter()
        layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        assert torch.isfinite(layer.base_layer.weight).all()
        torch.testing.assert_close(peft_model(x).logits, expected, rtol=1e-4, atol=1e-5)
        peft_model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)


def test_magnitude_gradient_flows_but_norm_is_detached():
    model = lrzoo.wrap(tiny_llama(), "dora", r=4, init_lora_weights=False, target_modules=["q_proj"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    magnitude = layer.lora_magnitude_vector["default"].weight
    x = torch.randn(3, 32, requires_grad=True)
    layer(x).sum().backward()
    # with a detached norm, dL/dm_j = Σ_N z_Nj / n_j exactly
    W = layer.base_layer.weight
    adapted = W + layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    expected = (x.detach() @ adapted.T).sum(0) / torch.linalg.norm(adapted.detach(), dim=1)
    torch.testing.assert_close(magnitude.grad, expected, rtol=1e-4, atol=1e-5)
