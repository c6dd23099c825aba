"""The frozen vision tower and its on-disk feature cache.

:class:`VisionTower` wraps a Hugging Face vision encoder -- CLIP vision, SigLIP vision, DINOv2 (with or without
registers) or ViT, given as a ``dvlp_common.zoo`` preset, a hub name or a local folder -- and turns images into
patch features ``[B, N, D]``. It is always frozen: no parameter requires a gradient, it is in eval mode and
``train()`` cannot take it out of eval mode, and its ``forward`` runs under ``torch.no_grad()``.

Loading. The reference's config decides the class: a full CLIP / SigLIP checkpoint (``model_type`` ``clip`` /
``siglip``, i.e. a ``CLIPModel`` / ``SiglipModel``) is loaded as ``CLIPVisionModel`` / ``SiglipVisionModel``
(only the image half); everything else goes through ``zoo.load_encoder`` (``AutoModel``).

Output. ``feature_layer = -1`` is the model's ``last_hidden_state`` (after the final LayerNorm for
DINOv2 / ViT / SigLIP; for CLIP before ``post_layernorm``, which only norms the pooled token). Any other value
indexes ``hidden_states`` (run with ``output_hidden_states=True``), whose entry 0 is the embedding output and
entry ``i`` the output of block ``i``, so ``-2`` is the penultimate block's (un-normed) output, as BLIP-2 takes
from EVA-CLIP. Tokens are ``[CLS, registers..., patches...]`` (SigLIP has no CLS): ``num_tokens`` counts them
for the configured ``image_size``. Position embeddings are interpolated (``interpolate_pos_encoding=True``
where the model's ``forward`` takes it; DINOv2 always interpolates), so 112 px runs on models trained at 224.

Normalisation (``mean`` / ``std``), first match wins:

1. ``image_mean`` / ``image_std`` attributes on the model's config (the reference's top-level config.json, e.g.
   the ``dinov2-s14`` preset), then on the vision sub-config;
2. ``image_mean`` / ``image_std`` in a ``preprocessor_config.json`` next to the weights (the local folder, or the
   hub cache snapshot of a hub name);
3. by family: CLIP's constants for CLIP, ``(0.5, 0.5, 0.5)`` for both for SigLIP, ImageNet's for anything else.

Feature cache. :func:`vision_feature_cache` runs the tower once per distinct image *content*: an image is a path or
the encoded bytes (a webdataset shard's, a datasets ``Image`` column's), and rows are keyed by the sha256 of those
bytes (for a path, of the file's), so copies of one file, and a shard's copy of it, share a row. It stores
``[N, D]`` per image in a :class:`dvlp_common.cache.KeyedArrayCache` whose producer is
:meth:`VisionTower.fingerprint` (weights, config, image size, mean/std, feature layer; plus the autocast dtype when
one is used). Using it is only correct when
the tower is frozen **and** nothing augments the images (random crops, flips, colour jitter...): the cached row
is the feature of the plain ``preprocess`` of the image. Deciding that is the caller's job (stage 2 uses the cache
only for the ``qformer`` front with ``vision.cache_features``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dvlp_common import zoo
from dvlp_common.cache import KeyedArrayCache, file_digest, fingerprint
from dvlp_common.config import Config, ConfigError, param

from .data import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, load_image

__all__ = ["VisionTowerConfig", "VisionTower", "VisionFeatureStore", "vision_feature_cache", "image_digests",
           "SIGLIP_MEAN", "SIGLIP_STD"]

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# full image-text checkpoints whose image half is loaded on its own
_VISION_SUBMODEL = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}
_CLIP_TYPES = ("clip", "clip_vision_model")
_SIGLIP_TYPES = ("siglip", "siglip_vision_model")
# config keys that do not change what the model computes (dropped from the fingerprint)
_VOLATILE_CONFIG_KEYS = ("transformers_version", "dtype", "torch_dtype", "architectures", "name_or_path")


@dataclasses.dataclass
class VisionTowerConfig(Config):
    model: str = param("dinov2-s14", help="vision encoder: a zoo preset, a HF name or a local folder (CLIP vision, "
                                          "SigLIP vision, DINOv2, ViT; full CLIP/SigLIP checkpoints give their "
                                          "vision half)")
    image_size: int = param(112, gt=0, help="input side in pixels; a multiple of the model's patch size")
    feature_layer: int = param(-1, help="-1: last_hidden_state; else an index into hidden_states (0 = embeddings, "
                                        "-2 = penultimate block, as BLIP-2 uses for EVA-CLIP)")
    cache_features: bool = param(True, help="compute the features once per image and read them from disk (only "
                                            "with a frozen tower and no image augmentation)")
    batch_size: int = param(64, ge=1, help="images per forward pass while filling the feature cache")


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
_DIGEST_MEMO: dict[tuple, str] = {}


def _memo_digest(path: Path) -> str:
    """sha256 of a file, remembered per (path, inode, size, mtime, ctime) for the life of the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGEST_MEMO:
        _DIGEST_MEMO[key] = file_digest(path)
    return _DIGEST_MEMO[key]


def _weight_files(folder: Path) -> list[Path]:
    """The files ``from_pretrained`` loads weights from: safetensors when there are any, else PyTorch ``.bin``."""
    safetensors = sorted(folder.glob("*.safetensors"))
    return safetensors or sorted(folder.glob("*.bin"))


def _hub_snapshot(name: str) -> Path | None:
    """The local hub-cache snapshot folder of a hub name (its name is the commit), if the hub cache has it."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 -- not a valid repo id, no hub library...: no snapshot
        return None
    return Path(found).parent if isinstance(found, str) else None


def _as_triple(value: Any, what: str) -> tuple[float, float, float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = [value] * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{what} needs 3 values (RGB), got {values}")
    return values  # type: ignore[return-value]


ImageSource = str | os.PathLike | bytes  # a path, or the image file's encoded bytes


def _as_image(image: ImageSource) -> str | bytes:
    """A hashable image key: bytes-like as ``bytes``, a path as ``str``."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    return os.fspath(image)


def _digest(image: str | bytes) -> str:
    return hashlib.sha256(image).hexdigest() if isinstance(image, bytes) else file_digest(image)


def image_digests(images: Sequence[ImageSource], workers: int = 8) -> dict[str | bytes, str]:
    """``{image: sha256 of its bytes}`` for the distinct images, a path's being its file's (threads: hashing
    releases the GIL)."""
    unique = list(dict.fromkeys(_as_image(im) for im in images))
    if len(unique) < 64:
        return {im: _digest(im) for im in unique}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(unique, pool.map(_digest, unique)))


# ---------------------------------------------------------------------------------------------------------------
# the tower
# ---------------------------------------------------------------------------------------------------------------
class VisionTower(nn.Module):
    """A frozen HF vision encoder: ``forward(pixel_values [B,3,S,S]) -> features [B, num_tokens, hidden_size]``.

    ``self.model`` is the Hugging Face model itself (the ELIP front wraps it).
    """

    def __init__(self, model: nn.Module, config: VisionTowerConfig, resolved: str,
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.config = config
        self.resolved = resolved  # the local folder or hub name the weights came from
        self._mean = tuple(float(v) for v in mean)
        self._std = tuple(float(v) for v in std)
        vision_cfg = model.config
        patch = getattr(vision_cfg, "patch_size", None)
        if patch is None:
            raise ValueError(f"vision model '{config.model}' ({type(model).__name__}) has no patch_size in its "
                             f"config; expected a ViT-like vision encoder (CLIP, SigLIP, DINOv2, ViT)")
        if isinstance(patch, (list, tuple)):
            if len(set(patch)) != 1:
                raise ValueError(f"vision model '{config.model}': non-square patches {tuple(patch)} are not supported")
            patch = patch[0]
        self._patch = int(patch)
        if config.image_size % self._patch:
            lower = config.image_size // self._patch * self._patch
            hint = f"e.g. {lower} or {lower + self._patch}" if lower else f"e.g. {self._patch}"
            raise ConfigError("vision.image_size", f"{config.image_size} is not a multiple of the patch size "
                                                   f"{self._patch} of '{config.model}' ({hint})")
        num_layers = getattr(vision_cfg, "num_hidden_layers", None)
        if config.feature_layer != -1 and num_layers is not None:
            n_states = int(num_layers) + 1  # embeddings + one per block
            if not -n_states <= config.feature_layer < n_states:
                raise ConfigError("vision.feature_layer", f"{config.feature_layer} is out of range: '{config.model}' "
                                                          f"has {num_layers} blocks, so hidden_states has {n_states} "
                                                          f"entries (valid: -1 = last_hidden_state, or "
                                                          f"{-n_states}..{n_states - 1})")
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        self._fingerprint: str | None = None
        self.model.requires_grad_(False)
        self.model.eval()
        super().train(False)

    # ------------------------------------------------------------------------------------------------ build
    @classmethod
    def build(cls, cfg: VisionTowerConfig) -> "VisionTower":
        full_config = zoo.load_config(cfg.model)
        model_type = getattr(full_config, "model_type", None)
        if model_type in _VISION_SUBMODEL:
            model = cls._load_vision_half(cfg.model, _VISION_SUBMODEL[model_type])
        else:
            model = zoo.load_encoder(cfg.model)
        if not hasattr(model, "config") or "pixel_values" not in inspect.signature(model.forward).parameters:
            raise ValueError(f"'{cfg.model}' (model_type {model_type!r}) loaded as {type(model).__name__}, which is "
                             f"not a vision encoder (its forward takes no pixel_values)")
        resolved = zoo.resolve(cfg.model)
        mean, std = cls._normalisation(full_config, model.config, resolved, model_type)
        return cls(model, cfg, resolved, mean, std)

    @staticmethod
    def _load_vision_half(ref: str, class_name: str) -> nn.Module:
        """The image half of a full CLIP / SigLIP checkpoint. The text weights are expected leftovers (their load
        report is silenced); a *missing* vision weight would mean a random init, so it is an error."""
        import transformers
        from transformers.utils import logging as hf_logging

        loader = getattr(transformers, class_name).from_pretrained
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = zoo._from_pretrained(loader, ref, dtype=torch.float32, output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        missing = sorted(info.get("missing_keys") or ())
        mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
        if missing or mismatched:
            raise ValueError(f"'{ref}' as {class_name}: vision weights missing from the checkpoint {missing[:5]} "
                             f"or of the wrong shape {mismatched[:5]}; is it a full {class_name[:-11]} checkpoint?")
        return model

    @staticmethod
    def _normalisation(full_config, vision_config, resolved: str, model_type: str | None):
        """(mean, std) by the rule in the module docstring."""
        for conf in (full_config, vision_config):
            mean = _as_triple(getattr(conf, "image_mean", None), "config image_mean")
            std = _as_triple(getattr(conf, "image_std", None), "config image_std")
            if mean is not None and std is not None:
                return mean, std
        folder = Path(resolved) if Path(resolved).is_dir() else _hub_snapshot(resolved)
        pre = folder / "preprocessor_config.json" if folder is not None else None
        if pre is not None and pre.is_file():
            data = json.loads(pre.read_text())
            mean = _as_triple(data.get("image_mean"), f"{pre} image_mean")
            std = _as_triple(data.get("image_std"), f"{pre} image_std")
            if mean is not None and std is not None:
                return mean, std
        if model_type in _CLIP_TYPES:
            return CLIP_MEAN, CLIP_STD
        if model_type in _SIGLIP_TYPES:
            return SIGLIP_MEAN, SIGLIP_STD
        return IMAGENET_MEAN, IMAGENET_STD

    # ------------------------------------------------------------------------------------------- properties
    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def patch_size(self) -> int:
        return self._patch

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_special_tokens(self) -> int:
        """Tokens before the patches: [CLS] (none for SigLIP) and register tokens."""
        cls_token = 0 if self.model.config.model_type in _SIGLIP_TYPES else 1
        return cls_token + int(getattr(self.model.config, "num_register_tokens", 0) or 0)

    @property
    def num_tokens(self) -> int:
        """Tokens per image at ``image_size``: special tokens + (image_size / patch_size)^2 patches."""
        return self.num_special_tokens + (self.config.image_size // self._patch) ** 2

    @property
    def mean(self) -> tuple[float, float, float]:
        return self._mean  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return self._std  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --------------------------------------------------------------------------------------------- frozen
    def train(self, mode: bool = True) -> "VisionTower":
        """Always eval: the tower is frozen (a parent's ``train()`` does not turn on dropout/drop-path here)."""
        return super().train(False)

    # ------------------------------------------------------------------------------------------- compute
    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """Paths / encoded bytes / PIL images -> normalised ``[B, 3, S, S]`` float32 (CPU) with
        ``vl_align.data.load_image``."""
        if not len(images):
            raise ValueError("preprocess needs at least one image")
        return torch.stack([load_image(im, self.config.image_size, self._mean, self._std) for im in images])

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> ``[B, num_tokens, hidden_size]`` (no gradient: the tower is frozen)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
        kwargs: dict[str, Any] = {}
        if self._interpolate:
            kwargs["interpolate_pos_encoding"] = True
        layer = self.config.feature_layer
        if layer != -1:
            kwargs["output_hidden_states"] = True
        out = self.model(pixel_values=pixel_values.to(self.device, self.dtype), **kwargs)
        return out.last_hidden_state if layer == -1 else out.hidden_states[layer]

    # ------------------------------------------------------------------------------------------- identity
    def _weights_identity(self) -> dict:
        folder = Path(self.resolved)
        if folder.is_dir():
            files = _weight_files(folder)
            if not files:
                raise FileNotFoundError(f"{folder}: no *.safetensors or *.bin weight files to fingerprint")
            return {"weights": {f.name: _memo_digest(f) for f in files}}
        snapshot = _hub_snapshot(self.resolved)
        if snapshot is None:
            warnings.warn(f"vision tower '{self.resolved}': no local folder or hub-cache snapshot found, so the "
                          f"feature-cache fingerprint has only the model name (a new upload under that name would "
                          f"not invalidate cached features)", stacklevel=3)
        return {"hub": self.resolved, "commit": snapshot.name if snapshot is not None else None}

    def fingerprint(self) -> str:
        """Identity of the features this tower computes, for cache folders.

        sha256 of the weight files (local folder; a hub name gives name + the commit of its cache snapshot), the
        vision config without its volatile keys (version, dtype...), the model class, ``image_size``, mean/std and
        ``feature_layer``. In-memory weight edits are not seen: the tower is frozen and loaded from disk.
        """
        if self._fingerprint is None:
            conf = {k: v for k, v in self.model.config.to_dict().items()
                    if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
            self._fingerprint = fingerprint("vision_tower", self._weights_identity(), type(self.model).__name__, conf,
                                            self.config.image_size, list(self._mean), list(self._std),
                                            self.config.feature_layer)
        return self._fingerprint


# ---------------------------------------------------------------------------------------------------------------
# feature cache
# ---------------------------------------------------------------------------------------------------------------
class VisionFeatureStore:
    """Cached tower features addressed by image (path or encoded bytes): ``get(images) -> [B, N, D]`` float32 (CPU).

    Rows are keyed by content digest; ``digests`` maps each known image to its digest. An image that was not given
    to :func:`vision_feature_cache` is hashed on use (its bytes may still have a row); a path's digest is kept, a
    new bytes object's is not (that would keep the image alive).
    """

    def __init__(self, cache: KeyedArrayCache, digests: dict[str | bytes, str]):
        self.cache = cache
        self.digests = dict(digests)

    @property
    def producer(self) -> str:
        return self.cache.meta["producer"]

    @property
    def folder(self) -> Path:
        return self.cache.folder

    def key(self, image: ImageSource) -> str:
        im = _as_image(image)
        digest = self.digests.get(im)
        if digest is None:
            digest = _digest(im)
            if isinstance(im, str):
                self.digests[im] = digest
        return digest

    def get(self, images: Sequence[ImageSource]) -> torch.Tensor:
        return self.cache.get([self.key(im) for im in images])

    def __len__(self) -> int:
        return len(self.digests)

    def __contains__(self, image: object) -> bool:
        images = (str, os.PathLike, bytes, bytearray, memoryview)
        return isinstance(image, images) and _as_image(image) in self.digests


def vision_feature_cache(tower: VisionTower, images: Sequence[ImageSource], cache_root: str | Path,
                         device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> VisionFeatureStore:
    """Features ``[N, D]`` of every image (path or encoded bytes), computed once with the frozen ``tower`` and kept
    under ``cache_root/vision_features/<producer>``.

    Only valid for a frozen tower and un-augmented images (see the module docstring): the caller decides. Rows are
    keyed by the sha256 of the image's bytes (a path: its file's), so identical images share a row whichever way
    they come; ``producer`` is ``tower.fingerprint()`` (mixed with the autocast dtype when ``dtype`` is bf16/fp16:
    those features differ from fp32 ones). When rows must be computed, the tower is moved to ``device`` and run in
    batches of ``tower.config.batch_size`` (under ``torch.autocast`` for bf16/fp16). Concurrent builders (several
    ranks) are serialised by a file lock.
    """
    from filelock import FileLock

    digests = image_digests(images)
    first_image: dict[str, str | bytes] = {}
    for image, digest in digests.items():
        first_image.setdefault(digest, image)
    autocast = dtype in (torch.bfloat16, torch.float16)
    producer = tower.fingerprint() if not autocast else fingerprint(tower.fingerprint(), "autocast", str(dtype))
    device = torch.device(device)

    def compute(keys: list[str]) -> torch.Tensor:
        tower.to(device)
        pixels = tower.preprocess([first_image[k] for k in keys]).to(device)
        ctx = torch.autocast(device.type, dtype=dtype) if autocast else contextlib.nullcontext()
        with ctx:
            return tower(pixels).float()

    root = Path(cache_root) / "vision_features"
    root.mkdir(parents=True, exist_ok=True)
    info = {"kind": "vision_features", "model": tower.config.model, "resolved": str(tower.resolved),
            "image_size": tower.config.image_size, "feature_layer": tower.config.feature_layer,
            "mean": list(tower.mean), "std": list(tower.std), "autocast": str(dtype) if autocast else None,
            "num_tokens": tower.num_tokens, "hidden_size": tower.hidden_size}
    keys = list(first_image)
    with FileLock(str(root / f"{producer}.lock")):
        cache = KeyedArrayCache.open_or_build(root, producer, info, keys, compute,
                                              batch_size=tower.config.batch_size,
                                              progress=len(keys) > 20 * tower.config.batch_size)
    return VisionFeatureStore(cache, digests)
