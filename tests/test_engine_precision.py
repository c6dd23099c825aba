"""The trainable module computes in the run's dtype inside the DeepSpeed engine.

DeepSpeed's ``engine.forward`` switches an outer CUDA autocast off around the module (unless its own
``torch_autocast`` section is set), so on a GPU a bf16/fp16 run trained its front in fp32. ``build_engine`` makes the
module's forward enter the autocast itself. Simulated here on CPU by switching the outer autocast off the same way.
"""
from __future__ import annotations

import pytest
import torch

from pipelines import optim
from pipelines.config import DeepSpeedConfig, OptimConfig
from pipelines.distributed import init_distributed


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_the_module_computes_in_the_run_dtype_even_where_the_engine_turns_autocast_off(zero_stage):
    ds = DeepSpeedConfig(zero_stage=zero_stage, precision="bf16")
    dist = init_distributed(ds)
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, max_steps=2, micro_batch_size=2)
    engine = optim.build_engine(Tiny(), cfg, ds, dist, dtype=torch.bfloat16)
    x = torch.randn(2, 4)
    with torch.autocast("cpu", enabled=False):  # what DeepSpeed does around the module on CUDA
        out = engine(x)
    assert out.dtype == torch.bfloat16
    engine.backward(out.float().sum())
    engine.step()
    assert set(engine.module.state_dict()) == {"layer.weight", "layer.bias"}  # names and checkpoints unchanged
    assert engine.module.layer.weight.dtype == torch.float32  # fp32 weights, low-precision compute


def test_fp32_runs_are_left_as_they_are():
    ds = DeepSpeedConfig(precision="fp32")
    dist = init_distributed(ds)
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, max_steps=2, micro_batch_size=2)
    module = Tiny()
    engine = optim.build_engine(module, cfg, ds, dist, dtype=torch.float32)
    assert "forward" not in vars(module)
    assert engine(torch.randn(2, 4)).dtype == torch.float32
