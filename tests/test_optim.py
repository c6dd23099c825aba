"""``optim.implementation`` picks torch's AdamW kernel; every kernel builds through ``build_optimizer`` and DeepSpeed,
and they give the same update up to float32 rounding.

Measured on CPU (torch 2.13): default, for_loop and foreach give bitwise the same parameters (on CPU the default is
the for-loop, and foreach's CPU fallback runs the same per-tensor ops); fused differs by about one float32 ulp of the
parameter (relative difference ~1e-7, at most ~1.2e-6 on a near-zero element), so it is compared at 1e-6 of each
tensor's largest magnitude.
"""
from __future__ import annotations

import copy

import pytest
import torch

from pipelines import optim
from pipelines.config import DeepSpeedConfig, OptimConfig
from pipelines.distributed import init_distributed

IMPLEMENTATIONS = ("default", "for_loop", "foreach", "fused")
FLAGS = {"default": (None, None), "for_loop": (False, None), "foreach": (True, None), "fused": (None, True)}


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(12, 24)
        self.norm = torch.nn.LayerNorm(24)
        self.out = torch.nn.Linear(24, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.norm(self.inp(x))))


INPUTS = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))


def _config(impl: str) -> OptimConfig:
    return OptimConfig(lr=5e-3, min_lr=0.0, warmup_steps=0, max_steps=4, weight_decay=0.05, grad_clip=1.0,
                       micro_batch_size=8, implementation=impl)


def _one_step(impl: str) -> list[torch.Tensor]:
    model = Small()
    optimizer = optim.build_optimizer(model, _config(impl))
    model(INPUTS).square().mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def _close_to_rounding(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest |a − b| of a tensor over that tensor's largest |b|."""
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_build_optimizer_passes_the_kernel_choice(impl):
    model = Small()
    optimizer = optim.build_optimizer(model, _config(impl))
    foreach, fused = FLAGS[impl]
    assert optimizer.defaults["foreach"] is foreach and optimizer.defaults["fused"] is fused
    decay, no_decay = optimizer.param_groups  # the groups do not depend on the kernel
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert len(decay["params"]) == 2 and len(no_decay["params"]) == 4


def test_unknown_implementation_is_a_config_error():
    from dvlp_common.config import ConfigError, load_config
    from pipelines.stage1 import Stage1Config

    with pytest.raises(ConfigError):
        load_config(Stage1Config, None, ["optim.implementation=apex"])


def test_kernels_give_the_same_update():
    initial = [p.detach().clone() for p in Small().parameters()]
    result = {impl: _one_step(impl) for impl in IMPLEMENTATIONS}
    reference = result["for_loop"]
    assert all(not torch.equal(p, p0) for p, p0 in zip(reference, initial))  # every tensor moved
    for impl in ("default", "foreach"):  # the same per-tensor arithmetic on CPU
        assert all(torch.equal(a, b) for a, b in zip(result[impl], reference)), impl
    assert _close_to_rounding(result["fused"], reference) < 1e-6


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_fused_trains_under_deepspeed(zero_stage):
    """The engine takes our AdamW as its client optimizer (ZeRO 1-3 hand it flat fp32 partitions): the fused kernel
    runs there and its weights after two steps follow the for-loop kernel's."""
    weights = {}
    for impl in ("for_loop", "fused"):
        ds = DeepSpeedConfig(zero_stage=zero_stage, precision="fp32")
        engine = optim.build_engine(Small(), _config(impl), ds, init_distributed(ds))
        adam = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the client AdamW
        assert isinstance(adam, torch.optim.AdamW) and adam.defaults["fused"] is FLAGS[impl][1]
        for _ in range(2):
            loss = engine(INPUTS).square().mean()
            engine.backward(loss)
            engine.step()
        module = optim.trained_module(engine, Small)
        weights[impl] = [p.detach().clone() for p in copy.deepcopy(module).parameters()]
    initial = [p.detach() for p in Small().parameters()]
    assert all(not torch.equal(p, p0) for p, p0 in zip(weights["fused"], initial))
    assert _close_to_rounding(weights["fused"], weights["for_loop"]) < 1e-6


def test_compiled_forward_trains_compiled_and_evaluates_eager():
    """compile_forward: train mode with grad runs the compiled forward (same values as eager), eval / no-grad
    runs the eager one (no compile for evaluation shapes), and names and state dict are unchanged."""
    import torch._dynamo

    from pipelines.optim import compile_forward

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    keys = list(model.state_dict())
    x = torch.randn(3, 8)
    expected = model(x)
    torch._dynamo.reset()
    compile_forward(model)
    compile_forward(model)  # idempotent
    model.train()
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out = model(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames_before  # it went through dynamo
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(torch.randn(5, 8)).shape, torch.Size([5, 4]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_graphs  # eval: eager, nothing compiled
    assert list(model.state_dict()) == keys


def test_compile_with_zero3_is_a_config_error():
    from dvlp_common.config import ConfigError

    with pytest.raises(ConfigError, match="compile"):
        DeepSpeedConfig(zero_stage=3, compile=True).check()
