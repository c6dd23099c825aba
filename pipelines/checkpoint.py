"""Checkpoints: ``<run>/checkpoints/step_XXXXXXXX/`` holds the DeepSpeed engine state (model, optimiser, scheduler)
and our trainer state (step, seed, samples seen, training time) as JSON. Written under a staging name and renamed, so a
crash during a save leaves the previous checkpoint intact; loaded with ``weights_only`` unpickling."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dvlp_common.io import write_json_atomic

from .distributed import DistInfo, barrier

STATE_NAME = "trainer_state.json"


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
            write_json_atomic(staging / tag / STATE_NAME, state)
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


