"""The training loop shared by every stage, on DeepSpeed. The only module besides the launchers that knows about
DeepSpeed and torch.distributed.

What a stage supplies: the trainable module (its forward returns features), ``make_batch(sample_ids, step)`` and
``loss_fn(engine, batch) -> (loss, parts)``. What the loop guarantees:

* Data order is a pure function of (seed, step): step s uses the global batch ``stream[s*G:(s+1)*G]`` of a stream of
  per-epoch permutations, G = world_size x micro_batch x accumulation; rank r takes slice r of each micro-step.
  Random state (dropout, masking) is re-seeded from (seed, step, rank) at every step. So a resumed run follows the
  uninterrupted one exactly, and 2 ranks x batch b see the same global batch as 1 rank x batch 2b.
* Checkpoints (DeepSpeed engine state + our JSON trainer state) are written under a temporary name and renamed,
  so a crash during a save leaves the previous checkpoint intact; ``resume`` picks the latest complete one.
* A non-finite loss stops the run with the step, the record ids and the loss parts, after checkpointing the last
  good state.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import DeepSpeedConfig, LoggingConfig, OptimConfig, ReliabilityConfig

STATE_NAME = "trainer_state.json"


# ---------------------------------------------------------------------------------------------------------------
# processes and devices
@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(ds: DeepSpeedConfig) -> DistInfo:
    """Join (or create, for a plain single process) the process group DeepSpeed needs."""
    import deepspeed
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ:  # plain `python -m ...` / `dvlp ...`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    backend = ds.backend if ds.backend != "auto" else ("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


@functools.lru_cache(maxsize=1)
def cpu_prefers_bf16(size: int = 768, repeats: int = 5) -> bool:
    """Whether bf16 matmuls beat fp32 on this CPU (true with AMX; measured false on some AVX-512 machines)."""
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # first call sets up the kernel
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        timings[dtype] = time.perf_counter() - start
    return timings[torch.bfloat16] < 0.8 * timings[torch.float32]


def start_run(cfg) -> tuple[DistInfo, torch.dtype, Path]:
    """Process group, compute dtype and run folder of a stage config; the resolved config is saved beside it."""
    from pformer.config import save_config

    dist_info = init_distributed(cfg.deepspeed)
    dtype = compute_dtype(cfg.deepspeed, dist_info.device)
    run_dir = Path(cfg.logging.output_dir)
    if dist_info.is_main:
        save_config(cfg, run_dir / "config.yaml")
    return dist_info, dtype, run_dir


def compute_dtype(ds: DeepSpeedConfig, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that have it (else fp16); on CPU bf16 only where a probe shows it is faster."""
    if ds.precision == "fp32":
        return torch.float32
    if ds.precision == "fp16":
        return torch.float16
    if ds.precision == "bf16":
        return torch.bfloat16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_prefers_bf16() else torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward sums every rank's gradient of the gathered tensor and keeps this rank's rows.

    Not ``torch.distributed.nn.functional.all_gather``: on gloo its backward (an all_to_all into ``empty_like`` of
    the incoming gradients) returns wrong values when those gradients are not contiguous, as einsum's are.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = (dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows[0]:ctx.rows[1]]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather along dim 0 (the ``gather`` the libraries' global-batch losses receive); every rank
    must pass the same shape."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 without gradient (hard-negative mining, caption ids)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t)
    return int(t.item()) == 0


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(values, t.tolist())}


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first(dist_info: DistInfo):
    """The block runs on the main rank first, then on the others: for work that leaves shared files behind (the
    feature and prompt caches), so that one rank builds them and the others open them complete."""
    if not dist_info.is_main:
        barrier()
    try:
        yield
    finally:
        if dist_info.is_main:
            barrier()


# ---------------------------------------------------------------------------------------------------------------
# optimisation
def deepspeed_config(optim: OptimConfig, ds: DeepSpeedConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON derived from our config; user overrides must agree on the batch arithmetic."""
    train_batch = optim.micro_batch_size * optim.grad_accum_steps * world_size
    config: dict[str, Any] = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": optim.micro_batch_size,
        "gradient_accumulation_steps": optim.grad_accum_steps,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,  # our loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    from pformer.config import ConfigError

    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in ds.config_overrides and ds.config_overrides[key] != config[key]:
            raise ConfigError(f"deepspeed.config_overrides.{key}",
                              f"is {ds.config_overrides[key]} but the training config implies {config[key]} "
                              f"(optim.micro_batch_size={optim.micro_batch_size} x optim.grad_accum_steps="
                              f"{optim.grad_accum_steps} x world size {world_size}); set the batch through optim.*")
    merged = {**config, **ds.config_overrides}
    if isinstance(ds.config_overrides.get("zero_optimization"), dict):
        merged["zero_optimization"] = {**config["zero_optimization"], **ds.config_overrides["zero_optimization"]}
    return merged


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and 0-/1-d parameters (temperatures, gates)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, optim: OptimConfig) -> float:
    """Linear warm-up from warmup_start_lr to lr, then cosine to min_lr at max_steps."""
    if step < optim.warmup_steps:
        return optim.warmup_start_lr + (optim.lr - optim.warmup_start_lr) * step / optim.warmup_steps
    span = max(1, optim.max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, torch's default (foreach) implementation. The fused CPU kernel is 4x faster
    on a 32M-parameter Q-Former, but in one generative run from the same checkpoint and seed its LM loss climbed
    (7.2 -> 9.6 by step 24) where this one's descended (7.2 -> 5.9). In the first Adam steps a rounding-level
    difference can flip the sign of a tiny gradient and so the direction of a full-size update, so one pair of runs
    cannot tell a kernel difference from chaos; the default stays until a seeded comparison settles it. (That run
    had the prefix at the LLM's first position; the erratic training it showed was traced to that, see
    ``pformer.llm``, so the comparison should be redone with the BOS lead token.)"""
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps)


def build_engine(model: torch.nn.Module, optim: OptimConfig, ds: DeepSpeedConfig, dist_info: DistInfo):
    import deepspeed

    optimizer = build_optimizer(model, optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, optim) / optim.lr)
    engine, _, _, _ = deepspeed.initialize(model=model.to(dist_info.device), optimizer=optimizer,
                                           lr_scheduler=scheduler,
                                           config=deepspeed_config(optim, ds, dist_info.world_size))
    return engine


def partitions_weights(engine) -> bool:
    """ZeRO-3: each rank holds only a shard of every parameter (``engine.module``'s tensors are empty outside the
    engine's forward and backward)."""
    return bool(engine.zero_optimization_partition_weights())


def trained_module(engine, rebuild: Callable[[], torch.nn.Module], keep: bool = True) -> torch.nn.Module | None:
    """The trained module for use outside the engine: saving its weights, evaluating on one rank.

    Without ZeRO-3 that is ``engine.module``. Under ZeRO-3 its parameters are partitioned across ranks and its forward
    hooks gather them with collectives, so it cannot run on one rank alone: the full weights are gathered with
    ``deepspeed.zero.GatheredParameters`` (a collective: call this on every rank) and loaded into ``rebuild()``, a
    fresh module of the same architecture, on the ranks with ``keep`` (None on the others).
    """
    if not partitions_weights(engine):
        return engine.module
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        state = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()} if keep else None
    if not keep:
        return None
    module = rebuild()
    module.load_state_dict(state)
    return module.to(engine.device)


# ---------------------------------------------------------------------------------------------------------------
# data order
class GlobalBatchOrder:
    """Sample ids of every (step, micro-step, rank): a stream of seeded per-epoch permutations."""

    def __init__(self, num_samples: int, optim: OptimConfig, world_size: int, seed: int):
        if num_samples < 1:
            raise ValueError("the training set is empty")
        self.n, self.b, self.accum, self.world, self.seed = (num_samples, optim.micro_batch_size,
                                                             optim.grad_accum_steps, world_size, seed)
        self.global_batch = self.b * self.accum * self.world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def ids(self, step: int, micro: int, rank: int) -> list[int]:
        start = step * self.global_batch + (micro * self.world + rank) * self.b
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + self.b)]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + rank) % 2 ** 63


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
class CheckpointManager:
    """``<run>/checkpoints/step_XXXXXXXX/`` = DeepSpeed state + trainer_state.json; a folder is complete iff its
    trainer_state.json exists, and folders only appear under their final name by an atomic rename."""

    def __init__(self, run_dir: Path, keep: int, dist_info: DistInfo):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.dist = dist_info

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if (p / STATE_NAME).is_file())

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, engine, state: dict[str, Any]) -> Path:
        tag = f"step_{state['step']:08d}"
        staging = self.root / ".staging"
        final = self.root / tag
        if self.dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # also what a save killed earlier left behind
        barrier()
        engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
        barrier()
        if self.dist.is_main:
            _write_json_atomic(staging / tag / STATE_NAME, state)
            if final.exists():  # re-saving the same step (e.g. the NaN guard right after a periodic save)
                _remove_checkpoint(final)
            os.replace(staging / tag, final)
            for old in self.complete()[:-self.keep]:
                _remove_checkpoint(old)
        barrier()
        return final

    def load(self, engine, path: Path) -> dict[str, Any]:
        with weights_only_loading(engine):
            engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
        return json.loads((path / STATE_NAME).read_text())


def _remove_checkpoint(path: Path) -> None:
    """Mark the folder incomplete first (one atomic unlink), so a crash half-way never leaves a folder that
    ``complete()`` would take for a whole checkpoint."""
    (path / STATE_NAME).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds objects other than tensors and plain data; it was not loaded."""


def _deepspeed_safe_globals() -> list:
    """The plain-data DeepSpeed classes its ZeRO checkpoints pickle (found by loading stage 0-3 checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loading(engine):
    """Make ``engine.load_checkpoint`` read its files with ``torch.load(weights_only=True)``.

    DeepSpeed's checkpoint engines call ``torch.load(path, weights_only=False)`` (deepspeed 0.19), which runs any
    code a tampered file carries. While this is active the engine's reader allows tensors, plain containers and
    only the few DeepSpeed classes of ``_deepspeed_safe_globals``; anything else raises UnsafeCheckpointError
    naming the file.
    """
    import pickle
    import re

    reader = engine.checkpoint_engine
    allowed = _deepspeed_safe_globals()

    def load(path, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            text = str(err)
            found = re.search(r"GLOBAL [\w.]+", text) or re.search(r"(?<=WeightsUnpickler error: )[^\n]*", text)
            reason = found.group(0) if found else (text.splitlines() or [type(err).__name__])[0]
            raise UnsafeCheckpointError(f"refusing to load checkpoint file {path}: it holds more than tensors and "
                                        f"plain data ({reason}); it was not unpickled") from None

    reader.load = load  # an instance attribute: shadows the class's weights_only=False reader
    try:
        yield
    finally:
        del reader.load


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# the loop
class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    final_step: int = 0
    wall_seconds: float = 0.0  # this call's training time
    train_seconds: float = 0.0  # the run's training time, earlier calls (before a resume) included
    resumed_from: int | None = None


def train(*, engine, dist_info: DistInfo, make_batch: Callable[[list[int], int], Any],
          loss_fn: Callable[[Any, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]], num_samples: int,
          optim: OptimConfig, logging: LoggingConfig, reliability: ReliabilityConfig, seed: int,
          dtype: torch.dtype, resume: bool = False, stop_after: int | None = None,
          record_ids: Callable[[Any], list] | None = None,
          after_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run optimizer steps until ``optim.max_steps`` (or ``stop_after`` steps in this call).

    ``after_step(step, train_seconds)`` runs on every rank after each step (and its checkpoint), e.g. a periodic
    evaluation for quality-against-time curves; its time is excluded from the training time and throughput.
    """
    run_dir = Path(logging.output_dir)
    ckpt = CheckpointManager(run_dir, logging.keep_checkpoints, dist_info)
    order = GlobalBatchOrder(num_samples, optim, dist_info.world_size, seed)
    metrics_path = run_dir / "metrics.jsonl"
    result = TrainResult()
    step = 0
    earlier_seconds = 0.0  # training time before this call (a resumed run's curve continues its clock)
    if resume and (latest := ckpt.latest()) is not None:
        state = ckpt.load(engine, latest)
        step = result.resumed_from = state["step"]
        earlier_seconds = float(state.get("train_seconds", 0.0))
        if dist_info.is_main:
            print(f"resumed from {latest} (step {step})", flush=True)
    if dist_info.is_main:  # the metric log holds exactly the steps before `step`
        kept = []
        if step and metrics_path.exists():
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= step]
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(line + "\n" for line in kept))
        result.history = [json.loads(line) for line in kept]
    writer = None
    if dist_info.is_main and logging.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step)
    bar = None
    if dist_info.is_main and logging.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=optim.max_steps, initial=step, desc=run_dir.name, dynamic_ncols=True)
    last = min(optim.max_steps, step + stop_after) if stop_after is not None else optim.max_steps
    start_time = time.perf_counter() - earlier_seconds
    window_time, window_samples = time.perf_counter(), 0
    engine.train()

    def state_at(s: int) -> dict[str, Any]:
        return {"step": s, "seed": seed, "samples_seen": s * order.global_batch,
                "train_seconds": time.perf_counter() - start_time}

    while step < last:
        seed_everything(step_seed(seed, step, dist_info.rank))
        sums: dict[str, float] = {}
        for micro in range(optim.grad_accum_steps):
            ids = order.ids(step, micro, dist_info.rank)
            batch = make_batch(ids, step)
            with autocast(dist_info.device, dtype):
                loss, parts = loss_fn(engine, batch)
            finite = all_ranks_true(bool(torch.isfinite(loss.detach()).item()), dist_info.device)
            if not finite and reliability.stop_on_nonfinite:
                # nothing of this step was applied yet: the engine holds the last good state
                path = ckpt.save(engine, state_at(step))
                named = {k: float(v.detach()) for k, v in parts.items()}
                rec = record_ids(batch) if record_ids else ids
                raise NonFiniteLoss(f"non-finite loss {float(loss.detach())} at step {step} (micro-step {micro}, rank "
                                    f"{dist_info.rank}); loss parts {named}; records {rec[:16]}; last good state "
                                    f"saved to {path}")
            engine.backward(loss)
            engine.step()
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / optim.grad_accum_steps
        sums = mean_over_ranks(sums, dist_info.device)  # log the global batch's loss, not rank 0's share
        step += 1
        window_samples += order.global_batch
        if dist_info.is_main and (step % logging.log_every == 0 or step == last):
            now = time.perf_counter()
            row = {"step": step, **sums, "lr": engine.get_lr()[0], "epoch": order.epoch_of(step),
                   "samples_per_s": window_samples / max(now - window_time, 1e-9),
                   "elapsed_s": now - start_time}
            window_time, window_samples = now, 0
            result.history.append(row)
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            if writer:
                for k, v in row.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, step)
            if bar:
                bar.set_postfix({k: f"{v:.3f}" for k, v in sums.items()} | {"samples/s": f"{row['samples_per_s']:.1f}"})
        if bar:
            bar.update(1)
        if step % logging.save_every == 0 or step == last:
            ckpt.save(engine, state_at(step))
        if after_step is not None:
            hook_start = time.perf_counter()
            after_step(step, hook_start - start_time)
            engine.train()
            spent = time.perf_counter() - hook_start
            start_time += spent  # the hook's time is not training time
            window_time += spent
    if bar:
        bar.close()
    if writer:
        writer.close()
    result.final_step = step
    result.train_seconds = time.perf_counter() - start_time
    result.wall_seconds = result.train_seconds - earlier_seconds
    return result
