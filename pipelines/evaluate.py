"""``dvlp evaluate``: held-out captioning and zero-shot VQA of a saved front (any kind), e.g. again under another
generation protocol. The evaluations themselves are in ``vl_align.evaluation``."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from dvlp_common.config import Config, ConfigError, param
from dvlp_common.precision import autocast, compute_dtype
from vl_align.evaluation import EvalConfig, evaluate_generative
from vl_align.fronts import load_front
from vl_align.pairs import PairDataConfig


@dataclass
class EvaluateConfig(Config):
    front: str = param("runs/generative/front", help="front/ folder of a generative (2b) run")
    output_dir: str = param("runs/evaluate", help="eval.json, eval.md and predictions.json are written here")
    data_source: str = param("embedded:easy-vqa", help="an embedded dataset whose test split is evaluated on "
                                                       "(else set eval.captions_source / eval.questions_source)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = param("auto", help="as the stages' deepspeed.precision")
    eval: EvalConfig = field(default_factory=EvalConfig)


def run_evaluate(cfg: EvaluateConfig) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(cfg.precision, device)
    front, tower, llm, _ = load_front(cfg.front)
    front, tower, llm = front.to(device), tower.to(device), llm.to(device)
    started = time.perf_counter()
    with torch.no_grad(), autocast(device, dtype):
        result = evaluate_generative(front, llm, tower, cfg.eval, PairDataConfig(source=cfg.data_source),
                                     Path(cfg.output_dir), device, dtype)
    if result is None:
        raise ConfigError("eval.captions_source", f"no held-out set for data_source={cfg.data_source}")
    print(f"evaluated in {time.perf_counter() - started:.0f} s -> {cfg.output_dir}/eval.json", flush=True)
    return result
