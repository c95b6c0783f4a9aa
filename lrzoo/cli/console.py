"""A quiet console for the entry points: transformers' LOAD REPORT table becomes one plain line.

Loading a pretrained encoder with a new classification head, transformers logs a table listing the head's
weights as MISSING, with advice to train them; for lrzoo-train that is the expected case, and the table
buried the run's own lines. :class:`LoadReportInWords` rewrites it as one sentence saying which weights are
new (and which checkpoint weights the model does not use). A report with anything else in it (a shape
mismatch, a conversion error) is left as transformers wrote it.
"""

from __future__ import annotations

import logging
import re

LOAD_LOGGER = "transformers.modeling_utils"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: report status -> what it means, in words
_PLAIN = {"MISSING": "new weights, not in the checkpoint (initialised at random, trained by the run)",
          "UNEXPECTED": "checkpoint weights this model does not use"}


def parse_load_report(text: str) -> dict[str, list[str]] | None:
    """``{status: [key, ...]}`` of a LOAD REPORT's table; None when ``text`` is not one or cannot be read."""
    text = _ANSI.sub("", text)
    if "LOAD REPORT" not in text:
        return None
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.fullmatch(r"-+\+[-+]*", line.strip())), None)
    if start is None:
        return None
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) < 2 or not cells[0] or not cells[1]:
            return None
        rows.setdefault(cells[1], []).append(cells[0])
    return rows or None


def _shown(keys: list[str], most: int = 6) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return ", ".join(keys[:most]) + more


class LoadReportInWords(logging.Filter):
    """Rewrites a LOAD REPORT that lists only MISSING/UNEXPECTED weights as one plain line."""

    def filter(self, record: logging.LogRecord) -> bool:
        rows = parse_load_report(str(record.msg)) if not record.args else None
        if rows is None or not set(rows) <= set(_PLAIN):
            return True
        model = _ANSI.sub("", str(record.msg)).split(" LOAD REPORT")[0].strip()
        parts = [f"{_PLAIN[status]}: {_shown(keys)}" for status, keys in sorted(rows.items())]
        record.msg, record.args = f"{model} loaded; " + "; ".join(parts), ()
        return True


def quiet_console() -> None:
    """Install the rewrites (idempotent)."""
    logger = logging.getLogger(LOAD_LOGGER)
    if not any(isinstance(f, LoadReportInWords) for f in logger.filters):
        logger.addFilter(LoadReportInWords())
