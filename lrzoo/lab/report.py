"""Writing the plain report of ``lrzoo-report DIR``: ``results.md``, ``results.csv`` and ``results.png`` from
the rows of :func:`lrzoo.lab.table.collect` (the tuned report of ``--plan`` is :mod:`lrzoo.lab.tuned`)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from .plot import plot
from .table import CSV_FIELDS, REPORT_CSV, REPORT_MD, REPORT_PNG, aggregate, commands, markdown


def write_plain_report(rows: Sequence[dict[str, Any]], out: Path) -> str:
    """Write the report of ``rows`` into ``out`` and return its markdown."""
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(rows)
    listed = commands(rows)
    text = markdown(table) + (("\n" + listed) if listed else "")
    if any(row["tuned"] for row in rows):
        text += ("\nThese runs have a held-out selection_score (an lrzoo-sweep plan): `lrzoo-report DIR --plan PLAN` "
                 "reports the tuned comparison (chosen lr per cell, bootstrap intervals, missing cells).\n")
    (out / REPORT_MD).write_text(text)
    with open(out / REPORT_CSV, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in CSV_FIELDS} for row in table)
    plot(table, out / REPORT_PNG)
    return text
