"""Streamed training data: records read shard by shard, never held as one list, in a seeded order that a checkpoint
can resume exactly.

A :class:`ShardedStream` reads the shards of one rank (``shards[rank::world_size]``; rank and world size are
arguments, the library knows nothing of ``torch.distributed``). Each epoch visits the rank's shards in a seeded
order and shuffles with a *block* buffer: ``buffer`` good records are read, the optional ``keep`` filter runs on
the block as a batch (e.g. a token-length limit; it returns a :class:`Skip` or None per record), and the block is
emitted in a permutation seeded by (seed, epoch, rank, block number). The order is a pure function of the seed
and the data, and its position is small:

    epoch, shard (index in the epoch's shard order), record + offset (the raw record, and its byte offset for
    seekable readers, where the current block began), block (number of the block in the epoch), taken (records of
    the block already emitted)

``state_dict()`` returns it; ``load_state_dict()`` seeks the reader back to the start of the block (a byte offset or
row index: no re-reading of earlier data), refills that block and skips ``taken`` records, so the next record is the
one an uninterrupted stream would have given. A sliding shuffle buffer (webdataset's) would need its whole content
in the checkpoint for that; a block buffer needs five integers.

Readers: ``read(shard, record, offset)`` yields ``(record_index, next_offset, value)`` for every raw record from
``record`` on (``offset``: where that record starts, None when the reader cannot seek and must skip); ``value`` is a
record, None (left out by design, e.g. a held-out sentence: not a skip) or a :class:`Skip` (counted in the stream's
``SkipReport``, whose threshold applies once ``check_after`` records were seen). :func:`text_shards` cuts text
files into byte ranges so one big file still splits over ranks and shuffles by range; :func:`read_text_lines`
reads such a range. A ``save_to_disk`` folder is opened once per process by :func:`open_saved_dataset` and cut
into row ranges by :func:`row_shards`.
"""
from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .records import SkipReport

__all__ = [
    "Shard",
    "ShardedStream",
    "Skip",
    "StreamPosition",
    "expand_paths",
    "open_saved_dataset",
    "read_text_lines",
    "record_uid",
    "row_shards",
    "text_shards",
]

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_ALTS = re.compile(r"\{([^{}]*,[^{}]*)\}")


def _brace_expand(pattern: str) -> list[str]:
    m = _RANGE.search(pattern)
    if m:
        a, b = m.group(1), m.group(2)
        width = len(a) if (a.startswith("0") and len(a) > 1) or len(a) == len(b) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        out = []
        for i in range(lo, hi + step, step):
            out.extend(_brace_expand(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end() :]))
        return out
    m = _ALTS.search(pattern)
    if m:
        out = []
        for alt in m.group(1).split(","):
            out.extend(_brace_expand(pattern[: m.start()] + alt + pattern[m.end() :]))
        return out
    return [pattern]


def expand_paths(spec: str | os.PathLike | Iterable[str | os.PathLike], what: str = "file") -> list[str]:
    """Existing absolute file paths of ``spec``: a path, a brace pattern (``shards/{000..009}.tar``, ``{a,b}.txt``),
    a glob, or a list of those. Raises ``FileNotFoundError`` naming what does not exist (``what``: the kind)."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise ValueError(f"empty list of {what}s")
    out: list[str] = []
    missing: list[str] = []
    for item in items:
        for pat in _brace_expand(os.fspath(item)):
            if glob.has_magic(pat):
                hits = sorted(glob.glob(pat))
                if not hits:
                    missing.append(pat)
                out.extend(os.path.abspath(h) for h in hits)
            elif os.path.isfile(pat):
                out.append(os.path.abspath(pat))
            else:
                missing.append(pat)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{what}(s) not found: {shown}")
    return out


@dataclass(frozen=True)
class Shard:
    """What one rank reads as a unit: a file, a byte range ``[start, stop)`` of one, or rows ``[start, stop)`` of a
    datasets folder (``stop`` None: to the end). ``index`` is its place in the full shard list (record ids)."""
    source: str
    start: int = 0
    stop: int | None = None
    index: int = 0


@dataclass(frozen=True)
class Skip:
    """A raw record a reader could not use: counted, never trained on."""
    reason: str
    where: str


@dataclass
class StreamPosition:
    epoch: int = 0
    shard: int = 0  # index into the epoch's shard order of this rank
    record: int = 0  # raw record (within the shard) where the current block began
    offset: int | None = None  # its byte offset, for readers that seek
    block: int = 0  # blocks already completed in this epoch
    taken: int = 0  # records of the current block already emitted


def record_uid(shard: Shard, record: int) -> int:
    """A stable integer id of a raw record (the shard's place in the list and the record's in the shard)."""
    return shard.index * 2 ** 40 + record


class ShardedStream:
    """The records of one rank's shards, block-shuffled and resumable; see the module docstring."""

    def __init__(self, shards: Sequence[Shard], read: Callable[[Shard, int, int | None], Iterator[tuple]], *,
                 rank: int, world_size: int, seed: int, buffer: int,
                 keep: Callable[[list], list[Skip | None]] | None = None, report: SkipReport | None = None,
                 check_after: int = 100):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if buffer < 1:
            raise ValueError(f"shuffle buffer must be >= 1, got {buffer}")
        if len(shards) < world_size:
            raise ValueError(f"{len(shards)} shard(s) for {world_size} ranks: every rank needs at least one (split "
                             f"the data into more shards, or for text files make data.shard_bytes smaller)")
        self.shards = list(shards)
        self.mine = self.shards[rank::world_size]
        self.read, self.keep = read, keep
        self.rank, self.world_size, self.seed, self.buffer = rank, world_size, seed, buffer
        self.report = report if report is not None else SkipReport(name="stream")
        self.check_after = check_after
        self.seen = 0  # raw records read by this process (for the skip threshold)
        self.pos = StreamPosition()
        self._block: list | None = None
        self._next: StreamPosition | None = None  # where the block after the current one starts

    # -- order ---------------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, self.rank, 11]).permutation(len(self.mine))

    def _fill(self) -> None:
        """Read the block that starts at ``self.pos``; set ``self._block`` (permuted) and ``self._next``."""
        p = self.pos
        order = self._order(p.epoch)
        items: list = []
        shard, record, offset = p.shard, p.record, p.offset
        while shard < len(order) and len(items) < self.buffer:
            for index, next_offset, value in self.read(self.mine[order[shard]], record, offset):
                self.seen += 1
                record, offset = index + 1, next_offset
                if isinstance(value, Skip):
                    self.report.skip(value.reason, value.where)
                elif value is not None:  # None: not a training record by design (e.g. a held-out sentence)
                    items.append(value)
                    if len(items) == self.buffer:
                        break
            else:  # the shard is exhausted
                shard, record, offset = shard + 1, 0, None
        if self.keep is not None and items:
            reasons = self.keep(items)
            for why in reasons:
                if why is not None:
                    self.report.skip(why.reason, why.where)
            items = [item for item, why in zip(items, reasons) if not why]
        if (self.seen >= self.check_after or shard >= len(order)) and self.report.total:  # or the whole epoch read
            self.report.check(self.seen)
        perm = np.random.default_rng([self.seed, p.epoch, self.rank, p.block]).permutation(len(items))
        self._block = [items[i] for i in perm]
        self._next = StreamPosition(p.epoch, shard, record, offset, p.block + 1, 0)

    def take(self, n: int) -> list:
        """The next ``n`` records (epochs wrap)."""
        out: list = []
        idle_wraps = 0  # epochs ended since the last record: two means a whole epoch gave none
        while len(out) < n:
            if self._block is None:
                self._fill()
            if self.pos.taken < len(self._block):
                out.append(self._block[self.pos.taken])
                self.pos.taken += 1
                idle_wraps = 0
                continue
            # block used up: the next one, or the next epoch after the last shard
            if self._next.shard >= len(self.mine):
                idle_wraps += 1
                if idle_wraps > 1:
                    raise ValueError(f"rank {self.rank}'s shards hold no usable record "
                                     f"({self.report.total} skipped){self._summary()}")
                self.pos = StreamPosition(epoch=self.pos.epoch + 1)
            else:
                self.pos = self._next
            self._block = None
        return out

    def _summary(self) -> str:
        return f"\n{self.report.summary()}" if self.report.total else ""

    # -- checkpoint ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**asdict(self.pos), "rank": self.rank, "world_size": self.world_size, "num_shards": len(self.shards),
                "buffer": self.buffer}

    def load_state_dict(self, state: dict) -> None:
        saved = {k: state.get(k) for k in ("rank", "world_size", "num_shards", "buffer")}
        now = {"rank": self.rank, "world_size": self.world_size, "num_shards": len(self.shards),
               "buffer": self.buffer}
        if saved != now:
            raise ValueError(f"the checkpoint's data position was saved for {saved}, this run has {now}: a streamed "
                             "run resumes with the same shards, ranks and shuffle buffer")
        self.pos = StreamPosition(**{k: state[k] for k in asdict(StreamPosition())})
        self._block = None  # refilled from the block's start; then `taken` records are skipped


# --------------------------------------------------------------------------------------------------------------
# text files as byte ranges
# --------------------------------------------------------------------------------------------------------------
def text_shards(paths: Sequence[str], shard_bytes: int) -> list[Shard]:
    """Each file cut into byte ranges of about ``shard_bytes`` (a line belongs to the range its first byte is in)."""
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
    out: list[Shard] = []
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            raise ValueError(f"text file {path!r} is empty")
        for start in range(0, size, shard_bytes):
            out.append(Shard(path, start, min(start + shard_bytes, size), len(out)))
    return out


def read_text_lines(shard: Shard, record: int, offset: int | None,
                    parse: Callable[[str, str], Any]) -> Iterator[tuple[int, int, Any]]:
    """The lines of a byte-range shard from raw line ``record`` (at byte ``offset``) on, as
    ``(record, next_offset, parse(text, where) or Skip)``; undecodable lines are ``invalid_utf8`` skips. ``where``
    is ``file@byte``. A range that starts inside a line leaves that line to the range before."""
    with open(shard.source, "rb") as fh:
        if offset is None:  # from the range's first whole line, then skip `record` lines
            fh.seek(shard.start)
            if shard.start > 0:
                fh.seek(shard.start - 1)
                fh.readline()  # the rest of a line that began in the previous range (or just its newline)
            pos = fh.tell()
            for _ in range(record):
                if pos >= shard.stop:
                    return
                pos += len(fh.readline())
        else:
            fh.seek(offset)
            pos = offset
        index = record
        while pos < shard.stop:
            raw = fh.readline()
            if not raw:
                return
            where = f"{shard.source}@{pos}"
            nxt = pos + len(raw)
            try:
                text = raw.rstrip(b"\r\n").decode("utf-8-sig" if pos == 0 else "utf-8")
            except UnicodeDecodeError as e:
                yield index, nxt, Skip("invalid_utf8", f"{where} (byte {e.start})")
            else:
                yield index, nxt, parse(text, where)
            index, pos = index + 1, nxt


def row_shards(source: str, num_rows: int, shard_rows: int) -> list[Shard]:
    """A datasets folder of ``num_rows`` rows cut into row ranges of ``shard_rows``."""
    return [Shard(source, a, min(a + shard_rows, num_rows), i) for i, a in enumerate(range(0, num_rows, shard_rows))]


_SAVED: dict[tuple[str, tuple[str, ...] | None], Any] = {}  # opened folders (memory-mapped arrow), once per process


def open_saved_dataset(path: str, columns: Sequence[str] | None = None):
    """The ``datasets.Dataset`` of a ``save_to_disk`` folder of one split, opened once per process; ``columns``:
    the ones the reader needs (checked, the others dropped), None: all. Errors name the folder."""
    import datasets

    key = (os.path.abspath(path), None if columns is None else tuple(columns))
    if key not in _SAVED:
        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise ValueError(f"{path!r} is a folder but not one written by datasets save_to_disk: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{path!r} holds a DatasetDict with splits {list(ds)}; pass the folder of one split")
        if columns is not None:
            for c in columns:
                if c not in ds.column_names:
                    raise ValueError(f"saved dataset {path!r} has no column {c!r}; available columns: "
                                     f"{ds.column_names}")
            ds = ds.select_columns(list(columns))
        _SAVED[key] = ds
    return _SAVED[key]
