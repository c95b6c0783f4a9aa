"""Shared fixtures: tiny random models built from configs (no downloads), and helpers to run code
in a fresh Python process (for save→load and stock-PEFT checks that must not see lrzoo)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LRZOO_SHARED_DATA", REPO.parent / "shared" / "data"))


def tiny_llama(seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **overrides)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3, **overrides):
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=40, max_position_embeddings=64, num_labels=num_labels, **overrides)
    return AutoModelForSequenceClassification.from_config(config).eval()


class TinyConvNet(torch.nn.Module):
    """Token ids -> Conv1d -> Conv2d -> Conv3d -> 3-way logits: a config-less model whose adaptable layers
    are N-d convolutions (kernels 3, 3×3, 3×3×3; one strided), for adapters that support conv layers."""

    def __init__(self, vocab: int = 96, channels: int = 6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, channels)
        self.conv1d = torch.nn.Conv1d(channels, 8, 3, padding=1)
        self.conv2d = torch.nn.Conv2d(8, 8, 3, stride=(2, 1), padding=1)
        self.conv3d = torch.nn.Conv3d(8, 5, 3, padding=1, bias=False)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, input_ids, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        h = torch.relu(self.conv1d(self.embed(input_ids).transpose(1, 2)))  # (B, C, L)
        h = torch.relu(self.conv2d(h[..., None]))  # (B, C, L', 1)
        h = self.conv3d(h[..., None])  # (B, C, L', 1, 1)
        logits = self.head(h.flatten(2).mean(-1))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), Path(path) / "model.pt")

    @classmethod
    def from_pretrained(cls, path) -> "TinyConvNet":
        model = cls()
        model.load_state_dict(torch.load(Path(path) / "model.pt"))
        return model


def tiny_conv(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


TINY_MODELS = {"llama": tiny_llama, "bert": tiny_bert, "conv": tiny_conv}


def tiny_inputs(seed: int = 1, batch: int = 2, length: int = 7, vocab: int = 96) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def run_fresh_python(code: str, cwd: Path, timeout: int = 300) -> str:
    """Run ``code`` in a new interpreter (nothing imported); return stdout, fail with its stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"fresh process failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


@pytest.fixture
def fresh_python():
    return run_fresh_python


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        if "shared_data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(pytest.mark.skip(reason=f"{SHARED_DATA} is absent"))
