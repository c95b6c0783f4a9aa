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


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M), re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


def test_links_between_pages_resolve():
    """Every relative link in README.md and docs/ names a file that exists and, with '#', a heading of it:
    results move between sections as they are re-run, and a dead anchor fails silently in a browser."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    dead = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s)://, mailto:
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                dead.append(f"{page.relative_to(REPO)} -> {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
                dead.append(f"{page.relative_to(REPO)} -> {target} (no such heading)")
    assert not dead, "\n".join(dead)
