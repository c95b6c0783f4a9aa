"""Answer equivalence for MATH (Hendrycks et al., arXiv 2103.03874): both answers are rewritten to a
canonical LaTeX string and compared exactly.

The rewrites follow the MATH paper's released ``strip_string``: drop layout noise (line breaks,
``\\!``, ``\\left``/``\\right``, degrees, ``\\$``, ``\\%``, a trailing ``\\text{ unit}``, spaces), unify
``\\tfrac``/``\\dfrac`` to ``\\frac``, add the braces that shorthand leaves out (``\\frac12``,
``\\sqrt3``), write ``0.5`` and integer ratios ``a/b`` as ``\\frac{a}{b}``, and drop a short left-hand side
(``x = 3`` -> ``3``). It is deliberately string-level: ``2`` and ``2.0`` stay different, as in MATH.
"""

from __future__ import annotations

import re

_SQRT_SHORTHAND = re.compile(r"\\sqrt([^{])")
_FRAC_TWO_SHORTHAND = re.compile(r"\\frac([^{])([^{])")
_FRAC_ONE_SHORTHAND = re.compile(r"\\frac([^{])")
_INTEGER_RATIO = re.compile(r"(-?\d+)/(-?\d+)")

# Plain substring deletions / replacements, applied in this order before the structural rewrites.
_REPLACEMENTS = (
    ("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
    ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""),
)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (``\\fbox{...}`` if there is none), braces
    balanced; the brace-less form ``\\boxed 5`` reads up to the next ``$``. None if absent."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
    if start < 0:
        return None
    rest = text[start:]
    if rest.startswith("\\boxed "):
        return rest[len("\\boxed "):].split("$")[0].strip()
    open_at = rest.find("{")
    if open_at < 0:
        return None
    depth = 0
    for i in range(open_at, len(rest)):
        depth += {"{": 1, "}": -1}.get(rest[i], 0)
        if depth == 0:
            return rest[open_at + 1:i]
    return None


def strip_string(answer: str) -> str:
    """Canonical form of a MATH answer (see the module docstring for the rewrites)."""
    s = answer
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    if "\\text{ " in s:  # "5 \text{ cm}": a unit written after the value
        s = s.split("\\text{ ")[0]
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 3", "k=3": keep the value
        s = sides[1]
    s = _SQRT_SHORTHAND.sub(r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    s = _FRAC_TWO_SHORTHAND.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_ONE_SHORTHAND.sub(r"\\frac{\1}", s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    ratio = _INTEGER_RATIO.fullmatch(s)
    if ratio and all(str(int(part)) == part for part in ratio.groups()):
        s = "\\frac{%s}{%s}" % ratio.groups()
    return s


def is_equiv(prediction: str | None, gold: str | None) -> bool:
    """Whether two MATH answers are the same after :func:`strip_string` (None only equals None)."""
    if prediction is None or gold is None:
        return prediction is None and gold is None
    return strip_string(prediction) == strip_string(gold)
