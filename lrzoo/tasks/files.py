"""Readers for the three local file formats (GLUE TSV, JSON list, JSONL), each record tagged with its
location so a malformed one is reported as ``file line N`` rather than as a crash mid-training. Files must
be UTF-8 text: a byte that is not is reported with its file, line and column (:func:`not_utf8`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import UserError
from .base import Record

csv.field_size_limit(1 << 24)  # RTE/QNLI passages are long; the csv default (128 KiB) is too small for some dumps


def read_tsv(path: Path, header: tuple[str, ...] | None, num_columns: int) -> list[Record]:
    """Rows of a GLUE TSV as ``{column: value}`` (by header name, or by position when ``header`` is None).

    GLUE TSVs are written without quoting (sentences contain ``"``), so they are read with
    ``QUOTE_NONE``; ``utf-8-sig`` drops MRPC's byte-order mark. ``header`` lists the columns the
    task needs; the file's header must contain them, and every row must have as many fields as it.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    start = 1
    if header is None:
        names, start = list(range(num_columns)), 0
    elif not lines:
        raise ValueError(f"{path} is empty; expected a header row with columns {list(header)}.")
    else:
        names = lines[0]
        missing = [c for c in header if c not in names]
        if missing:
            raise ValueError(f"{path}: header {names} lacks column(s) {missing}. This is not the GLUE TSV layout "
                             f"this task reads; use the file from the official GLUE download (header with {list(header)}).")
    records = []
    for number, fields in enumerate(lines[start:], start=start + 1):
        if not fields:
            continue  # blank line (trailing newline at the end of some dumps)
        where = f"{path} line {number}"
        if len(fields) != len(names):
            raise ValueError(f"{where} has {len(fields)} tab-separated fields, expected {len(names)} "
                             f"({names}). Fix or delete that row; GLUE files are read with csv.QUOTE_NONE, so a "
                             "stray tab or newline inside a sentence breaks the row.")
        records.append((where, dict(zip(names, fields))))
    return records


def read_json_list(path: Path) -> list[Record]:
    """Items of a file holding one JSON list (the LLM-Adapters layout)."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected one JSON list of objects.") from None
    if not isinstance(items, list):
        raise ValueError(f"{path} holds a JSON {type(items).__name__}, expected a list of objects "
                         "(one per example, as in LLM-Adapters' dataset/<task>/*.json).")
    return [(f"{path} item {i}", item) for i, item in enumerate(items)]


def read_jsonl(path: Path) -> list[Record]:
    """Objects of a JSON-lines file (blank lines skipped)."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    records.append((where, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where} is not valid JSON ({e}); each line must be one JSON object.") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    return records


def not_utf8(path: Path) -> UserError:
    """The error for a data file that is not UTF-8, naming its first bad byte's line and column (the decoder's
    own error names neither the file nor the line)."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
        start = 0  # decodes as a whole (the file changed meanwhile): point at its start
    except UnicodeDecodeError as err:
        start = err.start
    line = data.count(b"\n", 0, start) + 1
    column = start - data.rfind(b"\n", 0, start)
    byte = f"byte 0x{data[start]:02x}" if start < len(data) else "a cut-short character"
    return UserError(f"{path} line {line} is not UTF-8 text ({byte} at column {column}). Data files are read as "
                     "UTF-8: re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > NEW) or fix that line.")


def require_fields(record: object, fields: tuple[str, ...], where: str) -> dict:
    """``record`` as a dict that has every key in ``fields`` with a string value."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a {type(record).__name__}, expected an object with keys {list(fields)}.")
    bad = [f for f in fields if not isinstance(record.get(f), str)]
    if bad:
        raise ValueError(f"{where} lacks string field(s) {bad} (has keys {sorted(record)}). "
                         f"Every example needs {list(fields)}; fix or drop that row.")
    return record
