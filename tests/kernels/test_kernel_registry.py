"""The kernel families' declarations: every op in the dispatch table resolves, and the file layout
keeps its rules (shared helpers are public, triton is only imported by ``triton_*`` modules)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

from lrzoo import kernels
from lrzoo.kernels import KERNELS, TRITON_OPS, backend, randlora

KERNEL_DIR = Path(kernels.__file__).parent
MODULES = sorted(KERNEL_DIR.glob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_every_op_has_a_reference_and_a_public_entry_point():
    assert set(KERNELS) == {"lora_linear", "dora_linear", "randlora_linear", "tera_linear"}
    for op, entry in KERNELS.items():
        assert entry.op == op
        assert callable(entry.reference) and entry.reference.__module__.startswith("lrzoo.kernels.")
        params = list(inspect.signature(entry.reference).parameters)
        assert params[0] == "x" and params[-2:] == ["dropout_p", "training"]
        # the public entry point takes the reference's arguments
        assert list(inspect.signature(getattr(kernels, op)).parameters) == params
        assert (op in TRITON_OPS) == (entry.triton is not None)


def test_every_declared_triton_entry_resolves_with_the_references_signature():
    pytest.importorskip("triton")
    declared = [entry for entry in KERNELS.values() if entry.triton is not None]
    assert declared
    for entry in declared:
        module, name = entry.triton.split(":")
        assert module.startswith("triton_") and not name.startswith("_"), entry.triton
        fn = entry.resolve_triton()
        assert callable(fn), entry.triton
        assert inspect.signature(fn).parameters.keys() == inspect.signature(entry.reference).parameters.keys()


def test_a_family_limit_sends_the_call_to_the_reference_with_one_warning(monkeypatch):
    """RandLoRA's declared limit (dropout in training) is read by name from positional arguments."""
    backend.warn_once.cache_clear()
    torch.manual_seed(0)
    args = (torch.randn(3, 8), torch.randn(8, 8), torch.randn(8), torch.randn(2, 1, 8), torch.randn(8, 4, 2),
            torch.randn(2, 4), torch.randn(4, 8), 0.5, 0.25, True)
    with pytest.warns(RuntimeWarning, match="dropout"):
        torch.manual_seed(1)
        out = TRITON_OPS["randlora_linear"](*args)
    torch.manual_seed(1)
    torch.testing.assert_close(out, randlora.randlora_linear(*args))


def test_no_kernel_module_imports_a_private_name():
    offences = []
    for path in MODULES:
        tree = _tree(path)
        imported_modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                for alias in node.names:
                    if alias.name.startswith("_"):
                        offences.append(f"{path.name}:{node.lineno} imports {alias.name}")
                    imported_modules.add(alias.asname or alias.name)  # may be a module (from . import lora)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        offences.append(f"{path.name}:{node.lineno} imports {alias.name}")
                    imported_modules.add(alias.asname or alias.name.split(".")[0])
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_modules and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                offences.append(f"{path.name}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not offences, offences


def test_only_triton_modules_import_triton_or_each_other_at_import_time():
    """``import lrzoo`` must leave TRITON_INTERPRET to the user: the modules the package imports never
    import triton (or a ``triton_*`` module) at module level; the Triton side is named by string."""
    offences = []
    for path in MODULES:
        if path.stem.startswith("triton_"):
            continue
        for node in _tree(path).body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module or ''}.{alias.name}" for alias in node.names]
            else:
                continue
            if any(n.split(".")[0] == "triton" or any(p.startswith("triton_") for p in n.split(".")) for n in names):
                offences.append(f"{path.name}:{node.lineno}")
    assert not offences, offences


@pytest.mark.slow
def test_importing_lrzoo_loads_no_triton_kernel_module(fresh_python, tmp_path):
    fresh_python("""
        import sys
        import lrzoo, lrzoo.kernels
        loaded = [m for m in sys.modules if m.startswith("lrzoo.kernels.triton")]
        assert not loaded, loaded
    """, cwd=tmp_path)


def test_a_triton_kernel_cannot_be_declared_without_the_problems_it_is_checked_on():
    from lrzoo.kernels.registry import KernelEntry

    with pytest.raises(ValueError, match="check cases"):
        KernelEntry(op="lora_linear", reference=kernels.lora.lora_linear, triton="triton_lora:lora_linear")
    for entry in KERNELS.values():
        if entry.triton is not None:
            cases = entry.check(torch.device("cpu"), torch.float32)
            assert cases and all(set(case.grads) <= set(case.kwargs) for case in cases), entry.op
