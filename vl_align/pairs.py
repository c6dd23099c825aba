"""Image-text pairs for the stage-2 runs: where they come from (``PairDataConfig``), the typed record every stage
and evaluation reads (``ImageTextPair``), the seeded training subset, and the caption-length filter."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import numpy as np

from dvlp_common.config import Config, ConfigError, param
from dvlp_common.records import SkipReport, skip_too_long

from .data import load_image_text_pairs
from .sources import embedded_files
from .video_inputs import VideoClipsConfig


@dataclass
class PairDataConfig(Config):
    source: str = param("embedded:easy-vqa", help="COCO caption JSON, jsonl, saved datasets folder, webdataset "
                                                   "shards, or embedded:easy-vqa")
    format: Literal["auto", "coco", "jsonl", "disk", "webdataset"] = param("auto", help="format of source")
    image_root: Optional[str] = param(None, help="folder the image paths are relative to (COCO, jsonl)")
    max_pairs: Optional[int] = param(None, help="train on this many pairs (a seeded subset); None: all")
    validation_images: int = param(0, ge=0, help="training images (with all their pairs) held out of every training "
                                                 "subset as the validation split, the same for every seed: for "
                                                 "choosing settings without the test split; 0: none")
    verify_images: bool = param(True, help="open every image once at load; bad ones are counted skips")
    streaming: bool = param(False, help="stream webdataset shards or a datasets folder (very large sets): no list "
                                        "of pairs in memory, shards split over ranks, block-shuffled, resumed at "
                                        "the checkpoint's position; the tower and P-Former run on each batch "
                                        "(vl_align.pair_stream)")
    shuffle_buffer: int = param(1000, ge=1, help="streaming: pairs shuffled together (one block)")
    shard_rows: int = param(10_000, ge=1, help="streaming: a datasets folder is cut into row ranges of this size")
    prompt_cache_source: Optional[str] = param(None, help="streaming: a text corpus holding the captions (txt, jsonl, "
                                                          "datasets folder); their P(y) are cached once, in parallel, "
                                                          "memory-mapped, and read per batch; None: the P-Former runs "
                                                          "on each batch")
    prompt_workers: int = param(1, ge=1, help="processes building the prompt_cache_source cache")
    video: VideoClipsConfig = field(default_factory=VideoClipsConfig)  # read when the front is a video front

    def check(self) -> None:
        if self.prompt_cache_source is not None and not self.streaming:
            raise ConfigError("prompt_cache_source", "is for streaming; in-memory pairs cache their captions' P(y)")
        if self.streaming:
            for key in ("max_pairs", "validation_images"):
                if getattr(self, key):
                    raise ConfigError(key, "picks from the whole set in memory; not with streaming")
            if self.source.startswith("embedded:"):
                raise ConfigError("streaming", "is for webdataset shards and datasets folders, not "
                                               f"{self.source}")


@dataclass(frozen=True)
class ImageTextPair:
    """One training or held-out pair. The image is a file (``image_path``) or, for webdataset shards and datasets
    folders with an image column, the encoded bytes (``image_bytes``); ``image`` gives whichever it is."""
    image_id: str
    caption: str
    image_path: str | None = None
    image_bytes: bytes | None = field(default=None, repr=False)  # an image's bytes in a repr would bury the rest

    @property
    def image(self) -> str | bytes:
        return self.image_path if self.image_path is not None else self.image_bytes


def resolve_pair_source(data: PairDataConfig, split: str = "train") -> tuple[str, str]:
    if data.source.startswith("embedded:"):
        return str(embedded_files(data.source.split(":", 1)[1])[f"pairs_{split}"]), "jsonl"
    return data.source, data.format


def load_pairs(data: PairDataConfig, seed: int, max_skip_fraction: float = 0.05,
               split: str = "train") -> tuple[list[ImageTextPair], SkipReport]:
    """(pairs, SkipReport) of ``split``: "train" (a seeded subset of ``max_pairs``, the same subset for every arm of
    a seed, never a validation image's pair), "validation" (the pairs of ``validation_images`` images of the
    training source, the same for every seed) or "test"."""
    report = SkipReport(max_skip_fraction=max_skip_fraction, name=f"image-text pairs ({split})")
    source, fmt = resolve_pair_source(data, "train" if split == "validation" else split)
    # undecoded: a shard's or datasets folder's image stays its encoded bytes (hashed for the feature cache, decoded
    # by the tower); decoding here would hold every image as pixels and lose the bytes the cache is keyed by
    ds = load_image_text_pairs(source, fmt=fmt, image_root=data.image_root, report=report,
                               verify_images=data.verify_images, decode_images=False)
    root = data.image_root if data.image_root is not None else str(Path(source).parent)  # data.py's rule for disk
    records = [_record(r, root) for r in ds]
    if split in ("train", "validation") and data.validation_images:
        images = sorted({r.image_id for r in records})
        if data.validation_images >= len(images):
            raise ConfigError("data.validation_images", f"asks for {data.validation_images} of the {len(images)} "
                                                        f"images of {source}, leaving none to train on")
        held = {images[i] for i in np.random.default_rng(29).permutation(len(images))[:data.validation_images]}
        records = [r for r in records if (r.image_id in held) == (split == "validation")]
    if data.max_pairs is not None and split == "train":
        if data.max_pairs > len(records):
            raise ConfigError("data.max_pairs", f"asks for {data.max_pairs} pairs but {source} has {len(records)}")
        keep = np.random.default_rng([seed, 23]).permutation(len(records))[:data.max_pairs]
        records = [records[i] for i in sorted(keep)]
    return records, report


def _record(row: dict, root: str) -> ImageTextPair:
    """A row of ``load_image_text_pairs``: ``image_path`` (coco, jsonl, a path column) or an undecoded ``image``
    ``{"bytes", "path"}`` (webdataset, an ``Image`` column), whose bytes are the file as stored; a datasets value
    with a path only is that file."""
    image_id, caption = str(row["image_id"]), row["caption"]
    if "image_path" in row:
        return ImageTextPair(image_id, caption, image_path=row["image_path"])
    image = row["image"]
    if image.get("bytes") is not None:
        return ImageTextPair(image_id, caption, image_bytes=image["bytes"])
    path = image["path"]
    return ImageTextPair(image_id, caption, image_path=os.path.abspath(os.path.join(root, path)))


def held_out_pairs(data: PairDataConfig, source: str | None, seed: int,
                   max_skip_fraction: float = 0.05) -> list[ImageTextPair] | None:
    """Held-out pairs: ``source`` (any format of ``data.source``, read whole), else the test split of an embedded
    ``data.source``; None when neither exists (a custom training source has no held-out split we could know of)."""
    if source is None and not data.source.startswith("embedded:"):
        return None
    if source is not None:
        data = replace(data, source=source, format="auto", max_pairs=None, streaming=False, prompt_cache_source=None)
    split = "test" if data.source.startswith("embedded:") else "train"  # "train": the given file itself, in full
    return load_pairs(data, seed, max_skip_fraction, split=split)[0]


def within_caption_limit(pairs: Sequence[ImageTextPair], report: SkipReport,
                         count_tokens: Callable[[list[str]], Sequence[int]], limit: int,
                         verbose: bool = False) -> list[ImageTextPair]:
    """The pairs whose caption fits ``limit`` tokens as the stage tokenizes it (``count_tokens(captions)`` -> their
    lengths); longer ones are counted skips (then the report's threshold applies to all skips)."""
    seen, before = len(pairs) + report.total, report.total
    lengths = []
    for start in range(0, len(pairs), 1024):
        lengths += [int(n) for n in count_tokens([r.caption for r in pairs[start:start + 1024]])]
    keep = skip_too_long(lengths, limit, report, lambda i: f"image_id {pairs[i].image_id} {pairs[i].caption[:40]!r}")
    report.check(seen)
    if verbose and report.total > before:
        print(f"{report.total - before} caption(s) longer than {limit} tokens skipped; {len(keep)} pairs left\n"
              f"{report.summary()}", flush=True)
    return [pairs[i] for i in keep]


__all__ = ["PairDataConfig", "ImageTextPair", "resolve_pair_source", "load_pairs", "held_out_pairs",
           "within_caption_limit"]
