"""Text corpora for stage 1 (language pre-training of the P-Former).

``load_text_corpus`` returns a ``datasets.Dataset`` with one column ``"text"`` from

* ``txt``: one sentence per line (read in binary and decoded per line),
* ``jsonl``: one JSON object per line with a text field,
* a folder written by ``Dataset.save_to_disk`` (``load_from_disk``).

Bad records are counted skips in a ``SkipReport`` (with ``file:line``): blank lines, lines with invalid
UTF-8, jsonl lines that are not JSON / not an object / lack the field / have an empty or non-string text.
Whole-input problems raise one clear error (missing path, unknown format, missing column).
The loader aborts with ``TooManySkippedRecords`` when the skipped fraction exceeds the report's
``max_skip_fraction`` (default 0.05).
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from dvlp_common.records import SkipReport, iter_decoded_lines, iter_json_objects

__all__ = ["load_text_corpus", "detect_text_format", "TEXT_FORMATS"]

TEXT_FORMATS = ("txt", "jsonl", "disk")
_SUFFIXES = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def detect_text_format(path: str | os.PathLike) -> str:
    """``"disk"`` for a folder, else by suffix (``.txt`` / ``.jsonl``); raises for anything else."""
    p = Path(path)
    if p.is_dir():
        return "disk"
    fmt = _SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"cannot tell the format of text corpus {str(p)!r} from its suffix {p.suffix!r}; "
            f"pass fmt= one of {TEXT_FORMATS} (.txt, .jsonl or a saved datasets folder)"
        )
    return fmt


def _finish(local: SkipReport, report: SkipReport | None, n_seen: int) -> None:
    """Merge the per-call report into the caller's one, then apply the threshold."""
    if report is not None:
        report.merge(local)
    local.check(n_seen)


def _read_txt(path: Path, rep: SkipReport, max_records: int | None) -> list[str]:
    texts: list[str] = []
    for lineno, line in iter_decoded_lines(path, rep):
        if max_records is not None and len(texts) >= max_records:
            break
        text = line.strip()
        if not text:
            rep.skip("empty_line", f"{path}:{lineno}")
            continue
        texts.append(text)
    return texts


def _read_jsonl(path: Path, rep: SkipReport, field: str, max_records: int | None) -> list[str]:
    texts: list[str] = []
    for where, rec in iter_json_objects(path, rep):
        if max_records is not None and len(texts) >= max_records:
            break
        if field not in rec:
            rep.skip(f"missing_field:{field}", where)
            continue
        value = rec[field]
        if not isinstance(value, str):
            rep.skip(f"non_string_field:{field}", where)
            continue
        text = value.strip()
        if not text:
            rep.skip("empty_text", where)
            continue
        texts.append(text)
    return texts


def _read_disk(path: Path, rep: SkipReport, field: str, max_records: int | None) -> datasets.Dataset:
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ValueError(f"{str(path)!r} is a folder but not one written by datasets save_to_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(
            f"{str(path)!r} holds a DatasetDict with splits {list(ds)}; pass the folder of one split "
            f"(e.g. {str(path / next(iter(ds)))!r})"
        )
    if field not in ds.column_names:
        raise ValueError(f"saved dataset {str(path)!r} has no column {field!r}; available columns: {ds.column_names}")
    feat = ds.features[field]
    if not (isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string")):
        raise ValueError(f"column {field!r} of saved dataset {str(path)!r} is {feat}, not a string column")
    ds = ds.select_columns([field])
    keep: list[int] = []
    for start in range(0, len(ds), 10_000):
        if max_records is not None and len(keep) >= max_records:
            break
        for i, value in enumerate(ds[start : start + 10_000][field], start=start):
            if max_records is not None and len(keep) >= max_records:
                break
            if value is None or not value.strip():
                rep.skip("empty_text", f"{path}[row {i}]")
                continue
            keep.append(i)
    if len(keep) != len(ds):
        ds = ds.select(keep)
    if field != "text":
        ds = ds.rename_column(field, "text")
    return ds


def load_text_corpus(
    path: str | os.PathLike,
    fmt: str = "auto",
    text_field: str = "text",
    max_records: int | None = None,
    report: SkipReport | None = None,
) -> datasets.Dataset:
    """Load a stage-1 text corpus as a ``datasets.Dataset`` with the single column ``"text"``.

    Args:
        path: a ``.txt`` file (one sentence per line), a ``.jsonl`` file, or a ``save_to_disk`` folder.
        fmt: ``"auto"`` (by suffix / folder), ``"txt"``, ``"jsonl"`` or ``"disk"``.
        text_field: the jsonl key / dataset column holding the text (ignored for txt).
        max_records: keep at most this many (good) records, read in file order.
        report: a ``SkipReport`` that receives this call's skips; its ``max_skip_fraction`` is the abort
            threshold (default 0.05 when ``None``).

    Texts are stripped of surrounding whitespace (txt/jsonl). Raises ``FileNotFoundError`` for a missing
    path, ``ValueError`` for an unknown format / missing column / empty file, and
    ``TooManySkippedRecords`` when too many records are bad.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"text corpus not found: {str(p)!r}")
    if fmt == "auto":
        fmt = detect_text_format(p)
    if fmt not in TEXT_FORMATS:
        raise ValueError(f"unknown text corpus format {fmt!r}; expected 'auto' or one of {TEXT_FORMATS}")
    if max_records is not None and max_records < 0:
        raise ValueError(f"max_records must be >= 0, got {max_records}")
    if fmt in ("txt", "jsonl") and p.is_dir():
        raise ValueError(f"{str(p)!r} is a folder, but fmt={fmt!r} needs a file")
    if fmt == "disk" and not p.is_dir():
        raise ValueError(f"{str(p)!r} is a file, but fmt='disk' needs a folder written by save_to_disk")

    rep = SkipReport(
        max_skip_fraction=report.max_skip_fraction if report is not None else 0.05,
        max_examples=report.max_examples if report is not None else 5,
        name=str(p),
    )
    if fmt == "disk":
        ds = _read_disk(p, rep, text_field, max_records)
        _finish(rep, report, len(ds) + rep.total)  # every record seen was kept or skipped
        return ds

    if p.stat().st_size == 0:
        raise ValueError(f"text corpus {str(p)!r} is empty")
    if fmt == "txt":
        texts = _read_txt(p, rep, max_records)
    else:
        texts = _read_jsonl(p, rep, text_field, max_records)
    _finish(rep, report, len(texts) + rep.total)  # every line seen was kept or skipped
    return datasets.Dataset.from_dict({"text": texts}, features=datasets.Features({"text": datasets.Value("string")}))
