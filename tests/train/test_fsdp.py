"""trainer=fsdp on 2 CPU ranks (torchrun and accelerate launch, gloo): the frozen base is sharded with
FSDP2, and the run ends with the adapter of one process with the same global batch; the saved adapter
reloads onto a fresh base with the trained model's logits; a resumed sharded run ends where an
uninterrupted one does."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lrzoo.cli.train import run_recipe
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_gsm8k, write_sst2
from test_distributed import LAUNCHERS, NO_DROPOUT, launch_log

pytestmark = pytest.mark.slow

# precision "no": the recipe's bf16 autocast rounds differently when the batch is split over ranks
# (test_fsdp_bf16_runs_on_cpu covers it separately).
FSDP = ["trainer=fsdp", "trainer.precision=no", *NO_DROPOUT]
STEPS = 6


def _launch(launcher: str, overrides: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*LAUNCHERS[launcher], "-m", "lrzoo.cli.train", *overrides],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, launch_log(done)
    return done


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _logits(model, rows: list[dict], tokenizer, max_length: int) -> torch.Tensor:
    from lrzoo.train.trainer import collate, encode_rows

    batch = collate(encode_rows(rows, "classification", tokenizer, max_length), tokenizer.pad_token_id)
    with torch.no_grad():
        return model.eval()(**batch).logits


def _reloaded_logits(adapter_dir: Path, cfg, rows: list[dict], max_length: int) -> torch.Tensor:
    """Logits of a fresh base (built as the run built it) with the saved adapter loaded by lrzoo.load."""
    import lrzoo
    from lrzoo.models import load_model
    from lrzoo.train.trainer import seed_everything

    seed_everything(cfg.seed)
    base, tokenizer = load_model(cfg.model.source, "classification", 2,
                                 config_overrides=dict(cfg.model.config_overrides))
    return _logits(lrzoo.load(base, str(adapter_dir)), rows, tokenizer, max_length)


# Each launcher and each adapter once, not their 4 pairs: the launcher only starts the processes and sets the
# process group's environment (test_distributed runs both under DDP), and the sharding does not look at it;
# what differs between the adapters (LoLDU: frozen factors beside the base, a 0-dim trainable σ; LoRA: two
# trainable matrices) does not look at the launcher. The 4 pairs took ~4 min of `make test` under load.
@pytest.mark.parametrize("launcher, adapter", [("torchrun", "lora"), ("accelerate", "loldu")])
def test_fsdp_on_two_cpu_ranks_matches_one_process_and_reloads(tmp_path, monkeypatch, launcher, adapter):
    # 17 dev rows, 4 a batch: rank 0 scores 9 rows in 3 batches, rank 1 8 rows in 2 (plus a discarded one,
    # since every forward gathers weights from both ranks).
    data = write_sst2(tmp_path / "data", dev=17)
    overrides = tiny_run_overrides(data, tmp_path / "two", *FSDP, f"adapter={adapter}", f"trainer.max_steps={STEPS}",
                                   "trainer.eval_batch_size=4")
    _launch(launcher, overrides, tmp_path)

    # One process, same global batch; keep its trained model to compare logits with.
    from lrzoo.train.trainer import Trainer

    trained = []
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: (trained.append(self), fit(self))[1])
    cfg_one = compose(tiny_run_overrides(data, tmp_path / "one", *FSDP, f"adapter={adapter}",
                                         f"trainer.max_steps={STEPS}", "trainer.eval_batch_size=4"))
    single = run_recipe(cfg_one, run_dir_of(cfg_one))

    cfg_two = compose(overrides)
    two_dir = Path(run_dir_of(cfg_two))
    assert sorted(p.name for p in (tmp_path / "two").rglob("results.json")) == ["results.json"]
    distributed = json.loads((two_dir / "results.json").read_text())
    assert (distributed["world_size"], distributed["parallelism"]) == (2, "fsdp")
    assert (single["world_size"], single["parallelism"]) == (1, "none")
    assert distributed["steps"] == single["steps"] == STEPS
    assert distributed["trainable_params"] == single["trainable_params"]
    assert distributed["total_params"] == single["total_params"]  # counted whole, not per shard

    # The adapter file holds whole tensors (not rank 0's shards), equal to one process's up to float order.
    weights_two, weights_one = _adapter(two_dir), _adapter(Path(run_dir_of(cfg_one)))
    assert weights_two.keys() == weights_one.keys()
    for name in weights_one:
        assert weights_two[name].shape == weights_one[name].shape, name
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-4, atol=1e-5, msg=name)
    assert distributed["metrics"] == pytest.approx(single["metrics"])

    # Reloaded on a fresh base: the trained model's logits, and the accuracy the sharded run reported.
    trainer = trained[0]
    _, _, rows = next(iter(trainer.eval_sets.values()))
    expected = _logits(trainer.peft_model, rows, trainer.tokenizer, trainer.config.max_length)
    reloaded = _reloaded_logits(two_dir / "adapter", cfg_two, rows, trainer.config.max_length)
    torch.testing.assert_close(reloaded, expected, rtol=1e-4, atol=1e-5)
    labels = torch.tensor([row["label"] for row in rows])
    assert (reloaded.argmax(-1) == labels).float().mean().item() == pytest.approx(distributed["metrics"]["accuracy"])


def test_fsdp_resume_on_two_ranks_equals_the_uninterrupted_run(tmp_path):
    """stop_after leaves a checkpoint of whole tensors written by rank 0; the same command loads it into a
    freshly sharded model and ends bit for bit where the uninterrupted sharded run ends."""
    data = write_sst2(tmp_path / "data")
    straight = tiny_run_overrides(data, tmp_path / "straight", *FSDP, "adapter=loldu", f"trainer.max_steps={STEPS}",
                                  "trainer.save_every=2")
    _launch("torchrun", straight, tmp_path)

    resumed = tiny_run_overrides(data, tmp_path / "resumed", *FSDP, "adapter=loldu", f"trainer.max_steps={STEPS}",
                                 "trainer.save_every=2")
    _launch("torchrun", [*resumed, "trainer.stop_after=3"], tmp_path)
    run_dir = Path(run_dir_of(compose(resumed)))
    assert not (run_dir / "results.json").exists()
    state = torch.load(run_dir / "checkpoints" / "step-0000003" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and state["step"] == 3
    straight_adapter = _adapter(Path(run_dir_of(compose(straight))))
    assert state["adapter"].keys() == straight_adapter.keys()
    for name, value in state["adapter"].items():  # whole tensors, not rank 0's shards
        assert type(value) is torch.Tensor and value.shape == straight_adapter[name].shape, name
    assert all(type(value) is torch.Tensor for value in state["trainable"].values())
    second = _launch("torchrun", resumed, tmp_path)
    assert "resumed from" in second.stdout

    a, b = straight_adapter, _adapter(run_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    first = json.loads((Path(run_dir_of(compose(straight))) / "results.json").read_text())
    last = json.loads((run_dir / "results.json").read_text())
    assert last["metrics"] == first["metrics"] and last["parallelism"] == "fsdp"


def test_fsdp_bf16_runs_on_cpu(tmp_path):
    """The fsdp recipe's own precision (bf16 autocast) trains on CPU ranks too."""
    data = write_sst2(tmp_path / "data")
    overrides = tiny_run_overrides(data, tmp_path / "bf16", "trainer=fsdp", "adapter=lora", "trainer.max_steps=2")
    _launch("torchrun", overrides, tmp_path)
    results = json.loads((Path(run_dir_of(compose(overrides))) / "results.json").read_text())
    assert (results["parallelism"], results["precision"], results["autocast_dtype"]) == ("fsdp", "bf16", "bfloat16")
    assert results["score"] is not None
    assert all(torch.isfinite(t).all() for t in _adapter(Path(run_dir_of(compose(overrides)))).values())


def test_fsdp_generation_task_matches_ddp(tmp_path):
    """A causal LM under FSDP: the root unit (embeddings, norm, LM head) is gathered around generate,
    ranks that run out of rows or finish decoding keep stepping with the others; the run ends where
    the same run under DDP ends (per-rank token means make both differ from one process)."""
    data = write_gsm8k(tmp_path / "data", test=5)  # 3 rows on rank 0, 2 on rank 1: 2 batches vs 1

    def overrides(root: str, *extra: str) -> list[str]:
        return ["model=tiny_llama", "task=math/gsm8k", f"task.data_dir={data}", f"output_root={tmp_path / root}",
                "logger=csv", "trainer.batch_size=4", "trainer.max_steps=2", "trainer.max_length=160",
                "trainer.progress=false", "trainer.eval_batch_size=2", "+trainer.generation.max_new_tokens=4",
                "adapter=lora", "trainer.precision=no", *extra]

    fsdp, ddp = overrides("fsdp", "trainer=fsdp"), overrides("ddp", "trainer=ddp")
    _launch("torchrun", fsdp, tmp_path)
    _launch("torchrun", ddp, tmp_path)
    sharded = json.loads((Path(run_dir_of(compose(fsdp))) / "results.json").read_text())
    replicated = json.loads((Path(run_dir_of(compose(ddp))) / "results.json").read_text())
    assert (sharded["parallelism"], replicated["parallelism"]) == ("fsdp", "ddp")
    assert sharded["metrics"] == replicated["metrics"]
    a, b = _adapter(Path(run_dir_of(compose(fsdp)))), _adapter(Path(run_dir_of(compose(ddp))))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


SHARDED_LAYOUT = """
import sys
import torch, torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
sys.path.insert(0, sys.argv[1])
from conftest import tiny_bert
import lrzoo
from lrzoo.train.sharding import shard_model
from lrzoo.train.teardown import exit_rank

dist.init_process_group("gloo")
base = tiny_bert()  # the same random base on both ranks (seeded)
torch.manual_seed(dist.get_rank())  # different adapter/head inits: shard_model must broadcast rank 0's
model = lrzoo.wrap(base, sys.argv[2], target_modules=["query", "value"], r=4)
shard_model(model, torch.device("cpu"))
sharded, replicated = 0, 0
for name, p in model.named_parameters():
    if p.requires_grad or p.dim() == 0:
        assert not isinstance(p, DTensor), name
        replicated += 1
    else:
        assert isinstance(p, DTensor) and p.placements == (Shard(0),), name
        assert p.to_local().shape[0] == (p.shape[0] + 1 - dist.get_rank()) // 2, name
        sharded += 1
model.train()
x = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(dist.get_rank()))
model(input_ids=x, labels=torch.tensor([0, 1])).loss.backward()
for name, p in model.named_parameters():
    if p.requires_grad:  # averaged over the ranks: the same everywhere
        for t in (p.detach(), p.grad):
            seen = [torch.empty_like(t) for _ in range(2)]
            dist.all_gather(seen, t.contiguous())
            assert torch.equal(seen[0], seen[1]), name
if dist.get_rank() == 0:
    print("sharded", sharded, "replicated", replicated, flush=True)
dist.barrier()
print("rank", dist.get_rank(), "finished", flush=True)
exit_rank(0)  # as lrzoo-train ends a rank: a gloo group left to interpreter finalization can abort it
"""


@pytest.mark.parametrize("adapter", ["lora", "loldu"])
def test_shard_model_shards_the_frozen_base_and_replicates_the_adapter(tmp_path, adapter):
    script = tmp_path / "layout.py"
    script.write_text(SHARDED_LAYOUT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    tests = Path(__file__).resolve().parents[1]  # tests/, where conftest.py is
    done = subprocess.run([*LAUNCHERS["torchrun"], str(script), str(tests), adapter],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, launch_log(done)
    line = next(line for line in done.stdout.splitlines() if line.startswith("sharded"))
    _, sharded, _, replicated = line.split()
    assert int(sharded) > 0 and int(replicated) > 0, done.stdout


def test_fsdp_refuses_relora():
    from lrzoo.methods.relora import ReLoRAHook
    from lrzoo.train.sharding import check_supported

    with pytest.raises(ValueError, match="ReLoRA"):
        check_supported([object.__new__(ReLoRAHook)])
