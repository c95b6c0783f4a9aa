"""``trainer.embedding_lr``: the input embeddings (``get_input_embeddings()`` of the base model) train at a rate of
their own in every procedure's optimizer, null keeps the groups runs always had (and their hash), and a rate that
cannot apply as given is refused in one line."""

from __future__ import annotations

import pytest
import torch

import lrzoo
from lrzoo.optimizers import create_optimizer
from lrzoo.train.baselines import prepare_baseline
from lrzoo.train.config import TrainerConfig
from lrzoo.train.procedures import LowRankOptimizerProcedure, procedure_for
from conftest import tiny_bert, tiny_inputs, tiny_llama
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_sst2


def rates(optimizer, model, key: str = "lr") -> dict[str, float]:
    """parameter name -> the lr of its group (every trainable parameter once; ``initial_lr``: before a schedule)."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [(names[id(p)], group[key]) for group in optimizer.param_groups for p in group["params"]]
    assert len(seen) == len({n for n, _ in seen}), "a parameter in two groups"
    assert {n for n, _ in seen} == {n for n, p in model.named_parameters() if p.requires_grad}
    return dict(seen)


def groups(optimizer) -> list[tuple]:
    """The param groups as comparable values: their options and the ids of their parameters, in order."""
    return [(tuple(sorted((k, str(v)) for k, v in g.items() if k != "params")), [id(p) for p in g["params"]])
            for g in optimizer.param_groups]


def config(**kw) -> TrainerConfig:
    return TrainerConfig(**{"lr": 3e-3, "weight_decay": 0.1, **kw})


def test_full_finetuning_trains_exactly_the_input_embeddings_at_embedding_lr():
    model = prepare_baseline(tiny_llama(), "full_finetune")
    # the trainer's call: the procedure built from the run's config (trainer.lr, head_lr, embedding_lr)
    optimizer = procedure_for(model, config(head_lr=2e-2, embedding_lr=1e-2)).make_optimizer(model)
    got = rates(optimizer, model)
    assert got.pop("model.embed_tokens.weight") == 1e-2
    assert got.pop("lm_head.weight") == 2e-2
    assert set(got.values()) == {3e-3}   # every block weight and norm at trainer.lr
    # the decay rule is unchanged: ≥2-D tensors decay, the embeddings included
    for group in optimizer.param_groups:
        assert all((p.dim() >= 2) == (group["weight_decay"] == 0.1) for p in group["params"])
    # an encoder's input embeddings are the token embeddings only, not the position ones or the LayerNorm
    bert = prepare_baseline(tiny_bert(), "full_finetune")
    got = rates(lrzoo.make_optimizer(bert, lr=1e-3, embedding_lr=1e-2), bert)
    assert {n for n, lr in got.items() if lr == 1e-2} == {"bert.embeddings.word_embeddings.weight"}


def test_null_keeps_the_groups_runs_had():
    cases = [(prepare_baseline(tiny_llama(), "full_finetune"), {}),
             (prepare_baseline(tiny_bert(), "full_finetune"), {}),
             (lrzoo.wrap(tiny_llama(), "lora", r=4, modules_to_save=["embed_tokens", "lm_head"]), {}),
             (lrzoo.wrap(tiny_bert(), "loraplus", r=4), {}),
             (lrzoo.wrap(tiny_bert(), "lora_pro", r=4), {}),
             (prepare_baseline(tiny_llama(), "full_finetune"), {"method": "galore", "rank": 4})]
    for model, kw in cases:
        for head_lr in (None, 2e-2):
            before = lrzoo.make_optimizer(model, lr=3e-3, weight_decay=0.1, head_lr=head_lr, **kw)
            after = lrzoo.make_optimizer(model, lr=3e-3, weight_decay=0.1, head_lr=head_lr, embedding_lr=None, **kw)
            assert groups(after) == groups(before), (type(model).__name__, kw, head_lr)
        trainer_built = procedure_for(model, config()).make_optimizer(model) if not kw else \
            LowRankOptimizerProcedure(kw, config()).make_optimizer(model)
        assert groups(trainer_built) == groups(lrzoo.make_optimizer(model, lr=3e-3, weight_decay=0.1, **kw))


def test_a_modules_to_save_copy_of_the_embeddings_trains_at_embedding_lr():
    model = lrzoo.wrap(tiny_llama(), "lora", r=4, modules_to_save=["embed_tokens", "lm_head"])
    copy = "base_model.model.model.embed_tokens.modules_to_save.default.weight"
    for method in ("lora", "loraplus", "lora_pro"):  # the plain procedure, LoRA+'s groups, LoRA-Pro's optimizer
        wrapped = lrzoo.wrap(tiny_llama(), method, r=4, modules_to_save=["embed_tokens", "lm_head"])
        got = rates(procedure_for(wrapped, config(embedding_lr=1e-2)).make_optimizer(wrapped), wrapped)
        assert {n for n, lr in got.items() if lr == 1e-2} == {copy}, method
        assert got["base_model.model.lm_head.modules_to_save.default.weight"] == 3e-3, method
    # the copy is also "the head" (modules_to_save): one rate applies, two different ones are refused
    with pytest.raises(ValueError, match=r"head_lr=0.02 and embedding_lr=0.01 both apply to .*embed_tokens"):
        lrzoo.make_optimizer(model, lr=3e-3, head_lr=2e-2, embedding_lr=1e-2)
    got = rates(lrzoo.make_optimizer(model, lr=3e-3, head_lr=1e-2, embedding_lr=1e-2), model)
    assert got[copy] == got["base_model.model.lm_head.modules_to_save.default.weight"] == 1e-2
    assert rates(lrzoo.make_optimizer(model, lr=3e-3, head_lr=2e-2), model)[copy] == 2e-2   # as runs always had


@pytest.mark.parametrize("method", lrzoo.list_optimizers())
def test_low_rank_optimizers_train_the_embeddings_as_a_plain_group_at_embedding_lr(method):
    model = prepare_baseline(tiny_llama(), "full_finetune")
    options = {"rank": 4, **({"proj_group_size": 64} if method == "q_galore" else {})}
    # adapter=<method>'s procedure, built from the run's config
    optimizer = LowRankOptimizerProcedure({"method": method, **options}, config(embedding_lr=1e-2)).make_optimizer(model)
    embedding = model.get_input_embeddings().weight
    (group,) = [g for g in optimizer.param_groups if any(p is embedding for p in g["params"])]
    assert group["lr"] == 1e-2 and "rank" not in group and len(group["params"]) == 1
    assert all(g["lr"] == 3e-3 for g in optimizer.param_groups if g is not group)
    assert any("rank" in g for g in optimizer.param_groups)   # the block weights are still projected
    before = embedding.detach().clone()
    x = tiny_inputs()
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    # Adam's first step moves an entry by about its rate: 1e-2, not trainer.lr's 3e-3
    assert float((embedding.detach() - before).abs().max()) == pytest.approx(1e-2, rel=1e-2)


def test_create_optimizer_finds_the_embeddings_itself_and_refuses_two_rates_on_one_tensor():
    model = prepare_baseline(tiny_llama(), "full_finetune")
    embedding = model.get_input_embeddings().weight
    optimizer = create_optimizer(model, "galore", 3e-3, embedding_lr=1e-2, rank=4)
    assert [g["lr"] for g in optimizer.param_groups if any(p is embedding for p in g["params"])] == [1e-2]
    with pytest.raises(ValueError, match="head_lr=0.02 and embedding_lr=0.01 both apply"):
        create_optimizer(model, "galore", 3e-3, head_lr=2e-2, head_params={id(embedding)}, embedding_lr=1e-2, rank=4)


def test_relora_keeps_the_embeddings_rate_through_its_resets_schedule():
    model = lrzoo.wrap(tiny_llama(), "relora", r=4, relora_steps=2, restart_warmup_steps=1,
                       target_modules=["q_proj", "v_proj"])   # ReLoRA trains every other parameter in full
    procedure = procedure_for(model, config(embedding_lr=1e-2, warmup_ratio=0.0))
    optimizer = procedure.make_optimizer(model)
    got = rates(optimizer, model)
    assert {n for n, lr in got.items() if lr == 1e-2} == {"base_model.model.model.embed_tokens.weight"}
    scheduler = procedure.make_scheduler(optimizer, total_steps=6)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    lora_a = next(n for n in lr_of if "lora_A" in n)
    assert 0 < lr_of[lora_a] < 3e-3   # the jagged cosine moved every group ...
    assert lr_of["base_model.model.model.embed_tokens.weight"] / lr_of[lora_a] == pytest.approx(1e-2 / 3e-3)  # alike


def test_a_tied_output_layer_takes_one_rate_and_two_are_refused():
    model = prepare_baseline(tiny_llama(tie_word_embeddings=True), "full_finetune")
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with pytest.raises(ValueError, match=r"head_lr=0.02 and embedding_lr=0.01 both apply to lm_head.weight.*=null"):
        lrzoo.make_optimizer(model, lr=3e-3, head_lr=2e-2, embedding_lr=1e-2)
    for head_lr in (None, 1e-2):
        got = rates(lrzoo.make_optimizer(model, lr=3e-3, head_lr=head_lr, embedding_lr=1e-2), model)
        assert {n for n, lr in got.items() if lr == 1e-2} == {"model.embed_tokens.weight"}


def test_an_embedding_lr_that_trains_nothing_is_refused():
    frozen = [lrzoo.wrap(tiny_llama(), "lora", r=4), prepare_baseline(tiny_bert(), "head_only")]
    for model in frozen:
        with pytest.raises(ValueError, match=r"embedding_lr=0.01 trains nothing: .*input embeddings frozen.*=null"):
            lrzoo.make_optimizer(model, lr=3e-3, embedding_lr=1e-2)
        lrzoo.make_optimizer(model, lr=3e-3)   # null: as before
    # only the embeddings train, at a rate of their own: trainer.lr would move nothing (an lr grid of one run)
    model = tiny_llama()
    for name, param in model.named_parameters():
        param.requires_grad_(name == "model.embed_tokens.weight")
    with pytest.raises(ValueError, match=r"lr=0.003 trains nothing: every trainable parameter is the input "
                                         r"embeddings.*embedding_lr=None"):
        lrzoo.make_optimizer(model, lr=3e-3, embedding_lr=1e-2)
    assert [g["lr"] for g in lrzoo.make_optimizer(model, lr=1e-2, embedding_lr=1e-2).param_groups] == [1e-2]


@pytest.mark.parametrize("value, shown", [(0, "0"), (-1e-3, "-0.001"), ("high", "'high'"), (float("inf"), "inf")])
def test_a_bad_embedding_lr_is_refused_naming_the_key(value, shown):
    with pytest.raises(ValueError, match=rf"trainer.embedding_lr={shown}: must be a positive finite number .* or "
                                         r"null \(= lr\)"):
        TrainerConfig(embedding_lr=value)
    assert TrainerConfig(embedding_lr=None).embedding_lr is None


def test_null_keeps_every_run_hash_and_a_rate_makes_another_run(tmp_path):
    from omegaconf import open_dict

    from lrzoo.runs.identity import hashed_config, run_hash

    overrides = tiny_run_overrides(write_sst2(tmp_path / "data"), tmp_path / "runs", "adapter=full_finetune")
    cfg = compose(overrides)
    assert cfg.trainer.embedding_lr is None
    before = compose(overrides)
    with open_dict(before):
        del before.trainer["embedding_lr"]   # the config as it was before the key existed
    assert run_hash(cfg) == run_hash(before) and hashed_config(cfg) == hashed_config(before)
    probe = compose([*overrides, "trainer.embedding_lr=1e-2"])
    assert run_hash(probe) != run_hash(cfg) and hashed_config(probe)["trainer"]["embedding_lr"] == 1e-2
    # the pre-training preset leaves it at null; the diagnostic's command line sets it
    assert compose(["experiment=pretrain_cpu", "adapter=full_finetune"]).trainer.embedding_lr is None
    diagnostic = compose(["experiment=pretrain_cpu", "adapter=full_finetune", "trainer.lr=3e-3", "trainer.head_lr=1e-2",
                          "trainer.embedding_lr=1e-2"]).trainer
    assert (diagnostic.lr, diagnostic.head_lr, diagnostic.embedding_lr) == (3e-3, 1e-2, 1e-2)


def test_the_recipe_trains_with_it_and_refuses_it_in_one_line_where_embeddings_are_frozen(tmp_path, monkeypatch):
    from lrzoo.cli.train import run_recipe
    from lrzoo.errors import is_user_error
    from lrzoo.procedure import Procedure

    built = []
    make = Procedure.make_optimizer
    monkeypatch.setattr(Procedure, "make_optimizer", lambda self, model: built.append((make(self, model), model))
                        or built[-1][0])
    data = write_sst2(tmp_path / "data")
    cfg = compose(tiny_run_overrides(data, tmp_path / "runs", "adapter=full_finetune", "trainer.max_steps=1",
                                     "trainer.embedding_lr=2e-2", "trainer.save_every=0"))
    results = run_recipe(cfg, run_dir_of(cfg))
    assert results["config"]["trainer"]["embedding_lr"] == 2e-2
    (optimizer, model), = built
    got = rates(optimizer, model, "initial_lr")   # the run's schedule has moved "lr" since
    assert {n for n, lr in got.items() if lr == 2e-2} == {"bert.embeddings.word_embeddings.weight"}
    assert set(got.values()) == {2e-2, 5e-3}

    cfg = compose(tiny_run_overrides(data, tmp_path / "runs", "adapter=lora", "trainer.embedding_lr=2e-2"))
    with pytest.raises(ValueError, match="embedding_lr=0.02 trains nothing") as caught:
        run_recipe(cfg, run_dir_of(cfg))
    assert is_user_error(caught.value) and "\n" not in str(caught.value)
