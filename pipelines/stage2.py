"""Stage 2a: vision-language representation learning (BLIP-2's stage 1) with the P-Former alignment.

Frozen vision tower -> front (``qformer`` or ``elip``) trained with ITC + ITM + ITG + ω₁·align(W·Z, P(y)), where
P(y) comes from the prompt-target cache of a stage-1 P-Former (the P-Former itself never runs during training) and,
for the ``qformer`` front, the tower's features come from the vision-feature cache (the tower runs once per image).

Outputs in ``logging.output_dir``: ``config.yaml``, ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``,
``front/`` (safetensors weights + config), ``stage2_summary.json`` (losses, step time, tokens per image),
``retrieval.json`` / ``retrieval.md`` / ``retrieval_predictions.json`` (held-out image<->text retrieval).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from dvlp_common import zoo
from pformer.targets import prompt_target_cache
from dvlp_common.io import replace_folder
from dvlp_common.config import Config, ConfigError, param, to_dict
from pformer.model import read_pformer_config
from dvlp_common.records import SkipReport, skip_too_long
from vl_align.data import load_image_text_pairs
from vl_align.fronts import FrontConfig, build_front
from vl_align.alignment import AlignmentConfig, AlignmentStats
from vl_align.objectives import (RepresentationBatch, RepresentationWeights,
                                 representation_loss)
from vl_align.vision import VisionTower, VisionTowerConfig, vision_feature_cache

from . import distributed, optim, training
from .config import DeepSpeedConfig, LoggingConfig, OptimConfig, ReliabilityConfig
from .evaluate import RetrievalEvalConfig, evaluate_retrieval, held_out_pairs
from vl_align.sources import embedded_files, resolve_text_source


@dataclass
class PairDataConfig(Config):
    source: str = param("embedded:easy-vqa", help="COCO caption JSON, jsonl, saved datasets folder, webdataset "
                                                   "shards, or embedded:easy-vqa")
    format: Literal["auto", "coco", "jsonl", "disk", "webdataset"] = param("auto", help="format of source")
    image_root: Optional[str] = param(None, help="folder the image paths are relative to (COCO, jsonl)")
    max_pairs: Optional[int] = param(None, help="train on this many pairs (a seeded subset); None: all")
    verify_images: bool = param(True, help="open every image once at load; bad ones are counted skips")


@dataclass
class Stage2Config(Config):
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    front: FrontConfig = field(default_factory=FrontConfig)
    pformer: str = param("runs/stage1/pformer", help="stage-1 P-Former folder whose P(y) are the targets")
    llm: str = param("smollm2-135m", help="the frozen LLM (its width sizes W; must be the P-Former's LLM)")
    losses: RepresentationWeights = field(default_factory=RepresentationWeights)
    align: AlignmentConfig = field(default_factory=AlignmentConfig)
    align_stats_source: str = param("embedded:easy-vqa", help="text corpus whose P(y) give the mean/std used by "
                                                                "the corpus_mean target and the centred variants")
    data: PairDataConfig = field(default_factory=PairDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(output_dir="runs/stage2"))
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    eval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)
    seed: int = param(0, help="seed of initialisation, data order and negative sampling")

    def check(self) -> None:
        if self.front.kind == "tome":
            raise ConfigError("front.kind", "'tome' (SimVLG) has no representation stage; it trains with the LM "
                                            "loss alone in the generative stage")


def resolve_pair_source(data: PairDataConfig, split: str = "train") -> tuple[str, str]:
    if data.source.startswith("embedded:"):
        return str(embedded_files(data.source.split(":", 1)[1])[f"pairs_{split}"]), "jsonl"
    return data.source, data.format


def load_pairs(data: PairDataConfig, seed: int, reliability: ReliabilityConfig, split: str = "train"):
    """(records [{image_path, caption, image_id}], SkipReport), a seeded subset of ``max_pairs`` for training."""
    report = SkipReport(max_skip_fraction=reliability.max_skip_fraction, name=f"image-text pairs ({split})")
    source, fmt = resolve_pair_source(data, split)
    ds = load_image_text_pairs(source, fmt=fmt, image_root=data.image_root, report=report,
                               verify_images=data.verify_images)
    records = [{"image_path": r["image_path"], "caption": r["caption"], "image_id": str(r["image_id"])} for r in ds]
    if data.max_pairs is not None and split == "train":
        if data.max_pairs > len(records):
            raise ConfigError("data.max_pairs", f"asks for {data.max_pairs} pairs but {source} has {len(records)}")
        keep = np.random.default_rng([seed, 23]).permutation(len(records))[:data.max_pairs]
        records = [records[i] for i in sorted(keep)]
    return records, report


def decoder_start_id(tokenizer) -> int:
    """BLIP-2's [DEC] token for ITG: the tokenizer's BOS, else BERT's spare [unused0], else [CLS]."""
    for token in (tokenizer.bos_token, "[unused0]"):
        if token is not None and token in tokenizer.get_vocab():
            return tokenizer.convert_tokens_to_ids(token)
    return tokenizer.cls_token_id


def alignment_stats(pformer_dir: str, source: str, cache_root: Path, device, dtype) -> AlignmentStats:
    from pformer.data import load_text_corpus

    texts = list(dict.fromkeys(load_text_corpus(resolve_text_source(source))["text"]))
    cache = prompt_target_cache(pformer_dir, texts, cache_root, device=device, dtype=dtype)
    values = cache.get(texts)  # [N, n, d]
    center = values.mean(0)
    # one scale for every element: the RMS deviation of P(y) from the corpus mean. Per-element stds are ~1e-3 on
    # some elements, and dividing by them made the loss ~8 and the arm collapse (measured on easy-VQA).
    rms = (values - center).pow(2).mean().sqrt().clamp_min(1e-6)
    return AlignmentStats(center=center, scale=rms.expand_as(center))


@dataclass
class VisionTextSetup:
    """What stages 2a and 2b share: the pairs, the frozen tower (or its feature cache) and the P(y) targets."""
    records: list[dict]
    report: SkipReport
    caption_index: dict[str, int]
    tower: VisionTower
    features: object | None  # VisionFeatureStore when the tower is frozen and cached
    targets: object | None  # KeyedArrayCache of P(y) when aligning
    stats: AlignmentStats | None
    llm_width: int

    def image_inputs(self, recs: list[dict], device) -> dict[str, torch.Tensor]:
        paths = [r["image_path"] for r in recs]
        if self.features is not None:
            return {"image_embeds": self.features.get(paths).to(device)}
        return {"pixel_values": self.tower.preprocess(paths).to(device)}

    def target_prompts(self, recs: list[dict], align: AlignmentConfig, device) -> torch.Tensor | None:
        if self.targets is None:
            return None
        if align.target == "corpus_mean":
            return self.stats.center.expand(len(recs), *self.stats.center.shape).to(device)
        return self.targets.get([r["caption"] for r in recs]).to(device)


def prepare_vision_text(cfg, dist, dtype, live_tower: bool, num_prompt_slots: int | None) -> VisionTextSetup:
    """``cfg`` is a Stage2Config or GenerativeConfig (same vision/data/align/pformer/llm keys)."""
    with distributed.main_first(dist):  # the main rank builds the shared caches, the other ranks then open them
        return _prepare_vision_text(cfg, dist, dtype, live_tower, num_prompt_slots)


def _prepare_vision_text(cfg, dist, dtype, live_tower: bool, num_prompt_slots: int | None) -> VisionTextSetup:
    records, report = load_pairs(cfg.data, cfg.seed, cfg.reliability)
    captions = [r["caption"] for r in records]
    caption_index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    if dist.is_main:
        print(f"{len(records)} image-text pairs, {len(caption_index)} distinct captions; skipped records: "
              f"{report.total}" + (f"\n{report.summary()}" if report.total else ""), flush=True)
    tower = VisionTower.build(cfg.vision).to(dist.device)
    cache_root = zoo.cache_root()
    features = None
    if not live_tower and cfg.vision.cache_features:  # frozen tower, no augmentation: one ViT pass per image, ever
        features = vision_feature_cache(tower, [r["image_path"] for r in records], cache_root, dist.device, dtype)
    llm_config = zoo.load_config(cfg.llm)
    llm_width = getattr(llm_config, "hidden_size", None) or llm_config.d_model
    targets = stats = None
    if cfg.align.weight:
        if not Path(cfg.pformer).is_dir():
            raise FileNotFoundError(f"pformer={cfg.pformer} does not exist; run stage 1 first or set align.weight=0")
        targets = prompt_target_cache(cfg.pformer, captions, cache_root, device=dist.device, dtype=dtype)
        shape = list(targets.array.shape[1:])
        if shape[1] != llm_width or (num_prompt_slots is not None and shape[0] != num_prompt_slots):
            raise ConfigError("front.num_query_tokens", f"W·Z is [{num_prompt_slots}, {llm_width}] but the P-Former "
                                                        f"prompts are {shape}")
        if cfg.align.kind != "mse" or cfg.align.target == "corpus_mean":
            stats = alignment_stats(cfg.pformer, cfg.align_stats_source, cache_root, dist.device, dtype)
    return VisionTextSetup(records, report, caption_index, tower, features, targets, stats, llm_width)


def within_caption_limit(setup: VisionTextSetup, count_tokens, limit: int, verbose: bool) -> list[dict]:
    """The pairs whose caption fits ``limit`` tokens as the stage tokenizes it (``count_tokens(captions)`` -> their
    lengths); longer ones are counted skips (then the report's threshold applies to all skips)."""
    recs, report = setup.records, setup.report
    seen, before = len(recs) + report.total, report.total
    lengths = []
    for start in range(0, len(recs), 1024):
        lengths += [int(n) for n in count_tokens([r["caption"] for r in recs[start:start + 1024]])]
    keep = skip_too_long(lengths, limit, report,
                         lambda i: f"image_id {recs[i]['image_id']} {recs[i]['caption'][:40]!r}")
    report.check(seen)
    if verbose and report.total > before:
        print(f"{report.total - before} caption(s) longer than front.max_text_length={limit} tokens skipped; "
              f"{len(keep)} pairs left\n{report.summary()}", flush=True)
    return [recs[i] for i in keep]


def run_stage2(cfg: Stage2Config, resume: bool = False, stop_after: int | None = None) -> dict:
    dist, dtype, run_dir = training.start_run(cfg)
    training.seed_everything(cfg.seed)
    live_tower = cfg.front.kind == "elip" or not cfg.vision.cache_features
    setup = prepare_vision_text(cfg, dist, dtype, live_tower, cfg.front.num_query_tokens)
    records, tower, stats = setup.records, setup.tower, setup.stats

    tokenizer = zoo.load_tokenizer(cfg.front.init_from)
    records = setup.records = within_caption_limit(setup, lambda caps: [len(ids) for ids in tokenizer(caps).input_ids],
                                                   cfg.front.max_text_length, dist.is_main)
    dec_id = decoder_start_id(tokenizer)
    training.seed_everything(cfg.seed)  # the front's init must not depend on whether the caches existed
    front = build_front(cfg.front, tower.hidden_size, setup.llm_width, vision_tower=tower if live_tower else None)
    engine = optim.build_engine(front, cfg.optim, cfg.deepspeed, dist)

    def make_batch(ids: list[int], step: int) -> RepresentationBatch:
        recs = [records[i] for i in ids]
        tok = tokenizer([r["caption"] for r in recs], padding=True, truncation=True,
                        max_length=cfg.front.max_text_length, return_tensors="pt")
        dec = tok.input_ids.clone()
        dec[:, 0] = dec_id
        batch = RepresentationBatch(
            record_ids=[r["image_id"] for r in recs], input_ids=tok.input_ids.to(dist.device),
            attention_mask=tok.attention_mask.to(dist.device), decoder_input_ids=dec.to(dist.device),
            caption_ids=torch.tensor([setup.caption_index[r["caption"]] for r in recs], device=dist.device),
            noise_seed=training.step_seed(cfg.seed, step, 0), targets=setup.target_prompts(recs, cfg.align, dist.device),
            **setup.image_inputs(recs, dist.device))
        return batch

    def loss_fn(eng, batch):
        return representation_loss(eng, batch, cfg.losses, cfg.align, stats, distributed.all_gather_with_grad,
                                   distributed.all_gather_nograd, dist.rank)

    result = training.train(engine=engine, dist_info=dist, make_batch=make_batch, loss_fn=loss_fn,
                            num_samples=len(records), optim=cfg.optim, logging=cfg.logging,
                            reliability=cfg.reliability, seed=cfg.seed, dtype=dtype, resume=resume,
                            stop_after=stop_after, record_ids=lambda b: b.record_ids)
    summary = {"front": cfg.front.kind, "steps": result.final_step, "wall_seconds": result.wall_seconds,
               "resumed_from": result.resumed_from, "pairs": len(records), "skipped": setup.report.as_dict(),
               "vision_tokens": tower.num_tokens, "last": result.history[-1] if result.history else None}
    if result.final_step >= cfg.optim.max_steps:
        # every rank: under ZeRO-3 the weights (a live tower's too) are gathered from the ranks' partitions into a
        # fresh front, with a fresh tower where it runs inside the front
        if live_tower and optim.partitions_weights(engine) and dist.is_main:
            tower = VisionTower.build(cfg.vision).to(dist.device)
        trained = optim.trained_module(engine, lambda: build_front(
            cfg.front, tower.hidden_size, setup.llm_width, vision_tower=tower if live_tower else None), dist.is_main)
    if result.final_step >= cfg.optim.max_steps and dist.is_main:
        # W is trained toward the P-Former's prompts, so it is meant for the P-Former's layout (default without)
        layout = read_pformer_config(cfg.pformer).bos_before_prefix if cfg.align.weight else True
        summary["front_dir"] = str(save_front(trained, cfg, run_dir, layout))
        pairs = held_out_pairs(cfg.data, cfg.eval, cfg.seed, cfg.reliability) if cfg.eval.enabled else None
        if pairs:
            summary["retrieval"] = evaluate_retrieval(trained, tower, tokenizer, cfg.eval, pairs, run_dir,
                                                      dist.device, dtype, cfg.front.max_text_length)
        (run_dir / "stage2_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def save_front(front: torch.nn.Module, cfg: Stage2Config, run_dir: Path, bos_before_prefix: bool) -> Path:
    """The trained front (the ELIP tower's frozen weights excluded) as safetensors + the config that built it, and
    the LLM input layout its projection W was trained for (``FrozenLLM``'s ``bos_before_prefix``)."""
    out, tmp = run_dir / "front", run_dir / ".front.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in front.state_dict().items() if not k.startswith("vision.")}
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "front_config.json").write_text(json.dumps({"front": to_dict(cfg.front), "vision": to_dict(cfg.vision),
                                                       "llm": cfg.llm, "bos_before_prefix": bos_before_prefix},
                                                      indent=2))
    replace_folder(tmp, out)
    return out
