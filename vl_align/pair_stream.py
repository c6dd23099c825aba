"""Image-text pairs streamed for stage 2 (``data.streaming``): webdataset tar shards and ``save_to_disk`` folders
read shard by shard into :class:`~vl_align.pairs.ImageTextPair` records, never as a list, through
:class:`dvlp_common.stream.ShardedStream` (shards split over ranks, block-shuffled, resumable from a checkpoint's
data position).

A tar shard is one shard; its position is the byte offset of a sample's first member, so a resume seeks straight to
its block (compressed tars cannot seek and skip samples instead). A datasets folder is cut into row ranges
(``shard_rows``). Records carry the image's encoded bytes (as ``load_pairs`` keeps them); bad samples are counted
skips with the reasons of :mod:`vl_align.data` (empty or undecodable caption, missing or unreadable image).

What the step needs per batch, besides the records: :class:`TowerFeatures` runs the frozen tower on the batch's
images (no feature cache: streamed images are mostly seen once), :class:`LivePrompts` the frozen P-Former on the
batch's captions, and :class:`CaptionIds` gives equal captions equal ids on every rank (ITC positives).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import datasets
import torch

from dvlp_common.records import SkipReport
from dvlp_common.stream import (
    Shard,
    ShardedStream,
    Skip,
    expand_paths,
    open_saved_dataset,
    row_shards,
)

from .data import (
    _WDS_CAPTION_KEYS,
    _WDS_IMAGE_KEYS,
    _clean_caption,
    detect_pair_format,
    verify_image,
)
from .pairs import ImageTextPair, PairDataConfig

__all__ = ["CaptionIds", "LivePrompts", "TowerFeatures", "caption_limit", "pair_shards", "pair_stream"]

_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset: key = path up to the name's first dot
_SEEKABLE = (".tar",)


def pair_shards(data: PairDataConfig) -> tuple[list[Shard], str]:
    """The shards of ``data.source`` and its format (``webdataset`` or ``disk``)."""
    fmt = data.format if data.format != "auto" else detect_pair_format(data.source)
    if fmt == "webdataset":
        paths = expand_paths(data.source, what="webdataset shard")
        return [Shard(p, index=i) for i, p in enumerate(paths)], fmt
    if fmt == "disk":
        source = os.path.abspath(data.source)
        return row_shards(source, len(open_saved_dataset(source)), data.shard_rows), fmt
    raise ValueError(f"data.streaming reads webdataset shards or a saved datasets folder; {data.source!r} is {fmt}")


def _tar_samples(shard: Shard, record: int, offset: int | None) -> Iterator[tuple[int, int | None, dict]]:
    """``(index, offset of the next sample, {"__key__", ext: bytes})`` of a tar shard from sample ``record`` on."""
    seek = offset is not None and shard.source.endswith(_SEEKABLE)
    with open(shard.source, "rb") as fh:
        if seek:
            fh.seek(offset)
        with tarfile.open(fileobj=fh, mode="r:" if seek else "r|*") as tf:
            index = record if seek else 0
            sample: dict = {}
            for member in tf:
                found = _MEMBER.match(member.name) if member.isfile() else None
                if found is None:
                    continue
                key, ext = found.group(1), found.group(2).lower()
                if sample and sample["__key__"] != key:
                    start = member.offset if shard.source.endswith(_SEEKABLE) else None
                    if index >= record:
                        yield index, start, sample
                    index, sample = index + 1, {}
                data = tf.extractfile(member).read() if index >= record else b""
                sample.update({"__key__": key, ext: data})
            if sample and index >= record:
                yield index, None, sample


def _pair_reader(data: PairDataConfig, fmt: str) -> Callable[[Shard, int, int | None], Iterator[tuple]]:
    verify = data.verify_images

    def checked(image_id: str, caption, image: bytes | None, path: str | None, where: str):
        caption, why = _clean_caption(caption)
        if why is None and image is None and path is None:
            why = "missing_image"
        if why is None and verify:
            why = verify_image(image if image is not None else path)
        if why:
            return Skip(why, where)
        return ImageTextPair(image_id, caption, image_path=path if image is None else None, image_bytes=image)

    def read_tar(shard: Shard, record: int, offset: int | None):
        for index, nxt, ex in _tar_samples(shard, record, offset):
            ikey = "image" if "image" in ex else next((k for k in _WDS_IMAGE_KEYS if k in ex), None)
            ckey = "caption" if "caption" in ex else next((k for k in _WDS_CAPTION_KEYS if k in ex), None)
            where = f"{shard.source}:{ex['__key__']}"
            yield index, nxt, checked(ex["__key__"], ex.get(ckey) if ckey else None,
                                      ex.get(ikey) if ikey else None, None, where)

    def read_disk(shard: Shard, record: int, offset: int | None):
        ds = open_saved_dataset(shard.source)
        cols = ds.column_names
        ikey = "image" if "image" in cols else ("image_path" if "image_path" in cols else None)
        if ikey is None or "caption" not in cols:
            raise ValueError(f"saved dataset {shard.source!r} needs an image column 'image' and a "
                             f"'caption' column; available columns: {cols}")
        if isinstance(ds.features[ikey], datasets.Image):
            ds = ds.cast_column(ikey, datasets.Image(decode=False))
        root = data.image_root if data.image_root is not None else str(Path(shard.source).parent)
        for a in range(shard.start + record, shard.stop, 256):
            rows = ds[a:min(a + 256, shard.stop)]
            for k in range(len(rows["caption"])):
                i = a + k
                img, where = rows[ikey][k], f"{shard.source}[row {i}]"
                image_id = str(rows["image_id"][k]) if "image_id" in rows else str(i)
                if isinstance(img, dict):
                    image, path = img.get("bytes"), img.get("path")
                    path = None if image is not None or not path else os.path.abspath(os.path.join(root, path))
                else:
                    image, path = None, (os.path.abspath(os.path.join(root, img)) if img else None)
                yield i - shard.start, None, checked(image_id, rows["caption"][k], image, path, where)

    return read_tar if fmt == "webdataset" else read_disk


def pair_stream(data: PairDataConfig, *, seed: int, rank: int, world_size: int, report: SkipReport,
                keep: Callable[[list[ImageTextPair]], list[Skip | None]] | None = None) -> ShardedStream:
    """This rank's resumable stream of training pairs (see the module docstring)."""
    shards, fmt = pair_shards(data)
    return ShardedStream(shards, _pair_reader(data, fmt), rank=rank, world_size=world_size, seed=seed,
                         buffer=data.shuffle_buffer, keep=keep, report=report)


def caption_limit(count_tokens: Callable[[list[str]], Sequence[int]], limit: int):
    """A ``keep`` filter: captions longer than ``limit`` tokens (as the stage tokenizes them) are counted skips."""
    def keep(pairs: list[ImageTextPair]) -> list[Skip | None]:
        lengths = [int(n) for n in count_tokens([p.caption for p in pairs])]
        return [Skip("too_long", f"image_id {p.image_id} {p.caption[:40]!r} ({n} tokens > {limit})")
                if n > limit else None for p, n in zip(pairs, lengths)]
    return keep


class CaptionIds:
    """caption -> an id equal for equal captions on every rank (the first 63 bits of its blake2b digest), in place
    of the in-memory index of every distinct caption."""

    def __getitem__(self, caption: str) -> int:
        return int.from_bytes(hashlib.blake2b(caption.encode(), digest_size=8).digest(), "big") >> 1


class TowerFeatures:
    """The frozen tower's features ``[B, N, D]`` of a batch's images, computed for each batch; the same computation
    as a row of ``vision_feature_cache`` (float32, under autocast for bf16/fp16)."""

    def __init__(self, tower, device, dtype: torch.dtype | None):
        self.tower, self.device, self.dtype = tower, torch.device(device), dtype

    def get(self, images: Sequence) -> torch.Tensor:
        pixels = self.tower.preprocess(list(images)).to(self.device)
        autocast = self.dtype in (torch.bfloat16, torch.float16)
        ctx = torch.autocast(self.device.type, dtype=self.dtype) if autocast else contextlib.nullcontext()
        with ctx:
            return self.tower(pixels).float()


class LivePrompts:
    """P(y) ``[B, n, d_llm]`` of a batch's captions from the frozen P-Former, computed for each batch (what
    ``prompt_target_cache`` would hold); ``shape`` is one caption's."""

    def __init__(self, pformer_dir: str | os.PathLike, device, dtype: torch.dtype | None):
        from pformer.evaluation import prompts_for
        from pformer.model import PFormer, load_pformer_tokenizer

        self.model = PFormer.from_pretrained(pformer_dir).to(device).eval()
        self.tokenizer = load_pformer_tokenizer(pformer_dir)
        self.device, self.dtype, self._prompts = device, dtype, prompts_for
        self.shape = tuple(self.get(["a"]).shape[1:])

    @torch.no_grad()
    def get(self, captions: Sequence[str]) -> torch.Tensor:
        return self._prompts(self.model, self.tokenizer, list(captions), self.device, self.dtype).cpu()
