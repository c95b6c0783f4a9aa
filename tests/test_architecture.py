"""The package's shape, checked (docs/architecture.md): who may import whom, PEFT internals in one module,
the PEFT names that module relies on present in the installed PEFT, and a README that lists the registry."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import lrzoo
from conftest import REPO

PACKAGE = REPO / "lrzoo"

#: area -> the other areas it may import. An area is a top-level module or subpackage of lrzoo
#: ("lrzoo" itself is the public API in __init__). Data flows one way: leaves, then the PEFT bridge,
#: layers, registry, methods, the wrap/export/load API, then the trainer, then the command line.
#: Low-rank optimizers (optimizers/) sit beside the adapter stack: they use the leaves only. A method's training
#: procedure (its optimizer, schedule, callbacks) lives in its folder under methods/ and builds on procedure
#: (the base class and table): it may use torch, transformers' schedules and the low-rank optimizers' checks,
#: never the trainer (train/), which lends it what it needs as arguments.
#: The experiment wing: runs/ (a run's identity and files) sits under the trainer, which writes runs through it;
#: compose (a run's config from a command line, checked by the trainer's schema) above the trainer; the lab (plans,
#: sweeps, reports) and bench/ above both; cli/ (thin entry points) on top. Imports inside functions count.
LEAVES = {"builtin_models", "cache", "configs", "decompositions", "errors", "fingerprint", "io", "offline_notices",
          "registry_table", "targets"}
ALLOWED = {
    "kernels": {"cache", "io", "registry_table"},  # the kernel verdict cache is written atomically (kernels/verify.py)
    "tasks": {"cache", "io", "errors", "registry_table"},
    "builtin_models": set(), "cache": set(), "configs": set(), "decompositions": set(), "errors": set(), "fingerprint": set(),
    "io": set(),
    "offline_notices": set(), "registry_table": {"errors"},
    "targets": set(),
    "peft_bridge": {"fingerprint", "io", "targets"},  # io: the sorted adapter_config.json is rewritten atomically
    "layer": {"peft_bridge", "targets"},
    "core_layers": {"layer", "kernels"},
    "registry": {"peft_bridge", "configs", "errors", "registry_table"},  # errors is a leaf (docs/architecture.md)
    "procedure": LEAVES | {"peft_bridge", "registry"},
    "methods": LEAVES | {"core_layers", "kernels", "layer", "optimizers", "peft_bridge", "procedure", "registry"},
    "wrap": LEAVES | {"registry", "methods", "peft_bridge"},
    "export": LEAVES | {"kernels", "layer", "methods", "peft_bridge", "registry"},
    "load": LEAVES | {"registry"},
    "heads": LEAVES,
    "models": LEAVES | {"heads"},
    "optimizers": LEAVES,
    # the options a method ignores leave the hash (registry.ignored_options); the data fingerprint is the tasks'
    "runs": LEAVES | {"registry", "tasks"},
    "train": LEAVES | {"heads", "kernels", "layer", "methods", "models", "optimizers", "peft_bridge", "procedure",
                       "registry", "runs", "tasks", "wrap", "lrzoo"},
    "compose": LEAVES | {"runs", "train"},  # train.schema only: the keys lrzoo-train accepts (checked below)
    # the lab reads runs, composes their configs and scores with the tasks' metrics: never the trainer or PEFT
    "lab": LEAVES | {"compose", "heads", "runs", "tasks"},
    "bench": LEAVES | {"kernels", "models", "lrzoo"},
    "cli": LEAVES | {"bench", "compose", "heads", "kernels", "lab", "models", "optimizers", "registry", "runs", "tasks",
                     "train", "lrzoo"},
    "lrzoo": LEAVES | {"export", "kernels", "layer", "load", "methods", "optimizers", "peft_bridge", "procedure",
                       "registry", "train", "wrap"},
}
#: modules an area may import from an area otherwise above or beside it: (area, module) pairs
ONLY_MODULES = {"compose": {"train": {"lrzoo.train.schema"}}}
#: third-party packages an area must not import (the lab reads runs; the adapter stack is PEFT's business)
FORBIDDEN_PACKAGES = {"lab": ("peft", "torch"), "runs": ("peft", "torch"), "compose": ("peft", "torch")}


#: known violations being removed (each names its fix); empty when the package follows the rules.
PENDING: set[str] = set()


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rsplit(".", 1)[0]
        yield path, name, package, ast.parse(path.read_text())


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lrzoo"


def _lrzoo_imports(package: str, tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target + "." + alias.name for alias in node.names] if not node.module else [target]
            else:
                names = [node.module or ""]
            yield from ((node.lineno, n) for n in names if n.startswith("lrzoo"))
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.startswith("lrzoo"))


def test_every_area_has_a_rule():
    areas = {_area(name) for _, name, _, _ in _modules()}
    assert areas <= set(ALLOWED), f"areas without an import rule (add them to ALLOWED and docs/architecture.md): {areas - set(ALLOWED)}"


def test_imports_follow_the_layering():
    problems = []
    for path, name, package, tree in _modules():
        source = _area(name)
        for line, target in _lrzoo_imports(package, tree):
            dest = _area(target)
            if dest == source or str(path.relative_to(REPO)) in PENDING:
                continue
            only = ONLY_MODULES.get(source, {}).get(dest)
            if dest not in ALLOWED[source] or (only is not None and not any(
                    target == m or target.startswith(m + ".") for m in only)):
                problems.append(f"{path.relative_to(REPO)}:{line}: {source} imports {target} ({dest})")
    assert not problems, "imports against docs/architecture.md:\n" + "\n".join(problems)


def test_the_lab_and_runs_import_neither_peft_nor_torch():
    """The lab reads runs (JSON, CSV), composes configs and scores with numpy/scipy: a report or a sweep plan needs no
    model library of its own (what it reaches through :mod:`lrzoo.runs.identity` is the registry's, lazily)."""
    problems = []
    for path, name, _, tree in _modules():
        banned = FORBIDDEN_PACKAGES.get(_area(name), ())
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            problems += [f"{path.relative_to(REPO)}:{node.lineno}: imports {m}" for m in modules
                         if m.split(".")[0] in banned]
    assert not problems, "\n".join(problems)


def _module_names() -> set[str]:
    return {name for _, name, _, _ in _modules()}


def import_graph() -> dict[str, set[str]]:
    """Module -> the lrzoo modules it imports, at module level or inside functions (``from pkg import mod`` is an
    edge to ``pkg.mod`` when that is a module, else to ``pkg``)."""
    known = _module_names()
    graph: dict[str, set[str]] = {}
    for _, name, package, tree in _modules():
        edges = graph.setdefault(name, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in known else target)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
        edges &= known
        edges.discard(name)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph.get(node, ())):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


#: import circles being removed by another item, each naming it (an entry whose circle is gone is stale: delete it)
ALLOWED_CYCLES: list[list[str]] = []


def test_no_import_cycles_even_inside_functions():
    cycles = import_cycles(import_graph())
    unexpected = [c for c in cycles if c not in ALLOWED_CYCLES]
    assert not unexpected, "import circles (a function-level import counts too):\n" + "\n".join(
        " <-> ".join(c) for c in unexpected)


def test_the_cycle_finder_sees_a_circle_closed_inside_a_function(tmp_path):
    """A circle that only a function-level import closes is still a circle (the kind issue 27 found three of)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse("import os\ndef f():\n    from lrzoo.lab import plan\n")
    assert any(isinstance(n, ast.ImportFrom) and n.module == "lrzoo.lab" for n in ast.walk(tree))


#: ``from <lrzoo module> import _name`` allowed for now (none: a name another module needs is public)
PRIVATE_IMPORT_ALLOWED: set[tuple[str, str]] = set()


def test_nothing_imports_an_underscore_name_from_another_module():
    """A leading underscore says "this module's own": another module that needs the name needs a public one."""
    problems = []
    for path, name, package, tree in _modules():
        where = str(path.relative_to(REPO))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = node.module or ""
            if not (node.level or source.startswith("lrzoo")):
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and (where, alias.name) not in PRIVATE_IMPORT_ALLOWED:
                    problems.append(f"{where}:{node.lineno}: imports {alias.name} from {'.' * node.level}{source}")
    assert not problems, "private names imported across modules (make them public where they are defined):\n" + \
        "\n".join(problems)


#: PEFT below its documented API: only lrzoo/peft_bridge/ may use these.
PRIVATE_PEFT_ATTRIBUTES = {
    "_replace_module", "_create_and_replace", "_pre_injection_hook", "_prepare_adapter_config",
    "_check_target_module_exists", "_move_adapter_to_device_of_base_layer", "_cache_store", "_cache_pop",
    "_disable_adapters", "_active_adapter", "_register_custom_module",
}
#: Where the rest of lrzoo may import PEFT from (everything else goes through lrzoo.peft_bridge): the package's
#: top level and the namespaces PEFT documents as its API (peft.utils' and peft.optimizers' exported names),
#: and the two tuner base classes PEFT's "Tuners" reference documents.
PUBLIC_PEFT_MODULES = {"peft": None, "peft.utils": None, "peft.optimizers": None,
                       "peft.tuners.tuners_utils": {"BaseTuner", "BaseTunerLayer"}}


def _peft_import_problem(node: ast.AST) -> str:
    """Why an import of PEFT below its public API is one, or ``""``."""
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "peft" and not node.level:
        allowed = PUBLIC_PEFT_MODULES.get(node.module, set())
        names = {alias.name for alias in node.names}
        if allowed is not None and not names <= allowed:
            return f"from {node.module} import {', '.join(sorted(names - allowed))}"
    if isinstance(node, ast.Import):
        deep = [alias.name for alias in node.names if alias.name.startswith("peft.")]
        if deep:
            return f"import {', '.join(deep)}"
    return ""


def test_only_the_bridge_touches_peft_internals():
    problems = []
    for path, name, _, tree in _modules():
        if name == "lrzoo.peft_bridge" or name.startswith("lrzoo.peft_bridge."):
            continue
        where = path.relative_to(REPO)
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE_PEFT_ATTRIBUTES:
                problems.append(f"{where}:{node.lineno}: .{node.attr}")
            if isinstance(node, ast.FunctionDef) and node.name in PRIVATE_PEFT_ATTRIBUTES:
                problems.append(f"{where}:{node.lineno}: overrides {node.name}")
            if _peft_import_problem(node):
                problems.append(f"{where}:{node.lineno}: {_peft_import_problem(node)} (below PEFT's public API)")
            if isinstance(node, ast.ImportFrom) and any(a.name.startswith("PEFT_TYPE_TO_") for a in node.names):
                problems.append(f"{where}:{node.lineno}: imports a PEFT type table")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "base_model.model." in node.value \
                    and id(node) not in docstrings:
                problems.append(f"{where}:{node.lineno}: spells PeftModel's key prefix")
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "__class__"
                                                    for t in node.targets):
                problems.append(f"{where}:{node.lineno}: swaps a layer class")
    assert not problems, ("PEFT internals outside lrzoo/peft_bridge/ (use the bridge's functions):\n"
                          + "\n".join(problems))


def test_the_peft_names_the_bridge_relies_on_exist_in_the_installed_peft():
    from lrzoo.peft_bridge import peft_symbol_problems

    assert peft_symbol_problems() == []


def test_a_missing_peft_name_is_reported_readably(monkeypatch):
    from lrzoo import peft_bridge

    monkeypatch.setitem(peft_bridge.PEFT_SYMBOLS, "peft.tuners.tuners_utils:BaseTuner._gone_in_peft_1_0", ("self",))
    monkeypatch.setitem(peft_bridge.PEFT_SYMBOLS, "peft.utils.other:transpose", ("weight", "layout"))
    problems = peft_bridge.peft_symbol_problems()
    assert any("_gone_in_peft_1_0: missing in peft" in p for p in problems)
    assert any("transpose: lrzoo calls it with ('weight', 'layout')" in p for p in problems)


def test_the_readme_lists_exactly_the_registered_adapters():
    table = re.findall(r"^\| `([a-z_]+)` \|", (REPO / "README.md").read_text(), flags=re.M)
    assert sorted(table) == lrzoo.list_adapters(), "README's adapter table and the registry disagree"


def test_each_method_module_is_discovered():
    from lrzoo import methods

    files = sorted([p.stem for p in (PACKAGE / "methods").glob("*.py") if not p.stem.startswith("_")]
                   + [p.parent.name for p in (PACKAGE / "methods").glob("*/__init__.py")])
    assert list(methods.METHOD_MODULES) == files


def test_the_guard_sees_peft_imports_below_the_public_api():
    problems = [_peft_import_problem(ast.parse(line).body[0]) for line in (
        "from peft.utils.other import ModulesToSaveWrapper", "from peft.utils.constants import X",
        "from peft.tuners.lora import LoraLayer", "import peft.tuners.lora",
        "from peft.tuners.tuners_utils import check_adapters_to_merge")]
    assert all(problems), problems
    assert not any(_peft_import_problem(ast.parse(line).body[0]) for line in (
        "from peft import LoraConfig", "from peft.utils import get_peft_model_state_dict",
        "from peft.tuners.tuners_utils import BaseTunerLayer", "import peft"))


@pytest.mark.parametrize("name", lrzoo.list_adapters())
def test_every_adapter_has_a_docs_page(name):
    assert (REPO / "docs" / "adapters" / f"{name}.md").is_file()


#: a run's files and the held-out prefix are named in lrzoo/runs/files.py; a spelling elsewhere that is the whole
#: name (not a message that mentions it) is a second definition. Allowed: none.
SPELLED_ELSEWHERE_ALLOWED: set[tuple[str, str]] = set()


def test_run_file_names_and_the_heldout_prefix_are_spelled_once():
    from lrzoo.runs import files

    names = {value for key, value in vars(files).items() if key.isupper() and isinstance(value, str)}
    problems = []
    for path, name, _, tree in _modules():
        where = str(path.relative_to(REPO))
        if name == "lrzoo.runs.files":
            continue
        problems += [f"{where}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                     if isinstance(node, ast.Constant) and node.value in names
                     and (where, node.value) not in SPELLED_ELSEWHERE_ALLOWED]
    assert not problems, "spell these through lrzoo.runs.files:\n" + "\n".join(problems)


#: the test files that check the checkout as a whole, not one package area (tests/README.md)
CROSS_CUTTING_TESTS = {"test_architecture.py", "test_docs.py", "test_readme.py", "test_packaging.py", "test_learning.py",
                       "test_lm_eval.py"}


def test_the_tests_mirror_the_package():
    """tests/<area>/ for each package area (api/: the top-level modules); only the cross-cutting files at the top;
    a file name used once (the folders are not packages, so pytest imports each file by its name)."""
    tests = REPO / "tests"
    top = {p.name for p in tests.glob("test_*.py")}
    assert top <= CROSS_CUTTING_TESTS, f"move {sorted(top - CROSS_CUTTING_TESTS)} into the folder of the area they test"
    areas = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} | {"api"}
    folders = {p.parent.relative_to(tests).parts[0] for p in tests.rglob("test_*.py") if p.parent != tests}
    assert folders <= areas, f"tests/{sorted(folders - areas)} names no package area (lrzoo/<area>/ or api/)"
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
