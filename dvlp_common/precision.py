"""Compute precision: which dtype a run computes in on this device, and the autocast context for it."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp16", "fp32"]


def measure_bf16_speedup(size: int = 768, repeats: int = 7) -> float:
    """fp32 time / bf16 time of a square matmul, best of ``repeats`` each (the best is the least disturbed by other
    work on the machine)."""
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # first call sets up the kernel
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.float32] / best[torch.bfloat16]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def cpu_prefers_bf16() -> bool:
    """Whether bf16 matmuls beat fp32 on this CPU by 25% (true with AMX; false on some AVX-512 machines).

    Measured once per machine (CPU model, core count, torch version) and kept in the cache: every process of a run
    or an ablation grid then takes the same decision, even one that starts while others load the CPU (a probe under
    load once picked bf16 where fp32 is 1.8x faster, so arms of one grid could have trained in different dtypes).
    Delete ``$DVLP_CACHE/precision_probe/`` to measure again."""
    from filelock import FileLock

    from . import zoo
    from .cache import fingerprint
    from .io import write_json_atomic

    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__}
    folder = zoo.cache_root() / "precision_probe"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{fingerprint(machine)}.json"
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return bool(json.loads(path.read_text())["bf16_faster"])
        speedup = measure_bf16_speedup()
        write_json_atomic(path, {**machine, "bf16_over_fp32_speed": speedup, "bf16_faster": speedup > 1.25})
    return speedup > 1.25


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


__all__ = ["Precision", "cpu_prefers_bf16", "measure_bf16_speedup", "compute_dtype", "autocast"]
