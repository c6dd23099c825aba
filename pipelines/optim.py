"""The optimiser, its schedule and the DeepSpeed engine that applies them (ZeRO partitioning included)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from dvlp_common.config import ConfigError
from dvlp_common.cpu_kernels import install_cpu_attention, use_bit_dropout

from .config import DeepSpeedConfig, OptimConfig
from .distributed import DistInfo


def deepspeed_config(optim: OptimConfig, ds: DeepSpeedConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON derived from our config; user overrides must agree on the batch arithmetic."""
    train_batch = optim.micro_batch_size * optim.grad_accum_steps * world_size
    config: dict[str, Any] = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": optim.micro_batch_size,
        "gradient_accumulation_steps": optim.grad_accum_steps,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,  # our loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in ds.config_overrides and ds.config_overrides[key] != config[key]:
            raise ConfigError(f"deepspeed.config_overrides.{key}",
                              f"is {ds.config_overrides[key]} but the training config implies {config[key]} "
                              f"(optim.micro_batch_size={optim.micro_batch_size} x optim.grad_accum_steps="
                              f"{optim.grad_accum_steps} x world size {world_size}); set the batch through optim.*")
    merged = {**config, **ds.config_overrides}
    if isinstance(ds.config_overrides.get("zero_optimization"), dict):
        merged["zero_optimization"] = {**config["zero_optimization"], **ds.config_overrides["zero_optimization"]}
    return merged


def param_groups(model: torch.nn.Module, weight_decay: float, base_lr: float | None = None,
                 lr_scale: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and 0-/1-d parameters (temperatures, gates); parameters whose
    name starts with a key of ``lr_scale`` get their own groups at ``base_lr`` x its value (the schedule scales
    every group alike)."""
    lr_scale = lr_scale or {}
    groups: dict[tuple[bool, str | None], list] = {(True, None): [], (False, None): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scaled = next((prefix for prefix in lr_scale if name == prefix or name.startswith(prefix + ".")), None)
        groups.setdefault((p.ndim >= 2 and "norm" not in name.lower(), scaled), []).append(p)
    out = []
    for (decays, prefix), params in groups.items():
        if prefix is not None and not params:
            continue
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if prefix is not None:
            group["lr"] = base_lr * lr_scale[prefix]
        out.append(group)
    unmatched = [prefix for prefix in lr_scale if not any(k[1] == prefix for k in groups)]
    if unmatched:
        raise ConfigError("optim.lr_scale", f"no trainable parameter's name starts with {unmatched}")
    return out


def lr_at(step: int, optim: OptimConfig) -> float:
    """Linear warm-up from warmup_start_lr to lr, then ``optim.schedule``: cosine to min_lr at max_steps, or wsd
    (constant lr until ``optim.decay_start``, then ``optim.decay_shape`` down to min_lr at max_steps). Hägele et al.
    2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations") report that a cool-down of
    about 20% of the steps matches a cosine schedule of the same length."""
    if step < optim.warmup_steps:
        return optim.warmup_start_lr + (optim.lr - optim.warmup_start_lr) * step / optim.warmup_steps
    if optim.schedule == "wsd":
        start = optim.decay_start
        if step < start:
            return optim.lr
        progress = min(1.0, (step - start) / max(1, optim.max_steps - start))
        if optim.decay_shape == "1-sqrt":
            progress = math.sqrt(progress)
        return optim.lr + (optim.min_lr - optim.lr) * progress
    span = max(1, optim.max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``optim.implementation`` picks torch's kernel: ``default`` leaves it to torch,
    which on CPU is the single-tensor for-loop (``torch.optim.optimizer._default_to_fused_or_foreach`` picks foreach
    only on CUDA/XPU/MTIA) and on CUDA foreach; ``for_loop``, ``foreach`` or ``fused`` force one. The engine gets this
    optimizer as DeepSpeed's client optimizer; fused also runs under ZeRO 1-3 there (``tests/test_optim.py``).

    Seeded study (``benchmarks/optimizer_study.py``, ``docs/optimizer_study/``; CPU, fp32, 5 seeds x 40 steps of
    batch 16, stages 1, 2a and 2b): foreach gives bitwise the default's curves on CPU; fused's optimizer step is about
    4x faster (e.g. 40 vs 162 ms for the 32M-parameter Q-Former, 1 thread). With the same gradients fed to both
    kernels, fused's Adam moments are bitwise the for-loop's and its parameters differ by at most one float32 ulp,
    without growing over a stage's schedule: no kernel error. In training, that ulp is amplified by these short,
    chaotic runs to O(1) per-step loss differences within a few steps after warm-up, in both directions, exactly as
    for the default kernel with lr·(1 + 1e-6) (the study's ``control`` arm); fused's paired final-loss differences are
    within t·SE of zero in all three stages (-0.15 ± 0.54, -0.001 ± 0.10, -0.18 ± 0.45), and its seed-mean curve stays
    within the default's seed band in stages 1 and 2a, while in 2b it leaves it at 2 of 40 steps (ratio 1.6), as the
    control does (1.7). The one generative run that once climbed (7.2 -> 9.6) also had the prefix at the LLM's first
    position, since fixed (see ``pformer.llm``). Hence ``fused`` is the config's default."""
    kernel = {"default": {}, "for_loop": {"foreach": False}, "foreach": {"foreach": True},
              "fused": {"fused": True}}[optim.implementation]
    return torch.optim.AdamW(param_groups(model, optim.weight_decay, optim.lr, optim.lr_scale), lr=optim.lr,
                             betas=optim.betas, eps=optim.eps, **kernel)


def forward_under_autocast(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """Make ``module``'s forward enter ``autocast(device, dtype)`` itself (nothing for fp32).

    DeepSpeed's ``engine.forward`` (0.19, ``runtime/torch_autocast.autocast_if_enabled``) switches an outer autocast
    OFF around the module unless its own ``torch_autocast`` section is configured. It tests
    ``torch.is_autocast_enabled()``, the CUDA flag, so on a GPU the trainable module would silently compute in fp32
    under a bf16/fp16 run (on CPU the check is false and the outer autocast stays). Its ``torch_autocast`` section is
    not used instead: it also moves the gradient all-reduce of Linear weights to the low precision, and its fp16 path
    is wrong under ZeRO-1/2 (see ``pipelines.loss_scaling``). The forward is wrapped on the instance (as accelerate's
    ``prepare_model`` does), so parameter names, checkpoints and ZeRO-3's hooks are unchanged."""
    if dtype in (None, torch.float32) or getattr(module, "_forward_outside_autocast", None) is not None:
        return
    plain = module.forward
    device_type = torch.device(device).type

    def forward(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=dtype):
            return plain(*args, **kwargs)

    module._forward_outside_autocast = plain
    module.forward = forward


def compile_forward(module: torch.nn.Module) -> None:
    """Compile ``module``'s forward for the training steps, on the instance (names, checkpoints and hooks are
    unchanged); a forward under autocast (:func:`forward_under_autocast`) is compiled with its autocast. Evaluation
    (eval mode or no grad: other modes and shapes, which would each compile anew) runs the eager forward. Default
    dynamic-shape handling: a second caption length recompiles once with symbolic lengths, then no more."""
    if getattr(module, "_forward_eager", None) is not None:
        return
    eager = module.forward
    compiled = torch.compile(eager)

    def forward(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    module._forward_eager = eager
    module.forward = forward


def build_engine(model: torch.nn.Module, optim: OptimConfig, ds: DeepSpeedConfig, dist_info: DistInfo,
                 dtype: torch.dtype | None = None):
    """The DeepSpeed engine over ``model`` with our AdamW and schedule; ``dtype`` is the run's compute dtype (its
    autocast must reach inside the engine's forward, see :func:`forward_under_autocast`)."""
    import deepspeed

    forward_under_autocast(model, dist_info.device, dtype)
    # process-wide (every transformers model here, the frozen LLM's attention included); CUDA is not affected
    install_cpu_attention(ds.cpu_attention_matmul_max_keys, use_bit_dropout=ds.cpu_dropout == "bits")
    if ds.cpu_dropout == "bits":
        use_bit_dropout(model)
    if ds.compile:
        compile_forward(model)
    optimizer = build_optimizer(model, optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, optim) / optim.lr)
    engine, _, _, _ = deepspeed.initialize(model=model.to(dist_info.device), optimizer=optimizer,
                                           lr_scheduler=scheduler,
                                           config=deepspeed_config(optim, ds, dist_info.world_size))
    return engine


def partitions_weights(engine) -> bool:
    """ZeRO-3: each rank holds only a shard of every parameter (``engine.module``'s tensors are empty outside the
    engine's forward and backward)."""
    return bool(engine.zero_optimization_partition_weights())


def trained_module(engine, rebuild: Callable[[], torch.nn.Module], keep: bool = True) -> torch.nn.Module | None:
    """The trained module for use outside the engine: saving its weights, evaluating on one rank.

    Without ZeRO-3 that is ``engine.module``. Under ZeRO-3 its parameters are partitioned across ranks and its forward
    hooks gather them with collectives, so it cannot run on one rank alone: the full weights are gathered with
    ``deepspeed.zero.GatheredParameters`` (a collective: call this on every rank) and loaded into ``rebuild()``, a
    fresh module of the same architecture, on the ranks with ``keep`` (None on the others).
    """
    if not partitions_weights(engine):
        return engine.module
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        state = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()} if keep else None
    if not keep:
        return None
    module = rebuild()
    module.load_state_dict(state)
    return module.to(engine.device)


