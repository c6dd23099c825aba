"""Seeds: everything random in a run is a pure function of (seed, step, rank), so resumed and re-sharded runs
follow the uninterrupted one."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + rank) % 2 ** 63


__all__ = ["seed_everything", "step_seed"]
