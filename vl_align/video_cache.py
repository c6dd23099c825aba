"""The cache of what is frozen in a video front's tower: per (clip, frame index), the hidden state ``(N, C)`` of that
frame after the tower's embeddings and the blocks below the first temporal module
(``VideoVisionTower.frozen_features``).

The temporal modules train inside the tower's blocks, so the tower's *output* can never be cached (issue 20); the
part below the first module is frozen and sees each frame alone, so its output is a pure function of the frame.
A training step then reads its clips' rows ``(B, T, N, C)`` instead of decoding the clips and running those blocks,
and the front runs only blocks ``frozen_depth..`` (``VideoVisionTower.forward(frozen_hidden=...)``).

Valid only when the frames a step sees are a pure function of (clip, frame index): no random crop
(``data.video.crop_min_scale`` 1), ``vision.cache_features`` on, and at least one frozen block (a module in block 0
leaves nothing worth caching). :func:`live_reason` says which of these rules out the cache; the stage then runs the
tower live as before and says why in its log.

Rows are keyed ``"<clip digest>/<frame index>"``, the digest being the sha256 of the clip file (a frame folder: of
its frames' names and digests), so identical files share rows and a rewritten file is a cache miss, never a stale
row: the digest is checked again (by the file's stat) at every lookup. Every frame of every clip is cached, since
head-tail sampling may pick any. The sampled indices are the live path's (``video_data.load_clip``): the same draws
from the same per-clip generator, from the clip's frame count (the header's, and what decodes when a truncated
video's header promises more; both are cached per clip digest, so a cached step opens no file but for its stat).

The producer fingerprint (the folder's name) mixes the tower's fingerprint (weights, config, image size, mean/std),
``frozen_depth``, the frame preprocessing and the autocast dtype the rows were computed under (as the image
feature cache). Rows are float32 for an fp32 run (bit-equal inputs to the live path's blocks) and float16 for a
bf16/fp16 run: a bf16 value is exact in float16 within its range, which the build checks (half the disk: 4,000
motion clips x 8 frames x 65 tokens x 384 are 3.0 GiB in float32, 1.5 GiB in float16).
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dvlp_common import precision
from dvlp_common.cache import KeyedArrayCache, fingerprint

from .video_data import (
    FramePreprocessor,
    VideoError,
    _decoded_count,
    _frame_files,
    _kind,
    count_frames,
    read_frames,
    sample_frame_indices,
)
from .vision import _memo_digest

__all__ = ["FRAMES_VERSION", "VideoFrameCache", "clip_digest", "clip_indices", "estimated_bytes", "frozen_depth_of",
           "live_reason", "video_frame_cache"]

FRAMES_VERSION = 1  # bump when what a row holds changes (preprocessing, key layout)
COUNTS_VERSION = 1
FP16_MAX = 65504.0


def clip_digest(path: str | Path) -> str:
    """sha256 of a clip's content: the file's bytes, or a frame folder's frame names and their files' digests.
    Remembered per file stat for the life of the process, so calling it at every step costs a ``stat``."""
    path = Path(path)
    if _kind(path) == "folder":
        h = hashlib.sha256(b"frame-folder\0")
        for f in _frame_files(path):
            h.update(f"{f.name}\0{_memo_digest(f)}\0".encode())
        return h.hexdigest()
    return _memo_digest(path)


def clip_indices(n_header: int, n_decoded: int, num_frames: int, mode: str, rng: np.random.Generator | None,
                 path: str | Path) -> list[int]:
    """The frame indices ``video_data.load_clip`` samples from a clip with these counts, with the same draws from
    ``rng``: from the header's count, and again from what decodes when the first draw reaches past it."""
    if n_header < num_frames:
        raise VideoError("too_short", path, f"{n_header} frames, {num_frames} needed")
    idx = sample_frame_indices(n_header, num_frames, mode, rng)
    if max(idx) >= n_decoded:  # load_clip: read_frames fails (too_short), the clip is counted by decoding
        if n_decoded < num_frames:
            raise VideoError("too_short", path, f"{n_decoded} frames decode, {num_frames} needed")
        idx = sample_frame_indices(n_decoded, num_frames, mode, rng)
    return idx


def frozen_depth_of(tower, video) -> tuple[int, int]:
    """``(frozen_depth, depth)`` of the video tower ``video`` (a ``VideoConfig``) builds on ``tower``: the blocks
    below the first temporal module, and the blocks the features pass. The torch generator is left untouched (the
    throwaway tower's modules draw their initial weights)."""
    from .video import VideoVisionTower

    with torch.random.fork_rng(devices=[]):
        vt = VideoVisionTower(tower, video)
    return vt.frozen_depth, vt.depth


def live_reason(tower, video, crop_min_scale: float) -> str | None:
    """None when the frozen part's per-frame output may be cached for this run, else why the tower runs live."""
    if video is None:
        return "no front.video config was given to the video source"
    if not tower.config.cache_features:
        return "vision.cache_features=false"
    if crop_min_scale < 1.0:
        return (f"a random crop is configured (data.video.crop_min_scale={crop_min_scale}): the frames differ at "
                "every step")
    frozen, _ = frozen_depth_of(tower, video)
    if frozen == 0:
        return "a temporal module sits in block 0 (front.video.blocks), so no block is frozen below it"
    return None


def estimated_bytes(tower, paths: Sequence[str], dtype: torch.dtype | None = None) -> int:
    """Disk size of the rows of every frame of ``paths`` (from the clips' frame counts; no decoding)."""
    itemsize = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    frames = sum(count_frames(p) for p in dict.fromkeys(str(p) for p in paths))
    return frames * tower.num_tokens * tower.hidden_size * itemsize


class VideoFrameCache:
    """Cached frozen hidden states of every frame of a set of clips: ``lookup(path) -> (digest, n_header,
    n_decoded)`` and ``rows(digest, indices) -> (T, N, C)`` float32 (CPU)."""

    def __init__(self, frames: KeyedArrayCache, counts: dict[str, tuple[int, int]], frozen_depth: int, depth: int):
        self.frames, self.counts = frames, counts
        self.frozen_depth, self.depth = frozen_depth, depth

    @property
    def folder(self) -> Path:
        return self.frames.folder

    @property
    def producer(self) -> str:
        return self.frames.meta["producer"]

    def lookup(self, path: str | Path) -> tuple[str, int, int]:
        digest = clip_digest(path)
        if digest not in self.counts:
            raise VideoError("changed_video", path, "not in the frozen-frame cache: its content changed after the "
                                                    "cache was built (or it was not a training clip); restart the "
                                                    "stage to cache it again")
        return (digest, *self.counts[digest])

    def rows(self, digest: str, indices: Sequence[int]) -> torch.Tensor:
        return self.frames.get([f"{digest}/{int(i)}" for i in indices])

    def nbytes(self) -> int:
        return int(self.frames.array.nbytes)


def _frame_counts(root: Path, first_path: dict[str, str]) -> dict[str, tuple[int, int]]:
    """``{digest: (header count, decoded count)}`` of every clip, cached on disk by digest (a video's decoded count
    needs a full decode; a filmstrip's and a frame folder's equal their count)."""
    def compute(keys: list[str]) -> torch.Tensor:
        rows = []
        for k in keys:
            path = Path(first_path[k])
            n = count_frames(path)
            rows.append((n, _decoded_count(path) if _kind(path) == "video" else n))
        return torch.tensor(rows, dtype=torch.float64)

    producer = fingerprint("video_frame_counts", COUNTS_VERSION)
    cache = KeyedArrayCache.open_or_build(root / "video_frame_counts", producer, {"kind": "video_frame_counts"},
                                          list(first_path), compute, batch_size=256)
    values = cache.get(list(first_path)).round().long().tolist()
    return {k: (int(a), int(b)) for k, (a, b) in zip(first_path, values)}


def video_frame_cache(tower, video, paths: Sequence[str], cache_root: str | Path, device="cpu",
                      dtype: torch.dtype | None = None, verbose: bool = False) -> VideoFrameCache:
    """The frozen part's output for every frame of every clip in ``paths``, computed once with ``tower`` (a
    ``VisionTower``) and the frozen blocks of the ``VideoConfig`` ``video``, in batches of
    ``tower.config.batch_size`` frames under autocast in ``dtype``, kept under ``cache_root/video_frames``.
    The caller decides that it is valid (:func:`live_reason`)."""
    from filelock import FileLock

    from .video import VideoVisionTower

    with torch.random.fork_rng(devices=[]):  # the throwaway modules' init must not move the run's generator
        vt = VideoVisionTower(tower, video)
    if vt.frozen_depth == 0:
        raise ValueError("no frozen block below the first temporal module: nothing to cache (see live_reason)")
    first_path: dict[str, str] = {}
    for p in dict.fromkeys(str(p) for p in paths):
        first_path.setdefault(clip_digest(p), p)
    autocast = dtype in (torch.bfloat16, torch.float16)
    store = np.float16 if autocast else np.float32
    prep = FramePreprocessor.from_tower(tower)
    producer = fingerprint("video_frozen_frames", FRAMES_VERSION, tower.fingerprint(), vt.frozen_depth,
                           str(dtype) if autocast else None, np.dtype(store).name,
                           "frames: vl_align.data.load_image (bicubic shorter side, centre crop), no crop")
    root = Path(cache_root) / "video_frames"
    root.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    decoded: dict[str, list] = {}  # the last clip's decoded frames (a batch of keys may end inside a clip)

    def frames_of(digest: str, n: int) -> list:
        if digest not in decoded:
            decoded.clear()
            decoded[digest] = read_frames(first_path[digest], list(range(n)))
        return decoded[digest]

    start = time.perf_counter()
    with FileLock(str(root / f"{producer}.lock")):
        counts = _frame_counts(root, first_path)
        usable = {d: min(a, b) for d, (a, b) in counts.items()}  # frames a sample can land on

        def compute(keys: list[str]) -> torch.Tensor:
            frames = []
            for key in keys:
                digest, i = key.rsplit("/", 1)
                frames.append(frames_of(digest, usable[digest])[int(i)])
            with torch.no_grad(), precision.autocast(device, dtype):
                hidden = vt.frozen_features(prep(frames).to(device)).float()  # (F, N, C)
            if autocast and not bool(hidden.abs().max() <= FP16_MAX):
                raise ValueError(f"frozen hidden states of {sorted({k.rsplit('/', 1)[0] for k in keys})[:3]} exceed "
                                 f"float16's range ({FP16_MAX}); run in fp32 (deepspeed.precision=fp32) or with "
                                 "vision.cache_features=false")
            return hidden

        keys = [f"{d}/{i}" for d in first_path for i in range(usable[d])]
        info = {"kind": "video_frozen_frames", "model": tower.config.model, "resolved": str(tower.resolved),
                "image_size": tower.config.image_size, "frozen_depth": vt.frozen_depth, "depth": vt.depth,
                "autocast": str(dtype) if autocast else None, "store": np.dtype(store).name,
                "num_tokens": tower.num_tokens, "hidden_size": tower.hidden_size}
        frames_cache = KeyedArrayCache.open_or_build(root, producer, info, keys, compute,
                                                     batch_size=tower.config.batch_size, dtype=store,
                                                     progress=verbose and len(keys) > 20 * tower.config.batch_size)
    cache = VideoFrameCache(frames_cache, counts, vt.frozen_depth, vt.depth)
    if verbose:
        print(f"video frames: {len(first_path)} clips, {len(keys)} frames of frozen hidden states (blocks "
              f"0-{vt.frozen_depth - 1} of {vt.depth}) in {cache.folder} ({cache.nbytes() / 2 ** 20:.1f} MiB, "
              f"{np.dtype(store).name}; ready in {time.perf_counter() - start:.1f} s)", flush=True)
    return cache
