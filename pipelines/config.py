"""Run-level configs shared by every stage: optimisation, DeepSpeed, logging, data sources."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from dvlp_common.config import Config, ConfigError, param

# the shipped YAML of every stage and ablation
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class OptimConfig(Config):
    lr: float = param(1e-4, gt=0.0, help="peak learning rate (AdamW)")
    min_lr: float = param(1e-5, ge=0.0, help="the schedule's floor, reached at max_steps")
    warmup_start_lr: float = param(1e-6, ge=0.0, help="learning rate at step 0 of the linear warm-up")
    warmup_steps: int = param(2000, ge=0, help="linear warm-up steps")
    max_steps: int = param(100_000, ge=1, help="optimizer steps of the run (the schedule ends here)")
    schedule: Literal["cosine", "wsd"] = param(
        "cosine", help="after the warm-up: cosine = cosine from lr to min_lr at max_steps; wsd = warmup-stable-decay "
                       "(constant lr, then a decay to min_lr over the last decay_fraction of max_steps). A wsd "
                       "run still in its constant phase is a prefix of the same run with a larger max_steps, so it "
                       "can be extended exactly (--resume optim.max_steps=N) until a measurement says it has converged")
    decay_fraction: float = param(0.2, gt=0.0, le=1.0, help="wsd: share of max_steps spent decaying to min_lr")
    decay_shape: Literal["linear", "1-sqrt"] = param(
        "linear", help="wsd: the decay's shape in its progress t in [0, 1]: lr - (lr - min_lr)·t, or "
                       "lr - (lr - min_lr)·sqrt(t) (1-sqrt, the best of Hägele et al. 2024)")
    weight_decay: float = param(0.05, ge=0.0, help="AdamW weight decay (not applied to biases and norms)")
    betas: tuple[float, float] = param((0.9, 0.999), help="AdamW betas")
    eps: float = param(1e-8, gt=0.0, help="AdamW epsilon")
    grad_clip: float = param(1.0, ge=0.0, help="global gradient-norm clip; 0 disables")
    lr_scale: dict[str, float] = param(default_factory=dict, help="learning-rate multipliers by parameter-name "
                                                                  "prefix, e.g. {llm_proj: 30}: W, the projection "
                                                                  "to the LLM, at 30x the rate (same schedule)")
    micro_batch_size: int = param(32, ge=1, help="samples per process per forward")
    grad_accum_steps: int = param(1, ge=1, help="forwards per optimizer step")
    implementation: Literal["default", "for_loop", "foreach", "fused"] = param(
        "fused", help="torch AdamW kernel: fused (about 4x faster optimizer steps; follows the for-loop's loss curves "
                      "in a 5-seed study, docs/optimizer_study/), default = torch's own choice (for-loop on CPU, "
                      "foreach on CUDA), for_loop or foreach (fused needs every parameter on one device type)")

    def check(self) -> None:
        if self.min_lr > self.lr:
            raise ConfigError("min_lr", f"must be <= lr ({self.lr}), got {self.min_lr}")
        if self.warmup_steps > self.max_steps:
            raise ConfigError("warmup_steps", f"must be <= max_steps ({self.max_steps}), got {self.warmup_steps}")
        if self.schedule == "wsd" and self.warmup_steps > self.decay_start:
            raise ConfigError("warmup_steps", f"wsd: the warm-up ({self.warmup_steps} steps) must end before the decay "
                                              f"starts at step {self.decay_start} (max_steps {self.max_steps} x "
                                              f"(1 - decay_fraction {self.decay_fraction}))")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("betas", f"each beta must be in [0, 1), got {list(self.betas)}")
        for prefix, scale in self.lr_scale.items():
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
                raise ConfigError(f"lr_scale.{prefix}", f"must be a number > 0, got {scale!r}")

    @property
    def decay_start(self) -> int:
        """wsd: the first step of the decay (the constant phase is steps warmup_steps .. decay_start - 1)."""
        return self.max_steps - round(self.decay_fraction * self.max_steps)


@dataclass
class DeepSpeedConfig(Config):
    zero_stage: Literal[0, 1, 2, 3] = param(0, help="ZeRO stage")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = param(
        "auto", help="autocast dtype of the forward and dtype of frozen models; auto = bf16 where supported")
    backend: Literal["auto", "gloo", "nccl"] = param("auto", help="torch.distributed backend; auto = nccl on "
                                                                   "CUDA, gloo on CPU")
    config_overrides: dict[str, Any] = param(default_factory=dict, help="merged into the generated DeepSpeed "
                                                                        "JSON; batch keys must agree")
    compile: bool = param(False, help="torch.compile the trained module's forward for the training steps (inductor; "
                                      "evaluation stays eager). Pays once per process and graph: several minutes "
                                      "cold on a 2-core CPU, about 30 s from the inductor cache; see README "
                                      "Benchmarks")

    cpu_dropout: Literal["bits", "torch"] = param(
        "bits", help="dropout masks on the CPU: bits = four elements per 64-bit draw (dvlp_common.cpu_kernels; drop "
                     "probability within 6.1e-6 of p, expectation exact), torch = one bernoulli draw per element "
                     "(about 8x slower mask). CUDA always uses torch's dropout")
    cpu_attention_matmul_max_keys: int = param(
        128, ge=0, help="on the CPU, transformers' sdpa attention over at most this many keys is computed by matmuls "
                        "when gradients flow through it (torch's CPU flash backward is 2-5x slower there, faster "
                        "from ~256 keys; dvlp_common.cpu_kernels); 0 = SDPA's kernels always. CUDA: SDPA always")

    def check(self) -> None:
        if self.compile and self.zero_stage == 3:
            raise ConfigError("compile", "not with zero_stage 3: its parameter-gathering hooks are not traced here; "
                                         "use ZeRO 0-2 or compile=false")


@dataclass
class LoggingConfig(Config):
    output_dir: str = param("runs/stage1", help="run folder: checkpoints, config, logs, reports")
    log_every: int = param(10, ge=1, help="steps between logged scalars")
    save_every: int = param(200, ge=1, help="steps between checkpoints")
    keep_checkpoints: int = param(2, ge=1, help="complete checkpoints kept (older ones are deleted)")
    tensorboard: bool = param(True, help="write TensorBoard scalars to output_dir/tensorboard")
    progress_bar: bool = param(True, help="tqdm progress bar on rank 0")


@dataclass
class ReliabilityConfig(Config):
    max_skip_fraction: float = param(0.05, ge=0.0, le=1.0, help="abort when more records than this are skipped")
    stop_on_nonfinite: bool = param(True, help="stop (after checkpointing the last good state) on a NaN/inf loss")


@dataclass
class TextDataConfig(Config):
    source: str = param("embedded:easy-vqa", help="txt / jsonl file, saved datasets folder, or embedded:easy-vqa")
    format: Literal["auto", "txt", "jsonl", "datasets"] = param("auto", help="format of source")
    text_field: str = param("text", help="field holding the sentence (jsonl, datasets)")
    max_records: Optional[int] = param(None, help="use at most this many sentences (None: all)")
    holdout: int = param(200, ge=0, help="sentences held out of training for the stage-1 evaluation")
    streaming: bool = param(False, help="stream the corpus (for 10M+ sentences): never read into a list, shards "
                                        "split over ranks, block-shuffled, resumed at the checkpoint's position; "
                                        "the held-out sentences come from the corpus's head (pformer.text_stream)")
    shuffle_buffer: int = param(10_000, ge=1, help="streaming: sentences shuffled together (one block)")
    shard_bytes: int = param(64 << 20, ge=1, help="streaming: text files are cut into byte ranges of this size "
                                                  "(the unit split over ranks and ordered by the shuffle)")

    def check(self) -> None:
        if self.streaming and self.max_records is not None:
            raise ConfigError("max_records", "is for in-memory corpora; a streamed corpus is read whole")
