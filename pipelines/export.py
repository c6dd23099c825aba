"""``dvlp export-hf``: a trained ``front/`` folder -> a transformers ``Blip2ForConditionalGeneration`` folder.

Reads ``front/model.safetensors`` and ``front/front_config.json`` (written by ``vl_align.fronts.save_front``:
the front, vision and LLM configs of the run), rebuilds the front and loads the frozen tower and LLM named there,
converts them with :func:`vl_align.export.export_blip2` and, before the folder is moved into place, loads it
back with plain transformers and checks that it captions held-out images exactly as our model does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from dvlp_common.config import Config, ConfigError, param
from pformer.llm import FrozenLLM
from vl_align.export import ExportError, export_blip2, verify_export
from vl_align.fronts import QFormerFront, load_front
from vl_align.pairs import PairDataConfig, load_pairs
from vl_align.vision import VisionTower

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportConfig(Config):
    front: str = param("runs/generative/front", help="front/ folder of a stage-2a or 2b run (model.safetensors + "
                                                     "front_config.json)")
    output_dir: str = param("runs/export/blip2", help="the Blip2ForConditionalGeneration folder to write")
    overwrite: bool = param(False, help="replace output_dir if it exists")
    dtype: Literal["float32", "bfloat16", "float16"] = param("float32", help="dtype of the saved weights")
    max_new_tokens: int = param(30, ge=1, help="generation_config.max_new_tokens of the export")
    verify_images: int = param(4, ge=0, help="before moving the folder into place, caption this many held-out "
                                             "images with it and with our model and require equal captions "
                                             "(0: skip; compared but not required for a non-float32 dtype)")
    verify_source: str = param("embedded:easy-vqa", help="image-text pairs whose test split gives the "
                                                         "verification images")
    verify_prompt: str = param("", help="text prompt of the verification captions")


def load_front_dir(front_dir: str | Path) -> tuple[QFormerFront, VisionTower, FrozenLLM, dict]:
    """Rebuild a saved Q-Former front with its frozen tower and LLM: ``(front, tower, llm, front_config)``."""
    config = Path(front_dir) / "front_config.json"
    if config.is_file() and json.loads(config.read_text())["front"].get("video", {}).get("enabled"):
        raise ConfigError("front", f"{front_dir} holds a video front (SimVLG temporal modules inside the vision "
                                   "tower); Blip2ForConditionalGeneration has no video form. Evaluate it with "
                                   "`dvlp evaluate front=...` instead")
    front, tower, llm, meta = load_front(front_dir)
    if not isinstance(front, QFormerFront):
        raise ConfigError("front", f"{front_dir} holds a '{meta['front']['kind']}' front; only Q-Former fronts "
                                   "('qformer', 'elip') have a BLIP-2 counterpart")
    return front, tower, llm, meta


def _verification_images(cfg: ExportConfig) -> list[str | bytes]:
    """The first ``verify_images`` distinct held-out images (paths, or encoded bytes from shards)."""
    pairs, _ = load_pairs(PairDataConfig(source=cfg.verify_source, verify_images=False), seed=0, split="test")
    return list(dict.fromkeys(r.image for r in pairs))[:cfg.verify_images]


def run_export(cfg: ExportConfig) -> dict:
    out = Path(cfg.output_dir)
    if out.exists() and not cfg.overwrite:
        raise ConfigError("overwrite", f"{out} exists; set overwrite=true to replace it")
    front, tower, llm, meta = load_front_dir(cfg.front)
    images = _verification_images(cfg) if cfg.verify_images else []
    exact = cfg.dtype == "float32"
    report: dict = {}

    def verify(folder: Path) -> None:
        if not images:
            return
        result = verify_export(folder, front, tower, llm, images, [cfg.verify_prompt] * len(images),
                               max_new_tokens=cfg.max_new_tokens)
        report.update(result)
        if exact and result["captions_equal"] != len(images):
            bad = [(a, b) for a, b in zip(result["ours"], result["theirs"]) if a != b]
            raise ExportError(f"the exported model captions {len(bad)} of {len(images)} verification images "
                              f"differently from ours, e.g. ours {bad[0][0]!r} vs exported {bad[0][1]!r}; "
                              f"nothing was written to {out}")

    provenance = {"front": str(Path(cfg.front).resolve()), "vision": meta["vision"], "llm": meta["llm"],
                  "front_kind": meta["front"].get("kind")}
    try:
        path = export_blip2(front, tower, llm, out, max_new_tokens=cfg.max_new_tokens, dtype=_DTYPES[cfg.dtype],
                            overwrite=cfg.overwrite, provenance=provenance, verify=verify)
    except ExportError as err:
        raise ConfigError("front", str(err)) from err
    summary = {"output_dir": str(path), "dtype": cfg.dtype, "verified_images": len(images)}
    if report:
        summary.update({k: report[k] for k in ("pixel_max_abs", "vision_max_abs", "prefix_max_abs",
                                               "captions_equal")})
        summary["captions"] = report["theirs"]
    return summary


__all__ = ["ExportConfig", "load_front_dir", "run_export"]
