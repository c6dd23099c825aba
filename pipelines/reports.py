"""Small report writers shared by the stages: markdown tables and BLEU for reconstruction."""
from __future__ import annotations

from pathlib import Path


def bleu4(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 (pycocoevalcap's scorer) on lower-cased, whitespace-tokenised text; no Java needed."""
    from pycocoevalcap.bleu.bleu import Bleu

    if not predictions:
        return 0.0
    norm = lambda s: " ".join(s.lower().replace(".", " ").replace(",", " ").split()) or "<empty>"  # noqa: E731
    gts = {i: [norm(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [norm(p)] for i, p in enumerate(predictions)}
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(scores[3])


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
