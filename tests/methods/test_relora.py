"""ReLoRA: merge-and-reinit cycles, optimizer-state pruning, the jagged cosine schedule, the HF callback."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, TrainingArguments

import lrzoo
from conftest import tiny_inputs, tiny_llama
from lrzoo.methods.relora import lora_layers, merge_and_reinit
from lrzoo.registry import training_options
from lrzoo.methods.relora import ReLoRA, ReLoRACallback, jagged_cosine_factor, make_relora_scheduler


def relora_model(**kwargs):
    return lrzoo.wrap(tiny_llama(0), "relora", r=4, alpha=8, **kwargs)


def base_weights(model):
    return {id(layer): layer.get_base_layer().weight.detach().clone() for layer in lora_layers(model)}


def test_wrap_records_the_procedure_options_and_trains_non_adapter_parameters():
    model = relora_model(relora_steps=100, optimizer_pruning="magnitude", optimizer_pruning_ratio=0.9)
    assert training_options(model) == {"method": "relora", "relora_steps": 100, "optimizer_pruning": "magnitude",
                                    "optimizer_pruning_ratio": 0.9, "restart_warmup_steps": 100, "min_lr_ratio": 0.1}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
    assert any("norm" in n for n in trainable)
    assert not any(n.endswith("base_layer.weight") for n in trainable)
    relora = ReLoRA.from_model(model)
    assert (relora.relora_steps, relora.optimizer_pruning, relora.optimizer_pruning_ratio) == (100, "magnitude", 0.9)


def test_merge_and_reinit_keeps_the_function_and_restarts_lora():
    model = relora_model(init_lora_weights=False)
    x = tiny_inputs()
    with torch.no_grad():
        before = model(x).logits
    merge_and_reinit(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    for layer in lora_layers(model):
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        A = layer.lora_A["default"].weight
        bound = 1 / math.sqrt(A.shape[1])  # Kaiming-uniform(a=√5) bound
        assert A.abs().max() <= bound and A.std() > 0.3 * bound


def test_merged_weights_equal_the_sum_of_every_cycle_update():
    model = relora_model()
    model.train()
    initial = base_weights(model)
    cycle_sum = {key: torch.zeros_like(w) for key, w in initial.items()}
    relora = ReLoRA(relora_steps=3, optimizer_pruning="random", optimizer_pruning_ratio=0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tiny_inputs(batch=4, length=8)
    for step in range(1, 10):  # three full cycles
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 3 == 0:  # this cycle's update, read just before the reset
            for layer in lora_layers(model):
                cycle_sum[id(layer)] += (layer.lora_B["default"].weight @ layer.lora_A["default"].weight
                                         * layer.scaling["default"]).detach()
        relora.on_step_end(step, model, optimizer)
    assert relora.resets == 3
    for layer in lora_layers(model):
        assert cycle_sum[id(layer)].abs().max() > 1e-4
        torch.testing.assert_close(layer.get_base_layer().weight, initial[id(layer)] + cycle_sum[id(layer)],
                                   rtol=1e-5, atol=1e-6)


def _adam_state(model):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = tiny_inputs(batch=2, length=8)
    for _ in range(2):
        optimizer.zero_grad()
        model(x, labels=x).loss.backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("mode,ratio,zero_fraction", [("reset", 0.0, 0.999), ("random", 0.5, 0.5)])
def test_random_pruning_zeroes_that_fraction_of_the_lora_state_only(mode, ratio, zero_fraction):
    model = relora_model(init_lora_weights=False)
    optimizer = _adam_state(model)
    lm_head_state = optimizer.state[model.base_model.model.lm_head.weight]["exp_avg"].clone()
    ReLoRA(relora_steps=1, optimizer_pruning=mode, optimizer_pruning_ratio=ratio).reset(model, optimizer)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for key in ("exp_avg", "exp_avg_sq"):
        values = torch.cat([optimizer.state[p][key].flatten() for p in lora])
        assert abs((values == 0).float().mean().item() - zero_fraction) < 0.05
    torch.testing.assert_close(optimizer.state[model.base_model.model.lm_head.weight]["exp_avg"], lm_head_state)


def test_magnitude_pruning_keeps_only_the_largest_entries():
    model = relora_model(init_lora_weights=False)
    optimizer = _adam_state(model)
    param = lora_layers(model)[0].lora_A["default"].weight
    before = optimizer.state[param]["exp_avg_sq"].clone()
    ReLoRA(relora_steps=1, optimizer_pruning="magnitude", optimizer_pruning_ratio=0.75).reset(model, optimizer)
    after = optimizer.state[param]["exp_avg_sq"]
    threshold = before.abs().flatten().kthvalue(int(0.75 * before.numel())).values
    kept = before.abs() > threshold
    torch.testing.assert_close(after[kept], before[kept])
    assert torch.count_nonzero(after[~kept]) == 0
    assert abs(kept.float().mean().item() - 0.25) < 0.02


def test_lr_follows_the_jagged_cosine():
    total, warmup, cycle, rewarm, floor = 100, 10, 30, 5, 0.1
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = make_relora_scheduler(optimizer, total, warmup, cycle, rewarm, floor)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    def cosine(t):  # the global envelope, written from the paper's description
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))

    assert lrs[0] == 0 and lrs[5] == pytest.approx(2.0 * 5 / 10)  # linear warm-up
    assert lrs[20] == pytest.approx(2.0 * cosine(20))
    for reset in (30, 60, 90):
        assert lrs[reset] == 0  # re-warm-up starts from 0 after each reset
        assert lrs[reset + 2] == pytest.approx(2.0 * cosine(reset + rewarm) * 2 / rewarm)
        assert lrs[reset + rewarm] == pytest.approx(2.0 * cosine(reset + rewarm))
        assert lrs[reset - 1] > lrs[reset + rewarm] > lrs[reset + rewarm + 1]  # back on the decaying envelope
    assert min(lrs[warmup:]) >= 0 and lrs[-1] == pytest.approx(2.0 * cosine(99))
    assert jagged_cosine_factor(total, total, warmup, cycle, rewarm, floor) == pytest.approx(floor)


def test_hf_callback_resets_at_the_interval(tmp_path):
    model = relora_model(relora_steps=2, init_lora_weights=False)
    callback = ReLoRACallback.from_model(model)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state, control = TrainerState(), TrainerControl()
    initial = base_weights(model)
    for step in (1, 2, 3):
        state.global_step = step
        callback.on_step_end(args, state, control, model=model, optimizer=None)
        changed = any(not torch.equal(layer.get_base_layer().weight, initial[id(layer)]) for layer in lora_layers(model))
        assert changed == (step >= 2)
    assert callback.relora.resets == 1


def test_invalid_options_name_the_fix():
    with pytest.raises(ValueError, match="optimizer_pruning must be one of"):
        ReLoRA(optimizer_pruning="zero")
    with pytest.raises(ValueError, match="restart_warmup_steps"):
        make_relora_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 100, 0, 10, 10)


def _trained_with_resets(steps=5, relora_steps=2, model=None, labels=None):
    """A few AdamW steps with a reset every ``relora_steps``: merged cycles and trained non-adapter tensors."""
    model = model if model is not None else relora_model(relora_steps=relora_steps)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    relora = ReLoRA(relora_steps=relora_steps)
    x = tiny_inputs(batch=4, length=8)
    for step in range(1, steps + 1):
        loss = model(x, labels=x if labels is None else labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        relora.on_step_end(step, model, optimizer)
    return model.eval()


def test_saved_model_after_resets_reproduces_the_run_in_a_fresh_process(tmp_path, fresh_python):
    model = _trained_with_resets()
    x = tiny_inputs()
    torch.save(x, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(x).logits
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.save_pretrained(tmp_path / "saved")

    with torch.no_grad():  # saving merges a copy: the live model (and its current cycle) is untouched
        assert torch.equal(model(x).logits, expected)
    assert all(torch.equal(p, live[n]) for n, p in model.named_parameters())

    fresh_python(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "saved")!r}).eval()
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "inputs.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
        assert "lrzoo" not in sys.modules and "peft" not in sys.modules
    """, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-5, atol=1e-5)
    record = json.loads((tmp_path / "saved" / "relora.json").read_text())
    assert record["format"] == "lrzoo-relora-full-model" and record["resets"] == 2
    assert (record["r"], record["lora_alpha"], record["training"]["relora_steps"]) == (4, 8, 2)
    assert set(load_file(tmp_path / "saved" / "model.safetensors")) == set(tiny_llama(0).state_dict())


def test_partial_formats_refuse_and_name_the_full_save(tmp_path):
    untouched = relora_model(init_lora_weights=False)
    assert lrzoo.export_lora(untouched, str(tmp_path / "exact"))["exact"]  # nothing outside A, B changed yet

    no_reset = _trained_with_resets(steps=1, relora_steps=100)  # non-adapter tensors trained, no reset
    with pytest.raises(ValueError, match=r"non-adapter parameter\(s\) changed.*save_pretrained"):
        lrzoo.export_lora(no_reset, str(tmp_path / "partial"))

    reset = relora_model()
    merge_and_reinit(reset)
    with pytest.raises(ValueError, match=r"1 reset\(s\) merged.*AutoModelForCausalLM.from_pretrained"):
        lrzoo.export_lora(reset, str(tmp_path / "partial"))
    assert not (tmp_path / "partial").exists()

    (tmp_path / "has_adapter").mkdir()
    (tmp_path / "has_adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds an adapter"):  # transformers would load that adapter instead
        reset.save_pretrained(tmp_path / "has_adapter")
    reset.save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match=r"full ReLoRA model.*AutoModelForCausalLM.from_pretrained"):
        lrzoo.load(tiny_llama(0), str(tmp_path / "full"))


def test_full_save_keeps_task_heads_and_reads_a_given_state_dict(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from conftest import tiny_bert

    model = _trained_with_resets(steps=3, model=lrzoo.wrap(tiny_bert(0), "relora", r=4, alpha=8, relora_steps=2),
                                 labels=torch.tensor([0, 1, 2, 1]))
    x = tiny_inputs()
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path / "live")
    model.save_pretrained(tmp_path / "given", state_dict=model.state_dict())  # what FSDP/HF Trainer pass
    live, given = (load_file(tmp_path / name / "model.safetensors") for name in ("live", "given"))
    assert live.keys() == given.keys() and all(torch.equal(live[k], given[k]) for k in live)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "live").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_starts_kaiming_so_the_factors_train_from_the_first_step():
    """docs/adapters/relora.md: the official wrapper zeroes A (no gradient for A or B until the first reset);
    lrzoo starts A Kaiming-uniform, B = 0, so B gets a gradient at step 1 while ΔW = 0."""
    model = relora_model()
    loss = model(tiny_inputs(), labels=tiny_inputs()).loss
    loss.backward()
    for layer in lora_layers(model):
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.count_nonzero(B) == 0 and A.abs().max() > 0
        assert B.grad is not None and B.grad.abs().max() > 0
