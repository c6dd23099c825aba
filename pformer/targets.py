"""The stage-2 alignment targets: P(y) of every caption, computed once by the frozen P-Former and cached on disk.

``prompt_target_cache`` takes a list of captions (a ``KeyedArrayCache``); ``streamed_prompt_cache`` takes a text
corpus too large for a list (10M sentences) and builds a memory-mapped ``DigestArrayCache`` with several worker
processes, each streaming its share of the corpus's shards through the P-Former.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dvlp_common.cache import DigestArrayCache, KeyedArrayCache, file_digest, fingerprint, key_digests
from dvlp_common.io import building_folder

from .evaluation import prompts_for
from .model import CONFIG_NAME, WEIGHTS_NAME, PFormer, load_pformer_tokenizer


def pformer_fingerprint(pformer_dir: str | Path) -> str:
    """Identity of a saved P-Former: its weights and config files."""
    pformer_dir = Path(pformer_dir)
    return fingerprint("pformer", file_digest(pformer_dir / WEIGHTS_NAME), file_digest(pformer_dir / CONFIG_NAME))


def prompt_target_cache(pformer_dir: str | Path, captions: Sequence[str], cache_root: str | Path,
                        device: str | torch.device = "cpu", batch_size: int = 64,
                        dtype: torch.dtype | None = None) -> KeyedArrayCache:
    """P(y) [n, d_llm] for every caption, computed once with the frozen P-Former at ``pformer_dir``."""
    producer = fingerprint(pformer_fingerprint(pformer_dir), str(dtype))  # bf16 targets differ from fp32 ones
    state: dict = {}

    def compute(chunk: list[str]) -> torch.Tensor:
        if not state:  # load the P-Former only when something must be computed
            state["model"] = PFormer.from_pretrained(pformer_dir).to(device).eval()
            state["tok"] = load_pformer_tokenizer(pformer_dir)
        return prompts_for(state["model"], state["tok"], chunk, device, dtype)

    return KeyedArrayCache.open_or_build(Path(cache_root) / "prompt_targets", producer,
                                         {"kind": "pformer_prompts", "pformer_dir": str(pformer_dir)},
                                         captions, compute, batch_size=batch_size)


def _corpus_identity(sources: Sequence[str]) -> list:
    """Names, sizes and modification times of a corpus's files (a datasets folder: of the files inside it)."""
    files = []
    for src in sorted(set(sources)):
        found = sorted(Path(src).rglob("*")) if Path(src).is_dir() else [Path(src)]
        files += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in found if f.is_file()]
    return files


def streamed_prompt_cache(pformer_dir: str | Path, source, cache_root: str | Path, *, workers: int = 1,
                          threads: int | None = None, fmt: str = "auto", text_field: str = "text",
                          shard_bytes: int = 16 << 20, batch_size: int = 64, device: str = "cpu",
                          dtype: torch.dtype | None = None) -> DigestArrayCache:
    """P(y) [n, d_llm] of every distinct sentence of a text corpus (files or a datasets folder), never held as a list.

    ``workers`` processes (spawned; ``threads`` torch threads each) take the corpus's shards round-robin, read and
    tokenise them batch by batch, run the frozen P-Former and append rows and key digests to their own part files;
    the parts are then merged into one ``DigestArrayCache`` (rows sorted by digest, duplicates once), written under a
    temporary name. Built once per (P-Former weights, dtype, corpus files with sizes and modification times). Bad
    lines are not cached (training counts them as skips); a caption missing from the cache is a KeyError at use.
    """
    from .text_stream import corpus_shards

    shards, kind = corpus_shards(source, fmt, shard_bytes, text_field=text_field)
    producer = fingerprint(pformer_fingerprint(pformer_dir), str(dtype), "streamed",
                           _corpus_identity([s.source for s in shards]), text_field)
    folder = Path(cache_root) / "prompt_targets_streamed" / producer
    if (folder / "meta.json").is_file():
        return DigestArrayCache(folder)
    workers = max(1, min(workers, len(shards)))
    with building_folder(folder) as tmp:
        jobs = [(str(pformer_dir), shards[w::workers], kind, text_field, str(tmp / f"part{w}"), batch_size, device,
                 dtype, threads) for w in range(workers)]
        if workers == 1:
            parts = [_prompt_worker(jobs[0])]
        else:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(workers) as pool:  # no forked torch state
                parts = pool.map(_prompt_worker, jobs)
        count = _merge_parts(tmp, parts)
        (tmp / "meta.json").write_text(json.dumps({"producer": producer, "kind": "pformer_prompts_streamed",
                                                   "pformer_dir": str(pformer_dir), "num_keys": count,
                                                   "workers": workers}, indent=2))
    return DigestArrayCache(folder)


@torch.no_grad()
def _prompt_worker(job) -> dict:
    """One worker of ``streamed_prompt_cache``: P(y) of its shards' distinct sentences -> ``part.rows`` (float32)
    and ``part.keys`` ([n, 2] uint64 digests)."""
    from .text_stream import TextRecord, text_reader

    pformer_dir, shards, kind, field, part, batch_size, device, dtype, threads = job
    if threads:
        torch.set_num_threads(threads)
    model = PFormer.from_pretrained(pformer_dir).to(device).eval()
    tok = load_pformer_tokenizer(pformer_dir)
    read = text_reader(kind, field)
    seen: set[bytes] = set()  # digests of this worker's sentences (another worker's copies merge away)
    pending: list[str] = []
    n, shape = 0, None
    with open(part + ".rows", "wb") as rows_f, open(part + ".keys", "wb") as keys_f:
        def flush() -> None:
            nonlocal n, shape
            rows = prompts_for(model, tok, pending, device, dtype).cpu().numpy().astype(np.float32)
            rows_f.write(rows.tobytes())
            keys_f.write(key_digests(pending).tobytes())
            n, shape = n + len(pending), list(rows.shape[1:])
            pending.clear()

        for shard in shards:
            for _, _, value in read(shard, 0, None):
                if not isinstance(value, TextRecord):
                    continue
                digest = hashlib.blake2b(value.text.encode(), digest_size=16).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                pending.append(value.text)
                if len(pending) == batch_size:
                    flush()
        if pending:
            flush()
    return {"part": part, "rows": n, "shape": shape}


def _merge_parts(tmp: Path, parts: list[dict]) -> int:
    """The workers' parts -> ``digests.npy`` (sorted, unique) and ``data.npy`` in that order; returns the row count."""
    shape = next((p["shape"] for p in parts if p["shape"]), None)
    if shape is None:
        raise ValueError("the corpus holds no sentence to compute P(y) for")
    keys = np.concatenate([np.fromfile(p["part"] + ".keys", dtype=np.uint64).reshape(-1, 2) for p in parts])
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    ordered = keys[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)  # a sentence two workers both computed: once
    order = order[first]
    np.save(tmp / "digests.npy", ordered[first])
    offsets = np.cumsum([0] + [p["rows"] for p in parts])
    sources = [np.memmap(p["part"] + ".rows", dtype=np.float32, mode="r", shape=(p["rows"], *shape)) if p["rows"]
               else None for p in parts]
    data = np.lib.format.open_memmap(tmp / "data.npy", mode="w+", dtype=np.float32, shape=(len(order), *shape))
    for start in range(0, len(order), 65536):
        g = order[start:start + 65536]
        for k, src in enumerate(sources):
            hit = (g >= offsets[k]) & (g < offsets[k + 1])
            if hit.any():
                data[start + np.nonzero(hit)[0]] = src[g[hit] - offsets[k]]
    data.flush()
    del data, sources
    for p in parts:
        os.remove(p["part"] + ".rows")
        os.remove(p["part"] + ".keys")
    return len(order)


__all__ = ["pformer_fingerprint", "prompt_target_cache", "streamed_prompt_cache"]
