"""Stage 2a: vision-language representation learning (BLIP-2's stage 1) with the P-Former alignment.

Frozen vision tower -> front (``qformer`` or ``elip``) trained with ITC + ITM + ITG + ω₁·align(W·Z, P(y)), where
P(y) comes from the prompt-target cache of a stage-1 P-Former (the P-Former itself never runs during training) and,
unless the tower runs inside the front (``vl_align.fronts.needs_live_tower``), the tower's features come from the
vision-feature cache (the tower runs once per image).

Outputs in ``logging.output_dir``: ``config.yaml``, ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``,
``front/`` (safetensors weights + config), ``stage2_summary.json`` (losses, step time, tokens per image),
``retrieval.json`` / ``retrieval.md`` / ``retrieval_predictions.json`` (held-out image<->text retrieval).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Optional

import torch

from dvlp_common import precision, zoo
from dvlp_common.config import Config, ConfigError, param
from dvlp_common.io import put_step_row, read_jsonl, write_json_atomic
from pformer.llm import FrozenLLM
from pformer.model import read_pformer_config
from vl_align.alignment import AlignmentConfig
from vl_align.evaluation import (EvalConfig, HeldoutAlignment, RetrievalEvalConfig, evaluate_generative,
                                 evaluate_retrieval, heldout_lm_loss)
from vl_align.fronts import FrontConfig, needs_live_tower, save_front
from vl_align.inputs import training_pairs
from vl_align.objectives import RepresentationCollator, RepresentationWeights, representation_loss
from vl_align.pairs import PairDataConfig, held_out_pairs
from vl_align.vision import VisionTowerConfig

from . import distributed, optim, training
from .config import DeepSpeedConfig, LoggingConfig, OptimConfig, ReliabilityConfig
from .vl_run import open_vl_run


@dataclass
class AlignCurveConfig(Config):
    every: int = param(0, ge=0, help="read the alignment on held-out images every this many steps and at the last "
                                     "(MSE, MSE / mean(P(y)²), R² against the corpus-mean prompt; align_curve.jsonl): "
                                     "whether stage 2a has converged, which the training batches' R² cannot say once "
                                     "it has seen them for many epochs. The images: align_curve.split, from "
                                     "zero_shot's sources. 0: off")
    images: int = param(200, ge=1, help="held-out images read (the first by id; every caption of each is a pair)")
    split: Optional[Literal["test", "validation"]] = param(
        None, help="the held-out images: validation (data.validation_images, for deciding how long to train without "
                   "the test split) or test; None: zero_shot.split")


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
    zero_shot: EvalConfig = field(default_factory=lambda: EvalConfig(enabled=False, max_images=100,
                                                                      max_questions=0))
    align_curve: AlignCurveConfig = field(default_factory=AlignCurveConfig)
    seed: int = param(0, help="seed of initialisation, data order and negative sampling")

    def align_curve_images(self) -> EvalConfig:
        """What the held-out alignment readings read: zero_shot's sources, align_curve's count and split."""
        return replace(self.zero_shot, max_images=self.align_curve.images,
                       split=self.align_curve.split or self.zero_shot.split)

    def check(self) -> None:
        if self.front.kind == "tome":
            raise ConfigError("front.kind", "'tome' (SimVLG) has no representation stage; it trains with the LM "
                                            "loss alone in the generative stage")


def run_stage2(cfg: Stage2Config, resume: bool = False, stop_after: int | None = None) -> dict:
    run = open_vl_run(cfg, resume, num_prompt_slots=cfg.front.num_query_tokens)
    dist, dtype, run_dir, inputs, video = run.dist, run.dtype, run.run_dir, run.inputs, run.video
    tokenizer = zoo.load_tokenizer(cfg.front.init_from)
    def count_tokens(caps):
        return [len(ids) for ids in tokenizer(caps).input_ids]

    stream, pairs = training_pairs(inputs, cfg.data, count_tokens, cfg.front.max_text_length, seed=cfg.seed,
                                   rank=dist.rank, world_size=dist.world_size, verbose=dist.is_main)

    training.seed_everything(cfg.seed)  # the front's init must not depend on whether the caches existed
    engine = optim.build_engine(run.new_front(inputs.tower), cfg.optim, cfg.deepspeed, dist, dtype)
    collate = RepresentationCollator(pairs, tokenizer, cfg.front.max_text_length, inputs.caption_index,
                                     inputs.images, inputs.targets, cfg.seed, dist.device)

    def loss_fn(eng, batch):
        return representation_loss(eng, batch, cfg.losses, cfg.align, inputs.stats, distributed.all_gather_with_grad,
                                   distributed.all_gather_nograd, dist.rank, distributed.mean_over_ranks_tensor)

    if cfg.align_curve.every and inputs.targets is None:
        raise ConfigError("align_curve.every", f"reads W·Z against P(y), but this run has no P(y) of the front's shape "
                                               f"(pformer={cfg.pformer}); set it to 0")
    if cfg.align_curve.every and video is not None:
        raise ConfigError("align_curve.every", "reads held-out images; a video front has no such reader yet")
    heldout: list[HeldoutAlignment] = []  # built at the first reading (main rank)

    def align_point(step: int, train_seconds: float) -> None:
        if not cfg.align_curve.every or (step % cfg.align_curve.every and step != cfg.optim.max_steps):
            return
        trained, tower = run.trained_front(engine)
        if dist.is_main:
            if not heldout:
                heldout.append(HeldoutAlignment(tower, cfg.align_curve_images(), cfg.data, cfg.pformer,
                                                inputs.stats.center, needs_live_tower(cfg.front, cfg.vision),
                                                dist.device, dtype, zoo.cache_root()))
            put_step_row(run_dir / "align_curve.jsonl",
                        {"step": step, "train_seconds": train_seconds, **heldout[0](trained)})
        distributed.barrier()

    result = training.train(engine=engine, dist_info=dist, make_batch=collate if stream is None else collate.batch,
                            loss_fn=loss_fn, num_samples=len(pairs), optim=cfg.optim, logging=cfg.logging,
                            reliability=cfg.reliability, seed=cfg.seed, dtype=dtype, resume=resume,
                            stop_after=stop_after, record_ids=lambda b: b.record_ids, stream=stream,
                            after_step=align_point)
    summary = {"front": cfg.front.kind, "steps": result.final_step, "wall_seconds": result.wall_seconds,
               "resumed_from": result.resumed_from, "pairs": len(pairs), "skipped": inputs.report.as_dict(),
               "vision_tokens": inputs.tower.num_tokens, "last": result.history[-1] if result.history else None}
    if stream is not None:  # a streamed set is never counted whole
        summary.update(pairs=None, streamed={"shards": len(stream.shards), **stream.state_dict()})
    if result.final_step < cfg.optim.max_steps:
        return summary
    trained, tower = run.trained_front(engine)  # every rank (ZeRO-3 gathers the partitions)
    if not dist.is_main:
        return summary
    layout = prompt_layout(cfg)
    summary["front_dir"] = str(save_front(trained, run_dir / "front", cfg.front, cfg.vision, cfg.llm, layout))
    if cfg.eval.enabled:
        held_out = (video.held_out(cfg.eval.source) if video is not None else
                    held_out_pairs(cfg.data, cfg.eval.source, cfg.seed, cfg.reliability.max_skip_fraction))
        if held_out is None:
            print(f"retrieval evaluation skipped: data.source={cfg.data.source} has no known held-out split; set "
                  "eval.source", flush=True)
        else:
            summary["retrieval"] = evaluate_retrieval(trained, tower, tokenizer, cfg.eval, held_out, run_dir,
                                                      dist.device, dtype, cfg.front.max_text_length)
    if cfg.align_curve.every:
        summary["heldout_align"] = read_jsonl(run_dir / "align_curve.jsonl")[-1]
    if cfg.zero_shot.enabled:
        summary["zero_shot"] = zero_shot_mechanism(trained, tower, cfg, layout, run_dir / "zero_shot", dist.device,
                                                   dtype)
    write_json_atomic(run_dir / "stage2_summary.json", summary)
    return summary


def prompt_layout(cfg: Stage2Config) -> bool:
    """Whether W·Z goes after a BOS: W is trained toward the P-Former's prompts, so it is meant for the P-Former's
    layout (without a P-Former: the default, with BOS)."""
    return read_pformer_config(cfg.pformer).bos_before_prefix if cfg.align.weight else True


def zero_shot_mechanism(front, tower, cfg: Stage2Config, bos_before_prefix: bool, out_dir, device, dtype) -> dict:
    """What the P-Former alignment is for, measured before any LM training: held-out captions generated from W·Z
    through the frozen LLM, and the LLM's held-out caption loss with W·Z as its prefix (the generative stage's step
    0; the authors' P-Former run starts it 1.27 nats below their baseline). Written to ``out_dir``."""
    llm = FrozenLLM.load(cfg.llm, dtype=dtype, bos_before_prefix=bos_before_prefix).to(device)
    front.eval()
    with torch.no_grad(), precision.autocast(device, dtype):
        captions = evaluate_generative(front, llm, tower, cfg.zero_shot, cfg.data, out_dir, device, dtype)
    lm = heldout_lm_loss(front, llm, tower, cfg.zero_shot, cfg.data, device, dtype, cfg.front.max_text_length)
    result = {"captioning": (captions or {}).get("captioning"), "heldout_lm": lm}
    write_json_atomic(out_dir / "zero_shot.json", result)
    return result
