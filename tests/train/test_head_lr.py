"""``trainer.head_lr``: the task head trains at a rate of its own where the model has one with tensors of its own,
and a head rate that would reach nothing (an output layer tied to the input embeddings, a frozen head, no head) is
refused in one line naming the fix, in every procedure's optimizer and in the recipe; null stays a no-op."""

from __future__ import annotations

import pytest

import lrzoo
from lrzoo.models import load_model
from lrzoo.optimizers import create_optimizer
from lrzoo.train.baselines import prepare_baseline
from lrzoo.train.config import TrainerConfig
from lrzoo.train.procedures import LowRankOptimizerProcedure, procedure_for
from conftest import tiny_bert, tiny_llama
from recipe_helpers import compose, run_dir_of, tiny_run_overrides, write_gsm8k, write_sst2

TIED = r"head_lr=0.02 trains nothing: .*output layer \(lm_head.weight\) is tied to its input embeddings " \
       r"\(tie_word_embeddings\).*trainer.embedding_lr.*trainer.head_lr=null"


def rates(optimizer, model) -> dict[str, float]:
    """parameter name -> the lr of its group (every trainable parameter exactly once)."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [(names[id(p)], group["lr"]) for group in optimizer.param_groups for p in group["params"]]
    assert len(seen) == len({n for n, _ in seen}) and {n for n, _ in seen} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    return dict(seen)


def config(**kw) -> TrainerConfig:
    return TrainerConfig(**{"lr": 3e-3, "weight_decay": 0.1, **kw})


def tied_llama():
    model = prepare_baseline(tiny_llama(tie_word_embeddings=True), "full_finetune")
    assert model.lm_head.weight is model.get_input_embeddings().weight
    return model


def test_a_tied_output_layer_refuses_head_lr_and_names_embedding_lr():
    model = tied_llama()
    for head_lr in (2e-2, 3e-3):   # even one equal to lr: it would rename the run, not change it
        match = TIED.replace("0.02", f"{head_lr:g}")
        with pytest.raises(ValueError, match=match):
            lrzoo.make_optimizer(model, lr=3e-3, head_lr=head_lr)
        with pytest.raises(ValueError, match=match):   # the trainer's call, from the run's config
            procedure_for(model, config(head_lr=head_lr)).make_optimizer(model)
        with pytest.raises(ValueError, match=match):   # adapter=galore's procedure
            LowRankOptimizerProcedure({"method": "galore", "rank": 4}, config(head_lr=head_lr)).make_optimizer(model)
    # the fix it names: embedding_lr reaches the shared matrix; head_lr equal to it says the same and is accepted
    for head_lr in (None, 2e-2):
        got = rates(lrzoo.make_optimizer(model, lr=3e-3, head_lr=head_lr, embedding_lr=2e-2), model)
        assert {n for n, lr in got.items() if lr == 2e-2} == {"model.embed_tokens.weight"}
        optimizer = LowRankOptimizerProcedure({"method": "galore", "rank": 4},
                                              config(head_lr=head_lr, embedding_lr=2e-2)).make_optimizer(model)
        assert [g["lr"] for g in optimizer.param_groups if any(p is model.lm_head.weight for p in g["params"])] == [2e-2]
    # null: a no-op, every tensor at lr
    assert set(rates(lrzoo.make_optimizer(model, lr=3e-3), model).values()) == {3e-3}


def test_a_frozen_head_refuses_head_lr_and_names_modules_to_save():
    for tie in (False, True):   # a causal LM under an adapter: its output layer is frozen
        model = lrzoo.wrap(tiny_llama(tie_word_embeddings=tie), "lora", r=4)
        with pytest.raises(ValueError, match=r"head_lr=0.02 trains nothing: .*output layer \(lm_head\) is frozen\. "
                                             r"Train it .*modules_to_save=\[lm_head\].*trainer.head_lr=null"):
            lrzoo.make_optimizer(model, lr=3e-3, head_lr=2e-2)
        with pytest.raises(ValueError, match=r"\(lm_head\) is frozen"):
            procedure_for(model, config(head_lr=2e-2)).make_optimizer(model)
        assert set(rates(lrzoo.make_optimizer(model, lr=3e-3), model).values()) == {3e-3}
    # the fix it names: the head in modules_to_save trains at head_lr
    model = lrzoo.wrap(tiny_llama(), "lora", r=4, modules_to_save=["lm_head"])
    got = rates(lrzoo.make_optimizer(model, lr=3e-3, head_lr=2e-2), model)
    assert {n for n, lr in got.items() if lr == 2e-2} == {"base_model.model.lm_head.modules_to_save.default.weight"}
    # a baseline's recorded head whose tensors were frozen by hand
    bert = prepare_baseline(tiny_bert(), "full_finetune")
    bert.classifier.requires_grad_(False)
    with pytest.raises(ValueError, match=r"task head/output layer \(classifier.weight\) is frozen.*"
                                         r"modules_to_save=\[classifier\]"):
        lrzoo.make_optimizer(bert, lr=3e-3, head_lr=2e-2)


def test_a_model_without_a_head_refuses_head_lr():
    # a bi-encoder scores a pair by the cosine of two embeddings: nothing outside its backbone
    base, _ = load_model("tiny_bert", "regression", pooling="mean", pair_form="bi_encoder", label_range=(0.0, 5.0))
    for model in (lrzoo.wrap(base, "lora", r=4), prepare_baseline(
            load_model("tiny_bert", "regression", pooling="mean", pair_form="bi_encoder")[0], "full_finetune")):
        with pytest.raises(ValueError, match=r"head_lr=0.02 trains nothing: .* has no task head/output layer.*"
                                             r"trainer.head_lr=null"):
            lrzoo.make_optimizer(model, lr=3e-3, head_lr=2e-2)
        assert set(rates(lrzoo.make_optimizer(model, lr=3e-3), model).values()) == {3e-3}


def test_create_optimizer_refuses_a_head_lr_without_head_params():
    model = prepare_baseline(tiny_llama(), "full_finetune")
    with pytest.raises(ValueError, match="head_lr=0.02 trains nothing: head_params is empty"):
        create_optimizer(model, "galore", 3e-3, head_lr=2e-2, rank=4)
    head = model.lm_head.weight
    optimizer = create_optimizer(model, "galore", 3e-3, head_lr=2e-2, head_params=(id(p) for p in [head]), rank=4)
    assert [g["lr"] for g in optimizer.param_groups if any(p is head for p in g["params"])] == [2e-2]


def test_untied_heads_keep_their_rate_in_every_procedure():
    """The runs head_lr always served (a classifier, an untied output layer, a modules_to_save copy) are unchanged:
    exactly the head's tensors at head_lr, everything else at lr."""
    cases = [(lrzoo.wrap(tiny_bert(), "lora", r=4), {}, "classifier.modules_to_save"),
             (lrzoo.wrap(tiny_bert(), "loraplus", r=4), {}, "classifier.modules_to_save"),
             (lrzoo.wrap(tiny_bert(), "lora_pro", r=4), {}, "classifier.modules_to_save"),
             (prepare_baseline(tiny_bert(), "full_finetune"), {}, "classifier."),
             (prepare_baseline(tiny_llama(), "full_finetune"), {}, "lm_head."),
             (prepare_baseline(tiny_llama(), "full_finetune"), {"method": "galore", "rank": 4}, "lm_head.")]
    for model, kw, head in cases:
        got = rates(lrzoo.make_optimizer(model, lr=3e-3, head_lr=2e-2, **kw), model)
        assert {n for n, lr in got.items() if lr == 2e-2} == {n for n in got if head in n}, (type(model).__name__, kw)
        body = {3e-3, 3e-3 * 16} if model.lrzoo_record.method == "loraplus" else {3e-3}   # LoRA+: lora_B at lr·λ
        assert {lr for n, lr in got.items() if head not in n} == body, (type(model).__name__, kw)


def write_stsb(root):
    """An STS-B look-alike of a few pairs (a bi-encoder run needs two sentences and a score per row)."""
    folder = root / "glue" / "STS-B"
    folder.mkdir(parents=True)
    rows = [("a good film", "a good film", "4.8"), ("a bad day", "the sun is up", "0.4")] * 8
    for split in ("train", "dev"):
        (folder / f"{split}.tsv").write_text("sentence1\tsentence2\tscore\n" + "".join("\t".join(r) + "\n" for r in rows))
    return root


def test_the_recipe_refuses_it_in_one_line_and_ignores_the_presets_on_a_bi_encoder(tmp_path, capsys):
    from lrzoo.cli.train import run_recipe
    from lrzoo.errors import is_user_error

    data = write_gsm8k(tmp_path / "data")
    causal = ["model=tiny_llama", "task=math/gsm8k", f"task.data_dir={data}", f"output_root={tmp_path / 'runs'}",
              "trainer.batch_size=4", "trainer.max_steps=1", "trainer.progress=false", "eval_limit=1",
              "+trainer.generation.max_new_tokens=2", "trainer.head_lr=2e-2"]
    for extra, expected in ((["adapter=lora"], r"\(lm_head\) is frozen"),
                            (["adapter=full_finetune", "+model.config_overrides.tie_word_embeddings=true"], TIED)):
        cfg = compose([*causal, *extra])
        with pytest.raises(ValueError, match=expected) as caught:
            run_recipe(cfg, run_dir_of(cfg))
        assert is_user_error(caught.value) and "\n" not in str(caught.value)

    # the GLUE presets set head_lr for every task; a bi-encoder cell (STS-B, MRPC) has no head: said, then ignored
    pairs = write_stsb(tmp_path / "pairs")
    cfg = compose(["model=tiny_bert", "task=glue/stsb", "adapter=lora", f"task.data_dir={pairs}",
                   f"output_root={tmp_path / 'runs'}", "trainer.batch_size=8", "trainer.max_steps=1",
                   "trainer.progress=false", "logger=none", "model.pooling=mean", "model.similarity_head=bi_encoder",
                   "trainer.head_lr=2e-3"])
    results = run_recipe(cfg, run_dir_of(cfg))
    assert results["config"]["trainer"]["head_lr"] == 2e-3   # still the run's (and its hash's)
    assert "has no task head: trainer.head_lr=0.002 trains nothing and is ignored" in capsys.readouterr().out
    # a classifier head keeps it
    cfg = compose(tiny_run_overrides(write_sst2(tmp_path / "sst2"), tmp_path / "runs", "adapter=lora",
                                     "trainer.max_steps=1", "trainer.head_lr=2e-3", "trainer.save_every=0"))
    run_recipe(cfg, run_dir_of(cfg))
    assert "trains nothing and is ignored" not in capsys.readouterr().out
