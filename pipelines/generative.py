"""Stage 2b: generative learning. The front's projected output prefixes the frozen LLM; LM loss on the caption plus
ω₂·align(W·Z, P(y)). Starts from a representation-stage front when one is given (``init_front``). Ends with the
caption and zero-shot VQA evaluation on held-out images (``eval.*``).

Outputs in ``logging.output_dir``: ``config.yaml``, ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``,
``front/``, ``generative_summary.json`` and the evaluation files of :mod:`vl_align.evaluation`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from dvlp_common import precision, zoo
from dvlp_common.config import Config, ConfigError, param
from dvlp_common.io import put_step_row, write_json_atomic
from pformer.llm import FrozenLLM
from pformer.model import read_pformer_config
from vl_align.alignment import AlignmentConfig
from vl_align.evaluation import EvalConfig, evaluate_generative
from vl_align.fronts import FrontConfig, load_front_weights, save_front
from vl_align.generative import GenerativeCollator, GenerativeWeights, generative_loss
from vl_align.inputs import training_pairs
from vl_align.pairs import PairDataConfig
from vl_align.simvlg import TomeFront
from vl_align.vision import VisionTowerConfig

from . import distributed, optim, training
from .config import DeepSpeedConfig, LoggingConfig, OptimConfig, ReliabilityConfig
from .vl_run import open_vl_run


@dataclass
class CurveConfig(Config):
    every: int = param(0, ge=0, help="caption a held-out subset every this many steps (and at the last), for "
                                     "quality-against-training-time curves (eval_curve.jsonl); 0: off")
    images: int = param(50, ge=1, help="held-out images captioned at each curve point (the same ones each time)")


@dataclass
class GenerativeConfig(Config):
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    front: FrontConfig = field(default_factory=FrontConfig)
    init_front: Optional[str] = param(None, help="front/ folder of a representation-stage run to start from")
    pformer: str = param("runs/stage1/pformer", help="stage-1 P-Former folder whose P(y) are the targets")
    llm: str = param("smollm2-135m", help="the frozen LLM the prefix is for (the P-Former's LLM)")
    bos_before_prefix: bool = param(True, help="decoder-only LLMs: the tokenizer's BOS before the visual prefix "
                                               "(LLaVA-style); false: the prefix first, as BLIP-2. Must match the "
                                               "P-Former's when aligning to its prompts")
    weights: GenerativeWeights = field(default_factory=GenerativeWeights)
    align: AlignmentConfig = field(default_factory=lambda: AlignmentConfig(weight=100.0))
    align_stats_source: str = param("embedded:easy-vqa", help="text corpus for the corpus-mean/std statistics")
    data: PairDataConfig = field(default_factory=PairDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(output_dir="runs/generative"))
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    curve: CurveConfig = field(default_factory=CurveConfig)
    seed: int = param(0, help="seed of initialisation and data order")

    def check(self) -> None:
        if self.weights.lm == 0 and self.align.weight == 0:
            raise ConfigError("weights.lm", "and align.weight are both 0: nothing to train")
        if self.front.kind == "tome" and self.init_front:
            raise ConfigError("init_front", "the tome front has no representation stage to start from")


def run_generative(cfg: GenerativeConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    run = open_vl_run(cfg, resume, num_prompt_slots=cfg.front.num_query_tokens if cfg.front.kind != "tome" else None)
    dist, dtype, run_dir, inputs = run.dist, run.dtype, run.run_dir, run.inputs
    if cfg.align.weight:
        trained_with = read_pformer_config(cfg.pformer).bos_before_prefix
        if trained_with != cfg.bos_before_prefix:
            raise ConfigError("bos_before_prefix", f"is {cfg.bos_before_prefix} but the P-Former in {cfg.pformer} "
                                                   f"was trained with {trained_with}: its P(y) are prompts for the "
                                                   "other layout")
    llm = FrozenLLM.load(cfg.llm, dtype=dtype, bos_before_prefix=cfg.bos_before_prefix).to(dist.device)
    def count_tokens(caps):  # the LM target's length
        return llm.tokenize_targets(caps, None)[1].sum(1)

    stream, pairs = training_pairs(inputs, cfg.data, count_tokens, cfg.front.max_text_length, seed=cfg.seed,
                                   rank=dist.rank, world_size=dist.world_size, verbose=dist.is_main)

    training.seed_everything(cfg.seed)  # the front's init must not depend on whether the caches existed
    front = run.new_front(inputs.tower)
    if cfg.init_front:
        load_front_weights(front, cfg.init_front)
    engine = optim.build_engine(front, cfg.optim, cfg.deepspeed, dist, dtype)
    collate = GenerativeCollator(
        pairs, llm, cfg.front.max_text_length, inputs.images, inputs.targets,
        qformer_tokenizer=zoo.load_tokenizer(cfg.front.init_from) if cfg.front.kind == "elip" else None,
        train_prompt=cfg.weights.train_prompt, device=dist.device)

    def loss_fn(eng, batch):
        return generative_loss(eng, llm, batch, cfg.weights, cfg.align, inputs.stats,
                               distributed.all_gather_with_grad, dist.rank, distributed.mean_over_ranks_tensor)

    def curve_point(step: int, train_seconds: float) -> None:
        if not cfg.curve.every or (step % cfg.curve.every and step != cfg.optim.max_steps):
            return
        trained, tower = run.trained_front(engine)
        if dist.is_main:
            _append_curve_point(trained, llm, tower, cfg, run_dir, step, train_seconds, dist.device, dtype)
        distributed.barrier()

    result = training.train(engine=engine, dist_info=dist, make_batch=collate if stream is None else collate.batch,
                            loss_fn=loss_fn, num_samples=len(pairs), optim=cfg.optim, logging=cfg.logging,
                            reliability=cfg.reliability, seed=cfg.seed, dtype=dtype, resume=resume,
                            stop_after=stop_after, record_ids=lambda b: b.record_ids, after_step=curve_point,
                            stream=stream)
    summary = {"front": cfg.front.kind, "steps": result.final_step, "wall_seconds": result.wall_seconds,
               "train_seconds": result.train_seconds, "prefix_tokens": _prefix_tokens(cfg, engine.module, inputs),
               "resumed_from": result.resumed_from, "pairs": len(pairs), "skipped": inputs.report.as_dict(),
               "vision_tokens": inputs.tower.num_tokens, "last": result.history[-1] if result.history else None}
    if stream is not None:  # a streamed set is never counted whole
        summary.update(pairs=None, streamed={"shards": len(stream.shards), **stream.state_dict()})
    if result.final_step < cfg.optim.max_steps:
        return summary
    trained, tower = run.trained_front(engine)
    if not dist.is_main:
        return summary
    summary["front_dir"] = str(save_front(trained, run_dir / "front", cfg.front, cfg.vision, cfg.llm,
                                          cfg.bos_before_prefix))
    if cfg.eval.enabled:
        trained.eval()
        with torch.no_grad(), precision.autocast(dist.device, dtype):
            summary["eval"] = evaluate_generative(trained, llm, tower, cfg.eval, cfg.data, run_dir,
                                                  dist.device, dtype)
    write_json_atomic(run_dir / "generative_summary.json", summary)
    return summary


def _prefix_tokens(cfg: GenerativeConfig, front, inputs) -> int:
    """Visual tokens the LLM receives per image: the queries, or what is left after ToMe merging."""
    if isinstance(front, TomeFront):
        return front.connector.output_tokens(inputs.tower.num_tokens)
    return cfg.front.num_query_tokens


def _append_curve_point(front, llm, tower, cfg: GenerativeConfig, run_dir: Path, step: int, train_seconds: float,
                        device, dtype) -> None:
    """Caption the same held-out subset and append (step, training seconds, scores) to eval_curve.jsonl."""
    from dataclasses import replace

    point_dir = run_dir / "curve" / f"step_{step:08d}"
    point_dir.mkdir(parents=True, exist_ok=True)
    eval_cfg = replace(cfg.eval, max_images=cfg.curve.images, max_questions=0, meteor=False)
    was_training = front.training
    front.eval()
    with torch.no_grad(), precision.autocast(device, dtype):
        result = evaluate_generative(front, llm, tower, eval_cfg, cfg.data, point_dir, device, dtype)
    front.train(was_training)
    if result is None:  # no held-out set: no curve
        return
    scores = result["captioning"]
    # a video front on a keyed set (embedded:motion) also records its key-word accuracy per caption family
    keywords = {f"keywords_{family}": v for family, v in result.get("keywords", {}).items()}
    put_step_row(run_dir / "eval_curve.jsonl", {"step": step, "train_seconds": train_seconds,
                                                **{k: v for k, v in scores.items() if isinstance(v, float)}, **keywords})
