"""Results as text and data: a GitHub markdown table of rows, and a JSON file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str],
                   headers: Sequence[str] | None = None,
                   formats: dict[str, str] | None = None) -> str:
    """Rows of dicts as a GitHub markdown table: floats to 4 significant digits unless
    ``formats`` gives a column its own format spec (e.g. ``{"ms": ".1f"}``); ``headers``
    replaces the column keys in the first line."""
    formats = formats or {}

    def fmt(column: str, v: Any) -> str:
        if isinstance(v, float):
            return format(v, formats.get(column, ".4g"))
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(headers or columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path | None, payload: dict[str, Any]) -> None:
    """``payload`` as indented JSON at ``path``, its folder made; nothing when ``path`` is empty."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
