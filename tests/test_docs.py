"""The code in the user guides runs: each guide's python blocks, in order, in a fresh process."""

from __future__ import annotations

import re

import pytest

from conftest import REPO

GUIDES = ["quickstart.md", "peft_interop.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

pytestmark = pytest.mark.slow


def python_blocks(guide: str) -> list[str]:
    return BLOCK.findall((REPO / "docs" / guide).read_text())


def test_every_guide_has_code():
    assert all(python_blocks(guide) for guide in GUIDES)


@pytest.mark.parametrize("guide", GUIDES)
def test_guide_code_runs(guide, fresh_python, tmp_path):
    code = "\n".join(python_blocks(guide))
    fresh_python(code, cwd=tmp_path, timeout=600)


def test_docs_name_every_adapter_page():
    import lrzoo

    missing = [name for name in lrzoo.list_adapters() if not (REPO / "docs" / "adapters" / f"{name}.md").is_file()]
    assert not missing, f"write docs/adapters/<name>.md for: {missing}"
