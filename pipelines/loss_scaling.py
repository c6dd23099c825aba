"""Dynamic loss scaling for fp16 autocast on a DeepSpeed engine (``deepspeed.precision=fp16``, or ``auto`` on a GPU
without bf16): the weights stay fp32 and torch.autocast computes in fp16, so gradients below fp16's smallest
subnormal (6e-8) flush to zero unless the loss is scaled up before the backward pass.

The schedule is torch.amp.GradScaler's: start at ``init_scale``; a step whose gradients hold an inf/NaN is skipped
(no parameter, optimiser-state or learning-rate-schedule change) and the scale is multiplied by ``backoff_factor``;
after ``growth_interval`` applied steps in a row it is multiplied by ``growth_factor``. Gradient clipping sees the
unscaled gradients. bf16 and fp32 runs do not use it.

Why not DeepSpeed's own mechanisms (deepspeed 0.19):
* its ``fp16`` section trains fp16 weights with DeepSpeed's fp16 optimiser wrapper, not fp32 weights under autocast;
* its ``torch_autocast`` section with float16 creates a GradScaler, correct for ZeRO-0, but under ZeRO-1/2 it clips
  the still-scaled gradients (the combined clip factor uses DeepSpeed's own loss scale, 1) before the GradScaler
  unscales them, calls ``update()`` once per parameter group, and on an overflow returns before ``update()`` so the
  scale never backs off; it also marks every Linear weight for fp16 gradient communication.

What is used instead:
* ZeRO 1-3: the ZeRO optimiser's external loss scale (``override_loss_scale``). DeepSpeed then multiplies the loss by
  it in ``engine.backward``, divides the gradient partitions by it in the same factor as the clip (so the clip acts on
  unscaled gradients), detects an inf/NaN from the global gradient norm (the same on every rank) and skips the step,
  the scheduler included (``engine.was_step_applied()`` is False). This class only moves the scale.
* ZeRO-0 (the client optimiser unwrapped): the loss is scaled here; at the accumulation boundary, after the backward
  pass has all-reduced the gradients and before ``engine.step()`` clips them, they are unscaled in place and checked.
  An overflowing step is skipped by zeroing the gradients and running ``engine.step()`` with the optimiser's ``step``
  shadowed by a no-op and ``optimizer.overflow`` set, which DeepSpeed's own fp16 optimisers use to tell the engine
  to count a skipped step and leave the scheduler alone; both instance attributes are removed afterwards.

The state (scale, steps since the last backoff, skipped steps) is part of the checkpoint's trainer state, so a resumed
run scales as the uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dvlp_common.config import Config, param

from .distributed import all_ranks_true


@dataclass
class LossScaleConfig(Config):
    init_scale: float = param(2.0 ** 16, gt=0.0, help="loss scale of the first step (fp16 autocast only)")
    growth_factor: float = param(2.0, gt=1.0, help="scale multiplier after growth_interval applied steps")
    backoff_factor: float = param(0.5, gt=0.0, lt=1.0, help="scale multiplier after a step with inf/NaN gradients")
    growth_interval: int = param(2000, ge=1, help="applied steps in a row before the scale grows")


class LossScaler:
    """``engine.backward(scaler.scale(loss))`` then ``scaler.step()`` in place of ``engine.step()``; a pass-through
    when not ``enabled`` (bf16, fp32)."""

    def __init__(self, engine, enabled: bool, config: LossScaleConfig | None = None):
        self.engine, self.enabled = engine, enabled
        self.config = config or LossScaleConfig()
        self.scale_value = float(self.config.init_scale)
        self.good_steps = 0  # applied steps since the last change of the scale
        self.skipped_steps = 0
        self._zero = bool(engine.zero_optimization())
        self._push_scale()

    # -- the training step ------------------------------------------------------------------------------------
    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to pass to ``engine.backward`` (under ZeRO DeepSpeed multiplies it by the scale itself)."""
        if not self.enabled or self._zero:
            return loss
        return loss * self.scale_value

    def step(self) -> None:
        """``engine.step()``; at an accumulation boundary (fp16) also unscales, skips on inf/NaN and moves the scale."""
        if not self.enabled or not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return
        if self._zero:
            self.engine.step()
        else:
            self._zero0_step()
        self._update(applied=self.engine.was_step_applied())

    def _zero0_step(self) -> None:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale_value)  # a power of two by default: exact
            finite = bool(torch.stack([g.isfinite().all() for g in grads]).all())
        else:
            finite = True
        # the gradients were all-reduced in the backward pass, so every rank sees the same; agree anyway
        finite = all_ranks_true(finite, grads[0].device if grads else torch.device("cpu"))
        if finite:
            self.engine.step()
            return
        optimizer = self.engine.optimizer
        for g in grads:
            g.zero_()  # DeepSpeed's clip still runs over them
        optimizer.step = lambda *args, **kwargs: None  # instance attributes shadow the class's for this one step
        optimizer.overflow = True
        try:
            self.engine.step()
        finally:
            del optimizer.step, optimizer.overflow

    def _update(self, applied: bool) -> None:
        if applied:
            self.good_steps += 1
            if self.good_steps >= self.config.growth_interval:
                self.scale_value *= self.config.growth_factor
                self.good_steps = 0
        else:
            self.skipped_steps += 1
            self.scale_value *= self.config.backoff_factor
            self.good_steps = 0
        self._push_scale()

    def _push_scale(self) -> None:
        if self.enabled and self._zero:
            self.engine.optimizer.override_loss_scale(self.scale_value)

    # -- checkpoint ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale_value, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale_value = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self._push_scale()


__all__ = ["LossScaleConfig", "LossScaler"]
