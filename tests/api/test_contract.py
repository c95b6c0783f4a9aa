"""Every shared behaviour, on every registered adapter (rows in adapter_cases.py)."""

from __future__ import annotations

import json
import os
import re
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from filelock import FileLock
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper

import lrzoo
from adapter_cases import CASES, CASES_BY_METHOD
from conftest import REPO, TINY_MODELS, run_fresh_python, tiny_inputs

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


#: a worked example in an adapter page: "(4096×4096, r=16: 131,072)" = (d_out×d_in, r: trainable per matrix).
DOC_EXAMPLE = re.compile(r"\((\d+)×(\d+), r=(\d+): ([\d,]+)\)")


def test_documented_parameter_counts_follow_the_spec_formula():
    """docs/adapters/*.md quote per-matrix counts; they must agree with the rows' formulas (one source)."""
    checked = []
    for method, case in CASES_BY_METHOD.items():
        page = REPO / "docs" / "adapters" / f"{method}.md"
        for d_out, d_in, r, count in DOC_EXAMPLE.findall(page.read_text() if page.is_file() else ""):
            expected = case.param_count(int(d_out), int(d_in), {**case.kwargs, "r": int(r), "kernel_size": ()})
            assert int(count.replace(",", "")) == expected, f"{page.name}: ({d_out}×{d_in}, r={r}: {count})"
            checked.append(method)
    assert len(checked) >= 5, checked  # lora, dora, lora_xs, lora_sb and loldu quote one today


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


# ----------------------------------------------------------------------------- fresh processes
# Loading in a new interpreter proves a checkpoint stands on its own (nothing from the saving process).
# Starting one interpreter per case costs seconds of torch/transformers/peft imports each, so every
# case's artifacts are built first (in-process) and then loaded by two interpreters: one that imports
# lrzoo (lrzoo checkpoints) and one that must never import it (export_lora folders, PEFT-native
# checkpoints, ReLoRA's full model). Each load writes its case's logits, or its own traceback, so the
# per-case tests below still fail on, and name, their case. Everything lives on disk in one directory
# per session: under pytest-xdist the first worker to get there builds and loads, the others reuse it.

#: how a fresh process loads each manifest entry; see _run_loader.
LOADER = """
import importlib, json, sys, traceback
import torch
sys.path.insert(0, {tests_dir!r})
{imports}
from peft import PeftModel
stock = {stock!r}
if stock:
    import conftest  # the conv model's class: it must not pull lrzoo in either
    assert 'lrzoo' not in sys.modules, "importing torch/transformers/peft/conftest imported lrzoo"
culprit = None
for entry in json.load(open({manifest!r})):
    try:
        module_name, class_name = entry["model_class"].split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        if entry["full_model"]:  # the folder is the whole model: the model class alone loads it
            model = cls.from_pretrained(entry["adapter_dir"]).eval()
        else:
            model = PeftModel.from_pretrained(cls.from_pretrained(entry["base_dir"]).eval(), entry["adapter_dir"])
        with torch.no_grad():
            out = model(torch.load(entry["inputs"])).logits
        if stock and culprit is not None:  # an earlier load imported lrzoo: this one cannot be checked
            raise AssertionError(f"lrzoo was imported by an earlier load ({{culprit}}); cannot check this one")
        if stock and 'lrzoo' in sys.modules:
            culprit = entry["out"]
            raise AssertionError("loading this checkpoint imported lrzoo")
        torch.save(out, entry["out"])
        print("loaded", type(model).__name__, entry["out"])
    except Exception:
        with open(entry["out"] + ".error", "w") as handle:
            handle.write(traceback.format_exc())
"""


def _build(case, folder: Path) -> None:
    """Save base, adapter, inputs, expected logits and export_lora's folder and report under ``folder``;
    a step that raises leaves its traceback in ``build.error`` / ``export.error`` instead."""
    try:
        model, expected, _, _ = _save_case(case, folder)
        torch.save(expected, folder / "expected.pt")
    except Exception:  # noqa: BLE001 - reported by this case's tests
        (folder / "build.error").write_text(traceback.format_exc())
        return
    try:
        full_rank = None if case.exact_export else min(min(base_weight(l).shape[:2]) for _, l in adapted_layers(model))
        report = lrzoo.export_lora(model, str(folder / "export"), rank=full_rank)
        (folder / "export_report.json").write_text(json.dumps(report, default=str))
    except Exception:  # noqa: BLE001
        (folder / "export.error").write_text(traceback.format_exc())


def _once(root: Path, name: str, work) -> str:
    """Run ``work() -> str`` once per session, across xdist workers; every caller gets its result."""
    done = root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            done.write_text(work())
    return done.read_text()


def _folder(root: Path, case) -> Path:
    return root / f"{_key(case):02d}_{case.method}"


def _key(case) -> int:
    return next(i for i, c in enumerate(CASES) if c is case)


@pytest.fixture(scope="module")
def fresh_root(tmp_path_factory) -> Path:
    """Every case's artifacts, built once per session (the xdist workers share the session's base temp)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "contract_fresh"
    root.mkdir(exist_ok=True)

    def build_all() -> str:
        for case in CASES:
            folder = _folder(root, case)
            folder.mkdir(exist_ok=True)
            _build(case, folder)
        return ""

    _once(root, "built", build_all)
    return root


def _entry(case, folder: Path, adapter_dir: Path, out: str, full_model: bool = False) -> dict:
    return {"model_class": MODEL_CLASSES[case.model], "base_dir": str(folder / "base"),
            "adapter_dir": str(adapter_dir), "inputs": str(folder / "inputs.pt"), "out": str(folder / out),
            "full_model": full_model}


def _run_loader(root: Path, entries: list[dict], stock: bool) -> str:
    """Run one fresh interpreter over ``entries``; return "" or why the process itself failed."""
    manifest = root / f"manifest_{'stock' if stock else 'lrzoo'}.json"
    manifest.write_text(json.dumps(entries, indent=1))
    imports = "assert 'lrzoo' not in sys.modules" if stock else "import lrzoo"
    code = LOADER.format(tests_dir=str(REPO / "tests"), imports=imports, stock=stock, manifest=str(manifest))
    try:  # stock: run away from the repository, so `lrzoo` is not even on the path by accident
        run_fresh_python(code, cwd=root if stock else REPO, timeout=600)
    except AssertionError as error:
        return str(error)
    return ""


def _built(root: Path, case) -> bool:
    return not (_folder(root, case) / "build.error").exists()


@pytest.fixture(scope="module")
def lrzoo_process(fresh_root) -> str:
    """The interpreter with lrzoo: every lrzoo checkpoint (all rows but ReLoRA's full model)."""
    entries = [_entry(case, _folder(fresh_root, case), _folder(fresh_root, case) / "adapter", "saved.pt")
               for case in CASES if _built(fresh_root, case) and not case.saves_full_model]
    return _once(fresh_root, "lrzoo_process", lambda: _run_loader(fresh_root, entries, stock=False))


@pytest.fixture(scope="module")
def stock_process(fresh_root) -> str:
    """The interpreter without lrzoo: ReLoRA's full model, every export, every PEFT-native checkpoint."""
    entries = []
    for case in CASES:
        folder = _folder(fresh_root, case)
        if not _built(fresh_root, case):
            continue
        if case.saves_full_model:
            entries.append(_entry(case, folder, folder / "adapter", "saved.pt", full_model=True))
        if not (folder / "export.error").exists():
            entries.append(_entry(case, folder, folder / "export", "export.pt"))
        if case.native_peft_format:
            entries.append(_entry(case, folder, folder / "adapter", "native.pt"))
    return _once(fresh_root, "stock_process", lambda: _run_loader(fresh_root, entries, stock=True))


def _artifacts(root: Path, case, *errors: str) -> Path:
    """This case's folder, after failing with the traceback of any build step in ``errors`` that raised."""
    folder = _folder(root, case)
    for name in ("build.error", *errors):
        if (folder / name).exists():
            pytest.fail(f"building this case's artifacts failed:\n{(folder / name).read_text()}", pytrace=False)
    return folder


def _loaded(folder: Path, name: str, process_error: str) -> torch.Tensor:
    """The logits the fresh process wrote for this case, or its failure."""
    error = folder / f"{name}.error"
    if error.exists():
        pytest.fail(f"the fresh process could not load this case:\n{error.read_text()}", pytrace=False)
    if process_error:
        pytest.fail(process_error, pytrace=False)
    assert (folder / name).is_file(), f"the fresh process wrote no {name}"
    return torch.load(folder / name)


def test_save_then_load_in_a_fresh_process(case, fresh_root, request):
    folder = _artifacts(fresh_root, case)
    # lrzoo checkpoints load after `import lrzoo`; ReLoRA's folder is the whole model, loaded with the
    # model class alone in the process that never imports lrzoo.
    process_error = request.getfixturevalue("stock_process" if case.saves_full_model else "lrzoo_process")
    torch.testing.assert_close(_loaded(folder, "saved.pt", process_error), torch.load(folder / "expected.pt"),
                               rtol=1e-5, atol=1e-5)


def test_export_lora_loads_in_stock_peft(case, fresh_root, stock_process):
    folder = _artifacts(fresh_root, case, "export.error")
    report = json.loads((folder / "export_report.json").read_text())
    assert report["max_relative_error"] < 1e-5
    assert json.loads((folder / "export" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    torch.testing.assert_close(_loaded(folder, "export.pt", stock_process), torch.load(folder / "expected.pt"),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("native_case", [c for c in CASES if c.native_peft_format], ids=lambda c: c.method)
def test_native_checkpoint_loads_in_stock_peft(native_case, fresh_root, stock_process):
    """LoRA, LoRA+, DoRA and RandLoRA save PEFT's own format: no export, no lrzoo needed."""
    folder = _artifacts(fresh_root, native_case)
    torch.testing.assert_close(_loaded(folder, "native.pt", stock_process), torch.load(folder / "expected.pt"),
                               rtol=1e-5, atol=1e-5)
