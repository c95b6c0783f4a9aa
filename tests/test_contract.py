"""Every shared behaviour, on every registered adapter (rows in adapter_cases.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper

import lrzoo
from adapter_cases import CASES, CASES_BY_METHOD
from conftest import REPO, TINY_MODELS, tiny_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

#: how a fresh process re-creates each tiny model from its save_pretrained folder: "module:Class".
MODEL_CLASSES = {"llama": "transformers:AutoModelForCausalLM", "bert": "transformers:AutoModelForSequenceClassification",
                 "conv": "conftest:TinyConvNet"}


@pytest.fixture(params=CASES, ids=lambda case: case.method)
def case(request):
    return request.param


def wrapped(case, random_init: bool = False, seed: int = 0):
    model = TINY_MODELS[case.model](seed)
    kwargs = {**case.kwargs, **(case.random_init if random_init else {})}
    return lrzoo.wrap(model, case.method, **kwargs)


def adapted_layers(peft_model):
    heads = [n for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    return [
        (name, module)
        for name, module in peft_model.named_modules()
        if isinstance(module, BaseTunerLayer) and not any(name.startswith(h + ".") for h in heads)
    ]


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def base_weight(layer):
    weight = layer.get_base_layer().weight
    return weight.T if getattr(layer, "fan_in_fan_out", False) else weight


def is_conv(layer) -> bool:
    return isinstance(layer.get_base_layer(), torch.nn.modules.conv._ConvNd)


def layer_input(layer, batch: int, generator=None) -> torch.Tensor:
    """A random input for one adapted layer: ``(batch, 5, d_in)``, or ``(batch, C_in, 5, …)`` for a conv."""
    weight = base_weight(layer)
    shape = (batch, weight.shape[1], *[5] * (weight.dim() - 2)) if is_conv(layer) else (batch, 5, weight.shape[1])
    return torch.randn(*shape, generator=generator)


def reference_forward(layer, x, weight):
    """The base layer's own op with ``weight`` in place of its weight (linear or conv)."""
    base = layer.get_base_layer()
    return base._conv_forward(x, weight, base.bias) if is_conv(layer) else F.linear(x, weight, base.bias)


def test_every_adapter_has_a_contract_row():
    assert set(lrzoo.list_adapters()) <= set(CASES_BY_METHOD), (
        f"registered adapters without a row in tests/adapter_cases.py: "
        f"{sorted(set(lrzoo.list_adapters()) - set(CASES_BY_METHOD))}"
    )


def test_wrap_returns_a_peft_model(case):
    from peft import PeftModel

    model = wrapped(case)
    assert isinstance(model, PeftModel)
    assert adapted_layers(model), "no layer was adapted"


def test_init_matches_the_paper(case):
    model = wrapped(case)
    x = tiny_inputs()
    out = logits(model, x)
    with model.disable_adapter():
        base = logits(model, x)
    if case.zero_init:
        torch.testing.assert_close(out, base, rtol=0, atol=case.init_atol)
    else:
        assert (out - base).abs().max() > 1e-4, "this method's init should change the model"


def test_forward_matches_materialised_delta(case):
    model = wrapped(case, random_init=True)
    generator = torch.Generator().manual_seed(3)
    for name, layer in adapted_layers(model):
        weight = base_weight(layer)
        x = layer_input(layer, 3, generator)
        with torch.no_grad():
            expected = reference_forward(layer, x, weight + case.reference_delta(layer, "default"))
            actual = layer(x)
        assert actual.abs().max() > 0  # not trivially zero
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=f"layer {name}")


def test_gradients_match_materialised_delta(case):
    model = wrapped(case, random_init=True)
    model.train()
    for module in model.modules():  # compare deterministic paths: dropout off
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    name, layer = adapted_layers(model)[0]
    weight = base_weight(layer)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert trainable, f"{name} has no trainable tensors"
    x = layer_input(layer, 4).requires_grad_(True)
    out = layer(x)
    grad_out = torch.randn_like(out)

    grads = torch.autograd.grad((out * grad_out).sum(), [x, *trainable])
    reference = reference_forward(layer, x, weight + case.reference_delta(layer, "default"))
    expected = torch.autograd.grad((reference * grad_out).sum(), [x, *trainable])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_merge_then_unmerge_restores_the_base_weights(case):
    model = wrapped(case, random_init=True)
    x = tiny_inputs()
    before = {name: base_weight(layer).detach().clone() for name, layer in adapted_layers(model)}
    unmerged = logits(model, x)
    model.merge_adapter()
    merged = logits(model, x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    for name, layer in adapted_layers(model):
        torch.testing.assert_close(base_weight(layer), before[name], rtol=0, atol=1e-5)


def test_merge_and_unload_gives_the_adapted_model(case):
    model = wrapped(case, random_init=True)
    x = tiny_inputs()
    expected = logits(model, x)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, x), expected, rtol=1e-4, atol=1e-5)


def test_trainable_parameter_count_matches_the_spec(case):
    model = wrapped(case)
    expected = 0
    for _, layer in adapted_layers(model):
        d_out, d_in, *kernel = base_weight(layer).shape
        expected += case.param_count(d_out, d_in, {**case.kwargs, "kernel_size": tuple(kernel)})
    heads = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    expected += sum(p.numel() for head in heads for p in head.modules_to_save["default"].parameters())
    if case.extra_trainable is not None:
        expected += case.extra_trainable(model)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected


def test_bfloat16_forward_tracks_float32(case):
    model = wrapped(case, random_init=True)
    x = tiny_inputs()
    reference = logits(model, x)
    low = logits(model.to(torch.bfloat16), x).float()
    assert torch.isfinite(low).all()
    assert (low - reference).abs().max() < 0.1 * reference.abs().max() + 0.05


def test_short_training_run_lowers_the_loss(case):
    model = wrapped(case)
    model.train()
    x = tiny_inputs(batch=4, length=8)
    labels = x if case.model == "llama" else torch.tensor([0, 1, 2, 1])
    optimizer = lrzoo.make_optimizer(model, lr=case.train_lr)
    losses = []
    for _ in range(12):
        loss = model(x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


def _save_case(case, tmp_path, perturb_head: bool = True):
    """Save base + (randomly initialised) adapter; return the model, its inputs and outputs."""
    model = wrapped(case, random_init=True)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    TINY_MODELS[case.model](0).save_pretrained(base_dir)  # an untouched copy of the base
    if perturb_head:  # a trained head must travel with the adapter
        for module in model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                with torch.no_grad():
                    for p in module.modules_to_save["default"].parameters():
                        p.add_(0.5)
    model.save_pretrained(adapter_dir)
    x = tiny_inputs()
    torch.save(x, tmp_path / "inputs.pt")
    return model, logits(model.eval(), x), base_dir, adapter_dir


LOAD_SNIPPET = """
import importlib, sys, torch
sys.path.insert(0, {tests_dir!r})
{imports}
from peft import PeftModel
module_name, class_name = {model_class!r}.split(":")
base = getattr(importlib.import_module(module_name), class_name).from_pretrained({base_dir!r}).eval()
model = {load}
x = torch.load({inputs!r})
with torch.no_grad():
    torch.save(model(x).logits, {out!r})
print(type(model).__name__)
"""


def test_save_then_load_in_a_fresh_process(case, tmp_path, fresh_python):
    _, expected, base_dir, adapter_dir = _save_case(case, tmp_path)
    imports, load = "import lrzoo", f"PeftModel.from_pretrained(base, {str(adapter_dir)!r})"
    if case.saves_full_model:  # the folder is the whole model: the model class alone loads it, no lrzoo
        imports = "import sys; assert 'lrzoo' not in sys.modules"
        load = f"getattr(importlib.import_module(module_name), class_name).from_pretrained({str(adapter_dir)!r}).eval()"
    code = LOAD_SNIPPET.format(imports=imports, model_class=MODEL_CLASSES[case.model],
                               tests_dir=str(REPO / "tests"),
                               base_dir=str(base_dir), load=load,
                               inputs=str(tmp_path / "inputs.pt"), out=str(tmp_path / "out.pt"))
    if case.saves_full_model:
        code += "assert 'lrzoo' not in sys.modules\n"
    fresh_python(code, cwd=REPO)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-5, atol=1e-5)


def test_export_lora_loads_in_stock_peft(case, tmp_path, fresh_python):
    model, expected, base_dir, _ = _save_case(case, tmp_path)
    full_rank = None if case.exact_export else min(min(base_weight(l).shape[:2]) for _, l in adapted_layers(model))
    report = lrzoo.export_lora(model, str(tmp_path / "export"), rank=full_rank)
    assert report["max_relative_error"] < 1e-5
    assert json.loads((tmp_path / "export" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    code = LOAD_SNIPPET.format(imports="import sys; assert 'lrzoo' not in sys.modules",
                               model_class=MODEL_CLASSES[case.model], tests_dir=str(REPO / "tests"),
                               base_dir=str(base_dir),
                               load=f"PeftModel.from_pretrained(base, {str(tmp_path / 'export')!r})",
                               inputs=str(tmp_path / "inputs.pt"), out=str(tmp_path / "out.pt"))
    code += "import sys; assert 'lrzoo' not in sys.modules\n"
    fresh_python(code, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("native_case", [c for c in CASES if c.native_peft_format], ids=lambda c: c.method)
def test_native_checkpoint_loads_in_stock_peft(native_case, tmp_path, fresh_python):
    """LoRA, LoRA+, DoRA and RandLoRA save PEFT's own format: no export, no lrzoo needed."""
    _, expected, base_dir, adapter_dir = _save_case(native_case, tmp_path)
    code = LOAD_SNIPPET.format(imports="import sys; assert 'lrzoo' not in sys.modules",
                               model_class=MODEL_CLASSES[native_case.model], tests_dir=str(REPO / "tests"),
                               base_dir=str(base_dir), load=f"PeftModel.from_pretrained(base, {str(adapter_dir)!r})",
                               inputs=str(tmp_path / "inputs.pt"), out=str(tmp_path / "out.pt"))
    code += "import sys; assert 'lrzoo' not in sys.modules\n"
    fresh_python(code, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-5, atol=1e-5)
