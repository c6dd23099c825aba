"""``dvlp evaluate``: held-out captioning and zero-shot VQA of a saved front (any kind), e.g. again under another
generation protocol; or, with ``benchmark=...``, one of the papers' benchmarks read from its own files
(``vl_align.benchmarks``). The evaluations themselves are in ``vl_align.evaluation``."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from dvlp_common import zoo
from dvlp_common.config import Config, ConfigError, param
from dvlp_common.precision import autocast, compute_dtype
from vl_align.benchmarks import (
    RETRIEVAL_BENCHMARKS,
    BenchmarkConfig,
    BenchmarkName,
    check_benchmark,
    evaluate_benchmark,
)
from vl_align.checkpoints import Blip2CheckpointConfig, evaluation_parts
from vl_align.evaluation import EvalConfig, evaluate_generative
from vl_align.fronts import load_front
from vl_align.pairs import PairDataConfig
from vl_align.video_inputs import VideoClipsConfig


@dataclass
class EvaluateConfig(Config):
    front: str = param("runs/generative/front", help="front/ folder of a generative (2b) run")
    output_dir: str = param("runs/evaluate", help="eval.json, eval.md and predictions.json are written here")
    data_source: str = param("embedded:easy-vqa", help="an embedded dataset whose test split is evaluated on "
                                                       "(else set eval.captions_source / eval.questions_source)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = param("auto", help="as the stages' deepspeed.precision")
    eval: EvalConfig = field(default_factory=EvalConfig)
    # a video front: how data_source / eval.captions_source are read (format, video_root, eval_annotation_split)
    video: VideoClipsConfig = field(default_factory=VideoClipsConfig)
    benchmark: BenchmarkName = param(  # noqa: RUF009 (a str default; ruff does not see through the Literal alias)
        "embedded", help="embedded: the held-out split of data_source (or eval.captions_source / "
                         "eval.questions_source); else one of the papers' benchmarks, read from the files "
                         "bench.* names")
    bench: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    # a published BLIP-2 checkpoint (transformers folder or LAVIS .pth) evaluated in place of `front`
    blip2: Blip2CheckpointConfig = field(default_factory=Blip2CheckpointConfig)

    def check(self) -> None:
        check_benchmark(self.benchmark, self.bench)
        if self.benchmark != "embedded":
            for key in ("captions_source", "questions_source"):
                if getattr(self.eval, key) is not None:
                    raise ConfigError(f"eval.{key}", f"benchmark={self.benchmark} reads bench.*, not eval.{key}")
            if self.eval.split != "test":
                raise ConfigError("eval.split", f"benchmark={self.benchmark} evaluates the benchmark's files")


def run_evaluate(cfg: EvaluateConfig) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(cfg.precision, device)
    if cfg.blip2.enabled:  # blip2.hf=<folder> or blip2.lavis=<.pth> blip2.llm=<name> (vl_align.checkpoints)
        front, tower, llm, meta = evaluation_parts(cfg.blip2, retrieval=cfg.benchmark in RETRIEVAL_BENCHMARKS)
    else:
        front, tower, llm, meta = load_front(cfg.front)
    front, tower, llm = front.to(device), tower.to(device), llm.to(device)
    started = time.perf_counter()
    if cfg.benchmark != "embedded":
        # retrieval's texts go through the Q-Former, with the tokenizer of the BERT it was initialised from
        tokenizer = zoo.load_tokenizer(meta["front"]["init_from"]) if cfg.benchmark in RETRIEVAL_BENCHMARKS else None
        with torch.no_grad(), autocast(device, dtype):
            result = evaluate_benchmark(cfg.benchmark, cfg.bench, cfg.eval, front, llm, tower, Path(cfg.output_dir),
                                        device, dtype, tokenizer=tokenizer,
                                        max_text_length=meta["front"]["max_text_length"])
        print(f"{cfg.benchmark} evaluated in {time.perf_counter() - started:.0f} s -> {cfg.output_dir}", flush=True)
        return result
    with torch.no_grad(), autocast(device, dtype):
        result = evaluate_generative(front, llm, tower, cfg.eval, PairDataConfig(source=cfg.data_source, video=cfg.video),
                                     Path(cfg.output_dir), device, dtype)
    if result is None:
        raise ConfigError("eval.captions_source", f"no held-out set for data_source={cfg.data_source}")
    print(f"evaluated in {time.perf_counter() - started:.0f} s -> {cfg.output_dir}/eval.json", flush=True)
    return result
