"""Compute precision: which dtype a run computes in on this device, and the autocast context for it."""
from __future__ import annotations

import contextlib
import functools
import time
from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp16", "fp32"]


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


def compute_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that have it (else fp16); on CPU bf16 only where a probe shows it is faster."""
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if torch.device(device).type == "cpu":
        return torch.bfloat16 if cpu_prefers_bf16() else torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """Mixed precision in ``dtype`` on ``device``; nothing for fp32 (or None)."""
    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


__all__ = ["Precision", "cpu_prefers_bf16", "compute_dtype", "autocast"]
