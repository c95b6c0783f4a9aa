"""Helpers for the trainer/CLI tests: compose lrzoo-train configs in-process and write tiny data sets
in the ../shared/data layout (hand-written, so the tests need no network and no shared data)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from omegaconf import DictConfig

from lrzoo.configs import config_dir

POSITIVE = ["good", "great", "fine", "nice", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "dull", "nasty", "weak"]
#: the packaged adapter files and experiment presets (the CLI, config-key and run-data tests parametrize on them)
ADAPTER_FILES = sorted(p.stem for p in config_dir("adapters").glob("*.yaml"))
EXPERIMENTS = sorted(str(p.relative_to(config_dir("recipes") / "experiment").with_suffix(""))
                     for p in (config_dir("recipes") / "experiment").rglob("*.yaml"))


def compose(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """The config ``lrzoo-train <overrides>`` would run (without starting a Hydra job)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lrzoo.compose import register_adapter_configs

    register_adapter_configs()
    with initialize_config_dir(config_dir=str(config_dir("recipes")), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=return_hydra_config)


def write_sst2(root: Path, train: int = 64, dev: int = 16, seed: int = 0) -> Path:
    """A separable SST-2 look-alike: sentences of positive words are label 1, negative words 0."""
    rng = random.Random(seed)
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("dev", dev)):
        lines = ["sentence\tlabel"]
        for _ in range(count):
            label = rng.randint(0, 1)
            words = POSITIVE if label else NEGATIVE
            lines.append(" ".join(rng.choice(words) for _ in range(3)) + f"\t{label}")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def write_gsm8k(root: Path, train: int = 16, test: int = 4) -> Path:
    """GSM8K-format problems ``a + b`` with the gold after ``#### ``."""
    folder = root / "gsm8k"
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        rows = [{"question": f"What is {a} + {a + 1}?", "answer": f"{a} + {a + 1} = {2 * a + 1}\n#### {2 * a + 1}"}
                for a in range(count)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tiny_run_overrides(data_dir: Path, output_root: Path, *extra: str) -> list[str]:
    """A seconds-long tiny_bert run on :func:`write_sst2` data."""
    return [
        "model=tiny_bert", f"task.data_dir={data_dir}", f"output_root={output_root}", "logger=csv",
        "trainer.batch_size=8", "trainer.max_steps=8", "trainer.lr=5e-3", "trainer.progress=false",
        "trainer.eval_batch_size=16", "trainer.log_every=2", *extra,
    ]


def run_dir_of(cfg: DictConfig) -> str:
    return str(Path(cfg.output_root) / cfg.run_name)
