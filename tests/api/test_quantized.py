"""Issue 14: every adapter on a bitsandbytes-quantized base (nf4, fp4, int8), on CPU.

bitsandbytes 0.50 runs its 4-bit and 8-bit layers on CPU. Its 4-bit CPU path needs layers at least one
quantization block (64) wide, so these tests use a Llama of width 128 rather than conftest's 32.

The reference is independent of lrzoo's layers: the layer's own bnb output must equal
``F.linear(x, dequantize(W) + ΔW)`` with ΔW from ``adapter_cases`` (the spec's formulas) and W
dequantized by PEFT's helper.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adapter_cases
import lrzoo
from lrzoo.peft_bridge import keep_quantized_layout
from adapter_cases import CASES

bnb = pytest.importorskip("bitsandbytes")
QUANTIZATIONS = ("nf4", "fp4", "int8")
# PiSSA is refused on a quantized base (its residual would need re-quantizing; tests/methods/test_pissa.py)
METHODS = [case for case in CASES if case.model != "conv" and case.method not in ("relora", "pissa")]
#: the layer's output against dequantize(W) + ΔW, relative to its size: bnb's 4-bit CPU path dequantizes
#: and multiplies in the compute dtype (fp32); LLM.int8 also quantizes the activations, row by row.
TOLERANCE = {"nf4": 1e-5, "fp4": 1e-5, "int8": 3e-2}


def _wide_llama(seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    _wide_llama().save_pretrained(path)
    return path


def quantized(base_dir, quantization: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                                    bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, device_map="cpu").eval()


def _kwargs(case, random_init=True):
    kwargs = {k: v for k, v in case.kwargs.items() if k != "init_data"}
    return {**kwargs, "dropout": 0.0, **(case.random_init if random_init else {})}


def _adapted(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _dequantized_out_in(layer):
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(layer.get_base_layer()).detach().float()


def _pairs(quantizations):
    """(case, quantization) pairs lrzoo supports: DoRA on int8 is refused on CPU (see below)."""
    return [pytest.param(c, q, id=f"{c.method}-{q}") for c in METHODS for q in quantizations
            if not (c.method == "dora" and q == "int8")]


@pytest.mark.parametrize("case,quantization", _pairs(QUANTIZATIONS))
def test_forward_is_dequantized_weight_plus_delta(case, quantization, base_dir, monkeypatch):
    # adapter_cases reads W for DoRA's norm and RandLoRA's shapes: give it the dequantized W
    monkeypatch.setattr(adapter_cases, "_base_weight", _dequantized_out_in)
    model = lrzoo.wrap(quantized(base_dir, quantization), case.method, **_kwargs(case))
    layers = _adapted(model)
    assert layers and all(type(l.get_base_layer().weight).__name__ in ("Params4bit", "Int8Params") for _, l in layers)
    generator = torch.Generator().manual_seed(3)
    for name, layer in layers:
        x = torch.randn(2, 5, layer.get_base_layer().in_features, generator=generator)
        with torch.no_grad():
            expected = F.linear(x, _dequantized_out_in(layer) + case.reference_delta(layer, "default"),
                                layer.get_base_layer().bias)
            got = layer(x)
        error = (got - expected).abs().max() / expected.abs().max()
        assert error < TOLERANCE[quantization], f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("case,quantization", _pairs(QUANTIZATIONS))
def test_only_the_adapter_trains_and_the_loss_goes_down(case, quantization, base_dir):
    model = lrzoo.wrap(quantized(base_dir, quantization), case.method, **_kwargs(case, random_init=False)).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".base_layer." not in n for n in trainable)
    x = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(1))
    optimizer = lrzoo.make_optimizer(model, lr=case.train_lr)
    losses = []
    for _ in range(8):
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("case,quantization", _pairs(["nf4", "int8"]))
def test_save_then_load_onto_a_freshly_quantized_base(case, quantization, base_dir, tmp_path):
    model = lrzoo.wrap(quantized(base_dir, quantization), case.method, **_kwargs(case))
    x = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = lrzoo.load(quantized(base_dir, quantization), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", METHODS, ids=lambda c: c.method)
def test_export_loads_in_stock_peft_on_the_same_quantized_base(case, base_dir, tmp_path):
    from peft import PeftModel

    model = lrzoo.wrap(quantized(base_dir, "nf4"), case.method, **_kwargs(case))
    x = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x).logits
    report = lrzoo.export_lora(model, str(tmp_path / "export"), rank=None if case.exact_export else 128)
    assert report["max_relative_error"] < 1e-4
    stock = PeftModel.from_pretrained(quantized(base_dir, "nf4"), str(tmp_path / "export")).eval()
    assert not any(isinstance(m, lrzoo.AdapterLayer) for m in stock.modules())
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["lora_xs", "loldu", "tera"])
def test_merging_into_a_quantized_base_is_refused_with_the_reason(method, base_dir):
    model = lrzoo.wrap(quantized(base_dir, "nf4"), method, r=4)
    with pytest.raises(ValueError, match="quantized base weight.*export_lora"):
        model.merge_and_unload()


def test_peft_native_lora_merges_as_peft_does(base_dir):
    """LoRA on a quantized base is PEFT's own QLoRA layer: merge dequantizes, adds, requantizes, as stock PEFT."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from peft.tuners.lora.bnb import Linear4bit

    model = lrzoo.wrap(quantized(base_dir, "nf4"), "lora", r=4, init_lora_weights=False)
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    stock = get_peft_model(quantized(base_dir, "nf4"), LoraConfig(r=4, lora_alpha=model.peft_config["default"].lora_alpha,
                                                                  target_modules=["q_proj", "v_proj"]))
    set_peft_model_state_dict(stock, get_peft_model_state_dict(model))
    keep_quantized_layout(stock)  # the same bnb CPU path as lrzoo's model (bf16 repacking off), to compare like with like
    x = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x).logits
        ours, theirs = model.merge_and_unload()(x).logits, stock.merge_and_unload()(x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - expected).abs().max() > 0  # nf4 rounding of W + ΔW: PEFT's documented behaviour


def test_saving_does_not_change_a_quantized_model(base_dir, tmp_path):
    """bitsandbytes' CPU repacking made every save unpack the 4-bit weights lossily, in place (see peft_bridge)."""
    model = lrzoo.wrap(quantized(base_dir, "nf4"), "lora_xs", r=4, init_weights=False)
    x = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    lrzoo.export_lora(model, str(tmp_path / "export"))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)


def test_relora_is_refused_with_the_alternative(base_dir):
    with pytest.raises(ValueError, match="full precision.*QLoRA"):
        lrzoo.wrap(quantized(base_dir, "nf4"), "relora", r=4)


def test_dora_on_an_int8_cpu_base_is_refused_with_the_alternative(base_dir):
    """Stock PEFT's 8-bit DoRA fails at the second step on CPU (bitsandbytes' int8 state); lrzoo says so first."""
    with pytest.raises(ValueError, match="4-bit base.*nf4"):
        lrzoo.wrap(quantized(base_dir, "int8"), "dora", r=4)


def test_the_rank_check_reads_the_logical_shape(base_dir):
    """The packed 4-bit storage is (d_out·d_in/2, 1): the old check allowed rank 1 there."""
    model = lrzoo.wrap(quantized(base_dir, "nf4"), "lora_xs", r=64)
    assert model.peft_config["default"].r == 64
    with pytest.raises(ValueError, match="rank at most 128"):
        lrzoo.wrap(quantized(base_dir, "nf4"), "lora_xs", r=129)


def test_the_fingerprint_is_of_the_dequantized_weights(base_dir, tmp_path):
    model = lrzoo.wrap(quantized(base_dir, "nf4"), "lora_xs", r=4)
    model.save_pretrained(tmp_path / "adapter")
    lrzoo.load(quantized(base_dir, "nf4"), str(tmp_path / "adapter"))  # the same quantized checkpoint: accepted
    with pytest.raises(ValueError, match="different base weights"):
        lrzoo.load(_wide_llama(), str(tmp_path / "adapter"))  # full precision: other values
    with pytest.raises(ValueError, match="different base weights"):
        lrzoo.load(quantized(base_dir, "int8"), str(tmp_path / "adapter"))


def test_lora_sb_takes_its_gradient_init_on_a_quantized_base(base_dir):
    batches = [{"input_ids": x, "labels": x} for x in torch.randint(0, 96, (2, 3, 6),
                                                                    generator=torch.Generator().manual_seed(4))]
    model = lrzoo.wrap(quantized(base_dir, "nf4"), "lora_sb", r=4, init_data=batches, init_lr=1e-2)
    _, layer = _adapted(model)[0]
    assert layer.sb_R["default"].abs().max() > 0  # initialised from the gradient, not left at zero


# ----------------------------------------------------------------------------- bitsandbytes' CPU repacking
# Issue 25 item 7: on a CPU with AVX512-bf16, bnb 0.50 repacks a 4-bit weight in place on the first eval-mode
# forward without gradients (a quick look at the model). A repacked layer runs a kernel without a backward: an
# adapter wrapped on it got no gradient at all and the run "succeeded". wrap and trainable loads refuse it.
REPACK_REFUSAL = "repacked in place for bitsandbytes' CPU inference kernel.*Reload the quantized model"


def _looked_at(base_dir):
    """A freshly quantized nf4 model after one eval-mode, no-grad forward; skips where bnb does not repack."""
    model = quantized(base_dir, "nf4")
    with torch.no_grad():
        model(torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5)))
    if not any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
               for m in model.modules() if type(getattr(m, "weight", None)).__name__ == "Params4bit"):
        pytest.skip("bitsandbytes did not repack here (no AVX512-bf16 CPU kernel)")
    return model


def _one_step_grads(model):
    """Gradients of the trainable tensors after one training step's backward."""
    x = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(6))
    model.train()
    model(x, labels=x).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "dora", "lora_xs"])
def test_wrap_refuses_a_base_repacked_by_an_eval_forward(method, base_dir):
    model = _looked_at(base_dir)
    with pytest.raises(ValueError, match=REPACK_REFUSAL):
        grads = _one_step_grads(lrzoo.wrap(model, method, r=4))
        # what the old code did: the step "succeeded" with no gradient on any adapter tensor
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), "nothing trains"


def test_a_look_after_wrap_leaves_training_intact(base_dir):
    model = lrzoo.wrap(quantized(base_dir, "nf4"), "lora", r=4, init_lora_weights=False).eval()
    with torch.no_grad():
        model(torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5)))
    grads = _one_step_grads(model)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("is_trainable", [False, True], ids=["inference", "trainable"])
@pytest.mark.parametrize("loader", ["PeftModel.from_pretrained", "lrzoo.load", "load_adapter"])
def test_a_load_onto_a_repacked_base_is_refused(loader, is_trainable, base_dir, tmp_path):
    """Trainable, it would train nothing; for inference too, PEFT's load calls state_dict(), which unpacks the
    weights in place and lossily, so the adapter would run on another base than the one it was trained on."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    path = str(tmp_path / "adapter")
    lrzoo.wrap(quantized(base_dir, "nf4"), "lora", r=4, init_lora_weights=False).save_pretrained(path)
    model = _looked_at(base_dir)
    if loader == "load_adapter":  # a second adapter into a model stock get_peft_model wrapped after the look
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        with pytest.raises(ValueError, match=REPACK_REFUSAL):
            peft_model.load_adapter(path, adapter_name="second", is_trainable=is_trainable)
        assert list(peft_model.peft_config) == ["default"]
        return
    load = PeftModel.from_pretrained if loader == "PeftModel.from_pretrained" else lrzoo.load
    with pytest.raises(ValueError, match=REPACK_REFUSAL):
        load(model, path, is_trainable=is_trainable)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())  # refused before PEFT touched it
