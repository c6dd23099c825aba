"""What a stage-2 step or evaluation feeds a front besides text: the images (the frozen tower's cached features, or
pixels when the tower runs inside the front) and the alignment targets P(y); and ``prepare_stage_inputs``, which
builds both for the pairs of a run, and ``training_pairs``, the pairs or stream a stage trains on (stages 2a and 2b
share both)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dvlp_common import zoo
from dvlp_common.config import ConfigError
from dvlp_common.records import SkipReport
from dvlp_common.stream import ShardedStream
from pformer.data import load_text_corpus
from pformer.targets import prompt_target_cache, streamed_prompt_cache

from .alignment import AlignmentConfig, AlignmentStats, corpus_statistics
from .pair_stream import (
    CaptionIds,
    LivePrompts,
    TowerFeatures,
    caption_limit,
    pair_stream,
)
from .pairs import ImageTextPair, PairDataConfig, load_pairs, within_caption_limit
from .sources import resolve_text_source
from .vision import VisionTower, VisionTowerConfig, vision_feature_cache


class ImageInputs:
    """Images (paths or encoded bytes) -> the front's image keyword arguments: ``image_embeds`` [B, N, D] from the
    feature cache, or ``pixel_values`` [B, 3, S, S] when there is no cache (the tower runs inside the front)."""

    def __init__(self, tower: VisionTower, features=None):
        self.tower = tower
        self.features = features  # a VisionFeatureStore, or None: pixels

    @classmethod
    def build(cls, tower: VisionTower, images: Sequence[str | bytes], live_tower: bool, device,
              dtype: torch.dtype | None) -> "ImageInputs":
        """Cache the frozen tower's features of ``images`` once (unless the tower runs live)."""
        if live_tower:
            return cls(tower)
        return cls(tower, vision_feature_cache(tower, list(images), zoo.cache_root(), device, dtype))

    def __call__(self, images: Sequence[str | bytes], device) -> dict[str, torch.Tensor]:
        if self.features is not None:
            return {"image_embeds": self.features.get(list(images)).to(device)}
        return {"pixel_values": self.tower.preprocess(list(images)).to(device)}


class PromptTargets:
    """Captions -> the alignment targets [B, n, d_llm]: each caption's cached P(y), or, for the caption-free control
    (``align.target = corpus_mean``), the corpus-mean prompt for every caption. ``stats`` (corpus mean and scale) is
    set when the alignment kind or target needs it."""

    def __init__(self, cache, target: str, stats: AlignmentStats | None):
        self.cache, self.target, self.stats = cache, target, stats

    def __call__(self, captions: Sequence[str], device) -> torch.Tensor:
        return self.batch_fields(captions, device)["targets"]

    def caption_prompts(self, captions: Sequence[str], device) -> torch.Tensor:
        """Each caption's own P(y) [B, n, d_llm], whatever the arm's target."""
        return self.cache.get(list(captions)).to(device)

    def batch_fields(self, captions: Sequence[str], device) -> dict[str, torch.Tensor]:
        """``targets``, what the alignment loss pulls W·Z toward, and ``caption_prompts``, the captions' own P(y) that
        the diagnostics compare W·Z with. They differ only in the control: there R² against its own target (the
        corpus mean) would divide by zero, and the question the diagnostics answer is how much of the caption's P(y)
        W·Z holds."""
        prompts = self.caption_prompts(captions, device)
        if self.target == "corpus_mean":
            center = self.stats.center.expand(len(captions), *self.stats.center.shape).to(device)
            return {"targets": center, "caption_prompts": prompts}
        return {"targets": prompts, "caption_prompts": prompts}


def corpus_prompt_statistics(pformer_dir: str, source: str, device, dtype) -> AlignmentStats:
    """Mean and scale of P(y) over the distinct sentences of a text corpus (``embedded:<name>`` or a path)."""
    texts = list(dict.fromkeys(load_text_corpus(resolve_text_source(source))["text"]))
    cache = prompt_target_cache(pformer_dir, texts, zoo.cache_root(), device=device, dtype=dtype)
    return corpus_statistics(cache.get(texts))  # [N, n, d]


@dataclass
class StageInputs:
    """What stages 2a and 2b share: the pairs, the frozen tower and the image inputs, the P(y) targets."""
    pairs: list[ImageTextPair]  # empty when the pairs stream (data.streaming)
    report: SkipReport
    caption_index: dict[str, int] | CaptionIds  # an id per distinct caption (equal captions are ITC positives)
    tower: VisionTower
    images: ImageInputs
    targets: PromptTargets | None  # None without alignment
    llm_width: int

    @property
    def stats(self) -> AlignmentStats | None:
        return self.targets.stats if self.targets is not None else None


def llm_width_of(llm: str) -> int:
    config = zoo.load_config(llm)
    return getattr(config, "hidden_size", None) or config.d_model


def prepare_stage_inputs(*, data: PairDataConfig, vision: VisionTowerConfig, live_tower: bool, llm: str,
                         align: AlignmentConfig, pformer: str, align_stats_source: str, seed: int,
                         max_skip_fraction: float, num_prompt_slots: int | None, device, dtype,
                         verbose: bool = True, video=None) -> StageInputs:
    """Load the pairs, build the tower and (frozen, not live) its feature cache, and (when aligning) the P(y) cache.
    ``num_prompt_slots`` is the number of prefix vectors W·Z the front makes (None: not fixed, as after merging);
    the P-Former's prompts must have that count and the LLM's width.

    With ``data.streaming`` nothing is read here (the stage streams the pairs, ``vl_align.pair_stream``): the tower
    and the P-Former run on each batch instead of filling caches, and caption ids are digests.

    ``video`` (a ``vl_align.video_inputs.VideoSource``, for a video front) reads the video-text pairs and serves
    their clips (``pixel_values_videos``, or the frozen blocks' cached output ``frozen_hidden_videos``) instead of
    images."""
    if data.streaming:
        pairs, caption_index = [], CaptionIds()
        report = SkipReport(max_skip_fraction=max_skip_fraction, name="image-text pairs (train, streamed)")
    else:
        pairs, report = video.load_pairs() if video is not None else load_pairs(data, seed, max_skip_fraction)
        captions = [r.caption for r in pairs]
        caption_index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        if verbose:
            print(f"{len(pairs)} image-text pairs, {len(caption_index)} distinct captions; skipped records: "
                  f"{report.total}" + (f"\n{report.summary()}" if report.total else ""), flush=True)
    tower = VisionTower.build(vision).to(device)
    if data.streaming:
        images = ImageInputs(tower, None if live_tower else TowerFeatures(tower, device, dtype))
    else:
        images = (video.inputs(tower, [r.image for r in pairs], device, dtype, verbose) if video is not None
                  else ImageInputs.build(tower, [r.image for r in pairs], live_tower, device, dtype))
    width = llm_width_of(llm)
    targets = None
    if align.weight and not Path(pformer).is_dir():
        raise FileNotFoundError(f"pformer={pformer} does not exist; run stage 1 first or set align.weight=0")
    if Path(pformer).is_dir():  # aligning, or (ω = 0) the alignment diagnostics of the baseline
        if data.streaming and data.prompt_cache_source:
            cache = streamed_prompt_cache(pformer, resolve_text_source(data.prompt_cache_source), zoo.cache_root(),
                                          workers=data.prompt_workers, device=str(device), dtype=dtype)
            shape = list(cache.shape)
        elif data.streaming:
            cache = LivePrompts(pformer, device, dtype)
            shape = list(cache.shape)
        else:
            cache = prompt_target_cache(pformer, captions, zoo.cache_root(), device=device, dtype=dtype)
            shape = list(cache.array.shape[1:])
        if shape[1] != width or (num_prompt_slots is not None and shape[0] != num_prompt_slots):
            if align.weight:
                raise ConfigError("front.num_query_tokens", f"W·Z is [{num_prompt_slots}, {width}] but the "
                                                            f"P-Former prompts are {shape}")
            if verbose:
                print(f"alignment diagnostics off: W·Z is [{num_prompt_slots}, {width}], the P-Former's prompts "
                      f"{shape}", flush=True)
        else:  # the corpus statistics serve the centred variants, the control and the diagnostics' R²
            stats = corpus_prompt_statistics(pformer, align_stats_source, device, dtype)
            targets = PromptTargets(cache, align.target, stats)
    elif verbose:
        print(f"alignment diagnostics off: no P-Former at {pformer}", flush=True)
    return StageInputs(pairs, report, caption_index, tower, images, targets, width)


def training_pairs(inputs: StageInputs, data: PairDataConfig, count_tokens: Callable[[list[str]], Sequence[int]],
                   limit: int, *, seed: int, rank: int, world_size: int,
                   verbose: bool = False) -> tuple[ShardedStream | None, list[ImageTextPair]]:
    """``(stream, pairs)`` a stage trains on, captions within ``limit`` tokens as the stage tokenizes them
    (``count_tokens(captions)`` -> their lengths; longer ones are counted skips in ``inputs.report``): with
    ``data.streaming`` this rank's stream of pairs and no pairs, else no stream and the loaded pairs that fit."""
    if data.streaming:  # records come from this rank's shards; long captions are skipped as they stream in
        return pair_stream(data, seed=seed, rank=rank, world_size=world_size, report=inputs.report,
                           keep=caption_limit(count_tokens, limit)), []
    return None, within_caption_limit(inputs.pairs, inputs.report, count_tokens, limit, verbose)


__all__ = ["ImageInputs", "PromptTargets", "StageInputs", "corpus_prompt_statistics", "llm_width_of",
           "prepare_stage_inputs", "training_pairs"]
