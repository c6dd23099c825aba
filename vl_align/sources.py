"""Named data sources: ``embedded:<name>`` resolves to files built once into the cache from packaged data."""
from __future__ import annotations

from pathlib import Path

from dvlp_common import zoo

from . import embedded, motion, scenes

EMBEDDED = ("easy-vqa", "scenes", "motion")  # motion: video clips (vl_align.video_data reads its pairs)


def embedded_files(name: str) -> dict[str, Path]:
    """Build (once) and return the files of an embedded dataset."""
    if name == "easy-vqa":
        return {k: Path(v) for k, v in embedded.build_embedded_easy_vqa(zoo.cache_root() / "data" / "easy-vqa").items()}
    if name == "scenes":
        return {k: Path(v) for k, v in scenes.build_embedded_scenes(zoo.cache_root() / "data" / "scenes").items()}
    if name == "motion":
        return {k: Path(v) for k, v in motion.build_embedded_motion(zoo.cache_root() / "data" / "motion").items()}
    raise ValueError(f"unknown embedded dataset '{name}'; available: {', '.join(EMBEDDED)}")


def resolve_text_source(source: str) -> Path:
    """A stage-1 corpus: a path, or ``embedded:<name>`` (that dataset's text-only caption corpus)."""
    if source.startswith("embedded:"):
        return embedded_files(source.split(":", 1)[1])["caption_corpus"]
    return Path(source).expanduser()
