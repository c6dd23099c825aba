"""Where a training step's time goes: torch.profiler over whole steps built exactly as ``benchmarks.bench`` builds
them (the stages' own library parts and shipped configs).

    python -m benchmarks.profile_step [--out DIR] [--batch 8] [--steps 3] [--max-warmup 6] [--only NAME] [overrides]

Per step (stage 1, representation ``qformer`` / ``elip``, generative ``qformer`` / ``tome`` / ``elip``): the time of
the forward, backward, clipping and optimizer phases; the operators' self time grouped into matmuls, attention,
the optimizer's elementwise passes, copies and dtype conversions, other elementwise work; what is outside any
operator (Python and dispatch overhead); and the frozen parameters that received a gradient (there should be none).
Writes ``DIR/profile.json`` and ``DIR/profile.md``. Overrides (``optim.implementation=fused``) apply to every step.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from benchmarks import bench
from dvlp_common.memory import keep_freed_memory

STEPS = {"stage1": ("stage1", None), "representation_qformer": ("representation", "qformer"),
         "representation_elip": ("representation", "elip"), "generative_qformer": ("generative", "qformer"),
         "generative_tome": ("generative", "tome"), "generative_elip": ("generative", "elip")}
PHASES = ("forward", "backward", "clip", "optimizer")
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "mkldnn",
          "aten::_mkl", "onednn")
ATTENTION = ("scaled_dot_product", "flash_attention", "_efficient_attention")
OPTIMIZER = ("_fused_adam", "_foreach_", "aten::addcdiv", "aten::addcmul", "aten::lerp", "aten::sqrt")
COPIES = ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::cat",
          "aten::index", "aten::gather", "aten::expand", "aten::fill_", "aten::zero_", "aten::zeros", "aten::empty")


def _category(name: str, phase: str) -> str:
    if any(k in name for k in ATTENTION):
        return "attention"
    if any(k in name for k in MATMUL):
        return "matmul"
    if phase == "optimizer" or any(k in name for k in OPTIMIZER):
        return "optimizer"
    if any(name.startswith(k) for k in COPIES):
        return "copies / conversions"
    return "other elementwise"


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def profile_one(name: str, batch: int, steps: int, overrides: list[str], max_warmup: int = 6,
                image_size: int | None = None) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from dvlp_common import precision
    from dvlp_common.seeding import seed_everything
    from pipelines import optim

    stage, front = STEPS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = precision.compute_dtype("auto", device)
    spec = {"stage": stage, "front": front, "image_size": image_size or bench.MAIN_SIZE, "batch": batch,
            "overrides": overrides, "vision_input": None}
    seed_everything(0)
    model, loss_fn, ledger, _tokens, _shapes, optim_cfg, _kernels = bench.build_step(spec, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optim.build_optimizer(model, optim_cfg)

    def step(marked: bool):
        regions = {phase: (record_function(phase) if marked else _Null()) for phase in PHASES}
        optimizer.zero_grad(set_to_none=True)
        with regions["forward"], precision.autocast(device, dtype):
            loss, _ = loss_fn()
        with regions["backward"]:
            loss.backward()
        with regions["clip"]:
            if optim_cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, optim_cfg.grad_clip)
        with regions["optimizer"]:
            optimizer.step()

    # Warm-up: kernels chosen, optimizer state allocated, and the heap grown to the step's working set. The first
    # steps fault in fresh pages (300k+ faults in the first, tens of thousands in the next ones at batch 32), which
    # would show up as slow fill_/copy_ of the large buffers; warm up until a step runs without faults.
    warm_faults = []
    for i in range(max_warmup):
        before = _minor_faults()
        step(False)
        warm_faults.append(_minor_faults() - before)
        if i >= 1 and warm_faults[-1] == 0:
            break
    before = _minor_faults()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(True)
    wall = (time.perf_counter() - start) / steps
    # the profiler's own allocations can fragment the heap again: its steps may fault where unprofiled ones do not
    profiled_faults = (_minor_faults() - before) / steps

    events = prof.events()
    phase_ms = {p: sum(e.cpu_time_total for e in events if e.name == p) / steps / 1e3 for p in PHASES}
    # each operator's self time, attributed to the phase it ran in (the innermost record_function around it)
    by_category: dict[str, float] = {}
    by_op: dict[str, float] = {}
    spans = sorted(((e.time_range.start, e.time_range.end, e.name) for e in events if e.name in PHASES))
    for e in events:
        if e.name in PHASES or e.self_cpu_time_total <= 0:
            continue
        phase = next((n for s, t, n in spans if s <= e.time_range.start <= t), "")
        cat = _category(e.name, phase)
        by_category[cat] = by_category.get(cat, 0.0) + e.self_cpu_time_total
        by_op[e.name] = by_op.get(e.name, 0.0) + e.self_cpu_time_total
    op_ms = sum(by_category.values()) / steps / 1e3
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    return {
        "step": name, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "wall_ms": wall * 1e3, "phase_ms": phase_ms,
        "category_ms": {k: v / steps / 1e3 for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "outside_operators_ms": max(0.0, wall * 1e3 - op_ms),
        "top_ops_ms": {k: v / steps / 1e3 for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]},
        "gflop_per_step": ledger.total / 1e9,
        "trainable_params": sum(p.numel() for p in params),
        "frozen_params_with_grad": frozen_with_grad,
        "warmup_page_faults": warm_faults, "profiled_page_faults_per_step": profiled_faults,
    }


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def write(results: list[dict], out: Path, overrides: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps({"cpu": platform.processor() or platform.machine(),
                                                  "overrides": overrides, "steps": results}, indent=1))
    lines = [f"# Step profiles ({', '.join(overrides) or 'shipped configs'})", "",
             "| step | ms/step | forward | backward | clip | optimizer | matmul | attention | optimizer ops | copies / "
             "conversions | other elementwise | outside operators | frozen params with grad | page faults per "
             "profiled step (warm-up steps) |",
             "|---|" + "---|" * 13]
    for r in results:
        c = r["category_ms"]
        lines.append(f"| {r['step']} (b{r['batch']}, {r['dtype']}) | {r['wall_ms']:.0f} | "
                     + " | ".join(f"{r['phase_ms'][p]:.0f}" for p in PHASES) + " | "
                     + " | ".join(f"{c.get(k, 0.0):.0f}" for k in ("matmul", "attention", "optimizer",
                                                                   "copies / conversions", "other elementwise"))
                     + f" | {r['outside_operators_ms']:.0f} | {len(r['frozen_params_with_grad'])} | "
                       f"{r['profiled_page_faults_per_step']:.0f} ({', '.join(map(str, r['warmup_page_faults']))}) |")
    lines += ["", "Page faults in the profiled steps inflate `aten::fill_` / `aten::copy_` / `aten::zero_` of the large "
                  "buffers (the first touch of fresh pages); the warm-up counts show whether unprofiled steps still fault."]
    for r in results:
        lines += ["", f"## {r['step']}: top operators (self ms/step)", ""]
        lines += [f"- `{k}`: {v:.1f}" for k, v in r["top_ops_ms"].items()]
    (out / "profile.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(bench.REPO / "runs" / "profile"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-warmup", type=int, default=6, help="warm-up steps at most (it stops at the first step "
                                                             "after the first without page faults)")
    p.add_argument("--only", default=None, help=f"profile only the steps whose name contains this ({', '.join(STEPS)})")
    p.add_argument("overrides", nargs="*", help="config overrides of every step, e.g. optim.implementation=fused")
    args = p.parse_args(argv)
    names = [name for name in STEPS if not args.only or args.only in name]
    if not names:  # an empty report would read as "nothing to see"
        p.error(f"--only {args.only!r} matches no step; steps: {', '.join(STEPS)}")
    keep_freed_memory()  # profile the steps as `dvlp` runs them
    results = []
    for name in names:
        results.append(profile_one(name, args.batch, args.steps, args.overrides, args.max_warmup))
        print(f"{name}: {results[-1]['wall_ms']:.0f} ms/step", flush=True)
    write(results, Path(args.out), args.overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
