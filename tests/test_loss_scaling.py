"""fp16 autocast trains with dynamic loss scaling (``pipelines.loss_scaling``) through the real loop and DeepSpeed
engine, under ZeRO 0, 2 and 3, in one process on CPU (torch autocasts to float16 on CPU too).

The model is one Linear layer whose loss is scaled so that its gradients (about 1e-8) flush to zero in float16 unless
the loss is scaled: without loss scaling an fp16 run does not move the weights at all.
"""
from __future__ import annotations

import json

import pytest
import torch

from pipelines import optim, training
from pipelines.config import DeepSpeedConfig, LoggingConfig, OptimConfig, ReliabilityConfig
from pipelines.distributed import init_distributed
from pipelines.loss_scaling import LossScaleConfig

INPUTS = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)  # float16 under autocast


def loss_times(factor: float, inf_gradient_at: tuple[int, ...] = ()):
    """loss = factor · sum(out): d loss / d out = factor, cast to float16 on its way into the layer's backward.
    At the steps in ``inf_gradient_at`` the gradient into the layer is inf (the loss itself stays finite)."""

    def loss_fn(engine, batch):
        x, step = batch
        out = engine(x)
        if step in inf_gradient_at:
            out.register_hook(lambda g: g * float("inf"))
        loss = (out.float() * factor).sum()
        return loss, {}

    return loss_fn


def _run(tmp_path, zero_stage: int, dtype: torch.dtype, loss_fn, steps: int = 2, eps: float = 1e-12,
         grad_clip: float = 1.0, warmup_steps: int = 0, lr: float = 1e-2, **train_kw):
    ds = DeepSpeedConfig(zero_stage=zero_stage, precision="fp16" if dtype == torch.float16 else "fp32")
    dist = init_distributed(ds)
    cfg = OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=warmup_steps, max_steps=steps, weight_decay=0.0, eps=eps,
                      grad_clip=grad_clip, micro_batch_size=2)
    engine = optim.build_engine(Tiny(), cfg, ds, dist)
    logging = LoggingConfig(output_dir=str(tmp_path), log_every=1, save_every=2, tensorboard=False,
                            progress_bar=False)
    training.train(engine=engine, dist_info=dist, make_batch=lambda ids, step: (INPUTS[ids], step), loss_fn=loss_fn,
                   num_samples=len(INPUTS), optim=cfg, logging=logging, reliability=ReliabilityConfig(), seed=0,
                   dtype=dtype, **train_kw)
    weights = optim.trained_module(engine, Tiny).state_dict()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return {k: v.detach().clone() for k, v in weights.items()}, rows, engine


def _initial() -> dict[str, torch.Tensor]:
    return Tiny().state_dict()


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_fp16_gradients_below_the_fp16_range_still_train(tmp_path, zero_stage):
    """Gradients of about 1e-8 are zero in float16; with the loss scaled the fp16 run follows the fp32 run."""
    fp16, rows, _ = _run(tmp_path / "fp16", zero_stage, torch.float16, loss_times(1e-8))
    fp32, _, _ = _run(tmp_path / "fp32", zero_stage, torch.float32, loss_times(1e-8))
    initial = _initial()
    for key in initial:
        moved = (fp16[key] - initial[key]).abs().min()
        assert moved > 1e-3, (key, float(moved))  # every weight moved (Adam's first steps are about lr = 1e-2)
        assert torch.allclose(fp16[key], fp32[key], atol=1e-4), (key, float((fp16[key] - fp32[key]).abs().max()))
    assert [r["loss_scale"] for r in rows] == [2.0 ** 16] * 2 and rows[-1]["skipped_steps"] == 0


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_clipping_sees_the_unscaled_gradients(tmp_path, zero_stage):
    """Gradient clipping active on the true gradients (norm about 1e-2, clipped to 1e-3); with Adam's eps = 1 the
    update is about lr·g, so a clip computed on the scaled gradients (2^16 times larger) would show as 2^16 times
    smaller steps. The fp16 run must follow the fp32 run."""
    kw = dict(eps=1.0, grad_clip=1e-3, lr=1.0)
    fp16, rows, _ = _run(tmp_path / "fp16", zero_stage, torch.float16, loss_times(1e-3), **kw)
    fp32, _, _ = _run(tmp_path / "fp32", zero_stage, torch.float32, loss_times(1e-3), **kw)
    assert rows[-1]["skipped_steps"] == 0
    initial = _initial()
    for key in initial:
        step16, step32 = fp16[key] - initial[key], fp32[key] - initial[key]
        assert step32.abs().max() > 1e-4
        assert torch.allclose(step16, step32, rtol=2e-2, atol=1e-6), (key, step16, step32)


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_inf_gradient_skips_the_step_and_lowers_the_scale(tmp_path, zero_stage):
    """Step 0's gradients are inf: the weights, the optimiser state and the learning-rate schedule stay as they were,
    the scale halves and training goes on with the next steps applied."""
    weights, rows, engine = _run(tmp_path / "skip", zero_stage, torch.float16, loss_times(1e-8, (0,)), steps=1)
    initial = _initial()
    assert all(torch.equal(weights[k], initial[k]) for k in initial)
    assert rows[0]["skipped_steps"] == 1 and rows[0]["loss_scale"] == 2.0 ** 15 and engine.skipped_steps == 1
    adam = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the client AdamW
    assert all(float(s.get("step", 0)) == 0 for s in adam.state.values()), "Adam counted a skipped step"

    weights, rows, engine = _run(tmp_path / "go_on", zero_stage, torch.float16, loss_times(1e-8, (0,)), steps=3,
                                 warmup_steps=3)
    assert [r["loss_scale"] for r in rows] == [2.0 ** 15] * 3 and [r["skipped_steps"] for r in rows] == [1, 1, 1]
    cfg = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=3, max_steps=3)
    assert [r["lr"] for r in rows] == pytest.approx([optim.lr_at(s, cfg) for s in (0, 1, 2)])  # no schedule step
    adam = getattr(engine.optimizer, "optimizer", engine.optimizer)
    assert [float(s["step"]) for s in adam.state.values() if "step" in s] == [2.0] * len(adam.state)
    for key in initial:
        assert (weights[key] != initial[key]).all()  # the two applied steps moved every weight


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_resume_restores_the_loss_scale(tmp_path, zero_stage):
    """growth every 2 applied steps, an inf gradient at step 0: stopped after 2 steps and resumed, the run logs the
    same scales, skipped steps and weights as the uninterrupted one, and the checkpoint holds the scaler's state."""
    scale = LossScaleConfig(growth_interval=2)
    loss_fn = loss_times(1e-8, (0,))
    whole, whole_rows, _ = _run(tmp_path / "whole", zero_stage, torch.float16, loss_fn, steps=5, loss_scale=scale)
    assert [r["loss_scale"] for r in whole_rows] == [2.0 ** 15, 2.0 ** 15, 2.0 ** 16, 2.0 ** 16, 2.0 ** 17]
    _run(tmp_path / "parts", zero_stage, torch.float16, loss_fn, steps=5, loss_scale=scale, stop_after=2)
    state = json.loads((tmp_path / "parts" / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["loss_scaler"] == {"scale": 2.0 ** 15, "good_steps": 1, "skipped_steps": 1}
    parts, parts_rows, _ = _run(tmp_path / "parts", zero_stage, torch.float16, loss_fn, steps=5, loss_scale=scale,
                                resume=True)
    keys = ("step", "loss", "loss_scale", "skipped_steps", "lr")
    assert [{k: r[k] for k in keys} for r in parts_rows] == [{k: r[k] for k in keys} for r in whole_rows]
    assert all(torch.equal(parts[k], whole[k]) for k in whole)


def test_bf16_and_fp32_runs_do_not_scale(tmp_path):
    _, rows, _ = _run(tmp_path, 0, torch.float32, loss_times(1e-8))
    assert "loss_scale" not in rows[0]
    assert not json.loads((tmp_path / "checkpoints" / "step_00000002" / "trainer_state.json").read_text()
                          ).get("loss_scaler")
