"""Image-text pairs for stage 2 (vision-language alignment) and image preprocessing.

``load_image_text_pairs`` reads four kinds of source, always through Hugging Face ``datasets``:

=============  ==========================================================  =====================================
fmt            source                                                      returns
=============  ==========================================================  =====================================
``coco``       COCO caption JSON ``{"images": [{"id", "file_name"}],       ``Dataset``: image_path, caption,
               "annotations": [{"image_id", "caption"}]}``; file names     image_id (one row per annotation)
               are relative to ``image_root`` (default: the JSON's folder)
``jsonl``      one object per line with an image path (``image_field``,    ``Dataset``: image_path, caption,
               falling back to ``"image_path"``) and ``caption_field``;    image_id (+ ``extra_fields``)
               relative paths are against ``image_root`` (default: the
               jsonl's folder); ``image_id`` from the record's
               ``image_id``/``id``, else the relative path
``disk``       a ``save_to_disk`` folder. An ``Image`` column is kept as   ``Dataset``: **image** (PIL, decoded
               the column ``image`` (PIL images on access) *instead of*    on access), caption, image_id; or
               ``image_path``; a string column is treated as paths.        image_path, caption, image_id
``webdataset`` tar shards: a brace/glob pattern (``shards/{000..009}.tar``)  ``IterableDataset`` (streaming):
               or a list, streamed with ``IterableDataset.from_generator`` image (PIL), caption, image_id
               (one shard per generator shard) and split over data-      (the sample key)
               parallel ranks with ``split_dataset_by_node``
=============  ==========================================================  =====================================

Bad records are counted skips in a ``SkipReport`` (see ``dvlp_common.records``): empty/whitespace or non-string
captions, lines that are not JSON or have invalid UTF-8, missing fields, and with ``verify_images`` missing,
truncated/corrupt or non-image files. Whole-input problems raise one clear error: a missing file, a COCO
JSON without a required key (the error names the file, the key and the record index), an unknown format,
a missing column. For map-style sources the skipped fraction is checked against the report's
``max_skip_fraction`` when loading ends; for webdataset the check runs while streaming, once
``STREAM_CHECK_AFTER`` samples have been seen, and the skips land in the ``report`` of the process that
iterates (DataLoader workers hold their own copies; each pass over the stream counts its skips again). The tar
members are read as bytes by our own reader (``datasets``' webdataset builder decodes ``.txt`` itself, so one
caption that is not UTF-8 would end the stream): such a caption is a counted ``invalid_utf8`` skip.

With ``decode_images=False`` the ``image`` column of ``disk`` and ``webdataset`` is ``Image(decode=False)``:
``{"bytes": the encoded file as stored, "path": its name}`` (bytes None only for a path-only datasets value), which
is what training keeps (``vl_align.pairs.load_pairs``): the bytes are hashed for the feature cache and decoded when
the tower needs pixels.

``load_image`` turns a path / PIL image / bytes into a normalised ``[3, size, size]`` float tensor with
PIL + numpy only (shorter side resized with bicubic, centre crop, scale to [0, 1], normalise).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image, UnidentifiedImageError

from dvlp_common.records import SkipReport, iter_json_objects
from dvlp_common.stream import expand_paths

__all__ = [
    "load_image_text_pairs",
    "load_image",
    "verify_image",
    "expand_shards",
    "detect_pair_format",
    "PAIR_FORMATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "STREAM_CHECK_AFTER",
]

PAIR_FORMATS = ("coco", "jsonl", "disk", "webdataset")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# streaming sources: the skip-fraction threshold is applied once this many samples have been seen
STREAM_CHECK_AFTER = 100
_WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
_WDS_CAPTION_KEYS = ("txt", "text", "caption")
_PAIR_FEATURES = datasets.Features(
    {"image_path": datasets.Value("string"), "caption": datasets.Value("string"), "image_id": datasets.Value("string")}
)


# ----------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------
def verify_image(src: str | os.PathLike | bytes) -> str | None:
    """Check that ``src`` (a path or the file's bytes) is a readable image.

    Returns ``None`` when it is, else the skip reason: ``"missing_image"``, ``"not_an_image"`` (not a
    format PIL knows, e.g. a text file renamed ``.png``), ``"corrupt_image"`` (truncated or damaged data) or
    ``"image_too_large"`` (PIL's decompression-bomb limit). ``Image.verify()`` checks the structure (PNG
    chunk CRCs), then the pixels are really decoded (JPEGs at a reduced scale via ``draft``, so this stays
    cheap) because ``verify`` does not notice every truncation.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        opener = lambda: io.BytesIO(bytes(src))  # noqa: E731
    else:
        path = os.fspath(src)
        if not os.path.isfile(path):
            return "missing_image"
        opener = lambda: path  # noqa: E731
    try:
        with Image.open(opener()) as im:
            im.verify()
        with Image.open(opener()) as im:
            im.draft("RGB", (32, 32))  # JPEG only: decode at 1/2..1/8 scale
            im.convert("RGB")
    except Image.DecompressionBombError:
        return "image_too_large"
    except UnidentifiedImageError:
        return "not_an_image"
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, ZeroDivisionError):
        return "corrupt_image"
    return None


def _open_image(src: Any) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, dict):  # datasets Image(decode=False) value
        if src.get("bytes") is not None:
            return Image.open(io.BytesIO(src["bytes"]))
        return Image.open(src["path"])
    if isinstance(src, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(src)))
    return Image.open(os.fspath(src))


def load_image(
    path_or_pil: str | os.PathLike | Image.Image | bytes | dict,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Load and preprocess one image into a float32 tensor ``[3, size, size]``.

    Resize so the shorter side is ``size`` (bicubic), centre-crop ``size x size``, scale to [0, 1], then
    ``(x - mean) / std`` per channel. Accepts a path, a PIL image, raw bytes, or a ``datasets`` image dict
    (``{"bytes", "path"}``). Grey / palette / RGBA images are converted to RGB (alpha dropped).
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, 1, -1)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, 1, -1)
    if mean_a.size != 3 or std_a.size != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {tuple(mean)} and {tuple(std)}")
    im = _open_image(path_or_pil)
    try:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ValueError(f"image has zero size {im.size}")
        if w <= h:
            nw, nh = size, max(size, round(h * size / w))
        else:
            nw, nh = max(size, round(w * size / h)), size
        if im.format == "JPEG":
            im.draft("RGB", (nw, nh))  # decode large JPEGs at a reduced scale that is still >= the target
        rgb = im.convert("RGB")
    finally:
        if im is not path_or_pil:
            im.close()
    if rgb.size != (nw, nh):
        rgb = rgb.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    rgb = rgb.crop((left, top, left + size, top + size))
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    arr = (arr - mean_a) / std_a
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def expand_shards(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expand a shard spec to a list of existing absolute tar paths.

    ``spec`` is a path, a brace pattern (``shards/{000..009}.tar``, ``{a,b}.tar``), a glob (``shards/*.tar``)
    or a list of those. Raises ``FileNotFoundError`` naming the shards (or the pattern) that do not exist.
    """
    return expand_paths(spec, what="webdataset shard")


def detect_pair_format(source: Any) -> str:
    """Guess the format of ``source`` (see the module docstring)."""
    if isinstance(source, (list, tuple)):
        return "webdataset"
    s = os.fspath(source)
    if any(c in s for c in "{*?[") or s.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    p = Path(s)
    if p.is_dir():
        return "disk"
    if p.suffix.lower() == ".json":
        return "coco"
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    raise ValueError(
        f"cannot tell the format of image-text source {s!r}; pass fmt= one of {PAIR_FORMATS} "
        "(.json = COCO captions, .jsonl, a saved datasets folder, or .tar shards)"
    )


class _Verifier:
    """Verifies each distinct image once (COCO has several captions per image)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._cache: dict[str, str | None] = {}

    def __call__(self, path: str) -> str | None:
        if not self.enabled:
            return None
        if path not in self._cache:
            self._cache[path] = verify_image(path)
        return self._cache[path]


def _clean_caption(value: Any) -> tuple[str | None, str | None]:
    """-> (caption, None) or (None, skip reason)."""
    if value is None:
        return None, "empty_caption"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8"
    if not isinstance(value, str):
        return None, "caption_not_string"
    value = value.strip()
    if not value:
        return None, "empty_caption"
    return value, None


def _resolve(path: str, base: str) -> str:
    return os.path.abspath(path if os.path.isabs(path) else os.path.join(base, path))


def _new_report(report: SkipReport | None, name: str) -> SkipReport:
    return SkipReport(
        max_skip_fraction=report.max_skip_fraction if report is not None else 0.05,
        max_examples=report.max_examples if report is not None else 5,
        name=name,
    )


def _finish(local: SkipReport, report: SkipReport | None, n_seen: int) -> None:
    if report is not None:
        report.merge(local)
    local.check(n_seen)


def _rows_to_dataset(rows: dict[str, list], extra_fields: Sequence[str]) -> datasets.Dataset:
    feats = dict(_PAIR_FEATURES)
    for f in extra_fields:
        feats[f] = datasets.Value("string")
    return datasets.Dataset.from_dict(rows, features=datasets.Features(feats))


# ----------------------------------------------------------------------------------------------------------
# formats
# ----------------------------------------------------------------------------------------------------------
def _load_coco(path: Path, image_root, caption_field, max_records, rep, verify) -> datasets.Dataset:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"COCO caption file {str(path)!r} is not valid UTF-8 (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"COCO caption file {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"COCO caption file {str(path)!r}: top level is a {type(data).__name__}, expected an object")
    for key in ("images", "annotations"):
        if key not in data:
            raise ValueError(f"COCO caption file {str(path)!r} has no top-level key {key!r} (keys: {sorted(data)})")
        if not isinstance(data[key], list):
            raise ValueError(f"COCO caption file {str(path)!r}: {key!r} is a {type(data[key]).__name__}, expected a list")
    root = os.fspath(image_root) if image_root is not None else str(path.parent)
    files: dict[str, str] = {}
    for i, img in enumerate(data["images"]):
        for key in ("id", "file_name"):
            if not isinstance(img, dict) or key not in img:
                raise ValueError(f"COCO caption file {str(path)!r}: images[{i}] has no key {key!r}")
        iid = str(img["id"])
        if iid in files:
            raise ValueError(f"COCO caption file {str(path)!r}: images[{i}] repeats image id {img['id']!r}")
        files[iid] = _resolve(str(img["file_name"]), root)
    rows: dict[str, list] = {"image_path": [], "caption": [], "image_id": []}
    for j, ann in enumerate(data["annotations"]):
        if max_records is not None and len(rows["caption"]) >= max_records:
            break
        for key in ("image_id", caption_field):
            if not isinstance(ann, dict) or key not in ann:
                raise ValueError(f"COCO caption file {str(path)!r}: annotations[{j}] has no key {key!r}")
        where = f"{path}:annotations[{j}]"
        iid = str(ann["image_id"])
        if iid not in files:
            rep.skip("unknown_image_id", f"{where} (image_id {ann['image_id']!r})")
            continue
        caption, why = _clean_caption(ann[caption_field])
        if why:
            rep.skip(why, where)
            continue
        why = verify(files[iid])
        if why:
            rep.skip(why, f"{where} ({files[iid]})")
            continue
        rows["image_path"].append(files[iid])
        rows["caption"].append(caption)
        rows["image_id"].append(iid)
    return _rows_to_dataset(rows, ())


def _checked_image_path(rel, root, verify, rep: SkipReport, where: str) -> str | None:
    """The resolved path of a record's image, or None after counting why it is unusable."""
    if not isinstance(rel, str) or not rel.strip():
        rep.skip("missing_image", where)
        return None
    img = _resolve(rel, root)
    why = verify(img)
    if why:
        rep.skip(why, f"{where} ({img})")
        return None
    return img


def _load_jsonl(path: Path, image_root, caption_field, image_field, max_records, rep, verify, extra_fields):
    root = os.fspath(image_root) if image_root is not None else str(path.parent)
    rows: dict[str, list] = {"image_path": [], "caption": [], "image_id": [], **{f: [] for f in extra_fields}}
    for where, rec in iter_json_objects(path, rep):
        if max_records is not None and len(rows["caption"]) >= max_records:
            break
        ikey = image_field if image_field in rec else ("image_path" if "image_path" in rec else None)
        if ikey is None:
            rep.skip(f"missing_field:{image_field}", where)
            continue
        if caption_field not in rec:
            rep.skip(f"missing_field:{caption_field}", where)
            continue
        caption, why = _clean_caption(rec[caption_field])
        if why:
            rep.skip(why, where)
            continue
        rel = rec[ikey]
        img = _checked_image_path(rel, root, verify, rep, where)
        if img is None:
            continue
        iid = rec.get("image_id", rec.get("id", rel))
        rows["image_path"].append(img)
        rows["caption"].append(caption)
        rows["image_id"].append(str(iid))
        for f in extra_fields:
            v = rec.get(f)
            rows[f].append(None if v is None else str(v))
    return _rows_to_dataset(rows, extra_fields)


def _load_disk(path: Path, image_root, caption_field, image_field, max_records, rep, verify_images, extra_fields,
               decode_images=True):
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ValueError(f"{str(path)!r} is a folder but not one written by datasets save_to_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{str(path)!r} holds a DatasetDict with splits {list(ds)}; pass the folder of one split")
    cols = ds.column_names
    ikey = image_field if image_field in cols else ("image_path" if "image_path" in cols else None)
    if ikey is None:
        raise ValueError(f"saved dataset {str(path)!r} has no image column {image_field!r}; available columns: {cols}")
    if caption_field not in cols:
        raise ValueError(f"saved dataset {str(path)!r} has no caption column {caption_field!r}; available columns: {cols}")
    for f in extra_fields:
        if f not in cols:
            raise ValueError(f"saved dataset {str(path)!r} has no column {f!r}; available columns: {cols}")
    feat = ds.features[ikey]
    is_image = isinstance(feat, datasets.Image)
    if not is_image and not (isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string")):
        raise ValueError(f"column {ikey!r} of saved dataset {str(path)!r} is {feat}: need an Image or a path column")
    has_id = "image_id" in cols
    sel = [ikey, caption_field] + (["image_id"] if has_id else []) + [f for f in extra_fields if f not in (ikey, caption_field, "image_id")]
    ds = ds.select_columns(list(dict.fromkeys(sel)))
    if is_image:
        ds = ds.cast_column(ikey, datasets.Image(decode=False))
    root = os.fspath(image_root) if image_root is not None else str(path.parent)
    verify = _Verifier(verify_images)
    keep: list[int] = []
    paths: list[str] = []
    for start in range(0, len(ds), 1000):
        if max_records is not None and len(keep) >= max_records:
            break
        batch = ds[start : start + 1000]
        for k in range(len(batch[caption_field])):
            if max_records is not None and len(keep) >= max_records:
                break
            i = start + k
            where = f"{path}[row {i}]"
            caption, why = _clean_caption(batch[caption_field][k])
            if why:
                rep.skip(why, where)
                continue
            img = batch[ikey][k]
            if is_image:
                if img is None or (img.get("bytes") is None and not img.get("path")):
                    rep.skip("missing_image", where)
                    continue
                if verify_images:
                    src = img["bytes"] if img.get("bytes") is not None else _resolve(img["path"], root)
                    why = verify_image(src)
                    if why:
                        rep.skip(why, where)
                        continue
            else:
                img = _checked_image_path(img, root, verify, rep, where)
                if img is None:
                    continue
                paths.append(img)
            keep.append(i)
    out = ds.select(keep) if len(keep) != len(ds) else ds
    ids = [str(v) for v in out["image_id"]] if has_id else [str(i) for i in keep]
    extras = [f for f in extra_fields if f not in (ikey, caption_field, "image", "image_path", "caption", "image_id")]
    out = out.select_columns(list(dict.fromkeys([caption_field, *extras] + ([ikey] if is_image else []))))
    if is_image:
        out = out.cast_column(ikey, datasets.Image(decode=decode_images))
        if ikey != "image":
            out = out.rename_column(ikey, "image")
    else:
        out = out.add_column("image_path", paths)
    if caption_field != "caption":
        out = out.rename_column(caption_field, "caption")
    out = out.add_column("image_id", ids)
    return out.select_columns(["image" if is_image else "image_path", "caption", "image_id", *extras])


class _StreamConvert:
    """``IterableDataset.map`` function for webdataset samples.

    Skips go to the caller's ``report`` and to a per-stream report that applies the threshold (so earlier
    skips in a shared report do not count against this stream).
    """

    def __init__(self, image_key, caption_key, verify_images, report: SkipReport | None):
        self.image_key, self.caption_key = image_key, caption_key
        self.verify_images, self.report = verify_images, report
        self.local = _new_report(report, "webdataset stream")
        self.seen = 0

    def __call__(self, ex):
        self.seen += 1
        caption, why = _clean_caption(ex.get(self.caption_key))
        img = ex.get(self.image_key)
        if why is None and (img is None or img.get("bytes") is None):
            why = "missing_image"
        if why is None and self.verify_images:
            why = verify_image(img["bytes"])
        if why:
            where = f"{ex.get('__url__')}:{ex.get('__key__')}"
            self.local.skip(why, where)
            if self.report is not None:
                self.report.skip(why, where)
        if self.seen >= STREAM_CHECK_AFTER and self.local.total:
            self.local.check(self.seen)
        if why:
            return {"image": None, "caption": None, "image_id": ex.get("__key__"), "_ok": False}
        return {"image": img, "caption": caption, "image_id": ex.get("__key__"), "_ok": True}


_WDS_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset: key = path up to the name's first dot


def _tar_samples(shards: Sequence[str]):
    """The samples of webdataset tar shards, undecoded: ``{"__key__", "__url__", extension: bytes, ...}``."""
    for shard in shards:
        with tarfile.open(shard, "r|*") as tf:  # streaming read, any compression
            sample: dict[str, Any] = {}
            for member in tf:
                found = _WDS_MEMBER.match(member.name) if member.isfile() else None
                if found is None:
                    continue
                key, ext = found.group(1), found.group(2).lower()
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample.update({"__key__": key, "__url__": shard, ext: tf.extractfile(member).read()})
            if sample:
                yield sample


def _raw_pairs(shards: list[str], ikey: str, ckey: str):
    """``IterableDataset.from_generator`` body: image bytes and caption bytes, decoded later by _StreamConvert."""
    for ex in _tar_samples(shards):
        img = ex.get(ikey)
        yield {"__key__": ex["__key__"], "__url__": ex["__url__"], "caption": ex.get(ckey),
               "image": None if img is None else {"bytes": img, "path": f"{ex['__key__']}.{ikey}"}}


def _load_webdataset(source, caption_field, image_field, max_records, report, verify_images, rank, world_size,
                     decode_images=True):
    shards = expand_shards(source)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    first = next(_tar_samples(shards[:1]), None)  # the fields, as datasets' reader infers them: from the start
    if first is None:
        raise ValueError(f"webdataset shard {shards[0]!r} holds no samples")
    fields = [k for k in first if not k.startswith("__")]
    ikey = image_field if image_field in first else next((k for k in _WDS_IMAGE_KEYS if k in first), None)
    ckey = caption_field if caption_field in first else next((k for k in _WDS_CAPTION_KEYS if k in first), None)
    if ikey is None:
        raise ValueError(f"webdataset shards {shards[0]!r}...: no image field {image_field!r} (fields: {fields})")
    if ckey is None:
        raise ValueError(f"webdataset shards {shards[0]!r}...: no caption field {caption_field!r} (fields: {fields})")
    raw = datasets.Features({"__key__": datasets.Value("string"), "__url__": datasets.Value("string"),
                             "caption": datasets.Value("binary"), "image": datasets.Image(decode=False)})
    ds = datasets.IterableDataset.from_generator(_raw_pairs, features=raw,
                                                 gen_kwargs={"shards": list(shards), "ikey": ikey, "ckey": ckey})
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    convert = _StreamConvert("image", "caption", verify_images, report)
    out_feats = datasets.Features(
        {
            "image": datasets.Image(decode=False),
            "caption": datasets.Value("string"),
            "image_id": datasets.Value("string"),
            "_ok": datasets.Value("bool"),
        }
    )
    ds = ds.map(convert, remove_columns=list(raw), features=out_feats)
    ds = ds.filter(lambda ex: ex["_ok"]).remove_columns("_ok")
    if decode_images:
        ds = ds.cast_column("image", datasets.Image())
    if max_records is not None:
        ds = ds.take(max_records)
    return ds


# ----------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------
def load_image_text_pairs(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    fmt: str = "auto",
    image_root: str | os.PathLike | None = None,
    caption_field: str = "caption",
    image_field: str = "image",
    max_records: int | None = None,
    report: SkipReport | None = None,
    verify_images: bool = True,
    *,
    rank: int = 0,
    world_size: int = 1,
    extra_fields: Sequence[str] = (),
    decode_images: bool = True,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load image-caption pairs; see the module docstring for formats and returned columns.

    Args:
        source: COCO caption ``.json``, ``.jsonl``, a ``save_to_disk`` folder, or webdataset shards
            (pattern / list).
        fmt: ``"auto"`` or one of ``PAIR_FORMATS``.
        image_root: folder that relative image paths are resolved against (COCO / jsonl / path columns);
            default: the folder of the annotation file.
        caption_field: caption key / column (webdataset falls back to ``txt``).
        image_field: image key / column (jsonl and disk fall back to ``image_path``; webdataset to the
            first image extension present, e.g. ``jpg``). Unused for COCO (``file_name``).
        max_records: keep at most this many (good) pairs (per rank for webdataset).
        report: receives the skips; its ``max_skip_fraction`` is the abort threshold (default 0.05).
        verify_images: open every image with PIL and skip missing / truncated / non-image files.
        rank, world_size: data-parallel split of webdataset shards (``split_dataset_by_node``).
        extra_fields: more jsonl keys (kept as strings, None when absent) or dataset columns (kept as
            stored) to keep; jsonl and disk only.
        decode_images: False: an ``image`` column (disk, webdataset) gives the undecoded ``{"bytes", "path"}``
            instead of PIL images.
    """
    if fmt == "auto":
        if not isinstance(source, (list, tuple)) and not any(c in os.fspath(source) for c in "{*?["):
            if not Path(source).exists():
                raise FileNotFoundError(f"image-text source not found: {os.fspath(source)!r}")
        fmt = detect_pair_format(source)
    if fmt not in PAIR_FORMATS:
        raise ValueError(f"unknown image-text format {fmt!r}; expected 'auto' or one of {PAIR_FORMATS}")
    if max_records is not None and max_records < 0:
        raise ValueError(f"max_records must be >= 0, got {max_records}")
    if fmt == "webdataset":
        return _load_webdataset(source, caption_field, image_field, max_records, report, verify_images, rank,
                                world_size, decode_images)

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"image-text source not found: {str(path)!r}")
    if image_root is not None and not Path(image_root).is_dir():
        raise FileNotFoundError(f"image_root is not a folder: {os.fspath(image_root)!r}")
    if (fmt == "disk") != path.is_dir():
        raise ValueError(f"{str(path)!r}: fmt={fmt!r} needs {'a folder' if fmt == 'disk' else 'a file'}")
    rep = _new_report(report, str(path))
    if fmt == "disk":
        ds = _load_disk(path, image_root, caption_field, image_field, max_records, rep, verify_images,
                        tuple(extra_fields), decode_images)
    else:
        if path.stat().st_size == 0:
            raise ValueError(f"image-text file {str(path)!r} is empty")
        verify = _Verifier(verify_images)
        if fmt == "coco":
            ds = _load_coco(path, image_root, caption_field, max_records, rep, verify)
        else:
            ds = _load_jsonl(path, image_root, caption_field, image_field, max_records, rep, verify, tuple(extra_fields))
    _finish(rep, report, len(ds) + rep.total)  # every record seen was kept or skipped
    return ds
