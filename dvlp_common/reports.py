"""Markdown tables for the reports of evaluations and ablations."""
from __future__ import annotations

from pathlib import Path


def markdown_table(rows: list[dict], digits: int = 4) -> str:
    if not rows:
        return "(no rows)\n"
    keys = list(rows[0])
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(path: Path, rows: list[dict], title: str = "") -> str:
    text = (f"## {title}\n\n" if title else "") + markdown_table(rows)
    Path(path).write_text(text)
    return text
