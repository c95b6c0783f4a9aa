"""lrzoo.heads: encoder heads pool the way the checkpoint was trained (model.pooling), sentence-pair similarity can
be a bi-encoder (model.similarity_head), and both work through wrap, the trainer and a saved adapter."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, BertForSequenceClassification

import lrzoo
from lrzoo.heads import (HEAD_FILE, PooledForSequenceClassification, best_threshold, checkpoint_pooling, head_spec,
                         pair_form_for)
from lrzoo.models import load_model
from lrzoo.tasks import get_task
from lrzoo.train.data import collate, encode_rows

from conftest import tiny_bert, tiny_llama
from recipe_helpers import compose, run_dir_of

WORDS = ["cat", "dog", "sun", "car", "tree", "red", "blue", "run", "sit", "big"]


def sentence_transformers_checkpoint(root: Path, **pooling_flags: bool) -> Path:
    """A tiny BERT saved the way sentence-transformers lays a model out: the transformer at the top, a
    ``modules.json`` naming a Pooling module, and its ``1_Pooling/config.json``."""
    model, tokenizer = load_model("tiny_bert", "classification", 2, pooling="pooler")
    model.bert.save_pretrained(root)
    tokenizer.save_pretrained(root)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir()
    flags = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
             **pooling_flags}
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    return root


def reference_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked mean written out row by row: the average of the vectors of the real (unpadded) tokens."""
    rows = []
    for h, m in zip(hidden, mask):
        kept = [h[i] for i in range(len(m)) if m[i] == 1]
        rows.append(sum(kept) / len(kept))
    return torch.stack(rows)


def test_a_sentence_transformers_checkpoint_defaults_to_its_mean_pooling(tmp_path):
    path = sentence_transformers_checkpoint(tmp_path / "st", pooling_mode_mean_tokens=True)
    assert checkpoint_pooling(path) == "mean"
    model, tokenizer = load_model(str(path), "classification", 2)
    assert isinstance(model, PooledForSequenceClassification) and model.pooling == "mean"
    model.eval()
    batch = tokenizer(["a b c d e f", "ab"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # the second row is padded
    backbone = AutoModel.from_pretrained(str(path)).eval()  # the checkpoint read independently of lrzoo.heads
    with torch.no_grad():
        hidden = backbone(**batch).last_hidden_state
        pooled = model.embed(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        logits = model(**batch).logits
    torch.testing.assert_close(pooled, reference_mean(hidden, batch["attention_mask"]))
    torch.testing.assert_close(logits, pooled @ model.classifier.weight.T + model.classifier.bias)


def test_cls_and_pooler_are_selectable_and_a_plain_checkpoint_keeps_its_own_head(tmp_path):
    path = sentence_transformers_checkpoint(tmp_path / "st", pooling_mode_mean_tokens=True)
    cls, tokenizer = load_model(str(path), "classification", 2, pooling="cls")
    cls.eval()
    batch = tokenizer(["a b c", "d"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(str(path)).eval()(**batch).last_hidden_state
        torch.testing.assert_close(cls.embed(**batch), hidden[:, 0])
    pooler, _ = load_model(str(path), "classification", 2, pooling="pooler")
    assert type(pooler) is BertForSequenceClassification  # transformers' own head, unchanged
    # a checkpoint that declares no pooling (not a sentence-transformers one) keeps transformers' head
    plain = tmp_path / "plain"
    load_model("tiny_bert", "classification", 2)[0].save_pretrained(plain)
    load_model("tiny_bert", "classification", 2)[1].save_pretrained(plain)
    assert checkpoint_pooling(plain) is None
    assert type(load_model(str(plain), "classification", 2)[0]) is BertForSequenceClassification
    # a pooling lrzoo does not implement is refused, not replaced
    maxed = sentence_transformers_checkpoint(tmp_path / "max", pooling_mode_max_tokens=True)
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        load_model(str(maxed), "classification", 2)
    with pytest.raises(ValueError, match="model.pooling='max'"):
        load_model("tiny_bert", "classification", 2, pooling="max")


def test_bi_encoder_scores_the_cosine_of_two_mean_pooled_sentences():
    model, tokenizer = load_model("tiny_bert", "regression", pooling="mean", pair_form="bi_encoder",
                                  label_range=(0.0, 5.0))
    model.eval()
    rows = [{"text_a": "a cat sat", "text_b": "the cat", "label": 4.0},
            {"text_a": "x", "text_b": "a long sentence here", "label": 1.0}]
    batch = collate(encode_rows(rows, "regression", tokenizer, 64, pairs="separate"), tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
        backbone = model.bert
        expected = []
        for row in rows:  # each sentence alone, unpadded: its mean vector, then cos = u.v / (|u| |v|)
            u = backbone(**tokenizer(row["text_a"], return_tensors="pt")).last_hidden_state[0].mean(0)
            v = backbone(**tokenizer(row["text_b"], return_tensors="pt")).last_hidden_state[0].mean(0)
            expected.append(float(u @ v / (u.norm() * v.norm())))
    expected = torch.tensor(expected)
    torch.testing.assert_close(out.similarity, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits.squeeze(-1), 5.0 * expected, rtol=1e-5, atol=1e-5)
    # sentence-transformers' CosineSimilarityLoss: MSE between the cosine and the label scaled to [0, 1]
    torch.testing.assert_close(out.loss, ((expected - torch.tensor([0.8, 0.2])) ** 2).mean(), rtol=1e-5, atol=1e-6)


def test_binary_bi_encoder_predicts_above_its_threshold_and_the_threshold_is_the_most_accurate_cut():
    assert best_threshold([0.1, 0.4, 0.35, 0.8], [0, 1, 0, 1]) == pytest.approx(0.375)
    assert best_threshold([0.9, 0.8], [0, 0]) == pytest.approx(0.9)  # all negative: above the highest
    assert best_threshold([0.2, 0.3], [1, 1]) < 0.2  # all positive: below the lowest
    assert best_threshold([0.5, 0.5, 0.5, 0.1], [1, 0, 1, 0]) == pytest.approx(0.3)  # no cut inside equal scores
    model, tokenizer = load_model("tiny_bert", "classification", 2, pooling="mean", pair_form="bi_encoder")
    model.eval().set_threshold(0.3)
    rows = [{"text_a": "ab", "text_b": "ab", "label": 1}, {"text_a": "ab", "text_b": "zq x", "label": 0}]
    batch = collate(encode_rows(rows, "classification", tokenizer, 64, pairs="separate"), tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.argmax(-1).tolist() == (out.similarity > 0.3).long().tolist()
    assert model.spec()["threshold"] == pytest.approx(0.3)


def test_the_pair_form_applies_to_similarity_tasks_only():
    assert pair_form_for("bi_encoder", get_task("glue/stsb")) == "bi_encoder"
    assert pair_form_for("bi_encoder", get_task("glue/mrpc")) == "bi_encoder"
    assert pair_form_for("bi_encoder", get_task("glue/rte")) == "cross_encoder"  # NLI: no similarity
    assert pair_form_for("bi_encoder", get_task("glue/sst2")) == "cross_encoder"  # one sentence
    assert pair_form_for(None, get_task("glue/stsb")) == "cross_encoder"
    with pytest.raises(ValueError, match="similarity_head"):
        pair_form_for("siamese", get_task("glue/stsb"))


@pytest.mark.parametrize("method", [m for m in lrzoo.list_adapters()])
@pytest.mark.parametrize("pair_form", ["cross_encoder", "bi_encoder"])
def test_every_adapter_trains_and_saves_the_pooled_head(method, pair_form, tmp_path):
    from peft import PeftModel

    from adapter_cases import CASES

    case = next(c for c in CASES if c.method == method)
    # the case's targets and LoRA-SB's init batches are for its own tiny model, not this two-class one
    kwargs = {k: v for k, v in case.kwargs.items() if k not in ("target_modules", "init_data", "init_lr")}
    kwargs["r"] = min(kwargs.get("r", 4), 4)

    def build():
        torch.manual_seed(0)
        return load_model("tiny_bert", "classification", 2, pooling="mean", pair_form=pair_form)

    model, tokenizer = build()
    peft_model = lrzoo.wrap(model, method, target_modules=["query", "value"], **kwargs)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    has_head = pair_form == "cross_encoder"
    assert any("classifier" in n for n in trainable) == has_head  # the new head trains; a cosine has none
    rows = [{"text_a": "ab c", "text_b": "ab", "label": 1}, {"text_a": "q", "text_b": "zz z", "label": 0}]
    pairs = "separate" if pair_form == "bi_encoder" else "joint"
    batch = collate(encode_rows(rows, "classification", tokenizer, 32, pairs=pairs), tokenizer.pad_token_id)
    peft_model.train()
    peft_model(**batch).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters()
               if p.requires_grad and "classifier" not in n)
    if case.saves_full_model or not has_head:
        return
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "classifier" in name and param.requires_grad:
                param.add_(1.0)  # a trained head, unlike any fresh one
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = lrzoo.load(build()[0], str(tmp_path / "adapter"))  # the same base, a fresh head
    assert isinstance(loaded, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, expected, rtol=1e-4, atol=1e-5)


def write_pairs(root: Path, task: str, train: int = 80, dev: int = 24, seed: int = 0) -> Path:
    """STS-B or MRPC look-alikes: half the pairs repeat a sentence (similar, label 4-5 or 1), half do not."""
    folder, columns = {"stsb": ("STS-B", ("sentence1", "sentence2", "score")),
                       "mrpc": ("MRPC", ("#1 String", "#2 String", "Quality"))}[task]
    rng = random.Random(seed)
    (root / "glue" / folder).mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("dev", dev)):
        lines = ["\t".join(columns)]
        for _ in range(count):
            a = " ".join(rng.choice(WORDS) for _ in range(4))
            same = rng.random() < 0.5
            b = a if same else " ".join(rng.choice(WORDS) for _ in range(4))
            label = (f"{rng.uniform(3.5, 5):.2f}" if same else f"{rng.uniform(0, 2):.2f}") if task == "stsb" \
                else str(int(same))
            lines.append(f"{a}\t{b}\t{label}")
        (root / "glue" / folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_a_bi_encoder_recipe_chooses_its_threshold_on_held_out_rows_and_saves_its_head(tmp_path):
    from lrzoo.cli.train import run_recipe

    data = write_pairs(tmp_path / "data", "mrpc")
    cfg = compose(["model=tiny_bert", "task=glue/mrpc", "adapter=lora", f"task.data_dir={data}",
                   f"output_root={tmp_path / 'runs'}", "trainer.batch_size=8", "trainer.max_steps=4",
                   "trainer.progress=false", "logger=none", "model.pooling=mean", "model.similarity_head=bi_encoder",
                   "+task.heldout_size=16"])
    results = run_recipe(cfg, run_dir_of(cfg))
    head = results["head"]
    assert head["pooling"] == "mean" and head["pair_form"] == "bi_encoder"
    assert head["threshold_rows"] == "heldout/glue/mrpc"
    saved = json.loads((Path(run_dir_of(cfg)) / "adapter" / HEAD_FILE).read_text())
    assert saved["threshold"] == pytest.approx(head["threshold"])
    # the saved adapter on the run's base (seed 0), at the saved threshold, predicts what the run scored
    torch.manual_seed(0)
    base, tokenizer = load_model("tiny_bert", "classification", 2, pooling="mean", pair_form="bi_encoder")
    model = lrzoo.load(base, str(Path(run_dir_of(cfg)) / "adapter")).eval()
    base.set_threshold(saved["threshold"])
    rows = list(get_task("glue/mrpc").load_split("validation", data))
    batch = collate(encode_rows(rows, "classification", tokenizer, 512, pairs="separate"), tokenizer.pad_token_id)
    with torch.no_grad():
        predicted = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1).tolist()
    scored = json.loads((Path(run_dir_of(cfg)) / "predictions.json").read_text())["sets"]["glue/mrpc"]
    assert predicted == scored["predictions"]


def test_zero_shot_of_a_bi_encoder_is_the_checkpoints_own_cosine(tmp_path):
    from lrzoo.cli.train import run_recipe

    data = write_pairs(tmp_path / "data", "stsb")
    cfg = compose(["model=tiny_bert", "task=glue/stsb", "adapter=zero_shot", f"task.data_dir={data}",
                   f"output_root={tmp_path / 'runs'}", "trainer.progress=false", "logger=none",
                   "model.pooling=mean", "model.similarity_head=bi_encoder", "seed=3"])
    results = run_recipe(cfg, run_dir_of(cfg))
    assert results["steps"] == 0 and results["trainable_params"] == 0
    predictions = json.loads((Path(run_dir_of(cfg)) / "predictions.json").read_text())["sets"]["glue/stsb"]
    torch.manual_seed(3)  # the run's seed: the same random tiny model
    model, tokenizer = load_model("tiny_bert", "regression", pooling="mean", pair_form="bi_encoder",
                                  label_range=(0.0, 5.0))
    rows = list(get_task("glue/stsb").load_split("validation", data))
    batch = collate(encode_rows(rows, "regression", tokenizer, 512, pairs="separate"), tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits.squeeze(-1)
    torch.testing.assert_close(torch.tensor(predictions["predictions"]), expected, rtol=1e-4, atol=1e-5)


def test_head_only_on_a_bi_encoder_names_the_cross_encoder():
    from lrzoo.train.baselines import prepare_baseline

    model, _ = load_model("tiny_bert", "classification", 2, pooling="mean", pair_form="bi_encoder")
    with pytest.raises(ValueError, match="similarity_head=cross_encoder"):
        prepare_baseline(model, "head_only")


def test_other_presets_keep_their_run_hash_and_minilm_pools_by_mean():
    from lrzoo.runs.identity import hashed_config, run_hash

    for model in ("roberta_base", "tiny_bert", "smollm2_135m", "tiny_llama"):
        cfg = compose([f"model={model}", "task=glue/rte"])
        assert cfg.model.pooling is None and cfg.model.similarity_head == "cross_encoder"
        before = compose([f"model={model}", "task=glue/rte"])
        with open_dict(before):
            del before.model["pooling"], before.model["similarity_head"]  # the presets as they were
        assert run_hash(cfg) == run_hash(before), model
        assert "pooling" not in hashed_config(cfg)["model"]
    minilm = compose(["model=minilm", "task=glue/stsb"])
    assert minilm.model.pooling == "mean" and minilm.model.similarity_head == "bi_encoder"
    assert hashed_config(minilm)["model"]["pooling"] == "mean"


def open_dict(cfg):
    from omegaconf import open_dict as _open_dict

    return _open_dict(cfg)


def test_the_record_names_an_encoder_head_only_where_the_model_has_one():
    """results.json's "head" said "pooler / cross_encoder" for a causal LM (a pre-training run) that has neither."""
    assert head_spec(tiny_llama()) is None
    assert head_spec(lrzoo.wrap(tiny_llama(), "lora", r=2, target_modules=["q_proj"])) is None
    assert head_spec(tiny_bert()) == {"pooling": "pooler", "pair_form": "cross_encoder"}


def reference_cosent(cosine: list[float], labels: list[float], scale: float = 20.0) -> float:
    """CoSENT written out pair by pair: log(1 + sum over label_i > label_j of exp(scale * (cos_j - cos_i)))."""
    import math

    total = 1.0
    for i, (cos_i, label_i) in enumerate(zip(cosine, labels)):
        for j, (cos_j, label_j) in enumerate(zip(cosine, labels)):
            if label_i > label_j:
                total += math.exp(scale * (cos_j - cos_i))
    return math.log(total)


def test_cosent_loss_is_the_ranking_loss_over_every_ordered_pair():
    from lrzoo.heads import cosent_loss

    cosine, labels = [0.9, 0.7, 0.75, 0.2, 0.6], [1.0, 0.0, 1.0, 0.0, 0.4]
    loss = cosent_loss(torch.tensor(cosine), torch.tensor(labels))
    assert float(loss) == pytest.approx(reference_cosent(cosine, labels), rel=1e-6)
    # only the order counts: relabelling with the same order gives the same loss, an MSE would not
    assert float(cosent_loss(torch.tensor(cosine), torch.tensor([5.0, 0.0, 5.0, 0.0, 2.0]))) == pytest.approx(float(loss))
    # one label value: no ordered pair, a loss of 0 and no gradient (not NaN)
    flat = torch.tensor([0.3, 0.8], requires_grad=True)
    out = cosent_loss(flat, torch.tensor([1.0, 1.0]))
    out.backward()
    assert float(out) == 0.0 and torch.equal(flat.grad, torch.zeros(2))
    # the gradient raises the cosine of the positive scored below a negative, lowers the negative's
    wrong = torch.tensor([0.2, 0.8], requires_grad=True)
    cosent_loss(wrong, torch.tensor([1.0, 0.0])).backward()
    assert wrong.grad[0] < 0 < wrong.grad[1]


def test_a_bi_encoder_trained_with_cosent_uses_it_and_other_heads_refuse_it():
    model, tokenizer = load_model("tiny_bert", "classification", 2, pooling="mean", pair_form="bi_encoder",
                                  pair_loss="cosent")
    model.eval()
    rows = [{"text_a": "a cat sat", "text_b": "the cat", "label": 1}, {"text_a": "x y", "text_b": "long here", "label": 0},
            {"text_a": "dogs run", "text_b": "a dog runs", "label": 1}]
    batch = collate(encode_rows(rows, "classification", tokenizer, 64, pairs="separate"), tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
    expected = reference_cosent(out.similarity.tolist(), [1.0, 0.0, 1.0])
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="pair_loss"):
        load_model("tiny_bert", "classification", 2, pooling="mean", pair_form="cross_encoder", pair_loss="cosent")
    with pytest.raises(ValueError, match="pair_loss"):
        load_model("tiny_bert", "classification", 2, pair_loss="cosent")  # transformers' own head
    with pytest.raises(ValueError, match="choose cosine"):
        load_model("tiny_bert", "classification", 2, pooling="mean", pair_form="bi_encoder", pair_loss="contrastive")


def test_the_pair_loss_reaches_the_similarity_tasks_and_a_typo_fails_on_any_task():
    from lrzoo.models import head_options

    assert head_options({"similarity_head": "bi_encoder", "pair_loss": "cosent"}, get_task("glue/mrpc"))["pair_loss"] \
        == "cosent"
    # minilm reads SST-2 with a cross-encoder: its preset's pair loss is not for that task
    assert head_options({"similarity_head": "bi_encoder", "pair_loss": "cosent"}, get_task("glue/sst2"))["pair_loss"] \
        is None
    with pytest.raises(ValueError, match="model.pair_loss='cosnet'"):
        head_options({"similarity_head": "bi_encoder", "pair_loss": "cosnet"}, get_task("glue/sst2"))


def test_the_default_pair_loss_keeps_every_run_hash():
    from lrzoo.runs.identity import hashed_config, run_hash

    minilm = compose(["model=minilm", "task=glue/mrpc"])
    assert minilm.model.pair_loss == "cosine"
    before = compose(["model=minilm", "task=glue/mrpc"])
    with open_dict(before):
        del before.model["pair_loss"]  # the preset before the key existed
    assert run_hash(minilm) == run_hash(before)
    cosent = compose(["model=minilm", "task=glue/mrpc", "model.pair_loss=cosent"])
    assert run_hash(cosent) != run_hash(minilm) and hashed_config(cosent)["model"]["pair_loss"] == "cosent"
