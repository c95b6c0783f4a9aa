"""Precision is real (issue 12 item 7): bf16 trains under autocast for every adapter family through the
trainer, fp16 on a CPU and unknown values are refused, and results.json says what was used."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lrzoo.cli.train import run_recipe
from lrzoo.train import trainer as trainer_module
from lrzoo.train.precision import check_precision
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_sst2

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAMILIES = {
    "lora": [], "dora": [], "lora_xs": [], "randlora": [], "tera": [], "loldu": [], "flora": [],
    # a merge-and-reinit inside the 3 steps, under autocast too
    "relora": ["adapter.relora_steps=2", "adapter.restart_warmup_steps=1"],
}


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory):
    return write_sst2(tmp_path_factory.mktemp("data"))


def _record_autocast(monkeypatch) -> list[tuple[bool, torch.dtype]]:
    """(autocast enabled, its dtype) seen by every adapted layer's training forward."""
    seen: list[tuple[bool, torch.dtype]] = []
    original_fit = trainer_module.Trainer.fit

    def fit(self):
        def hook(module, args):
            if module.training:
                seen.append((torch.is_autocast_enabled(DEVICE), torch.get_autocast_dtype(DEVICE)))

        handles = [m.register_forward_pre_hook(hook) for name, m in self.peft_model.named_modules()
                   if name.endswith((".query", ".value"))]
        assert handles
        try:
            return original_fit(self)
        finally:
            for handle in handles:
                handle.remove()

    monkeypatch.setattr(trainer_module.Trainer, "fit", fit)
    return seen


@pytest.mark.parametrize("adapter", sorted(FAMILIES))
def test_bf16_trains_under_autocast_for_every_adapter_family(adapter, sst2_dir, tmp_path, monkeypatch):
    seen = _record_autocast(monkeypatch)
    cfg = compose(tiny_run_overrides(sst2_dir, tmp_path / "runs", f"adapter={adapter}", "adapter.r=4",
                                     *FAMILIES[adapter], "trainer.precision=bf16", "trainer.max_steps=3",
                                     "trainer.log_every=1"))
    results = run_recipe(cfg, run_dir_of(cfg))  # a non-finite loss would stop it (trainer.on_nonfinite=stop)
    assert results["precision"] == "bf16" and results["autocast_dtype"] == "bfloat16"
    assert seen and all(enabled and dtype == torch.bfloat16 for enabled, dtype in seen), seen[:4]
    saved = json.loads((Path(run_dir_of(cfg)) / "results.json").read_text())
    assert saved["precision"] == "bf16" and math.isfinite(saved["score"])


def test_no_after_bf16_in_one_process_runs_float32_and_says_so(sst2_dir, tmp_path, monkeypatch):
    for precision, dtype in (("bf16", "bfloat16"), ("no", None)):
        seen = _record_autocast(monkeypatch)
        cfg = compose(tiny_run_overrides(sst2_dir, tmp_path / precision, f"trainer.precision={precision}",
                                         "trainer.max_steps=2"))
        results = run_recipe(cfg, run_dir_of(cfg))
        assert (results["precision"], results["autocast_dtype"]) == (precision, dtype)
        assert all(enabled == (dtype is not None) for enabled, _ in seen)


@pytest.fixture
def no_model(monkeypatch):
    import lrzoo.models

    monkeypatch.setattr(lrzoo.models, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on CPU-only machines")
def test_fp16_on_a_cpu_is_refused_with_the_reason(sst2_dir, tmp_path, no_model):
    cfg = compose(tiny_run_overrides(sst2_dir, tmp_path / "runs", "trainer.precision=fp16"))
    with pytest.raises(ValueError, match="(?s)fp16 needs a CUDA GPU.*float32.*trainer.precision=bf16"):
        run_recipe(cfg, run_dir_of(cfg))


@pytest.mark.parametrize("value, message", [
    ("fp8", "got 'fp8'"), ("fp32", "got 'fp32' \\(float32 is 'no'\\)"), ("true", "got True"),
])
def test_unknown_precision_is_refused(value, message, sst2_dir, tmp_path, no_model):
    cfg = compose(tiny_run_overrides(sst2_dir, tmp_path / "runs", f"trainer.precision={value}"))
    with pytest.raises(ValueError, match=f"trainer.precision must be one of \\['no', 'bf16', 'fp16'\\], {message}"):
        run_recipe(cfg, run_dir_of(cfg))


def test_yaml_no_and_case_are_normalised():
    assert check_precision(False) == "no" and check_precision("BF16") == "bf16"
    assert check_precision("fp16", cuda=True) == "fp16"


@pytest.mark.gpu
@pytest.mark.parametrize("precision, dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_cuda_mixed_precision_through_the_trainer(precision, dtype, sst2_dir, tmp_path, monkeypatch):
    seen = _record_autocast(monkeypatch)
    cfg = compose(tiny_run_overrides(sst2_dir, tmp_path / "runs", "adapter=dora", "adapter.r=4",
                                     f"trainer.precision={precision}", "trainer.max_steps=3"))
    results = run_recipe(cfg, run_dir_of(cfg))
    assert (results["precision"], results["autocast_dtype"]) == (precision, dtype)
    assert seen and all(enabled and str(d) == f"torch.{dtype}" for enabled, d in seen)
