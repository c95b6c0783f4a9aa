"""Issue 14 item 5: ``lrzoo-train model.quantization=nf4|fp4|int8`` (a bitsandbytes base, on CPU here).

The tiny Llama is widened to 128 (``model.config_overrides``): bitsandbytes' 4-bit CPU inference kernel
needs layers at least 64 wide. The run's model is caught from the trainer so that the saved adapter,
reloaded onto a freshly quantized base, can be compared with what was trained.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import lrzoo
from lrzoo.cli.train import run_recipe
from lrzoo.runs.identity import config_hash
from lrzoo.models import load_model
from lrzoo.targets import quantization_of
from lrzoo.train.trainer import Trainer
from recipe_helpers import compose, run_dir_of, write_gsm8k, write_sst2

bnb = pytest.importorskip("bitsandbytes")
WIDE = {"hidden_size": 128, "intermediate_size": 256}
WIDE_OVERRIDES = ("+model.config_overrides.hidden_size=128", "+model.config_overrides.intermediate_size=256")


def _gsm8k_overrides(tmp_path: Path, *extra: str) -> list[str]:
    data = write_gsm8k(tmp_path / "data", train=8, test=2)
    return ["model=tiny_llama", *WIDE_OVERRIDES, "task=math/gsm8k", f"task.data_dir={data}",
            f"output_root={tmp_path / 'runs'}", "trainer.batch_size=4", "trainer.max_steps=3", "trainer.lr=1e-2",
            "trainer.progress=false", "trainer.max_length=160", "trainer.log_every=1", "eval_limit=2",
            "+trainer.generation.max_new_tokens=2", *extra]


def _bnb_layers(model):
    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


@pytest.fixture
def trained_models(monkeypatch):
    """The PeftModel of every trainer run in this test, as it was when ``fit`` returned."""
    caught = []
    fit = Trainer.fit

    def catching_fit(self):
        results = fit(self)
        caught.append(self.peft_model)
        return results

    monkeypatch.setattr(Trainer, "fit", catching_fit)
    return caught


@pytest.mark.parametrize("adapter,quantization,precision,compute_dtype", [
    ("lora_xs", "nf4", "no", torch.float32),     # lrzoo-native: SVD of the dequantized W, fingerprint checked
    ("lora", "nf4", "bf16", torch.bfloat16),     # PEFT's own QLoRA layer; compute dtype follows the precision
    ("loldu", "int8", "no", None),               # LLM.int8 has no compute dtype
])
def test_a_recipe_trains_on_a_quantized_base_and_its_adapter_reloads(adapter, quantization, precision, compute_dtype,
                                                                     tmp_path, trained_models):
    cfg = compose(_gsm8k_overrides(tmp_path, f"adapter={adapter}", f"model.quantization={quantization}",
                                   f"trainer.precision={precision}"))
    results = run_recipe(cfg, run_dir_of(cfg))
    run_dir = Path(run_dir_of(cfg))

    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["steps"] == 3 and saved["adapter"] == adapter
    assert saved["precision"] == precision and saved["autocast_dtype"] == (None if precision == "no" else "bfloat16")
    assert saved["config"]["model"]["quantization"] == quantization == results["config"]["model"]["quantization"]
    with open(run_dir / "metrics.csv") as handle:
        losses = [float(line.split(",")[2]) for line in handle if ",train/loss," in line]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))

    (trained,) = trained_models
    quantized_layers = _bnb_layers(trained)
    assert quantized_layers and all(quantization_of(m) == quantization for m in quantized_layers)
    if compute_dtype is not None:
        assert {m.compute_dtype for m in quantized_layers} == {compute_dtype}
    assert all(not p.requires_grad for m in quantized_layers for p in m.parameters())

    # The same seed builds the same random model; quantized afresh, the saved adapter gives the trained outputs.
    torch.manual_seed(cfg.seed)
    base, _ = load_model("tiny_llama", "generation", config_overrides=WIDE, quantization=quantization,
                         compute_dtype=precision)
    loaded = lrzoo.load(base, str(run_dir / "adapter")).eval()
    assert len(_bnb_layers(loaded)) == len(quantized_layers)
    assert all(quantization_of(m) == quantization for m in _bnb_layers(loaded))
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    # under the run's precision (accelerate left the trained model's forward autocasting to bf16)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.no_grad(), autocast:
        expected = trained.eval()(x).logits.float()
        torch.testing.assert_close(loaded(x).logits.float(), expected, rtol=1e-5, atol=1e-5)
        with trained.disable_adapter():
            assert (trained(x).logits - expected).abs().max() > 1e-4  # training moved the adapter off its no-op init


def test_quantization_is_part_of_the_run_directory():
    plain = compose(["model=tiny_llama"])
    assert plain.model.quantization == "none"
    assert config_hash(compose(["model=tiny_llama", "model.quantization=nf4"])) != config_hash(plain)
    assert run_dir_of(compose(["model=tiny_llama", "model.quantization=nf4"])) != run_dir_of(plain)


def test_without_bitsandbytes_the_run_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    loaded = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: loaded.append(a))
    cfg = compose(_gsm8k_overrides(tmp_path, "adapter=lora", "model.quantization=nf4"))
    with pytest.raises(ImportError, match=r"pip install 'lrzoo\[quant\]'"):
        run_recipe(cfg, run_dir_of(cfg))
    assert not loaded
    with pytest.raises(ImportError, match=r"lrzoo\[quant\]"):
        load_model("tiny_llama", "generation", config_overrides=WIDE, quantization="int8")
    load_model("tiny_llama", "generation", quantization="none")  # no quantization: bitsandbytes is not needed


def test_unknown_quantizations_and_narrow_4bit_layers_are_refused():
    with pytest.raises(ValueError, match=r"model.quantization must be one of \['none', 'nf4', 'fp4', 'int8'\]"):
        load_model("tiny_llama", "generation", quantization="int4")
    with pytest.raises(ValueError, match=r"at least 64 inputs wide.*\+model.config_overrides.hidden_size=128"):
        load_model("tiny_llama", "generation", quantization="nf4")  # width 32


def test_a_classification_head_stays_in_full_precision(tmp_path):
    model, _ = load_model("tiny_bert", "classification", 2, config_overrides=WIDE, quantization="fp4")
    assert quantization_of(model.bert.encoder.layer[0].attention.self.query) == "fp4"
    assert quantization_of(model.classifier) is None and model.classifier.weight.dtype == torch.float32
    peft_model = lrzoo.wrap(model, "lora", r=4)
    assert any("classifier" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    # and through lrzoo-train, on SST-2
    data = write_sst2(tmp_path / "data", train=16, dev=8)
    cfg = compose(["model=tiny_bert", *WIDE_OVERRIDES, "model.quantization=fp4", "adapter=lora_xs",
                   f"task.data_dir={data}", f"output_root={tmp_path / 'runs'}", "trainer.batch_size=8",
                   "trainer.max_steps=2", "trainer.progress=false", "trainer.eval_batch_size=8"])
    results = run_recipe(cfg, run_dir_of(cfg))
    assert results["steps"] == 2 and results["config"]["model"]["quantization"] == "fp4"


def test_full_weight_methods_refuse_a_quantized_base_with_the_alternative():
    """full_finetune, and GaLore/Fira (which the CLI prepares the same way), train every weight."""
    from lrzoo.train.baselines import prepare_baseline

    model = _quantized_tiny_llama_for_refusal()
    with pytest.raises(ValueError, match="full-precision model.*model.quantization=none"):
        prepare_baseline(model, "full_finetune")


def _quantized_tiny_llama_for_refusal():
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with tempfile.TemporaryDirectory() as folder:
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
