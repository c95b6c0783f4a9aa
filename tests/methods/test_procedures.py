"""Training procedures are a table the registry points to (lrzoo/procedure.py, each beside its method): each method's entry,
the options it gets from wrap, ReLoRA's state through its own state_dict, and no method name in the loop."""

from __future__ import annotations

import ast

import pytest
import torch

import lrzoo
from conftest import REPO, tiny_bert, tiny_llama
from lrzoo.train.config import TrainerConfig
from lrzoo.methods.relora import ReLoRA, ReLoRAHook
from lrzoo.procedure import PROCEDURES, Procedure, register_procedure
from lrzoo.registry import RECORD_ATTRIBUTE, record_of, unregister_adapter
from lrzoo.train.procedures import procedure_for


@pytest.mark.parametrize("name", lrzoo.list_adapters())
def test_every_adapter_names_a_known_procedure(name):
    assert (lrzoo.get_adapter(name).procedure or "default") in PROCEDURES


@pytest.mark.parametrize("method, procedure", [("lora", "default"), ("dora", "default"), ("loraplus", "loraplus"),
                                               ("relora", "relora"), ("lora_sb", "lora_sb")])
def test_the_registry_picks_the_procedure_with_the_options_wrap_recorded(method, procedure):
    model = lrzoo.wrap(tiny_llama(0) if method == "relora" else tiny_bert(0), method, r=4)
    built = procedure_for(model, TrainerConfig(seed=3))
    assert built.name == procedure
    assert built.options == record_of(model).options and built.options is not record_of(model).options


def test_a_model_lrzoo_did_not_wrap_gets_the_plain_procedure():
    assert type(procedure_for(tiny_bert(0), TrainerConfig())) is Procedure


def test_loraplus_optimizer_groups_come_from_the_options_not_the_model():
    model = lrzoo.wrap(tiny_bert(0), "loraplus", r=4, loraplus_lr_ratio=4.0)
    built = procedure_for(model, TrainerConfig(lr=1e-3))
    delattr(model, RECORD_ATTRIBUTE)  # the procedure holds the options: the record is read once
    assert sorted({g["lr"] for g in built.make_optimizer(model).param_groups if g["params"]}) == [1e-3, 4e-3]


def test_relora_state_goes_through_its_own_state_dict():
    model = lrzoo.wrap(tiny_llama(0), "relora", r=4, relora_steps=2, optimizer_pruning="random",
                       optimizer_pruning_ratio=0.5)
    built = procedure_for(model, TrainerConfig(seed=5))
    assert (built.relora.relora_steps, built.relora.optimizer_pruning, built.relora.seed) == (2, "random", 5)
    (hook,) = built.callbacks(model)
    assert isinstance(hook, ReLoRAHook) and hook.relora is built.relora
    relora = built.relora
    relora.resets = 3
    state = hook.state_dict()
    assert set(state) == {"resets", "generator", "base_weights"} and state["resets"] == 3
    fresh = ReLoRA(seed=6)
    assert not torch.equal(fresh.state_dict()["generator"], state["generator"])
    fresh.load_state_dict(relora.state_dict())
    assert fresh.resets == 3 and torch.equal(fresh.state_dict()["generator"], state["generator"])


def test_a_new_procedure_is_one_table_entry():
    calls = []

    class Recording(Procedure):
        name = "recording_test"

        def callbacks(self, model):
            calls.append(self.options)
            return []

    class Clash(Procedure):
        name = "relora"

    register_procedure(Recording)
    try:
        Recording({"x": 1}, TrainerConfig()).callbacks(None)
        assert calls == [{"x": 1}] and PROCEDURES["recording_test"] is Recording
        with pytest.raises(ValueError, match="already registered"):
            register_procedure(Clash)
    finally:
        del PROCEDURES["recording_test"]


def _name_lists(tree: ast.Module, names: set[str]) -> set[str]:
    """Module-level constants that are tuples/lists/sets of adapter names (``PEFT_METHODS = ("lora", ...)``):
    ``method in PEFT_METHODS`` is a name comparison too. Dicts keyed by name (per-method data) are not."""
    found = set()
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, (ast.Tuple, ast.List, ast.Set)):
            if any(isinstance(e, ast.Constant) and e.value in names for e in node.value.elts):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found |= {t.id for t in targets if isinstance(t, ast.Name)}
    return found


def test_the_trainer_its_command_the_adapter_api_and_the_benchmarks_never_test_a_method_name():
    """`method == "relora"`-style branches belong in the method's procedure or its spec's hooks, not in the loop,
    nor in wrap/load/export, nor in the benchmarks (which ask AdapterSpec.peft_reference and bench_options for
    their stock-PEFT rows and wrap keywords). A list of names may stay as data: what to time by default."""
    names = set(lrzoo.list_adapters())
    files = (sorted((REPO / "lrzoo" / "train").glob("*.py")) + sorted((REPO / "lrzoo" / "bench").glob("*.py"))
             + [REPO / "lrzoo" / "cli" / f"{name}.py" for name in ("train", "bench")]
             + [REPO / "lrzoo" / f"{name}.py" for name in ("wrap", "load", "export", "registry", "procedure")])
    found = []
    for path in files:
        tree = ast.parse(path.read_text())
        lists = _name_lists(tree, names)
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                constants = [c for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in names]
                found += [f"{path.relative_to(REPO)}:{c.lineno}: compares with {c.value!r}" for c in constants]
                found += [f"{path.relative_to(REPO)}:{n.lineno}: compares with the name list {n.id}"
                          for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in lists]
    assert not found, "\n".join(found)


def test_the_benchmarks_build_from_the_spec_hooks():
    """A method registered with a peft_reference gets a stock-PEFT row and its bench_options, whatever its name."""
    from peft import LoraConfig

    from lrzoo.bench import layers
    from lrzoo.bench.model import build_member

    calls = []

    def reference(**options):
        calls.append(options)
        return LoraConfig(r=options["r"], lora_alpha=options.get("alpha") or 1, target_modules=options["target_modules"],
                          lora_dropout=options["dropout"], task_type=options.get("task_type"))

    spec = lrzoo.get_adapter("lora")
    lrzoo.register_adapter("bench_hook_test", build_config=spec.build_config, aliases=spec.aliases,
                           peft_reference=reference, bench_options={"init_lora_weights": False})
    try:
        rows = layers.run(["bench_hook_test"], [(4, 8, 8)], 2, torch.device("cpu"), torch.float32, 0.0, 0, 1)
        assert [(row.method, row.impl) for row in rows] == [("frozen F.linear", "torch"), ("bench_hook_test", "lrzoo"),
                                                             ("bench_hook_test", "peft")]
        assert calls == [{"r": 2, "target_modules": ["0"], "dropout": 0.0}]
        adapted = build_member(tiny_llama(0), "bench_hook_test", "lrzoo", 2, ["q_proj"], 0.0, "generation")
        b_factors = [b for n, b in adapted.named_parameters() if "lora_B" in n]
        assert b_factors and all(b.abs().sum() > 0 for b in b_factors)  # B ≠ 0: the bench_options were passed
    finally:
        unregister_adapter("bench_hook_test")


def test_load_and_export_ask_the_spec_hooks(tmp_path):
    """What load and export do differently for ReLoRA comes from its spec, not from a name in load.py/export.py."""
    spec = lrzoo.get_adapter("relora")
    assert spec.export_problem is not None and spec.foreign_folder is not None
    assert lrzoo.get_adapter("lora").before_load is not None and lrzoo.get_adapter("randlora").after_load is not None
    assert lrzoo.get_adapter("lora").peft_reference(r=4, target_modules=["q"]).init_lora_weights is False
    model = lrzoo.wrap(tiny_llama(0), "relora", r=4, relora_steps=1)
    from lrzoo.methods.relora import merge_and_reinit

    merge_and_reinit(model)
    with pytest.raises(ValueError, match="cannot be written as a LoRA adapter"):
        lrzoo.export_lora(model, str(tmp_path / "export"))
    model.save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match="holds a full ReLoRA model"):
        lrzoo.load(tiny_llama(0), str(tmp_path / "full"))


def test_make_optimizer_asks_the_model_s_procedure():
    lora_pro = lrzoo.wrap(tiny_bert(0), "lora_pro", r=4)
    assert type(lrzoo.make_optimizer(lora_pro, lr=1e-3)).__name__ == "LoraProAdamW"
    assert type(lrzoo.make_optimizer(lora_pro, lr=1e-3, lora_pro=False)) is torch.optim.AdamW
    plain = lrzoo.wrap(tiny_bert(0), "lora", r=4)
    assert type(lrzoo.make_optimizer(plain, lr=1e-3, lora_pro=True)).__name__ == "LoraProAdamW"
    groups = lrzoo.make_optimizer(plain, lr=1e-3, loraplus_lr_ratio=2.0).param_groups
    assert sorted({g["lr"] for g in groups if g["params"]}) == [1e-3, 2e-3]  # LoRA+ asked of a plain method
    with pytest.raises(ValueError, match="does not apply to LoRA-Pro"):
        lrzoo.make_optimizer(lora_pro, lr=1e-3, loraplus_lr_ratio=2.0)
    with pytest.raises(ValueError, match="wrap the model with 'lora'"):
        procedure_for(lrzoo.wrap(tiny_bert(0), "lora_pro", r=4, lora_pro=False), TrainerConfig())
