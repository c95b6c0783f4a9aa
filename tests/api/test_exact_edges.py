"""Issue 11: the PEFT habits that used to give silently wrong numbers, on every adapter.

* trainable base biases (``bias="all"/"lora_only"``, ReLoRA) get the same gradients as stock PEFT;
* GPT-2's ``Conv1D`` and models mixing it with ``nn.Linear`` give exact outputs, and DoRA exports;
* under ``torch.autocast`` (bf16 on CPU) every adapter's forward and backward match the materialised
  ΔW computed the way autocast computes a linear layer; a bf16 base with fp32 adapters trains.

References are independent of the layer code: ΔW comes from ``adapter_cases`` (written from the
spec) and the stock-PEFT models are built without lrzoo's layers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, RandLoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers.pytorch_utils import Conv1D

import lrzoo
from adapter_cases import CASES
from conftest import tiny_bert, tiny_inputs, tiny_llama

LINEAR_CASES = [case for case in CASES if case.model != "conv"]


def tiny_qwen2(seed: int = 0):
    """A Qwen2-style decoder: q/k/v projections carry biases, o/MLP projections do not."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    return AutoModelForCausalLM.from_config(config).eval()


class MixedNet(nn.Module):
    """``nn.Linear`` and transformers' ``Conv1D`` side by side, none of them square."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(96, 24)
        self.up = nn.Linear(24, 40)
        self.conv_down = Conv1D(16, 40)  # Conv1D(nf=d_out, nx=d_in) stores W as (d_in, d_out)
        self.conv_up = Conv1D(36, 16)
        self.down = nn.Linear(36, 20)
        self.head = nn.Linear(20, 3)

    def forward(self, input_ids, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        h = self.down(torch.tanh(self.conv_up(torch.tanh(self.conv_down(torch.tanh(self.up(self.embed(input_ids))))))))
        logits = self.head(h.mean(1))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


MIXED_TARGETS = ["up", "conv_down", "conv_up", "down"]


def _adapted(peft_model):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    heads = [n for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    return [(n, m) for n, m in peft_model.named_modules()
            if isinstance(m, BaseTunerLayer) and not any(n.startswith(h + ".") for h in heads)]


def _weight_out_in(layer) -> torch.Tensor:
    """The base weight as (d_out, d_in), read from the base layer's type (not from the adapter layer's flag)."""
    base = layer.get_base_layer()
    return base.weight.T if isinstance(base, Conv1D) else base.weight


def _case_kwargs(case, random_init=True, **extra):
    kwargs = {k: v for k, v in case.kwargs.items() if k != "init_data"}  # LoRA-SB's init data is BERT's
    return {**kwargs, **(case.random_init if random_init else {}), **extra}


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


# --------------------------------------------------------------------------- 1. trainable biases
BIAS_METHODS = [("lora", {}), ("loraplus", {}), ("dora", {"use_dora": True}), ("randlora", None)]


def _stock_config(method, r, alpha, bias, target_modules):
    if method == "randlora":
        return RandLoraConfig(r=r, randlora_alpha=alpha, bias=bias, target_modules=target_modules,
                              init_weights=False)
    use_dora = method == "dora"
    return LoraConfig(r=r, lora_alpha=alpha, bias=bias, target_modules=target_modules, use_dora=use_dora,
                      init_lora_weights=False)


def _loss(model, x):
    out = model(x).logits
    weights = torch.linspace(-1, 1, out.shape[-1])
    return (out * weights).sum()


def _assert_grads_close(got, want, name):
    """Equal up to float32 summation order, relative to the gradient's own size."""
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-7, name


def _named_grads(model):
    return {n.replace(".base_layer", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backbone", ["bert", "qwen2"])
@pytest.mark.parametrize("bias", ["all", "lora_only"])
@pytest.mark.parametrize("method", [m for m, _ in BIAS_METHODS])
def test_trainable_biases_get_stock_pefts_gradients(method, bias, backbone):
    build = tiny_bert if backbone == "bert" else tiny_qwen2
    targets = ["query", "value"] if backbone == "bert" else ["q_proj", "v_proj", "o_proj"]
    ours = _no_dropout(lrzoo.wrap(build(), method, r=4, alpha=8, target_modules=targets, bias=bias,
                                  modules_to_save=None, task_type=None,
                                  **({"init_weights": False} if method == "randlora" else {"init_lora_weights": False})))
    stock = _no_dropout(get_peft_model(build(), _stock_config(method, 4, 8, bias, targets)))
    set_peft_model_state_dict(stock, get_peft_model_state_dict(ours))
    x = tiny_inputs(batch=3)
    ours.train(), stock.train()
    _loss(ours, x).backward()
    _loss(stock, x).backward()
    mine, theirs = _named_grads(ours), _named_grads(stock)
    assert mine.keys() == theirs.keys()
    adapted_biases = [n for n in mine if n.endswith(".bias") and any(t in n for t in targets)]
    assert adapted_biases, "the adapted layers of this backbone carry biases"
    for name in mine:
        assert mine[name] is not None, f"{name} trains but got no gradient"
        _assert_grads_close(mine[name], theirs[name], name)


def test_relora_trains_the_bias_of_adapted_layers():
    """ReLoRA trains every non-adapter parameter; the adapted layers' own biases must move too."""
    model = _no_dropout(lrzoo.wrap(tiny_qwen2(), "relora", r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                   init_lora_weights=False))
    reference = get_peft_model(tiny_qwen2(), _stock_config("lora", 4, 8, "none", ["q_proj", "v_proj"]))
    set_peft_model_state_dict(reference, get_peft_model_state_dict(model))
    for name, param in reference.named_parameters():  # stock PEFT + ReLoRA's rule: all but adapted W train
        param.requires_grad_(not name.endswith("base_layer.weight"))
    x = tiny_inputs(batch=3)
    model.train(), _no_dropout(reference).train()
    _loss(model, x).backward()
    _loss(reference, x).backward()
    mine, theirs = _named_grads(model), _named_grads(reference)
    q_bias = "base_model.model.model.layers.0.self_attn.q_proj.bias"
    assert mine[q_bias] is not None and mine[q_bias].abs().max() > 0
    assert mine.keys() == theirs.keys()
    for name in theirs:
        _assert_grads_close(mine[name], theirs[name], name)


def test_a_trained_base_weight_takes_the_autograd_path():
    """The kernels treat W as frozen; a user who unfreezes it must still get its gradient, not None."""
    model = lrzoo.wrap(tiny_bert(), "lora", r=4, target_modules=["query"], modules_to_save=None, task_type=None,
                       init_lora_weights=False)
    layer = dict(_adapted(model))["base_model.model.bert.encoder.layer.0.attention.self.query"]
    layer.get_base_layer().weight.requires_grad_(True)
    # Reference: the merged model, a plain nn.Linear holding W + ΔW, has the same dL/dW.
    merged = copy.deepcopy(model).merge_and_unload()
    _loss(model, tiny_inputs()).backward()
    assert layer.get_base_layer().weight.grad is not None
    _loss(merged, tiny_inputs()).backward()
    want = merged.bert.encoder.layer[0].attention.self.query.weight.grad
    assert want.abs().max() > 0
    _assert_grads_close(layer.get_base_layer().weight.grad, want, "query.weight")


# --------------------------------------------------------------------------- 2. Conv1D and mixed targets
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.method)
@pytest.mark.parametrize("backbone", ["gpt2", "mixed"])
def test_conv1d_and_mixed_targets_are_exact(case, backbone):
    build = tiny_gpt2 if backbone == "gpt2" else MixedNet
    targets = ["c_attn", "c_fc"] if backbone == "gpt2" else MIXED_TARGETS
    x = tiny_inputs()
    base_out = build()(x).logits.detach()
    zero = lrzoo.wrap(build(), case.method, **_case_kwargs(case, random_init=False, target_modules=targets))
    if case.zero_init:  # ΔW = 0: exactly the base model (the Linear layers must not see a transposed W)
        torch.testing.assert_close(zero(x).logits.detach(), base_out, rtol=0, atol=case.init_atol)

    model = _no_dropout(lrzoo.wrap(build(), case.method, **_case_kwargs(case, target_modules=targets)))
    layers = _adapted(model)
    assert {type(layer.get_base_layer()) for _, layer in layers} == ({Conv1D} if backbone == "gpt2"
                                                                      else {Conv1D, nn.Linear})
    generator = torch.Generator().manual_seed(3)
    for name, layer in layers:
        weight = _weight_out_in(layer)
        x_in = torch.randn(2, 5, weight.shape[1], generator=generator)
        with torch.no_grad():
            expected = F.linear(x_in, weight + case.reference_delta(layer, "default"), layer.get_base_layer().bias)
            torch.testing.assert_close(layer(x_in), expected, rtol=1e-4, atol=1e-5, msg=name)
    # merge_and_unload gives the same function
    expected = model(x).logits.detach()
    torch.testing.assert_close(model.merge_and_unload()(x).logits.detach(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.method)
def test_export_on_gpt2_loads_in_stock_peft(case, tmp_path):
    """export_lora of every adapter on Conv1D layers (DoRA's used to fail with a size mismatch)."""
    from peft import PeftModel

    model = _no_dropout(lrzoo.wrap(tiny_gpt2(), case.method, **_case_kwargs(case, target_modules=["c_attn", "c_fc"])))
    x = tiny_inputs()
    expected = model(x).logits.detach()
    report = lrzoo.export_lora(model, str(tmp_path / "export"), rank=None if case.exact_export else 32)
    assert report["max_relative_error"] < 1e-5  # rank 32 = full rank of these layers: exact
    loaded = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "export")).eval()
    assert not any(isinstance(m, lrzoo.AdapterLayer) for m in loaded.modules())
    torch.testing.assert_close(loaded(x).logits.detach(), expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- 5. mixed precision
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.method)
def test_autocast_bf16_matches_the_materialised_delta(case):
    """Under bf16 autocast each adapter's output and gradients are as close to the fp32 truth as
    autocast's own linear layer with the materialised ΔW (the style guide's rule: compare errors
    against fp32, relative to torch's own bf16 error, not with a fixed tolerance)."""
    build = tiny_bert if case.model == "bert" else tiny_llama
    model = _no_dropout(lrzoo.wrap(build(), case.method, **_case_kwargs(case))).train()
    name, layer = _adapted(model)[0]
    trainable = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(3, 5, _weight_out_in(layer).shape[1]).requires_grad_(True)
    grad_out = torch.randn(3, 5, _weight_out_in(layer).shape[0])

    def run(fn, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn()
        return out, torch.autograd.grad((out.float() * grad_out).sum(), [x, *trainable])

    def materialised():
        return F.linear(x, _weight_out_in(layer) + case.reference_delta(layer, "default"), layer.get_base_layer().bias)

    out, grads = run(lambda: layer(x), autocast=True)
    assert out.dtype == torch.bfloat16  # autocast's rule for a linear layer
    ref, ref_grads = run(materialised, autocast=True)
    exact, exact_grads = run(materialised, autocast=False)
    for what, got, bf16_ref, truth in [("output", out, ref, exact)] + [
            (f"grad {i}", g, r, e) for i, (g, r, e) in enumerate(zip(grads, ref_grads, exact_grads))]:
        assert got.dtype == truth.dtype or what == "output"  # fp32 adapter tensors get fp32 gradients
        ours = (got.float() - truth.float()).abs().max()
        torchs = (bf16_ref.float() - truth.float()).abs().max()
        assert ours <= 4 * torchs + 1e-3 * truth.abs().max(), f"{what}: error {ours:.3g} vs torch's bf16 {torchs:.3g}"


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.method)
def test_a_training_step_runs_under_autocast_and_tracks_float32(case):
    build = tiny_bert if case.model == "bert" else tiny_llama
    x = tiny_inputs(batch=4, length=8)
    labels = x if case.model == "llama" else torch.tensor([0, 1, 2, 1])
    losses = {}
    for precision in ("fp32", "bf16"):
        model = _no_dropout(lrzoo.wrap(build(), case.method, **_case_kwargs(case))).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(x, labels=labels).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        losses[precision] = loss.item()
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2, abs=2e-2)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.method)
def test_a_bf16_base_with_fp32_adapters_trains(case):
    build = tiny_bert if case.model == "bert" else tiny_llama
    x = tiny_inputs(batch=4, length=8)
    labels = x if case.model == "llama" else torch.tensor([0, 1, 2, 1])
    reference = _no_dropout(lrzoo.wrap(build(), case.method, **_case_kwargs(case))).eval()
    expected = reference(x).logits.detach()
    model = _no_dropout(lrzoo.wrap(build().to(torch.bfloat16), case.method, **_case_kwargs(case))).train()
    adapter_params = [p for _, layer in _adapted(model) for n, p in layer.named_parameters()
                      if p.requires_grad and not n.startswith("base_layer.")]
    assert adapter_params and all(p.dtype == torch.float32 for p in adapter_params)
    loss = model(x, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in adapter_params)
    model.eval()
    with torch.no_grad():
        got = model(x).logits.float()
    assert (got - expected).abs().max() <= 5e-2 * expected.abs().max() + 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.method)
def test_autocast_on_cuda_tracks_float32(case, dtype):
    """The CUDA side of item 5: fp16 and bf16 autocast on the Triton path, against the fp32 loss."""
    build = tiny_bert if case.model == "bert" else tiny_llama
    x = tiny_inputs(batch=4, length=8).cuda()
    labels = x if case.model == "llama" else torch.tensor([0, 1, 2, 1]).cuda()
    losses = {}
    for autocast in (False, True):
        model = _no_dropout(lrzoo.wrap(build(), case.method, **_case_kwargs(case))).cuda().train()
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            loss = model(x, labels=labels).loss
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
        losses[autocast] = loss.item()
    assert losses[True] == pytest.approx(losses[False], rel=3e-2, abs=3e-2)
