"""Reports of evaluations and ablations: markdown tables, and the JSON + markdown + predictions layout every
evaluation writes (``write_report``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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


def write_report(run_dir: Path, name: str, result: dict[str, dict[str, Any]], rows: list[dict], title: str,
                 predictions: Any, note: str = "") -> None:
    """``<name>.json`` (``result``: named sections of numeric scores), ``<name>.md`` (``rows`` as a table, then
    ``note``) and the predictions (``predictions.json`` for ``eval``, else ``<name>_predictions.json``)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    pred_name = "predictions.json" if name == "eval" else f"{name}_predictions.json"
    (run_dir / pred_name).write_text(json.dumps(predictions, indent=2))
    text = write_table(run_dir / f"{name}.md", rows, title=title)
    if note:
        (run_dir / f"{name}.md").write_text(text + "\n" + note.strip() + "\n")
