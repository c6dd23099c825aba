"""What stage 2a and the generative stage share around their training loops: the run's process group, dtype and
folder; its inputs (pairs, image features or frozen frames, P(y) targets and their statistics), built once by the
main rank; the front built for it; and the trained front taken back out of the engine."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vl_align.fronts import build_front, needs_live_tower
from vl_align.inputs import StageInputs, prepare_stage_inputs
from vl_align.video_inputs import VideoSource
from vl_align.vision import VisionTower

from . import distributed, optim, training
from .distributed import DistInfo


@dataclass
class VLRun:
    cfg: Any  # Stage2Config or GenerativeConfig
    dist: DistInfo
    dtype: torch.dtype
    run_dir: Path
    live_tower: bool  # the tower runs inside the front's step (ELIP, video fronts), not from the feature cache
    video: VideoSource | None
    inputs: StageInputs

    def new_front(self, tower: VisionTower):
        return build_front(self.cfg.front, tower.hidden_size, self.inputs.llm_width,
                           vision_tower=tower if self.live_tower else None)

    def trained_front(self, engine) -> tuple[Any, VisionTower]:
        """(front, tower) for use on the main rank outside the engine; call on every rank: under ZeRO-3 the weights
        are gathered from the ranks' partitions into a fresh front (and a fresh tower where it runs inside)."""
        tower = self.inputs.tower
        if self.live_tower and optim.partitions_weights(engine) and self.dist.is_main:
            tower = VisionTower.build(self.cfg.vision).to(self.dist.device)
        return optim.trained_module(engine, lambda: self.new_front(tower), self.dist.is_main), tower


def open_vl_run(cfg, resume: bool, num_prompt_slots: int | None) -> VLRun:
    """Start a stage-2 run (``training.start_run``) and prepare its inputs; ``num_prompt_slots``: the prefix positions
    W·Z fills, which the P-Former's prompt count must match (None: the front's prefix is not aligned position-wise)."""
    dist, dtype, run_dir = training.start_run(cfg, resume)
    training.seed_everything(cfg.seed)
    live_tower = needs_live_tower(cfg.front, cfg.vision)
    # a video front reads data.source as video-text pairs and trains on clips (vl_align.video_inputs)
    video = (VideoSource(cfg.data, cfg.front.video.num_frames, cfg.seed, cfg.reliability.max_skip_fraction,
                         video=cfg.front.video) if cfg.front.video.enabled else None)
    with distributed.main_first(dist):  # the main rank builds the shared caches, the other ranks then open them
        inputs = prepare_stage_inputs(
            data=cfg.data, vision=cfg.vision, live_tower=live_tower, llm=cfg.llm, align=cfg.align,
            pformer=cfg.pformer, align_stats_source=cfg.align_stats_source, seed=cfg.seed,
            max_skip_fraction=cfg.reliability.max_skip_fraction, num_prompt_slots=num_prompt_slots,
            device=dist.device, dtype=dtype, verbose=dist.is_main, video=video)
    return VLRun(cfg, dist, dtype, run_dir, live_tower, video, inputs)
