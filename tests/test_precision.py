"""The CPU precision probe decides once per machine: every process of a run or a grid takes the same dtype."""
from __future__ import annotations

import json

import torch

from dvlp_common import precision


def test_the_probe_is_measured_once_and_shared_by_later_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("DVLP_CACHE", str(tmp_path))
    calls = []

    def fake_speedup():
        calls.append(1)
        return 0.56 if len(calls) == 1 else 4.0  # a second measurement (e.g. under load) would decide otherwise

    monkeypatch.setattr(precision, "measure_bf16_speedup", fake_speedup)
    precision.cpu_prefers_bf16.cache_clear()
    assert precision.compute_dtype("auto", torch.device("cpu")) == torch.float32
    precision.cpu_prefers_bf16.cache_clear()  # as a new process would start
    assert precision.compute_dtype("auto", torch.device("cpu")) == torch.float32 and len(calls) == 1
    (record,) = (tmp_path / "precision_probe").glob("*.json")
    saved = json.loads(record.read_text())
    assert saved["bf16_over_fp32_speed"] == 0.56 and saved["bf16_faster"] is False and saved["cpu"]
    precision.cpu_prefers_bf16.cache_clear()


def test_explicit_precisions_need_no_probe():
    assert precision.compute_dtype("fp32", torch.device("cpu")) == torch.float32
    assert precision.compute_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert precision.compute_dtype("fp16", torch.device("cpu")) == torch.float16
