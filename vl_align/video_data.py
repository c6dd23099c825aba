"""Video-text pairs: reading caption files, decoding frames, sampling them as the authors do, and batching them into
``pixel_values_videos`` ``[B, T, 3, S, S]`` (transformers' name and layout for video input).

A *video* is one of (``count_frames`` / ``read_frames``):

* a video file (mp4, webm, avi, mkv, mov, m4v), decoded with PyAV (``av`` on pip, which ships its own FFmpeg);
* a folder of frame images, in natural order of their names (``frame_2.jpg`` before ``frame_10.jpg``);
* one image file holding a filmstrip of square frames side by side (``embedded:motion`` stores its clips so).

Caption files (``read_video_pairs``, ``format="auto"`` picks by extension and content):

* ``jsonl``: one object a line with ``video_path`` (relative to ``video_root``, else to the file's folder) and
  ``caption``; ``video_id`` and any other field are kept (``VideoTextPair.meta``: the motion set's family, key
  words...).
* ``msrvtt``: ``{"videos": [{"video_id", "split", ...}], "sentences": [{"video_id", "caption"}]}``; ``split``
  keeps the videos of one split (MSR-VTT's are ``train`` / ``validate`` / ``test``); the file is
  ``{video_root}/{video_id}.<ext>``.
* ``vatex``: ``[{"videoID", "enCap": [...]}]``, one pair per English caption; the file is ``{videoID}.<ext>``.
* ``msvd_csv``: the MSVD release's ``video_corpus.csv`` (``VideoID, Start, End, ..., Language, Description``);
  English rows only; the file is ``{VideoID}_{Start}_{End}.<ext>`` (the YouTubeClips names).
* ``msvd_txt``: ``AllVideoDescriptions.txt`` style, ``<clip name> <caption>`` a line, ``#`` lines are comments.
* ``caption_list``: LAVIS-style ``[{"video": "name.avi", "caption": str | [str]}]`` (its MSVD / MSR-VTT files).

A record whose video is missing, unreadable or shorter than the frames asked for is a counted skip naming the
file (``dvlp_common.records.SkipReport``); a whole file that is not of its format is one error naming it.

Sampling (``sample_frame_indices``), after LAVIS's ``load_video`` that SimVLG's code uses: in training
``headtail`` takes ``T // 2`` sorted random frames from the first half and ``T - T // 2`` from the second; in
evaluation ``uniform`` takes frame ``floor(i * n / T)`` for ``i < T`` (segment starts). Augmentation: one random
resized crop shared by every frame of a clip (``random_crop_box``), as the authors' video processor; **no
horizontal flip**, which they also apply and which silently breaks every caption that says left or right.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from dvlp_common.config import Config, ConfigError, param
from dvlp_common.records import SkipReport, iter_decoded_lines, iter_json_objects

from .data import IMAGENET_MEAN, IMAGENET_STD, load_image

__all__ = [
    "VIDEO_EXTENSIONS",
    "FramePreprocessor",
    "VideoClipDataset",
    "VideoDataConfig",
    "VideoError",
    "VideoTextPair",
    "collate_video_batch",
    "count_frames",
    "detect_video_caption_format",
    "load_clip",
    "load_video_pairs",
    "random_crop_box",
    "read_frames",
    "read_video_pairs",
    "resolve_video_source",
    "sample_frame_indices",
]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_EMBEDDED = ("motion",)  # embedded data sets whose pairs are videos
# formats of a video caption file (VideoDataConfig.format, and data.video.format of a stage)
VideoFormat = Literal["auto", "jsonl", "msrvtt", "vatex", "msvd_csv", "msvd_txt", "caption_list"]


def is_video_source(source: str) -> bool:
    """Whether ``source`` names an embedded data set of videos (``embedded:motion``)."""
    return source.startswith("embedded:") and source.split(":", 1)[1] in VIDEO_EMBEDDED
Sampling = Literal["headtail", "uniform"]


class VideoError(ValueError):
    """A video that cannot give the frames asked for; ``reason`` is the skip key (missing_video, corrupt_video,
    no_video_stream, too_short, not_a_filmstrip, empty_frame_folder)."""

    def __init__(self, reason: str, path: str | os.PathLike, detail: str = ""):
        self.reason, self.path, self.detail = reason, str(path), detail
        super().__init__(f"{reason}: {self.path}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class VideoTextPair:
    video_id: str
    caption: str
    video_path: str  # a video file, a folder of frames or a filmstrip image
    meta: dict = field(default_factory=dict, compare=False)  # the caption file's other fields


@dataclass
class VideoDataConfig(Config):
    source: str = param("embedded:motion", help="embedded:motion, or a caption file: jsonl (video_path, caption), "
                                                "MSR-VTT / VATEX / LAVIS JSON, MSVD csv or txt")
    format: VideoFormat = param(  # noqa: RUF009 (a str default; ruff does not see through the Literal alias)
        "auto", help="format of source")
    video_root: str | None = param(None, help="folder the videos are in / relative to (default: the caption "
                                                 "file's folder)")
    annotation_split: str | None = param(None, help="MSR-VTT: keep the videos of this split (train, validate, "
                                                       "test); None: all")
    num_frames: int = param(4, ge=1, help="frames per clip fed to the model (T); SimVLG uses 4")
    train_sampling: Sampling = param(  # noqa: RUF009 (as format)
        "headtail", help="training frame sampling: headtail (T/2 sorted random frames from each half, the authors') "
                         "or uniform")
    crop_min_scale: float = param(0.5, gt=0.0, le=1.0, help="training: one random resized crop per clip, this "
                                                            "share of the area at least (authors: 0.5); 1.0: none. "
                                                            "No horizontal flip (it breaks left/right captions)")
    verify_videos: bool = param(True, help="open every video once at load: missing, broken or too-short ones are "
                                           "counted skips")
    max_skip_fraction: float = param(0.05, ge=0.0, le=1.0, help="abort the load above this share of skipped "
                                                                "records")

    def check(self) -> None:
        if self.source.startswith("embedded:") and not is_video_source(self.source):
            raise ConfigError("source", f"{self.source} is not a video data set; embedded video sets: "
                                        f"{', '.join('embedded:' + n for n in VIDEO_EMBEDDED)}")


# ----------------------------------------------------------------------------------------------------------
# frames
# ----------------------------------------------------------------------------------------------------------
def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _frame_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(files, key=lambda p: _natural_key(p.name))


def _kind(path: Path) -> str:
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise VideoError("missing_video", path)
    return "strip" if path.suffix.lower() in IMAGE_EXTENSIONS else "video"


def _av_errors() -> tuple[type[BaseException], ...]:
    import av

    return (av.FFmpegError, OSError, ValueError, EOFError, IndexError)


def count_frames(path: str | os.PathLike) -> int:
    """Frames in a video file (the container's count, else its packets), a frame folder or a filmstrip.
    Raises ``VideoError`` (missing_video, corrupt_video, no_video_stream, not_a_filmstrip, empty_frame_folder)."""
    path = Path(path)
    kind = _kind(path)
    if kind == "folder":
        n = len(_frame_files(path))
        if not n:
            raise VideoError("empty_frame_folder", path)
        return n
    if kind == "strip":
        try:
            with Image.open(path) as im:
                w, h = im.size
        except (OSError, ValueError, SyntaxError) as e:
            raise VideoError("corrupt_video", path, str(e)) from e
        if h <= 0 or w % h:
            raise VideoError("not_a_filmstrip", path, f"{w}x{h} is not square frames side by side")
        return w // h
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("no_video_stream", path)
            stream = container.streams.video[0]
            if stream.frames > 0:  # the container's count (mp4, avi)
                return int(stream.frames)
            # webm / mkv keep no count: the packets are (one frame each, the flush packet has no data)
            return sum(1 for packet in container.demux(stream) if packet.size > 0)
    except _av_errors() as e:
        if isinstance(e, VideoError):
            raise
        raise VideoError("corrupt_video", path, f"{type(e).__name__}: {e}") from e


def read_frames(path: str | os.PathLike, indices: Sequence[int]) -> list[Image.Image]:
    """The frames at ``indices`` (0-based, in display order, repeats allowed) as RGB PIL images.

    A video file is decoded from the start up to the last index (no seeking: keyframe seeks land on other frames
    in some codecs); ``VideoError("too_short")`` when it ends before that index.
    """
    path = Path(path)
    if not len(indices):
        return []
    if min(indices) < 0:
        raise ValueError(f"negative frame index in {list(indices)}")
    kind = _kind(path)
    if kind == "folder":
        files = _frame_files(path)
        if max(indices) >= len(files):
            raise VideoError("too_short", path, f"{len(files)} frames, index {max(indices)} asked")
        return [_open_rgb(files[i]) for i in indices]
    if kind == "strip":
        strip = _open_rgb(path)
        w, h = strip.size
        if w % h:
            raise VideoError("not_a_filmstrip", path, f"{w}x{h} is not square frames side by side")
        if max(indices) >= w // h:
            raise VideoError("too_short", path, f"{w // h} frames, index {max(indices)} asked")
        return [strip.crop((i * h, 0, (i + 1) * h, h)) for i in indices]
    import av

    wanted = {int(i) for i in indices}
    last = max(wanted)
    got: dict[int, Image.Image] = {}
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("no_video_stream", path)
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i in wanted:
                    got[i] = frame.to_image()  # RGB24
                if i >= last:
                    break
    except _av_errors() as e:
        if isinstance(e, VideoError):
            raise
        raise VideoError("corrupt_video", path, f"{type(e).__name__}: {e}") from e
    if last not in got:
        raise VideoError("too_short", path, f"decoding ended before frame {last}")
    return [got[int(i)] for i in indices]


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise VideoError("corrupt_video", path, str(e)) from e


def sample_frame_indices(num_available: int, num_frames: int, mode: Sampling,
                         rng: np.random.Generator | None = None) -> list[int]:
    """``num_frames`` sorted frame indices out of ``num_available``.

    ``uniform``: ``floor(i * n / T)``, the starts of T equal segments (LAVIS's ``np.arange(0, n, n / T)``; no
    randomness). ``headtail``: ``T // 2`` distinct sorted random indices from ``[0, n // 2)`` and ``T - T // 2``
    from ``[n // 2, n)`` (the authors' 2 + 2 for T = 4), so the clip's start and end are always both seen.
    Fewer than ``num_frames`` frames is a ``ValueError`` (``load_clip`` checks first and raises
    ``VideoError("too_short")`` naming the file).
    """
    n, t = int(num_available), int(num_frames)
    if t < 1:
        raise ValueError(f"num_frames must be >= 1, got {t}")
    if n < t:
        raise ValueError(f"{n} frames available, {t} asked")
    if mode == "uniform":
        return [i * n // t for i in range(t)]
    if mode == "headtail":
        if rng is None:
            raise ValueError("headtail sampling needs an rng")
        half = n // 2
        head = np.sort(rng.choice(half, size=t // 2, replace=False)) if t // 2 else np.zeros(0, dtype=int)
        tail = half + np.sort(rng.choice(n - half, size=t - t // 2, replace=False))
        return [int(i) for i in np.concatenate([head, tail])]
    raise ValueError(f"unknown frame sampling {mode!r}; expected 'headtail' or 'uniform'")


def random_crop_box(width: int, height: int, rng: np.random.Generator, min_scale: float = 0.5,
                    max_scale: float = 1.0, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A random resized crop box ``(left, top, right, bottom)``: area ``scale * W * H`` with scale uniform in
    ``[min_scale, max_scale]``, aspect ratio log-uniform in ``ratio`` (torchvision's rule, 10 tries, then the
    largest centred box of a clamped ratio). One box is drawn per clip and applied to all its frames."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(min_scale, max_scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def load_clip(path: str | os.PathLike, num_frames: int, mode: Sampling, rng: np.random.Generator | None = None,
              crop_min_scale: float = 1.0, image_size: int | None = None) -> tuple[list[Image.Image], list[int]]:
    """(frames, their indices): ``num_frames`` frames sampled by ``mode``; with ``crop_min_scale < 1`` (needs
    ``rng`` and ``image_size``) one random resized crop, the same box for every frame, resized to ``image_size``.
    A video whose header promises more frames than it decodes is counted again by decoding and sampled anew."""
    n = count_frames(path)
    if n < num_frames:
        raise VideoError("too_short", path, f"{n} frames, {num_frames} needed")
    idx = sample_frame_indices(n, num_frames, mode, rng)
    try:
        frames = read_frames(path, idx)
    except VideoError as e:
        if e.reason != "too_short" or _kind(Path(path)) != "video":
            raise
        n = _decoded_count(Path(path))  # a container count above what decodes (truncated file)
        if n < num_frames:
            raise VideoError("too_short", path, f"{n} frames decode, {num_frames} needed") from e
        idx = sample_frame_indices(n, num_frames, mode, rng)
        frames = read_frames(path, idx)
    if crop_min_scale < 1.0:
        if rng is None or image_size is None:
            raise ValueError("a random crop needs rng and image_size")
        w, h = frames[0].size
        box = random_crop_box(w, h, rng, min_scale=crop_min_scale)
        frames = [f.crop(box).resize((image_size, image_size), Image.Resampling.BICUBIC) for f in frames]
    return frames, idx


def _decoded_count(path: Path) -> int:
    import av

    try:
        with av.open(str(path)) as container:
            return sum(1 for _ in container.decode(container.streams.video[0]))
    except _av_errors() as e:
        raise VideoError("corrupt_video", path, f"{type(e).__name__}: {e}") from e


class FramePreprocessor:
    """What ``VisionTower.preprocess`` does to a list of images (``vl_align.data.load_image``: resize the shorter
    side, centre crop, normalise), as a small picklable object for DataLoader workers: frames ->
    ``[T, 3, S, S]``."""

    def __init__(self, image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)

    @classmethod
    def from_tower(cls, tower) -> FramePreprocessor:
        return cls(tower.image_size, tower.mean, tower.std)

    def __call__(self, frames: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([load_image(f, self.image_size, self.mean, self.std) for f in frames])


# ----------------------------------------------------------------------------------------------------------
# caption files
# ----------------------------------------------------------------------------------------------------------
def detect_video_caption_format(path: str | os.PathLike) -> str:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".csv":
        return "msvd_csv"
    if suffix == ".txt":
        return "msvd_txt"
    if suffix == ".json":
        data = _read_json(path)
        if isinstance(data, dict) and "sentences" in data:
            return "msrvtt"
        if isinstance(data, list) and data and isinstance(data[0], dict):
            if "videoID" in data[0]:
                return "vatex"
            if "video" in data[0]:
                return "caption_list"
        raise ValueError(f"{path}: not a known video caption JSON (MSR-VTT {{'videos', 'sentences'}}, VATEX "
                         f"[{{'videoID', 'enCap'}}] or [{{'video', 'caption'}}]); pass the format explicitly")
    raise ValueError(f"{path}: cannot tell the caption format from the extension {suffix!r}; expected .jsonl, "
                     f".json, .csv or .txt")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable JSON file: {e}") from e


class _Finder:
    """Finds a video by name under a root (the name itself, name + a video extension, or a frame folder),
    remembering each answer."""

    def __init__(self, root: Path):
        self.root = root
        self.memo: dict[str, str | None] = {}

    def __call__(self, name: str) -> str | None:
        if name not in self.memo:
            base = Path(name) if os.path.isabs(name) else self.root / name
            found = None
            if base.is_file() or base.is_dir():
                found = base
            else:
                for ext in VIDEO_EXTENSIONS:
                    if base.with_name(base.name + ext).is_file():
                        found = base.with_name(base.name + ext)
                        break
            self.memo[name] = str(found.absolute()) if found is not None else None
        return self.memo[name]


def _clean(caption: Any) -> str | None:
    if not isinstance(caption, str):
        return None
    caption = " ".join(caption.split())
    return caption or None


def _entries(path: Path, fmt: str, split: str | None, report: SkipReport):
    """Yield ``(where, video_name, caption, video_id, meta)``; malformed entries are counted skips."""
    if fmt == "jsonl":
        for where, rec in iter_json_objects(path, report):
            name = rec.get("video_path")
            if not isinstance(name, str) or not name:
                report.skip("missing_video_path", where)
                continue
            meta = {k: v for k, v in rec.items() if k not in ("video_path", "caption", "video_id")}
            yield where, name, rec.get("caption"), str(rec.get("video_id", name)), meta
    elif fmt == "msrvtt":
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("videos"), list) \
                or not isinstance(data.get("sentences"), list):
            raise ValueError(f"{path}: an MSR-VTT file needs lists 'videos' and 'sentences'")
        splits = {}
        for i, v in enumerate(data["videos"]):
            if not isinstance(v, dict) or not isinstance(v.get("video_id"), str):
                report.skip("malformed_video_entry", f"{path}:videos[{i}]")
                continue
            splits[v["video_id"]] = v.get("split")
        for i, s in enumerate(data["sentences"]):
            where = f"{path}:sentences[{i}]"
            vid = s.get("video_id") if isinstance(s, dict) else None
            if vid not in splits:
                report.skip("unknown_video_id", where)
                continue
            if split is not None and splits[vid] != split:
                continue  # another split: not a skip
            yield where, vid, s.get("caption"), vid, {"split": splits[vid]}
    elif fmt == "vatex":
        data = _read_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: a VATEX file is a list of {{'videoID', 'enCap'}}")
        for i, v in enumerate(data):
            where = f"{path}:[{i}]"
            if not isinstance(v, dict) or not isinstance(v.get("videoID"), str) or not isinstance(v.get("enCap"), list):
                report.skip("malformed_video_entry", where)
                continue
            for j, cap in enumerate(v["enCap"]):
                yield f"{where}.enCap[{j}]", v["videoID"], cap, v["videoID"], {}
    elif fmt == "caption_list":
        data = _read_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of {{'video', 'caption'}}")
        for i, v in enumerate(data):
            where = f"{path}:[{i}]"
            if not isinstance(v, dict) or not isinstance(v.get("video"), str):
                report.skip("malformed_video_entry", where)
                continue
            caps = v.get("caption")
            vid = str(v.get("video_id", Path(v["video"]).stem))
            for j, cap in enumerate(caps if isinstance(caps, list) else [caps]):
                yield f"{where}.caption[{j}]" if isinstance(caps, list) else where, v["video"], cap, vid, {}
    elif fmt == "msvd_csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            need = {"VideoID", "Start", "End", "Language", "Description"}
            if not need <= set(reader.fieldnames or ()):
                raise ValueError(f"{path}: an MSVD csv needs the columns {sorted(need)}, has {reader.fieldnames}")
            for lineno, row in enumerate(reader, start=2):
                if row["Language"] != "English":
                    continue  # the corpus's other languages: not a skip
                where = f"{path}:{lineno}"
                try:
                    name = f"{row['VideoID']}_{int(float(row['Start']))}_{int(float(row['End']))}"
                except (TypeError, ValueError):
                    report.skip("malformed_video_entry", where)
                    continue
                yield where, name, row["Description"], name, {}
    elif fmt == "msvd_txt":
        for lineno, line in iter_decoded_lines(path, report):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, _, caption = line.strip().partition(" ")
            yield f"{path}:{lineno}", name, caption, name, {}
    else:
        raise ValueError(f"unknown video caption format {fmt!r}")


def read_video_pairs(source: str | os.PathLike, fmt: str = "auto", video_root: str | os.PathLike | None = None,
                     split: str | None = None, report: SkipReport | None = None, verify: bool = False,
                     min_frames: int = 1) -> list[VideoTextPair]:
    """The video-text pairs of a caption file (formats: module docstring), in file order.

    Counted skips in ``report`` (``where`` names the caption file and entry, and the video file): malformed
    entries, empty captions, videos not found (``missing_video``); with ``verify``, videos that do not open
    (``corrupt_video``, ``no_video_stream``...) or hold fewer than ``min_frames`` frames (``too_short``), each
    video opened once. ``report.check`` aborts above its ``max_skip_fraction``.
    """
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"video caption file not found: {path}")
    fmt = detect_video_caption_format(path) if fmt == "auto" else fmt
    rep = SkipReport(max_skip_fraction=report.max_skip_fraction if report is not None else 0.05, name=str(path))
    find = _Finder(Path(video_root) if video_root is not None else path.parent)
    verdict: dict[str, tuple[str, str] | None] = {}  # video path -> (skip reason, detail), None: fine
    out: list[VideoTextPair] = []
    seen = skipped_here = 0  # entries yielded; of them, skipped in this loop (the rest of rep are malformed ones)
    for where, name, caption, video_id, meta in _entries(path, fmt, split, rep):
        seen += 1
        caption = _clean(caption)
        video = find(name) if caption is not None else None
        if caption is None:
            rep.skip("empty_caption", where)
        elif video is None:
            rep.skip("missing_video", f"{where} ({find.root / name})")
        elif verify and _verdict(verdict, video, min_frames) is not None:
            reason, detail = verdict[video]
            rep.skip(reason, f"{where} ({video}: {detail})")
        else:
            out.append(VideoTextPair(video_id, caption, video, meta))
            continue
        skipped_here += 1
    if report is not None:
        report.merge(rep)
    rep.check(seen + rep.total - skipped_here)
    return out


def _verdict(memo: dict, video: str, min_frames: int) -> tuple[str, str] | None:
    if video not in memo:
        try:
            n = count_frames(video)
            memo[video] = None if n >= min_frames else ("too_short", f"{n} frames, {min_frames} needed")
        except VideoError as e:
            memo[video] = (e.reason, e.detail or e.reason)
    return memo[video]


def resolve_video_source(data: VideoDataConfig, split: str = "train") -> tuple[str, str]:
    """(caption file, format): an embedded set's ``pairs_{split}.jsonl``, else ``data.source`` itself."""
    if data.source.startswith("embedded:"):
        from .sources import embedded_files

        name = data.source.split(":", 1)[1]
        if name not in VIDEO_EMBEDDED:
            raise ConfigError("source", f"{data.source} is not a video data set")
        return str(embedded_files(name)[f"pairs_{split}"]), "jsonl"
    return data.source, data.format


def load_video_pairs(data: VideoDataConfig, split: str = "train",
                     report: SkipReport | None = None) -> tuple[list[VideoTextPair], SkipReport]:
    """(pairs, SkipReport) of ``split`` ("train" / "test" of an embedded set; a caption file is read whole, with
    ``annotation_split`` as its split filter), videos verified to hold ``num_frames`` frames when
    ``verify_videos``."""
    rep = report if report is not None else SkipReport(max_skip_fraction=data.max_skip_fraction,
                                                       name=f"video-text pairs ({split})")
    source, fmt = resolve_video_source(data, split)
    pairs = read_video_pairs(source, fmt=fmt, video_root=data.video_root, split=data.annotation_split, report=rep,
                             verify=data.verify_videos, min_frames=data.num_frames)
    return pairs, rep


# ----------------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------------
class VideoClipDataset(torch.utils.data.Dataset):
    """Item ``i``: ``{"pixel_values": [T, 3, S, S], "caption", "video_id", "frame_indices"}``.

    Training (``train=True``): ``sampling`` frames (head-tail by default) and one random resized crop per clip
    (``crop_min_scale < 1``), drawn from ``default_rng([seed, epoch, i])`` so a run is reproducible and workers
    agree (``set_epoch`` between epochs). Evaluation: uniform frames, no crop. ``preprocess`` turns the frames into
    the tower's input (``FramePreprocessor.from_tower(tower)`` or ``tower.preprocess``). A video that fails here
    raises ``VideoError`` naming it (``load_video_pairs`` with ``verify_videos`` has already skipped the broken
    ones, so a failure now means the file changed).
    """

    def __init__(self, pairs: Sequence[VideoTextPair], preprocess: Callable[[list[Image.Image]], torch.Tensor],
                 image_size: int, num_frames: int = 4, train: bool = False, seed: int = 0,
                 sampling: Sampling = "headtail", crop_min_scale: float = 1.0):
        self.pairs = list(pairs)
        self.preprocess, self.image_size = preprocess, int(image_size)
        self.num_frames, self.train, self.seed = int(num_frames), bool(train), int(seed)
        self.sampling: Sampling = sampling if train else "uniform"
        self.crop_min_scale = float(crop_min_scale) if train else 1.0
        self.epoch = 0

    @classmethod
    def from_config(cls, pairs: Sequence[VideoTextPair], data: VideoDataConfig, preprocess, image_size: int,
                    train: bool, seed: int) -> VideoClipDataset:
        return cls(pairs, preprocess, image_size, num_frames=data.num_frames, train=train, seed=seed,
                   sampling=data.train_sampling, crop_min_scale=data.crop_min_scale)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        frames, idx = load_clip(pair.video_path, self.num_frames, self.sampling, rng,
                                crop_min_scale=self.crop_min_scale, image_size=self.image_size)
        pixels = self.preprocess(frames)  # [T, 3, S, S]
        return {"pixel_values": pixels, "caption": pair.caption, "video_id": pair.video_id, "frame_indices": idx}


def collate_video_batch(items: Sequence[dict]) -> dict:
    """``{"pixel_values_videos": [B, T, 3, S, S], "captions": [B], "video_ids": [B], "frame_indices": [B][T]}``."""
    return {"pixel_values_videos": torch.stack([it["pixel_values"] for it in items]),
            "captions": [it["caption"] for it in items], "video_ids": [it["video_id"] for it in items],
            "frame_indices": [it["frame_indices"] for it in items]}
