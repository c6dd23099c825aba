"""Video clips through the stage-2 pipelines: what a stage reads when its front is a video front
(``front.video.enabled``), and the clips it feeds it.

``data.source`` is then a video source (``embedded:motion`` or a caption file of ``vl_align.video_data``: jsonl of
``video_path``/``caption``, MSR-VTT, VATEX, MSVD, LAVIS lists), read with the settings in ``data.video``. The frame
count T is ``front.video.num_frames``: one key, saved with the front, so that ``dvlp evaluate`` samples what the
front was trained on.

* :class:`VideoSource` loads the training pairs (the seeded ``data.max_pairs`` subset, as for images) and the
  held-out ones; it plugs into ``vl_align.inputs.prepare_stage_inputs`` (``video=``), so the P(y) targets, the caption
  ids and the collators are the image pipeline's.
* :class:`VideoInputs` is the stage's ``images`` callable for video: clip paths -> ``{"pixel_values_videos":
  [B, T, 3, S, S]}``. Training samples head-tail frames (the authors') and one random resized crop per clip; the
  randomness comes from the global torch generator, which the training loop re-seeds from (seed, step, rank) at
  every step, so a resumed run draws the uninterrupted run's frames. Evaluation samples uniformly, without a crop,
  and may reorder the sampled frames (``frame_order``: reversed, or a seeded shuffle) to probe order-awareness.
  With a frozen-frame cache (``vl_align.video_cache``; training clips, no random crop, ``vision.cache_features``)
  it samples the same frame indices without decoding and returns ``{"frozen_hidden_videos": [B, T, N, C]}``, the
  cached output of the tower's blocks below the first temporal module.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from dvlp_common import zoo
from dvlp_common.config import Config, ConfigError, param
from dvlp_common.records import SkipReport

from .video_cache import (
    VideoFrameCache,
    clip_indices,
    estimated_bytes,
    live_reason,
    video_frame_cache,
)
from .video_data import (
    VIDEO_EMBEDDED,
    FramePreprocessor,
    Sampling,
    VideoDataConfig,
    VideoFormat,
    VideoTextPair,
    is_video_source,
    load_clip,
    load_video_pairs,
)

FrameOrder = Literal["as_is", "reversed", "shuffled"]


@dataclass
class VideoClipsConfig(Config):
    """``data.video``: how a video front's stage reads ``data.source`` (ignored by image fronts)."""
    format: VideoFormat = param(  # noqa: RUF009 (a str default; ruff does not see through the Literal alias)
        "auto", help="format of a video caption file in data.source (auto: detected)")
    video_root: str | None = param(None, help="folder the videos are in / relative to (default: the caption "
                                                 "file's folder)")
    annotation_split: str | None = param(None, help="MSR-VTT: the split of data.source trained on (train, "
                                                       "validate, test); None: all")
    eval_annotation_split: str | None = param(None, help="MSR-VTT: the split of eval.captions_source evaluated "
                                                            "on; None: all")
    train_sampling: Sampling = param(  # noqa: RUF009 (as format)
        "headtail", help="training frame sampling: headtail (T/2 sorted random frames from each half, the authors') "
                         "or uniform; evaluation is always uniform")
    crop_min_scale: float | None = param(None, gt=0.0, le=1.0, help="training: one random resized crop per "
                                                                       "clip of at least this share of the area "
                                                                       "(1.0: none); None: 1.0 for "
                                                                       "embedded:motion (a crop can cut its shape "
                                                                       "out of frames), 0.5 (the authors') else")
    verify_videos: bool = param(True, help="open every video once at load: missing, broken or too-short ones are "
                                           "counted skips naming the file")
    frame_cache_max_gib: float = param(32.0, ge=0.0, help="training reads the frozen blocks' per-frame output from a "
                                                          "disk cache of every frame of every clip (with "
                                                          "vision.cache_features, no random crop, modules above "
                                                          "block 0); above this size the tower runs live instead "
                                                          "(long real videos)")


@dataclass(frozen=True)
class VideoRecord:
    """A video-text pair as the stage collators read records: ``image_id`` (the video id), ``caption`` and
    ``image`` (what the inputs callable gets: the video's path); ``meta`` holds the caption file's other fields
    (embedded:motion: family, category, key words, pair id)."""
    image_id: str
    caption: str
    video_path: str
    meta: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def image(self) -> str:
        return self.video_path

    @classmethod
    def of(cls, pair: VideoTextPair) -> VideoRecord:
        return cls(pair.video_id, pair.caption, pair.video_path, {**pair.meta, "video_id": pair.video_id})


def crop_scale(data) -> float:
    """``data.video.crop_min_scale``, or its default for ``data.source``."""
    if data.video.crop_min_scale is not None:
        return float(data.video.crop_min_scale)
    return 1.0 if is_video_source(data.source) else 0.5


def video_data_config(data, num_frames: int, max_skip_fraction: float, source: str | None = None,
                      annotation_split: str | None = None) -> VideoDataConfig:
    """The ``vl_align.video_data`` config of a stage's ``data`` (a ``PairDataConfig``) for ``source``."""
    source = data.source if source is None else source
    if source.startswith("embedded:") and not is_video_source(source):
        raise ConfigError("data.source", f"{source} is an image set, but front.video.enabled is true; a video front "
                                         f"trains and evaluates on video: "
                                         f"{', '.join('embedded:' + n for n in VIDEO_EMBEDDED)} or a video caption "
                                         "file (data.video.format)")
    return VideoDataConfig(source=source, format=data.video.format if source == data.source else "auto",
                           video_root=data.video.video_root, annotation_split=annotation_split,
                           num_frames=num_frames, train_sampling=data.video.train_sampling,
                           crop_min_scale=crop_scale(data), verify_videos=data.video.verify_videos,
                           max_skip_fraction=max_skip_fraction)


def check_video_data(data) -> None:
    """The image-pair options a video stage does not have (a clear error instead of an ignored key)."""
    if data.streaming:
        raise ConfigError("data.streaming", "streams image shards; a video front reads its caption file in memory")
    if data.validation_images:
        raise ConfigError("data.validation_images", "carves images out of an image set; not for video sources")


class VideoSource:
    """The pairs of a video stage: ``load_pairs()`` (the training split, the seeded ``data.max_pairs`` subset),
    ``held_out(source=None)`` (the test split of an embedded set, or ``source``, a caption file read whole) and
    ``inputs(tower)`` (the training clips' :class:`VideoInputs`). Plugs into ``prepare_stage_inputs(video=...)``."""

    def __init__(self, data, num_frames: int, seed: int, max_skip_fraction: float = 0.05, video=None):
        check_video_data(data)
        self.data, self.num_frames, self.seed = data, int(num_frames), int(seed)
        self.video = video  # the front's VideoConfig: which blocks are frozen (the frame cache); None: always live
        self.max_skip_fraction = max_skip_fraction
        self.config = video_data_config(data, num_frames, max_skip_fraction,
                                        annotation_split=data.video.annotation_split)

    def load_pairs(self) -> tuple[list[VideoRecord], SkipReport]:
        split = "train" if is_video_source(self.data.source) else "all"
        pairs, report = load_video_pairs(self.config, split="train")
        report.name = f"video-text pairs ({split})"
        records = [VideoRecord.of(p) for p in pairs]
        if self.data.max_pairs is not None:  # the image pipeline's rule: the same subset for every arm of a seed
            if self.data.max_pairs > len(records):
                raise ConfigError("data.max_pairs", f"asks for {self.data.max_pairs} pairs but {self.data.source} "
                                                    f"has {len(records)}")
            keep = np.random.default_rng([self.seed, 23]).permutation(len(records))[:self.data.max_pairs]
            records = [records[i] for i in sorted(keep)]
        return records, report

    def held_out(self, source: str | None = None, annotation_split: str | None = None) -> list[VideoRecord] | None:
        return held_out_videos(self.data, self.num_frames, source, annotation_split, self.max_skip_fraction)

    def inputs(self, tower, paths: Sequence[str] = (), device="cpu", dtype: torch.dtype | None = None,
               verbose: bool = False) -> VideoInputs:
        """The training clips' inputs: from the frozen-frame cache of ``paths`` (every frame of every clip, built
        once with ``tower`` under autocast in ``dtype``) where it is valid (``video_cache.live_reason``), else
        decoded and preprocessed for the tower to run live; ``verbose`` says which in the log."""
        reason = live_reason(tower, self.video, self.config.crop_min_scale)
        if reason is None and not len(paths):
            reason = "no training clips were given to cache"
        if reason is None:
            size = estimated_bytes(tower, paths, dtype) / 2 ** 30
            if size > self.data.video.frame_cache_max_gib:
                reason = (f"the frozen-frame cache would take {size:.1f} GiB > data.video.frame_cache_max_gib="
                          f"{self.data.video.frame_cache_max_gib}")
        frames = None
        if reason is None:
            frames = video_frame_cache(tower, self.video, paths, zoo.cache_root(), device, dtype, verbose=verbose)
            if verbose:
                print(f"video frames: training steps read the frozen part (blocks 0-{frames.frozen_depth - 1}) "
                      "from the cache", flush=True)
        elif verbose:
            print(f"video frames: the tower runs live on decoded clips ({reason})", flush=True)
        return VideoInputs(tower, self.num_frames, train=True, sampling=self.config.train_sampling,
                           crop_min_scale=self.config.crop_min_scale, frames=frames)


def held_out_videos(data, num_frames: int, source: str | None = None, annotation_split: str | None = None,
                    max_skip_fraction: float = 0.05) -> list[VideoRecord] | None:
    """Held-out video pairs: ``source`` (a caption file, read whole but for ``annotation_split``), else the test
    split of an embedded ``data.source``; None when neither exists."""
    if source is None and not data.source.startswith("embedded:"):
        return None  # a custom training file has no held-out split we could know of (an image set: an error below)
    cfg = video_data_config(data, num_frames, max_skip_fraction, source=source or data.source,
                            annotation_split=annotation_split)
    pairs, report = load_video_pairs(cfg, split="test" if source is None else "train")
    if report.total:
        print(f"held-out videos: {report.summary()}", flush=True)
    return [VideoRecord.of(p) for p in pairs]


def order_permutation(num_frames: int, order: FrameOrder, key: str) -> list[int]:
    """The order the sampled frames are fed in: as sampled, reversed, or a permutation seeded by ``key`` (the clip's
    path) that is neither the identity nor the reversal where T >= 3 allows it (so "shuffled" is never "as_is" or
    "reversed" in disguise)."""
    t = int(num_frames)
    if order == "as_is" or t == 1:
        return list(range(t))
    if order == "reversed":
        return list(range(t))[::-1]
    if order != "shuffled":
        raise ValueError(f"unknown frame order {order!r}; expected as_is, reversed or shuffled")
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    excluded = ({tuple(range(t)), tuple(range(t))[::-1]} if t >= 3 else set())
    while True:
        perm = tuple(int(i) for i in rng.permutation(t))
        if perm not in excluded:
            return list(perm)


class VideoInputs:
    """Clip paths -> ``{"pixel_values_videos": [B, T, 3, S, S]}`` for a video front (``tower``: the
    ``VisionTower`` whose preprocessing the frames get). ``train``: ``sampling`` frames and a random crop
    (``crop_min_scale`` < 1) from the global torch generator; else uniform frames, no crop, reordered by
    ``frame_order``. With ``frames`` (a ``VideoFrameCache``; no crop) the same frame indices are drawn and
    ``{"frozen_hidden_videos": [B, T, N, C]}`` is read from it instead."""

    def __init__(self, tower, num_frames: int, train: bool, sampling: str = "headtail",
                 crop_min_scale: float = 1.0, frame_order: FrameOrder = "as_is",
                 frames: VideoFrameCache | None = None):
        if train and frame_order != "as_is":
            raise ValueError("frame_order is an evaluation probe; training feeds the frames in time order")
        self.tower, self.num_frames, self.train = tower, int(num_frames), bool(train)
        self.preprocess = FramePreprocessor.from_tower(tower)
        self.sampling = sampling if train else "uniform"
        self.crop_min_scale = float(crop_min_scale) if train else 1.0
        self.frame_order = frame_order
        if frames is not None and self.crop_min_scale < 1.0:
            raise ValueError("the frozen-frame cache holds uncropped frames; a random crop needs the live tower")
        self.frames = frames

    @property
    def cached(self) -> bool:
        return self.frames is not None

    def cached_clip(self, path: str, rng: np.random.Generator | None) -> torch.Tensor:
        """``(T, N, C)``: the cached frozen hidden states of the frames ``clip`` would decode, in the same order."""
        digest, n_header, n_decoded = self.frames.lookup(path)
        idx = clip_indices(n_header, n_decoded, self.num_frames, self.sampling, rng, path)
        return self.frames.rows(digest, idx)[order_permutation(self.num_frames, self.frame_order, str(path))]

    def clip(self, path: str, rng: np.random.Generator | None) -> torch.Tensor:
        frames, _ = load_clip(path, self.num_frames, self.sampling, rng, crop_min_scale=self.crop_min_scale,
                              image_size=self.tower.image_size)
        pixels = self.preprocess(frames)  # [T, 3, S, S], time order
        return pixels[order_permutation(self.num_frames, self.frame_order, str(path))]

    def __call__(self, paths: Sequence[str], device) -> dict[str, torch.Tensor]:
        if self.train:  # one draw from the step-seeded generator, then one stream per clip of the batch
            base = int(torch.randint(0, 2 ** 62, ()).item())
            rngs = [np.random.default_rng([base, i]) for i in range(len(paths))]
        else:
            rngs = [None] * len(paths)
        if self.frames is not None:
            hidden = [self.cached_clip(p, rng) for p, rng in zip(paths, rngs)]
            return {"frozen_hidden_videos": torch.stack(hidden).to(device)}
        clips = [self.clip(p, rng) for p, rng in zip(paths, rngs)]
        return {"pixel_values_videos": torch.stack(clips).to(device)}


def is_video_front(front) -> bool:
    from .video import VideoVisionTower

    return isinstance(getattr(front, "vision", None), VideoVisionTower)


def front_frames(front) -> int:
    """T of a video front: the ``front.video.num_frames`` it was built (and trained) with."""
    return int(front.vision.config.num_frames)


__all__ = ["FrameOrder", "VideoClipsConfig", "VideoInputs", "VideoRecord", "VideoSource", "check_video_data",
           "crop_scale", "front_frames", "held_out_videos", "is_video_front", "is_video_source",
           "order_permutation", "video_data_config"]
