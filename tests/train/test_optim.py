"""make_optimizer: LoRA+ groups identical to PEFT's reference implementation, head learning rate."""

from __future__ import annotations

import torch
from peft.optimizers import create_loraplus_optimizer

import lrzoo
from lrzoo.registry import training_options
from conftest import tiny_bert, tiny_inputs


def groups_by_lr(optimizer):
    groups: dict[float, set[int]] = {}
    for group in optimizer.param_groups:
        if group["params"]:
            groups.setdefault(group["lr"], set()).update(id(p) for p in group["params"])
    return groups


def test_loraplus_groups_equal_peft_with_the_default_ratio_16():
    model = lrzoo.wrap(tiny_bert(), "loraplus", r=4)
    assert training_options(model)["loraplus_lr_ratio"] == 16.0
    ours = lrzoo.make_optimizer(model, lr=1e-4)
    reference = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16.0)
    assert groups_by_lr(ours) == groups_by_lr(reference)
    fast = groups_by_lr(ours)[1.6e-3]
    names = {id(p): n for n, p in model.named_parameters()}
    assert any("lora_B" in names[i] for i in fast) and not any("lora_A" in names[i] for i in fast)


def test_loraplus_ratio_given_to_wrap_is_used():
    model = lrzoo.wrap(tiny_bert(), "loraplus", r=4, loraplus_lr_ratio=4.0)
    assert 4e-4 in groups_by_lr(lrzoo.make_optimizer(model, lr=1e-4))


def test_plain_methods_get_one_lr_and_decay_only_on_matrices():
    model = lrzoo.wrap(tiny_bert(), "lora", r=4)
    optimizer = lrzoo.make_optimizer(model, lr=1e-3, weight_decay=0.1)
    for group in optimizer.param_groups:
        assert group["lr"] == 1e-3
        assert all((p.dim() >= 2) == (group["weight_decay"] == 0.1) for p in group["params"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable


def test_head_lr_applies_to_the_task_head_only():
    model = lrzoo.wrap(tiny_bert(), "lora_xs", r=4)
    optimizer = lrzoo.make_optimizer(model, lr=1e-3, head_lr=5e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        in_head = {"classifier" in names[id(p)] for p in group["params"]}
        assert in_head == {group["lr"] == 5e-3}


def test_optimizer_works_with_the_hf_trainer(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = lrzoo.wrap(tiny_bert(), "loraplus", r=4)
    x = tiny_inputs(batch=8)
    data = Dataset.from_dict({"input_ids": x.tolist(), "labels": [0, 1, 2, 0, 1, 2, 0, 1]})
    optimizer = lrzoo.make_optimizer(model, lr=1e-3)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)).train()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
