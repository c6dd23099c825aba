"""Skip accounting shared by every data loader.

A loader never drops a record silently: each bad record (empty caption, line that is not JSON,
undecodable bytes, missing or corrupt image, ...) is recorded with ``SkipReport.skip(reason, where)``
where ``where`` is ``"file:line"`` or a record id. The report keeps a count per reason and the first few
examples, and ``check(total_records)`` aborts with ``TooManySkippedRecords`` when the skipped fraction is
above ``max_skip_fraction`` (so a wrong field name or a broken file does not silently yield a tiny dataset).

Errors that concern the whole input (missing file, missing key in a COCO JSON, unknown format) are not
skips: the loaders raise one clear exception for those.
"""

from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger(__name__)

__all__ = ["SkipReport", "TooManySkippedRecords", "iter_decoded_lines", "iter_json_objects", "skip_too_long"]


class TooManySkippedRecords(ValueError):
    """Raised by ``SkipReport.check`` when too large a fraction of the records was skipped."""


class SkipReport:
    """Counts skipped records per reason and keeps the first ``max_examples`` locations of each.

    Args:
        max_skip_fraction: ``check(n)`` raises when ``total / n`` is strictly above this
            (``1.0`` never aborts, ``0.0`` aborts on the first skip).
        max_examples: how many ``where`` strings to keep per reason.
        name: optional label used in ``summary()`` (e.g. the file being loaded).
    """

    def __init__(self, max_skip_fraction: float = 0.05, max_examples: int = 5, name: str | None = None):
        if not 0.0 <= float(max_skip_fraction) <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction!r}")
        self.max_skip_fraction = float(max_skip_fraction)
        self.max_examples = int(max_examples)
        self.name = name
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    # -- recording -------------------------------------------------------------------------------
    def skip(self, reason: str, where: str) -> None:
        """Record one skipped record: ``reason`` is a short key (``"empty_caption"``), ``where`` its location."""
        first = reason not in self.counts
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(str(where))
        if first:
            logger.warning("skipping record (%s) at %s; further ones are counted in the SkipReport", reason, where)

    def merge(self, other: "SkipReport") -> "SkipReport":
        """Add ``other``'s counts and examples into this report (in place); returns ``self``."""
        for reason, n in other.counts.items():
            self.counts[reason] += n
            ex = self.examples.setdefault(reason, [])
            for w in other.examples.get(reason, []):
                if len(ex) >= self.max_examples:
                    break
                ex.append(w)
        return self

    # -- reading ---------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        """Number of skipped records over all reasons."""
        return sum(self.counts.values())

    def __len__(self) -> int:
        return self.total

    def __bool__(self) -> bool:  # a report object is truthy even when empty
        return True

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "total": self.total,
            "counts": dict(sorted(self.counts.items())),
            "examples": {k: list(self.examples.get(k, [])) for k in sorted(self.counts)},
            "max_skip_fraction": self.max_skip_fraction,
        }

    def summary(self) -> str:
        head = f"{self.name}: " if self.name else ""
        if not self.counts:
            return f"{head}no records skipped"
        lines = [f"{head}{self.total} record(s) skipped"]
        for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            ex = ", ".join(self.examples.get(reason, []))
            more = " ..." if n > len(self.examples.get(reason, [])) else ""
            lines.append(f"  {reason}: {n} (e.g. {ex}{more})")
        return "\n".join(lines)

    def check(self, total_records: int) -> None:
        """Raise ``TooManySkippedRecords`` when ``total / total_records > max_skip_fraction``.

        ``total_records`` counts every record seen, the skipped ones included.
        """
        if self.total == 0:
            return
        if total_records <= 0:
            raise TooManySkippedRecords(f"{self.total} record(s) skipped out of 0 records\n{self.summary()}")
        frac = self.total / total_records
        if frac > self.max_skip_fraction:
            raise TooManySkippedRecords(
                f"skipped {self.total} of {total_records} records ({frac:.1%}), above the allowed "
                f"max_skip_fraction={self.max_skip_fraction:.1%}; pass a SkipReport with a higher threshold "
                f"if this is expected.\n{self.summary()}"
            )

    def __repr__(self) -> str:
        return f"SkipReport(total={self.total}, counts={dict(self.counts)}, max_skip_fraction={self.max_skip_fraction})"


def iter_decoded_lines(path, report: SkipReport, where_prefix: str | None = None):
    """Yield ``(line_number, text)`` for each line of ``path`` that decodes as UTF-8 (1-based numbers).

    The file is read in binary and decoded line by line, so one line with invalid bytes is a counted skip
    (``"invalid_utf8"`` at ``file:line``) instead of an error for the whole file. A UTF-8 byte-order mark
    on the first line is dropped. The text has its line ending removed but is otherwise unstripped.
    """
    prefix = where_prefix if where_prefix is not None else str(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                report.skip("invalid_utf8", f"{prefix}:{lineno} (byte {e.start})")
                continue
            yield lineno, text


def iter_json_objects(path, report: SkipReport):
    """Yield ``(where, record)`` for each jsonl line holding a JSON object; blank lines, lines that are not JSON
    and JSON values that are not objects are counted skips (``where`` is ``file:line``)."""
    import json

    for lineno, line in iter_decoded_lines(path, report):
        where = f"{path}:{lineno}"
        if not line.strip():
            report.skip("empty_line", where)
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            report.skip("invalid_json", where)
            continue
        if not isinstance(rec, dict):
            report.skip("not_a_json_object", where)
            continue
        yield where, rec


def skip_too_long(lengths, limit: int, report: SkipReport, where) -> list[int]:
    """Indices of the records of at most ``limit`` tokens; each longer one is a counted ``too_long`` skip.

    ``lengths[i]`` is record i's token count as the stage would tokenize it; ``where(i)`` names the record.
    A skip rather than a silent truncation: the model would learn a text other than the record's.
    """
    keep = []
    for i, n in enumerate(lengths):
        if n > limit:
            report.skip("too_long", f"{where(i)} ({n} tokens > {limit})")
        else:
            keep.append(i)
    return keep
