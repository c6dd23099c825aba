"""The training loop shared by every stage, on DeepSpeed. It delegates to small parts: processes and collectives
(``pipelines.distributed``), the optimiser, schedule and engine (``pipelines.optim``), checkpoints
(``pipelines.checkpoint``) and precision (``dvlp_common.precision``).

What a stage supplies: the trainable module (its forward returns features), ``make_batch(sample_ids, step)`` and
``loss_fn(engine, batch) -> (loss, parts)``. What the loop guarantees:

* Data order is a pure function of (seed, step): step s uses the global batch ``stream[s*G:(s+1)*G]`` of a stream of
  per-epoch permutations, G = world_size x micro_batch x accumulation; rank r takes slice r of each micro-step.
  Random state (dropout, masking) is re-seeded from (seed, step, rank) at every step. So a resumed run follows the
  uninterrupted one exactly, and 2 ranks x batch b see the same global batch as 1 rank x batch 2b.
* A streamed source (``stream``: ``take(n)``, ``state_dict()``, ``load_state_dict()``, e.g.
  ``dvlp_common.stream.ShardedStream``) replaces the permutation stream: each rank takes its micro-batches from its
  own shards, ``make_batch`` receives the records instead of ids, and every checkpoint keeps each rank's data position
  (``data_position``, one per rank), which the resume restores: the next batch is the uninterrupted run's.
* ``resume`` continues from the latest complete checkpoint.
* A non-finite loss stops the run with the step, the record ids and the loss parts, after checkpointing the last
  good state.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dvlp_common.config import ConfigError, save_config
from dvlp_common.precision import autocast, compute_dtype
from dvlp_common.seeding import seed_everything, step_seed

from .checkpoint import CheckpointManager
from .config import LoggingConfig, OptimConfig, ReliabilityConfig
from .distributed import DistInfo, all_ranks_true, gather_objects, init_distributed, mean_over_ranks
from .loss_scaling import LossScaleConfig, LossScaler


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


def start_run(cfg, resume: bool = False) -> tuple[DistInfo, torch.dtype, Path]:
    """Process group, compute dtype and run folder of a stage config; the resolved config is saved beside it.

    A fresh run (``resume`` false) refuses a folder that already holds a checkpoint: starting over there would
    overwrite that run's config and metric log, and later its checkpoints."""
    dist_info = init_distributed(cfg.deepspeed)
    run_dir = Path(cfg.logging.output_dir)
    if not resume and (earlier := CheckpointManager(run_dir, 0, dist_info).latest()) is not None:
        raise ConfigError("logging.output_dir", f"{run_dir} already holds a run (checkpoint {earlier.name}): pass "
                                                f"--resume to continue it, or choose a new folder (or remove this "
                                                f"one) to start over")
    dtype = compute_dtype(cfg.deepspeed.precision, dist_info.device)
    if dist_info.is_main:
        save_config(cfg, run_dir / "config.yaml")
    return dist_info, dtype, run_dir



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
          after_step: Callable[[int, float], None] | None = None,
          loss_scale: LossScaleConfig | None = None, stream=None) -> TrainResult:
    """Run optimizer steps until ``optim.max_steps`` (or ``stop_after`` steps in this call).

    With ``dtype`` float16 (fp16 autocast) the backward pass runs on a dynamically scaled loss
    (``pipelines.loss_scaling``, schedule ``loss_scale``); its state is checkpointed with the trainer state.

    ``after_step(step, train_seconds)`` runs on every rank after each step (and its checkpoint), e.g. a periodic
    evaluation for quality-against-time curves; its time is excluded from the training time and throughput. A resumed
    run calls it once more for the step it resumed at, so it must be idempotent for a step.
    """
    run_dir = Path(logging.output_dir)
    ckpt = CheckpointManager(run_dir, logging.keep_checkpoints, dist_info)
    order = GlobalBatchOrder(num_samples, optim, dist_info.world_size, seed) if stream is None else None
    global_batch = optim.micro_batch_size * optim.grad_accum_steps * dist_info.world_size
    metrics_path = run_dir / "metrics.jsonl"
    result = TrainResult()
    step = 0
    earlier_seconds = 0.0  # training time before this call (a resumed run's curve continues its clock)
    scaler = LossScaler(engine, enabled=dtype == torch.float16, config=loss_scale)
    if resume and (latest := ckpt.latest()) is not None:
        state = ckpt.load(engine, latest)
        step = result.resumed_from = state["step"]
        if scaler.enabled and "loss_scaler" in state:
            scaler.load_state_dict(state["loss_scaler"])
        earlier_seconds = float(state.get("train_seconds", 0.0))
        if stream is not None:
            _restore_position(stream, state, latest, dist_info)
        if dist_info.is_main:
            print(f"resumed from {latest} (step {step})", flush=True)
            _note_schedule_change(engine, optim, step)
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
    if result.resumed_from and after_step is not None:
        # a run killed after its checkpoint but before the hook for that step finished (a curve evaluation, say)
        # would otherwise never run it for that step; hooks replace what an earlier call wrote for their step
        after_step(step, earlier_seconds)
    start_time = time.perf_counter() - earlier_seconds
    window_time, window_samples = time.perf_counter(), 0
    engine.train()

    def state_at(s: int, position: dict | None = None) -> dict[str, Any]:
        state = {"step": s, "seed": seed, "samples_seen": s * global_batch,
                 "train_seconds": time.perf_counter() - start_time}
        if stream is not None:  # collective: every rank's position, kept by the main rank
            state["data_position"] = gather_objects(position if position is not None else stream.state_dict())
        return {**state, "loss_scaler": scaler.state_dict()} if scaler.enabled else state

    while step < last:
        seed_everything(step_seed(seed, step, dist_info.rank))
        sums: dict[str, float] = {}
        step_position = stream.state_dict() if stream is not None else None  # where this step's data begins
        for micro in range(optim.grad_accum_steps):
            ids = order.ids(step, micro, dist_info.rank) if stream is None else stream.take(optim.micro_batch_size)
            batch = make_batch(ids, step)
            with autocast(dist_info.device, dtype):
                loss, parts = loss_fn(engine, batch)
            finite = all_ranks_true(bool(torch.isfinite(loss.detach()).item()), dist_info.device)
            if not finite and reliability.stop_on_nonfinite:
                # nothing of this step was applied yet: the engine holds the last good state
                path = ckpt.save(engine, state_at(step, step_position))
                named = {k: float(v.detach()) for k, v in parts.items()}
                rec = record_ids(batch) if record_ids else ids
                raise NonFiniteLoss(f"non-finite loss {float(loss.detach())} at step {step} (micro-step {micro}, rank "
                                    f"{dist_info.rank}); loss parts {named}; records {rec[:16]}; last good state "
                                    f"saved to {path}")
            engine.backward(scaler.scale(loss))
            scaler.step()  # engine.step(); under fp16 autocast also unscales, skips on inf/NaN, moves the scale
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / optim.grad_accum_steps
        sums = mean_over_ranks(sums, dist_info.device)  # log the global batch's loss, not rank 0's share
        step += 1
        window_samples += global_batch
        if dist_info.is_main and (step % logging.log_every == 0 or step == last):
            now = time.perf_counter()
            epoch = order.epoch_of(step) if order is not None else stream.state_dict()["epoch"]
            row = {"step": step, **sums, "lr": engine.get_lr()[0], "epoch": epoch,
                   "samples_per_s": window_samples / max(now - window_time, 1e-9),
                   "elapsed_s": now - start_time}
            if scaler.enabled:  # the scale the next step uses, and the steps skipped so far for inf/NaN gradients
                row.update(loss_scale=scaler.scale_value, skipped_steps=scaler.skipped_steps)
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


def _note_schedule_change(engine, optim: OptimConfig, step: int) -> None:
    """Say so when a resumed run's schedule is not the one it was saved under (a changed lr, min_lr, max_steps or
    schedule): legitimate (a wsd run extended in its constant phase gives the same value; a re-warm on purpose does
    not), but the curve after this step then follows the new schedule, and the log should record that."""
    from .optim import lr_at

    saved, now = float(engine.get_lr()[0]), lr_at(step, optim)
    if not math.isclose(saved, now, rel_tol=1e-6, abs_tol=1e-12):
        print(f"the schedule changed at the resume: the checkpoint's learning rate for step {step} is {saved:.3g}, "
              f"this config's is {now:.3g}; the steps after the first resumed one follow this config's schedule "
              f"(optim.schedule={optim.schedule}, "
              f"lr={optim.lr:g}, min_lr={optim.min_lr:g}, max_steps={optim.max_steps})", flush=True)


def _restore_position(stream, state: dict, path: Path, dist_info: DistInfo) -> None:
    positions = state.get("data_position")
    if positions is None:
        raise ValueError(f"checkpoint {path} has no data position: it was written by a run that did not stream its "
                         "data; resume it with the same data settings")
    if len(positions) != dist_info.world_size:
        raise ValueError(f"checkpoint {path} holds the data positions of {len(positions)} ranks, this run has "
                         f"{dist_info.world_size}: a streamed run resumes on as many ranks as it was saved from")
    stream.load_state_dict(positions[dist_info.rank])
