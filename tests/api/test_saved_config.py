"""adapter_config.json in one order: PEFT keeps target_modules as a set and writes it in the order of the string
hashes (PYTHONHASHSEED); lrzoo's save hook writes every set-valued field sorted, so one adapter saved by two
processes is the same bytes, and stock PEFT still reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from peft import LoraConfig, PeftConfig

import lrzoo

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SAVE = """
import sys
import torch
import lrzoo
from transformers import AutoModelForCausalLM, LlamaConfig

torch.manual_seed(0)
config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = lrzoo.wrap(AutoModelForCausalLM.from_config(config), "lora", r=2, target_modules={targets!r})
model.save_pretrained(sys.argv[1])
"""


def save_in_a_process(folder: Path, hash_seed: str) -> bytes:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": hash_seed,
           "PYTHONPATH": str(Path(lrzoo.__file__).resolve().parents[1])}  # the lrzoo under test
    subprocess.run([sys.executable, "-c", textwrap.dedent(SAVE.format(targets=TARGETS)), str(folder)], env=env,
                   cwd=folder.parent, check=True, capture_output=True, timeout=300)
    return (folder / "adapter_config.json").read_bytes()


@pytest.mark.slow
def test_one_adapter_saved_under_two_hash_seeds_is_the_same_bytes_and_stock_peft_loads_it(tmp_path, fresh_python):
    # under PEFT alone, seeds 0 and 1 write these seven names in two different orders
    first, second = (save_in_a_process(tmp_path / f"seed{seed}", seed) for seed in ("0", "1"))
    assert first == second
    assert json.loads(first)["target_modules"] == sorted(TARGETS)
    code = f"""
    import sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_config(config), {str(tmp_path / 'seed1')!r})
    assert 'lrzoo' not in sys.modules
    print(sorted(model.peft_config['default'].target_modules))
    """
    assert fresh_python(code, cwd=tmp_path).strip() == str(sorted(TARGETS))


def test_set_fields_are_written_sorted_in_peft_layout(tmp_path):
    config = LoraConfig(r=2, target_modules=TARGETS, exclude_modules=["z_proj", "a_proj", "m_proj"])
    assert isinstance(config.target_modules, set)  # what PEFT writes in hash order
    config.save_pretrained(str(tmp_path))
    text = (tmp_path / "adapter_config.json").read_text()
    written = json.loads(text)
    assert written["target_modules"] == sorted(TARGETS)
    assert written["exclude_modules"] == ["a_proj", "m_proj", "z_proj"]
    assert text == json.dumps(written, indent=2, sort_keys=True)  # PEFT's own layout, only the order changed
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json"]  # the rewrite left no temporary file
    reread = PeftConfig.from_pretrained(str(tmp_path))
    assert reread.target_modules == set(TARGETS) and reread.exclude_modules == {"z_proj", "a_proj", "m_proj"}


def test_the_save_hook_is_installed_by_import_lrzoo_once():
    from peft.config import PeftConfigMixin

    from lrzoo.peft_bridge import install_save_hooks, save_hooks_installed

    assert save_hooks_installed()
    assert install_save_hooks() is False  # a second call wraps nothing
    assert not getattr(PeftConfigMixin.save_pretrained.__wrapped__, "_lrzoo_sorted", False)
