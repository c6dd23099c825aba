"""Disk caches of what frozen models compute (P-Former targets P(y) per caption in ``pformer.targets``, vision
features per image in ``vl_align.vision``).

A :class:`KeyedArrayCache` is a folder holding one memory-mapped ``.npy`` array (a row per key), the keys in row
order and a ``meta.json`` with the *producer fingerprint* (which model, which weights, which preprocessing). The
folder's name is derived from the fingerprint, so a cache made by other weights is never found, and ``meta.json``
is checked again on open. A key that is missing means the cache is incomplete: a new folder is written with the old rows
copied and only the missing keys computed, never a partial result. Folders are written under a temporary name and renamed, so a crash leaves no half cache.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .io import building_folder

FORMAT_VERSION = 1


def fingerprint(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class KeyedArrayCache:
    """Rows of a float array addressed by string keys, memory-mapped read-only."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text())
        self.meta = meta
        self.keys: list[str] = json.loads((self.folder / "keys.json").read_text())
        self.row = {k: i for i, k in enumerate(self.keys)}
        self.array = np.load(self.folder / "data.npy", mmap_mode="r")
        if self.array.shape[0] != len(self.keys):
            raise ValueError(f"{self.folder}: {self.array.shape[0]} rows for {len(self.keys)} keys (corrupt cache)")

    @staticmethod
    def folder_for(root: Path, producer: str) -> Path:
        return Path(root) / producer

    @classmethod
    def open_or_build(cls, root: str | Path, producer: str, producer_info: dict, keys: Sequence[str],
                      compute: Callable[[list[str]], torch.Tensor], batch_size: int = 64,
                      dtype: np.dtype = np.float32, progress: bool = False) -> "KeyedArrayCache":
        """Open the cache of ``producer`` if it holds every key, else extend it (old rows copied, new ones computed).

        ``compute(keys) -> Tensor [len(keys), ...]`` produces rows; ``producer`` is the fingerprint of whatever
        determines the rows (model weights, preprocessing) and names the folder.
        """
        folder = cls.folder_for(Path(root), producer)
        wanted = list(dict.fromkeys(keys))  # unique, order kept
        old: KeyedArrayCache | None = None
        if (folder / "meta.json").is_file():
            try:
                cache = cls(folder)
                if cache.meta.get("producer") == producer and cache.meta.get("version") == FORMAT_VERSION:
                    if all(k in cache.row for k in wanted):
                        return cache
                    old = cache  # valid but incomplete: its rows are copied, only new keys are computed
            except (ValueError, OSError, json.JSONDecodeError):
                old = None  # unreadable: rebuilt from scratch
        new_keys = [k for k in wanted if old is None or k not in old.row]
        all_keys = (old.keys if old is not None else []) + new_keys
        with building_folder(folder) as tmp:  # the old cache stays readable until the new one is in place
            rows = None

            def allocate(row_shape: tuple[int, ...]) -> np.ndarray:
                return np.lib.format.open_memmap(tmp / "data.npy", mode="w+", dtype=dtype,
                                                 shape=(len(all_keys), *row_shape))

            offset = 0
            if old is not None:
                rows = allocate(old.array.shape[1:])
                for start in range(0, len(old.keys), 4096):
                    stop = min(start + 4096, len(old.keys))
                    rows[start:stop] = old.array[start:stop]
                offset = len(old.keys)
            iterator = range(0, len(new_keys), batch_size)
            if progress:
                from tqdm import tqdm

                iterator = tqdm(iterator, desc=f"caching {producer_info.get('kind', 'rows')}", unit="batch")
            for start in iterator:
                chunk = new_keys[start:start + batch_size]
                values = compute(chunk).detach().float().cpu().numpy().astype(dtype)
                if rows is None:
                    rows = allocate(values.shape[1:])
                rows[offset + start:offset + start + len(chunk)] = values
            if rows is not None:
                rows.flush()
                del rows
            old = None  # release the old memory map before replacing its folder
            (tmp / "keys.json").write_text(json.dumps(all_keys))
            (tmp / "meta.json").write_text(json.dumps({"producer": producer, "version": FORMAT_VERSION,
                                                       "num_keys": len(all_keys), **producer_info}, indent=2))
        return cls(folder)

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        """Rows for ``keys`` as a float32 tensor [len(keys), ...]; a missing key is an error, never a zero row."""
        try:
            idx = [self.row[k] for k in keys]
        except KeyError as err:
            raise KeyError(f"{self.folder}: no cached row for {err.args[0]!r}; rebuild the cache") from None
        return torch.from_numpy(np.asarray(self.array[idx], dtype=np.float32))

    def __len__(self) -> int:
        return len(self.keys)


def key_digests(keys: Sequence[str]) -> np.ndarray:
    """The 128-bit blake2b digests of string keys as ``[n, 2]`` uint64 (high, low words)."""
    out = np.empty((len(keys), 2), dtype=np.uint64)
    for i, k in enumerate(keys):
        d = hashlib.blake2b(k.encode(), digest_size=16).digest()
        out[i, 0], out[i, 1] = int.from_bytes(d[:8], "big"), int.from_bytes(d[8:], "big")
    return out


class DigestArrayCache:
    """Rows of a float array addressed by the 128-bit digest of string keys, everything memory-mapped: for key sets
    too large for :class:`KeyedArrayCache`'s ``keys.json`` and dict (10M captions). The folder holds ``data.npy``
    ``[n, ...]``, ``digests.npy`` ``[n, 2]`` uint64 sorted by (high, low) word, and ``meta.json``; a lookup is a binary
    search. Written by a builder (e.g. ``pformer.targets.streamed_prompt_cache``) under a temporary name."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.digests = np.load(self.folder / "digests.npy", mmap_mode="r")
        self.array = np.load(self.folder / "data.npy", mmap_mode="r")
        if self.array.shape[0] != self.digests.shape[0]:
            raise ValueError(f"{self.folder}: {self.array.shape[0]} rows for {self.digests.shape[0]} keys (corrupt)")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """Row index of each key; a missing key is a KeyError naming it."""
        q = key_digests(keys)
        hi = self.digests[:, 0]
        idx = np.searchsorted(hi, q[:, 0], side="left")
        for i, (h, lo) in enumerate(q):
            j = int(idx[i])
            while j < len(hi) and hi[j] == h and self.digests[j, 1] != lo:  # equal high words: scan (rare)
                j += 1
            if j >= len(hi) or hi[j] != h:
                raise KeyError(f"{self.folder}: no cached row for {keys[i]!r}; rebuild the cache")
            idx[i] = j
        return idx

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        idx = self.rows_of(keys)
        order = np.argsort(idx)  # memory-mapped reads in file order
        rows = np.empty((len(keys), *self.shape), dtype=np.float32)
        rows[order] = self.array[idx[order]]
        return torch.from_numpy(rows)

    def __len__(self) -> int:
        return int(self.digests.shape[0])


__all__ = ["DigestArrayCache", "KeyedArrayCache", "fingerprint", "file_digest", "key_digests"]
