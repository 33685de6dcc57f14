"""How the ledger commands print rows: an aligned table, CSV or a JSON array."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from typing import Any, TextIO


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.9f}".rstrip("0").rstrip(".") if value else "0"
    return str(value)


def render(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str, out: TextIO) -> None:
    """Write rows as an aligned table, CSV or a JSON array."""
    if fmt == "json":
        json.dump(list(rows), out, indent=2)
        out.write("\n")
        return
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
        out.write(buf.getvalue())
        return
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    numeric = [
        all(_is_number(row[i]) for row in cells) and cells != [] for i in range(len(columns))
    ]
    for line in [list(columns), *cells]:
        parts = [
            cell.rjust(w) if num else cell.ljust(w)
            for cell, w, num in zip(line, widths, numeric, strict=True)
        ]
        out.write("  ".join(parts).rstrip() + "\n")


def _is_number(text: str) -> bool:
    return text == "-" or re.fullmatch(r"-?[\d.]+(e-?\d+)?", text) is not None
