"""A stage-1 corpus too large for a list: streamed from text files (``.txt``, ``.jsonl``; one file, a brace/glob
pattern or a list) or a ``save_to_disk`` folder, sharded over ranks and block-shuffled by
:class:`dvlp_common.stream.ShardedStream` (resumable from a checkpoint's data position).

Files are cut into byte ranges (``shard_bytes``), so one 10M-line file splits over ranks and its shuffle mixes
ranges from all of it; a datasets folder into row ranges (``shard_rows``). A record is a :class:`TextRecord`:
its stable id (shard and line), the stripped text and where it is (``file@byte`` or ``folder[row i]``). Bad lines
are counted skips with the same reasons as :func:`pformer.data.load_text_corpus` (blank, invalid UTF-8, not JSON,
missing field, non-string or empty text). Tokenising happens in the batch builder, per batch (``Stage1Collator``),
and the token-length limit is a ``keep`` filter on each shuffle block.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dvlp_common.records import SkipReport
from dvlp_common.stream import (
    Shard,
    ShardedStream,
    Skip,
    expand_paths,
    open_saved_dataset,
    read_text_lines,
    record_uid,
    row_shards,
    text_shards,
)

from .data import TEXT_FORMATS, detect_text_format

__all__ = ["TextRecord", "corpus_shards", "heldout_from_head", "stream_text_corpus", "text_reader"]


@dataclass(frozen=True)
class TextRecord:
    uid: int  # stable over runs: the masking of a sentence is seeded by it
    text: str
    where: str


def _resolve(source: str | os.PathLike | Sequence[str], fmt: str) -> tuple[list[str], str]:
    """(paths, format): a folder is one datasets folder; anything else expands to files of one format."""
    if not isinstance(source, (list, tuple)) and Path(source).is_dir():
        if fmt not in ("auto", "disk", "datasets"):
            raise ValueError(f"{os.fspath(source)!r} is a folder, but fmt={fmt!r} needs files")
        return [os.fspath(source)], "disk"
    paths = expand_paths(source, what="text corpus file")
    kinds = {detect_text_format(p) for p in paths} if fmt == "auto" else {fmt}
    if len(kinds) != 1 or next(iter(kinds)) not in ("txt", "jsonl"):
        raise ValueError(f"streamed text corpus {source!r}: need .txt or .jsonl files of one format, got "
                         f"{sorted(kinds)} (formats: {TEXT_FORMATS})")
    return paths, kinds.pop()


def corpus_shards(source, fmt: str = "auto", shard_bytes: int = 64 << 20, shard_rows: int = 100_000,
                  text_field: str = "text") -> tuple[list[Shard], str]:
    """The shards of a corpus and its format (``txt``, ``jsonl`` or ``disk``)."""
    paths, kind = _resolve(source, fmt)
    if kind != "disk":
        return text_shards(paths, shard_bytes), kind
    return row_shards(paths[0], len(open_saved_dataset(paths[0], [text_field])), shard_rows), kind


def text_reader(kind: str, text_field: str = "text", exclude: frozenset[str] = frozenset(),
                chunk_rows: int = 1000) -> Callable[[Shard, int, int | None], Iterator[tuple]]:
    """``read(shard, record, offset)`` for :class:`ShardedStream`; sentences in ``exclude`` (held out) are left out,
    not skipped."""

    def record(shard: Shard, index: int, text: str, where: str):
        text = text.strip()
        if text in exclude:
            return None
        return TextRecord(record_uid(shard, index), text, where)

    def parse_line(shard: Shard):
        def parse(line: str, where: str):
            if not line.strip():
                return Skip("empty_line", where)
            if kind == "txt":
                return (line, where)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                return Skip("invalid_json", where)
            if not isinstance(rec, dict):
                return Skip("not_an_object", where)
            if text_field not in rec:
                return Skip(f"missing_field:{text_field}", where)
            value = rec[text_field]
            if not isinstance(value, str):
                return Skip(f"non_string_field:{text_field}", where)
            if not value.strip():
                return Skip("empty_text", where)
            return (value, where)
        return parse

    def read(shard: Shard, start: int, offset: int | None):
        if kind == "disk":
            ds = open_saved_dataset(shard.source, [text_field])
            for a in range(shard.start + start, shard.stop, chunk_rows):
                rows = ds[a:min(a + chunk_rows, shard.stop)][text_field]
                for k, value in enumerate(rows):
                    index = a - shard.start + k
                    where = f"{shard.source}[row {a + k}]"
                    if value is None or not value.strip():
                        yield index, None, Skip("empty_text", where)
                    else:
                        yield index, None, record(shard, index, value, where)
            return
        for index, nxt, value in read_text_lines(shard, start, offset, parse_line(shard)):
            if isinstance(value, tuple):
                value = record(shard, index, *value)
            yield index, nxt, value

    return read


def heldout_from_head(shards: Sequence[Shard], kind: str, count: int, seed: int, text_field: str = "text",
                      pool: int | None = None) -> list[str]:
    """``count`` distinct sentences held out of training: a seeded choice among the first ``pool`` (default
    ``max(10 * count, 1000)``) distinct good sentences of the corpus in file order, the same on every rank. Reading
    the head only keeps this independent of the corpus size; every copy of a chosen sentence leaves training."""
    if count == 0:
        return []
    pool = pool or max(10 * count, 1000)
    read = text_reader(kind, text_field)
    seen: dict[str, None] = {}
    for shard in shards:
        for _, _, value in read(shard, 0, None):
            if isinstance(value, TextRecord):
                seen.setdefault(value.text)
                if len(seen) >= pool:
                    break
        if len(seen) >= pool:
            break
    distinct = sorted(seen)
    if count >= len(distinct):
        raise ValueError(f"data.holdout={count} leaves no training sentence among the first {len(distinct)} "
                         "distinct ones")
    chosen = np.random.default_rng([seed, 17]).choice(len(distinct), size=count, replace=False)
    return sorted(distinct[i] for i in chosen)


def stream_text_corpus(source, *, rank: int, world_size: int, seed: int, buffer: int = 10_000,
                       fmt: str = "auto", text_field: str = "text", shard_bytes: int = 64 << 20,
                       shard_rows: int = 100_000, exclude: Sequence[str] = (),
                       keep: Callable[[list[TextRecord]], list[Skip | None]] | None = None,
                       report: SkipReport | None = None) -> ShardedStream:
    """A resumable stream of :class:`TextRecord` for one rank (see the module docstring)."""
    shards, kind = corpus_shards(source, fmt, shard_bytes, shard_rows, text_field)
    return ShardedStream(shards, text_reader(kind, text_field, frozenset(exclude)), rank=rank,
                         world_size=world_size, seed=seed, buffer=buffer, keep=keep, report=report)
