"""Seeded study of torch's AdamW kernels (issue 17): do ``foreach`` and ``fused`` follow the default's loss curves?

    python -m benchmarks.optimizer_study --out DIR [--seeds 5] [--steps 40] [--batch 16] [--jobs 2]
                                         [--workdir runs/optimizer_study] [--control] [--report-only]
    python -m benchmarks.optimizer_study --kernel-drift [--implementations for_loop foreach fused]

For each stage (``stage1``; ``stage2`` = 2a, ``qformer`` front with the P-Former alignment; ``generative`` = 2b,
``qformer`` from a fresh front (``init_front=null``) with the alignment), each seed and each implementation
(``optim.implementation`` = default, foreach, fused), the stage runs through the command line (as
``scripts/loss_compare.py`` does) in fp32 with every step logged, on the shipped YAML's data and learning rates,
with a short budget: ``--steps`` optimizer steps of ``--batch`` samples, linear warm-up over 10% of them. Stage 1 runs
first; the P-Former of its (default, seed 0) run feeds stages 2a and 2b of every seed and implementation. A seed fixes
the initialisation and the data order, so the runs of one seed see the same batches and differ only by the kernel.
``--jobs`` runs go in parallel, each on one thread (OMP_NUM_THREADS=1); finished runs are reused on a rerun.
``--control`` adds the arm ``control``: the default kernel with lr·(1 + 1e-6), a rounding-level change that is no
kernel at all, to measure how far such a change alone moves these short, chaotic runs.

The kernels alone (``--kernel-drift``, also part of every report): each stage's optimiser settings on a tiny parameter
set, every kernel fed the same gradients each step, per-step relative parameter and moment difference to default:
what a kernel changes with the training dynamics taken out (the reproducer one would send upstream).

Then the optimizer step alone is timed on each stage's real trainable parameters (the module built as
``benchmarks/bench.py`` builds it, random gradients, median of ``--timing-steps`` steps after 2 warm-up steps), at 1
thread and at ``--timing-threads`` threads, one measurement at a time.

Writes ``DIR/study.json`` (every curve and timing), ``DIR/study.md`` (the tables and verdicts) and
``DIR/curves.png``. The statistics are described in the report itself (:func:`write_report`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ("stage1", "stage2", "generative")
IMPLEMENTATIONS = ("default", "foreach", "fused")
COMMAND = {"stage1": "stage1", "stage2": "stage2", "generative": "generate-stage"}
YAML = {"stage1": "stage1.yaml", "stage2": "stage2.yaml", "generative": "generative.yaml"}
SETUP = {"stage1": "stage1", "stage2": "representation", "generative": "generative"}  # benchmarks.bench._SETUPS
COMMON = ["deepspeed.precision=fp32", "logging.log_every=1", "logging.tensorboard=false",
          "logging.progress_bar=false", "eval.enabled=false"]
CONTROL = "control"  # not a kernel: the default kernel with lr·(1 + CONTROL_LR_CHANGE), see --control
CONTROL_LR_CHANGE = 1e-6
NOT_LOSSES = ("step", "lr", "epoch", "samples_per_s", "elapsed_s")
FINAL_WINDOW = 5  # final loss = mean of the last FINAL_WINDOW steps' losses (one batch per step is noisy)
_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, **_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


# ===============================================================================================================
# training runs
def run_dir(work: Path, stage: str, impl: str, seed: int) -> Path:
    return work / stage / impl / f"seed{seed}"


def pformer_dir(work: Path) -> Path:
    return run_dir(work, "stage1", "default", 0) / "pformer"


def overrides(work: Path, stage: str, impl: str, seed: int, steps: int, batch: int) -> list[str]:
    warmup = max(1, round(0.1 * steps))
    kernel = "default" if impl == CONTROL else impl
    out = [f"optim.max_steps={steps}", f"optim.warmup_steps={warmup}", f"optim.micro_batch_size={batch}",
           f"optim.implementation={kernel}", f"seed={seed}", f"logging.save_every={steps}",
           f"logging.output_dir={run_dir(work, stage, impl, seed)}", *COMMON]
    if impl == CONTROL:  # the default kernel with a rounding-level change: lr·(1 + 1e-6)
        from dvlp_common.config import load_config

        lr = load_config(_stage_config_class(stage), REPO / "configs" / YAML[stage], []).optim.lr
        out.append(f"optim.lr={lr * (1 + CONTROL_LR_CHANGE)!r}")
    if stage != "stage1":
        out.append(f"pformer={pformer_dir(work)}")
    if stage == "generative":
        out.append("init_front=null")
    return out


def read_metrics(folder: Path, steps: int) -> dict | None:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(rows) != steps or rows[-1]["step"] != steps:
        return None
    keys = [k for k in rows[0] if k not in NOT_LOSSES]
    curves = {k: [r[k] for r in rows] for k in keys}
    elapsed = [r["elapsed_s"] for r in rows]
    curves["step_s"] = [b - a for a, b in itertools.pairwise(elapsed)]  # logged every step: wall time per step
    return curves


def train_one(work: Path, stage: str, impl: str, seed: int, steps: int, batch: int) -> dict:
    folder = run_dir(work, stage, impl, seed)
    done = read_metrics(folder, steps)
    if done is not None:
        return done
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pipelines.cli", COMMAND[stage], *overrides(work, stage, impl, seed, steps, batch)]
    started = time.perf_counter()
    log = folder.parent / f"seed{seed}.log"
    with log.open("w") as handle:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(1), stdout=handle, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage}/{impl}/seed{seed} failed ({proc.returncode}), see {log}")
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # ~0.4 GB each; the curves are what the study keeps
    curves = read_metrics(folder, steps)
    if curves is None:
        raise RuntimeError(f"{stage}/{impl}/seed{seed}: metrics.jsonl incomplete, see {log}")
    print(f"{stage:10s} {impl:8s} seed {seed}: {time.perf_counter() - started:5.0f} s, "
          f"loss {curves['loss'][0]:.3f} -> {curves['loss'][-1]:.3f}", flush=True)
    return curves


def train_all(work: Path, stages, impls, seeds: int, steps: int, batch: int, jobs: int) -> dict:
    """Every (stage, implementation, seed) run; stage 1 first (its default seed-0 run is the P-Former of the others),
    then one stage-2 run alone (it fills the P(y) target cache of that P-Former), then the rest."""
    runs: dict = {s: {i: {} for i in impls} for s in stages}

    def do(key):
        stage, impl, seed = key
        runs[stage][impl][seed] = train_one(work, stage, impl, seed, steps, batch)

    needs_pformer = [s for s in stages if s != "stage1"]
    first = [("stage1", "default", 0)] if (needs_pformer or "stage1" in stages) else []
    phases = [first]
    if "stage1" in stages:
        phases.append([("stage1", i, k) for k in range(seeds) for i in impls if ("stage1", i, k) not in first])
    if needs_pformer:
        warm = (needs_pformer[0], impls[0], 0)
        phases.append([warm])
        phases.append([(s, i, k) for s in needs_pformer for k in range(seeds) for i in impls if (s, i, k) != warm])
    for phase in phases:
        if len(phase) == 1:
            do(phase[0])
            continue
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for future in [pool.submit(do, key) for key in phase]:
                future.result()
    if "stage1" not in stages:
        runs.pop("stage1", None)
    return runs


# ===============================================================================================================
# optimizer-step timing (worker side: one stage's parameters in this process)
def time_optimizer(stage: str, impls, steps: int, threads: int) -> dict:
    import torch

    from benchmarks import bench
    from dvlp_common.config import load_config
    from pipelines import optim
    from pipelines.training import seed_everything

    torch.set_num_threads(threads)
    seed_everything(0)
    spec = {"front": "qformer", "image_size": bench.MAIN_SIZE, "batch": 2, "overrides": []}
    model = bench._SETUPS[SETUP[stage]](spec, torch.device("cpu"), torch.float32)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=generator) * 1e-3 for p in params]
    initial = [p.detach().clone() for p in params]
    stage_cfg = load_config(_stage_config_class(stage), REPO / "configs" / YAML[stage], [])
    out = {"threads": torch.get_num_threads(), "load_average": list(os.getloadavg()), "trainable_params": sum(p.numel() for p in params),
           "tensors": len(params), "ms": {}}
    for impl in impls:
        with torch.no_grad():
            for p, p0 in zip(params, initial):
                p.copy_(p0)
        optimizer = optim.build_optimizer(model, _with(stage_cfg.optim, implementation=impl))
        for p, g in zip(params, grads):
            p.grad = g
        times = []
        for k in range(2 + steps):
            start = time.perf_counter()
            optimizer.step()
            if k >= 2:
                times.append(time.perf_counter() - start)
        out["ms"][impl] = 1e3 * statistics.median(times)
        del optimizer
    return out


def _with(cfg, **changes):
    from dataclasses import replace

    return replace(cfg, **changes)


def _stage_config_class(stage: str):
    if stage == "stage1":
        from pipelines.stage1 import Stage1Config
        return Stage1Config
    if stage == "stage2":
        from pipelines.stage2 import Stage2Config
        return Stage2Config
    from pipelines.generative import GenerativeConfig
    return GenerativeConfig


def time_all(work: Path, stages, impls, steps: int, thread_counts) -> dict:
    timings: dict = {s: {} for s in stages}
    impls = [i for i in impls if i != CONTROL]
    for stage in stages:
        for threads in thread_counts:
            result = work / f"timing_{stage}_{threads}.json"
            if result.exists() and set(impls) <= set(json.loads(result.read_text())["ms"]):
                timings[stage][str(threads)] = json.loads(result.read_text())  # measured by an earlier call
                continue
            cmd = [sys.executable, "-m", "benchmarks.optimizer_study", "--time-stage", stage, "--threads",
                   str(threads), "--timing-steps", str(steps), "--implementations", *impls, "--result", str(result)]
            proc = subprocess.run(cmd, cwd=REPO, env=_env(threads), capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"timing {stage} at {threads} threads failed:\n{proc.stderr[-3000:]}")
            timings[stage][str(threads)] = json.loads(result.read_text())
            ms = timings[stage][str(threads)]["ms"]
            print(f"optimizer step {stage:10s} {threads} thread(s): "
                  + ", ".join(f"{i} {v:.1f} ms" for i, v in ms.items()), flush=True)
    return timings


# ===============================================================================================================
# the kernels alone: identical gradients, so any difference is the kernels' arithmetic (no training dynamics)
class _TinyParams:
    """A weight matrix (decayed), a bias and a norm weight (not decayed), as ``param_groups`` splits a model."""

    @staticmethod
    def build(seed: int):
        import torch

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                g = torch.Generator().manual_seed(seed)
                self.weight = torch.nn.Parameter(torch.randn(256, 64, generator=g) * 0.02)
                self.bias = torch.nn.Parameter(torch.zeros(256))
                self.norm_weight = torch.nn.Parameter(torch.ones(256))

        return Tiny()


def kernel_drift(stage: str, impls, seed: int = 0) -> dict:
    """The stage's YAML optimiser (lr, betas, eps, weight decay, warm-up + cosine schedule, global-norm clipping) on
    a tiny parameter set for the YAML's max_steps, each implementation fed the same gradients every step
    (N(0, 1e-2²), a quarter of the elements N(0, 1e-8²): near Adam's eps; clipped to ``grad_clip`` like the engine
    does). Per step: the largest |p_impl − p_default| of a tensor over that tensor's largest |p_default|, and the
    same for Adam's two moments."""
    import torch

    from dvlp_common.config import load_config
    from pipelines import optim

    cfg = load_config(_stage_config_class(stage), REPO / "configs" / YAML[stage], []).optim
    models = {impl: _TinyParams.build(seed) for impl in impls}
    opts = {impl: optim.build_optimizer(models[impl], _with(cfg, implementation=impl)) for impl in impls}
    scheds = {impl: torch.optim.lr_scheduler.LambdaLR(opts[impl], lambda s: optim.lr_at(s, cfg) / cfg.lr)
              for impl in impls}
    generator = torch.Generator().manual_seed(seed + 1)
    rel = {impl: {"param": [], "exp_avg": [], "exp_avg_sq": []} for impl in impls if impl != "default"}

    def worst(a, b):
        return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(a, b))

    for _ in range(cfg.max_steps):
        grads = []
        for p in models["default"].parameters():
            g = torch.randn(p.shape, generator=generator) * 1e-2
            tiny = torch.rand(p.shape, generator=generator) < 0.25
            grads.append(torch.where(tiny, g * 1e-6, g))
        if cfg.grad_clip:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            grads = [g * min(1.0, cfg.grad_clip / (float(norm) + 1e-6)) for g in grads]
        for impl in impls:
            for p, g in zip(models[impl].parameters(), grads):
                p.grad = g.clone()
            opts[impl].step()
            scheds[impl].step()
        ref = list(models["default"].parameters())
        for impl in rel:
            mine = list(models[impl].parameters())
            rel[impl]["param"].append(worst([p.detach() for p in mine], [p.detach() for p in ref]))
            for key in ("exp_avg", "exp_avg_sq"):
                rel[impl][key].append(worst([opts[impl].state[p][key] for p in mine],
                                            [opts["default"].state[p][key] for p in ref]))
    return {"steps": cfg.max_steps, "lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps,
            "weight_decay": cfg.weight_decay, "grad_clip": cfg.grad_clip, "relative": rel}


# ===============================================================================================================
# statistics
def final_loss(curve: list[float]) -> float:
    return sum(curve[-FINAL_WINDOW:]) / len(curve[-FINAL_WINDOW:])


def analyse(runs: dict, impls) -> dict:
    from pipelines.ablate_stats import mean_std, t_critical

    stats: dict = {}
    for stage, by_impl in runs.items():
        base = by_impl["default"]
        seeds = sorted(base)
        steps = len(base[seeds[0]]["loss"])
        base_curves = [base[k]["loss"] for k in seeds]
        base_mean = [statistics.mean(c[s] for c in base_curves) for s in range(steps)]
        base_std = [statistics.stdev(c[s] for c in base_curves) if len(seeds) > 1 else 0.0 for s in range(steps)]
        stage_stats = {"seeds": seeds, "steps": steps, "default_mean_curve": base_mean, "default_std_curve": base_std}
        for impl in impls:
            mine = by_impl.get(impl, {})
            shared = [k for k in seeds if k in mine]
            finals = [final_loss(mine[k]["loss"]) for k in shared]
            mean, std, n = mean_std(finals)
            diffs = [final_loss(mine[k]["loss"]) - final_loss(base[k]["loss"]) for k in shared]
            d_mean, d_std, _ = mean_std(diffs)
            t = t_critical(n - 1) if n >= 2 else float("nan")
            t_se = t * d_std / math.sqrt(n) if n >= 2 else float("nan")
            per_step = [[mine[k]["loss"][s] - base[k]["loss"][s] for s in range(steps)] for k in shared]
            max_abs = [max(abs(d) for d in row) for row in per_step]
            first_diff = [next((s + 1 for s, d in enumerate(row) if d != 0.0), None) for row in per_step]
            mean_diff = [statistics.mean(row[s] for row in per_step) for s in range(steps)]
            # curve criterion: the seed-mean paired difference stays within the default's seed-to-seed std, per step
            ratio = [abs(m) / sd if sd > 0 else (0.0 if m == 0 else math.inf) for m, sd in zip(mean_diff, base_std)]
            within_t = abs(d_mean) <= t_se if math.isfinite(t_se) else False
            within_curve = max(ratio) <= 1.0
            step_s = [statistics.median(mine[k]["step_s"][1:]) for k in shared]
            stage_stats[impl] = {
                "seeds": n, "final_mean": mean, "final_std": std, "finals": finals,
                "paired_diffs": diffs, "paired_mean": d_mean, "paired_std": d_std, "t_crit": t, "t_se": t_se,
                "max_abs_step_diff_per_seed": max_abs, "max_abs_step_diff": max(max_abs) if max_abs else float("nan"),
                "first_differing_step_per_seed": first_diff, "mean_step_diff": mean_diff,
                "max_mean_step_diff_over_default_std": max(ratio),
                "mean_curve": [statistics.mean(mine[k]["loss"][s] for k in shared) for s in range(steps)],
                "std_curve": [statistics.stdev(mine[k]["loss"][s] for k in shared) if n > 1 else 0.0
                              for s in range(steps)],
                "run_step_s_median": statistics.median(step_s) if step_s else float("nan"),
                "within_t_se": within_t, "within_default_spread": within_curve,
                "follows_default": within_t and within_curve,
            }
        stats[stage] = stage_stats
    return stats


# ===============================================================================================================
# report
def write_report(out: Path, meta: dict, stats: dict, timings: dict, impls, drift: dict) -> None:
    from dvlp_common.io import write_text_atomic

    lines = ["# AdamW kernels: seeded loss-curve study (issue 17)", "",
             f"torch {meta['torch']}, {meta['cpu']}; each run on 1 thread, {meta['jobs']} runs in parallel. Every "
             f"stage runs through `python -m pipelines.cli` in fp32 for {meta['steps']} optimizer steps of "
             f"{meta['batch']} samples (linear warm-up over {meta['warmup']} steps, then cosine to the YAML's "
             f"min_lr), on the shipped YAML's data and learning rate, seeds 0..{meta['seeds'] - 1}. `stage2` = 2a with "
             f"the `qformer` front and the P-Former alignment; `generative` = 2b `qformer` from a fresh front "
             f"(`init_front=null`) with the alignment; both use the P-Former of the (default, seed 0) stage-1 run of "
             f"this study. `default` is torch's own choice, which on CPU is the single-tensor for-loop "
             f"(`_default_to_fused_or_foreach` picks foreach only on CUDA / XPU / MTIA devices).", "",
             "Statistics, per stage and implementation, over the seeds (n):", "",
             f"- final loss = mean of the training loss over the last {FINAL_WINDOW} steps of a run; reported as "
             "mean ± sample std over seeds;",
             "- paired Δ = final loss(impl, seed) − final loss(default, seed): a seed fixes the initialisation and "
             "the batches, so the runs of one seed differ only by the kernel; reported as mean, std and "
             "t·SE = t_{0.975, n−1} · std / √n;",
             "- max |Δ step| = the largest |loss(impl, seed, step) − loss(default, seed, step)| over all steps and seeds;",
             "- spread ratio = max over steps s of |mean over seeds of the per-step Δ(s)| / σ_default(s), with "
             "σ_default(s) the sample std over seeds of the default's loss at step s (the seed-to-seed spread);",
             "- **verdict**: an implementation *follows the default* when |mean paired Δ| ≤ t·SE AND its spread "
             "ratio ≤ 1 (its seed-mean curve never leaves the default's ±1σ seed band). An implementation "
             "bitwise equal to the default has Δ = 0 everywhere and follows it trivially.",
             f"- `{CONTROL}` (when present) is not a kernel: the default kernel with the learning rate times "
             f"(1 + {CONTROL_LR_CHANGE:g}), a change at the level of float32 rounding. Its spread of paired Δ is "
             "what any rounding-level difference produces in these runs, the yardstick for the kernels' Δ.", ""]
    for stage, st in stats.items():
        lines += [f"## {stage}", "",
                  "| implementation | final loss (mean ± std) | paired Δ mean | Δ std | t·SE | max abs Δ step | "
                  "first differing step | spread ratio | optimizer step ms (1 thr) | ratio to default | "
                  f"optimizer step ms ({meta['timing_threads']} thr) | ratio | run s/step | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        t1 = timings.get(stage, {}).get("1", {}).get("ms", {})
        tn = timings.get(stage, {}).get(str(meta["timing_threads"]), {}).get("ms", {})
        for impl in impls:
            s = st[impl]
            first = sorted({f for f in s["first_differing_step_per_seed"] if f is not None})
            verdict = ("identical to default" if s["max_abs_step_diff"] == 0 else
                       "follows default" if s["follows_default"] else
                       "does NOT follow default" + (" (paired Δ beyond t·SE)" if not s["within_t_se"] else "")
                       + (" (curve leaves the seed band)" if not s["within_default_spread"] else ""))
            lines.append(
                f"| {impl} | {s['final_mean']:.4f} ± {s['final_std']:.4f} | {s['paired_mean']:+.4f} | "
                f"{s['paired_std']:.4f} | {s['t_se']:.4f} | {s['max_abs_step_diff']:.3g} | "
                f"{','.join(map(str, first)) if first else '-'} | {s['max_mean_step_diff_over_default_std']:.2f} | "
                f"{_fmt_ms(t1, impl)} | {_ratio(t1, impl)} | {_fmt_ms(tn, impl)} | {_ratio(tn, impl)} | "
                f"{s['run_step_s_median']:.2f} | {verdict} |")
        info = timings.get(stage, {}).get("1", {})
        if info:
            lines += ["", f"{info['trainable_params'] / 1e6:.1f}M trainable parameters in {info['tensors']} tensors. "
                          "Optimizer step: `optimizer.step()` alone on random gradients, median of "
                          f"{meta['timing_steps']} steps after 2 warm-up steps (1-min load average at the start: "
                          + ", ".join(f"{t} thr {timings[stage][t]['load_average'][0]:.1f}" for t in timings[stage])
                          + "; the machine is shared, so a load above the thread count means contended cores). "
                          "Run s/step: median wall time per logged training step of the study's runs (2 runs "
                          "sharing the 2 cores: noisy)."]
        lines.append("")
    if drift:
        lines += ["## The kernels alone (same gradients every step)", "",
                  "Each stage's YAML optimiser (lr, betas, eps, weight decay, warm-up + cosine over its max_steps, "
                  "global-norm clipping) on a tiny parameter set (a 256x64 decayed weight, a bias, a norm weight), "
                  "every implementation fed the same gradients each step (N(0, 1e-2²), a quarter of the elements "
                  "1e-6 times smaller: near eps). Relative difference to default = largest |Δ| of a tensor over "
                  "that tensor's largest |value| (float32 ulp: 1.2e-7 relative).", "",
                  "| stage | steps | lr | implementation | param: max over steps | param: last step | "
                  "exp_avg: max | exp_avg_sq: max |", "|---|---|---|---|---|---|---|---|"]
        for stage, d in drift.items():
            for impl, r in d["relative"].items():
                lines.append(f"| {stage} | {d['steps']} | {d['lr']:g} | {impl} | {max(r['param']):.2g} | "
                             f"{r['param'][-1]:.2g} | {max(r['exp_avg']):.2g} | {max(r['exp_avg_sq']):.2g} |")
        lines.append("")
    lines += ["![top: mean loss ± std over seeds; bottom: mean paired Δ to default and the default's seed band]"
              "(curves.png)", ""]
    write_text_atomic(out / "study.md", "\n".join(lines))


def _fmt_ms(ms: dict, impl: str) -> str:
    return f"{ms[impl]:.1f}" if impl in ms else "-"


def _ratio(ms: dict, impl: str) -> str:
    return f"{ms[impl] / ms['default']:.2f}" if impl in ms and "default" in ms else "-"


def plot(out: Path, stats: dict, impls) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(stats), figsize=(4.2 * len(stats), 6.0), squeeze=False, sharex=True)
    styles = {"default": "-", "foreach": "--", "fused": ":", CONTROL: "-."}
    for col, (stage, st) in enumerate(stats.items()):
        x = list(range(1, st["steps"] + 1))
        top, bottom = axes[0][col], axes[1][col]
        for impl in impls:
            m, s = st[impl]["mean_curve"], st[impl]["std_curve"]
            top.plot(x, m, label=impl, lw=1.2, ls=styles.get(impl, "-"))
            top.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.15)
            if impl != "default":
                bottom.plot(x, st[impl]["mean_step_diff"], label=impl, lw=1.2, ls=styles.get(impl, "-"))
        sd = st["default_std_curve"]
        bottom.fill_between(x, [-v for v in sd], sd, color="grey", alpha=0.2, label="±σ default (seeds)")
        top.set_title(stage)
        top.set_ylabel("training loss (mean ± std)")
        bottom.set_ylabel("mean paired Δ loss vs default")
        bottom.set_xlabel("step")
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    fig.tight_layout()
    tmp = out / ".curves.png.tmp"  # written beside, then renamed over (atomic)
    fig.savefig(tmp, dpi=90, format="png")
    os.replace(tmp, out / "curves.png")
    plt.close(fig)


# ===============================================================================================================
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.optimizer_study", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "docs" / "optimizer_study"), help="folder for study.json/.md/.png")
    p.add_argument("--workdir", default=str(REPO / "runs" / "optimizer_study"), help="run folders (reused)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=16, help="micro batch (one process, no accumulation)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS),
                   choices=("default", "for_loop", "foreach", "fused", CONTROL))
    p.add_argument("--control", action="store_true",
                   help=f"add the arm '{CONTROL}': the default kernel with lr·(1 + {CONTROL_LR_CHANGE:g}), a "
                        "rounding-level change, to show how far such a change alone moves the curves")
    p.add_argument("--timing-steps", type=int, default=10)
    p.add_argument("--timing-threads", type=int, default=2, help="also time at this many threads")
    p.add_argument("--report-only", action="store_true", help="no new runs or timings: report from --workdir")
    p.add_argument("--kernel-drift", action="store_true",
                   help="only the kernels-alone check (seconds): same gradients into every kernel with each stage's "
                        "optimiser settings, per-step relative parameter difference to default; prints a table")
    p.add_argument("--time-stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    impls = list(dict.fromkeys(["default", *args.implementations, *([CONTROL] if args.control else [])]))

    if args.time_stage:  # worker: one stage's optimizer timings
        Path(args.result).write_text(json.dumps(time_optimizer(args.time_stage, impls, args.timing_steps,
                                                               args.threads)))
        return 0

    if args.kernel_drift:  # the small stand-alone reproducer: no runs, no files
        for stage in args.stages:
            d = kernel_drift(stage, [i for i in impls if i != CONTROL])
            for impl, r in d["relative"].items():
                print(f"{stage:10s} lr {d['lr']:g} wd {d['weight_decay']:g} eps {d['eps']:g} clip {d['grad_clip']:g} "
                      f"{d['steps']} steps  {impl:8s} param rel diff: max {max(r['param']):.2g}, last "
                      f"{r['param'][-1]:.2g}; exp_avg max {max(r['exp_avg']):.2g}; exp_avg_sq max "
                      f"{max(r['exp_avg_sq']):.2g}")
        return 0

    import torch

    from dvlp_common.io import write_json_atomic

    work, out = Path(args.workdir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.report_only:
        runs = {s: {i: {k: read_metrics(run_dir(work, s, i, k), args.steps) for k in range(args.seeds)}
                    for i in impls} for s in args.stages}
        missing = [(s, i, k) for s in runs for i in runs[s] for k, v in runs[s][i].items() if v is None]
        if missing:
            sys.exit(f"--report-only: runs missing or incomplete: {missing[:6]}")
        timings = {s: {t: json.loads((work / f"timing_{s}_{t}.json").read_text())
                       for t in ("1", str(args.timing_threads)) if (work / f"timing_{s}_{t}.json").exists()}
                   for s in args.stages}
    else:
        runs = train_all(work, args.stages, impls, args.seeds, args.steps, args.batch, args.jobs)
        timings = time_all(work, args.stages, impls, args.timing_steps,
                           sorted({1, args.timing_threads}))
    stats = analyse(runs, impls)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "cpu") if Path("/proc/cpuinfo").exists() else "cpu"
    meta = {"torch": torch.__version__, "cpu": cpu, "jobs": args.jobs, "steps": args.steps, "batch": args.batch,
            "warmup": max(1, round(0.1 * args.steps)), "seeds": args.seeds, "timing_steps": args.timing_steps,
            "timing_threads": args.timing_threads, "final_window": FINAL_WINDOW,
            "wall_s": time.perf_counter() - started}
    if args.report_only and (out / "study.json").exists():  # keep the wall time of the call that ran the study
        meta["wall_s"] = json.loads((out / "study.json").read_text())["meta"].get("wall_s", meta["wall_s"])
    drift = {stage: kernel_drift(stage, [i for i in impls if i != CONTROL]) for stage in args.stages}
    write_json_atomic(out / "study.json", {"meta": meta, "runs": runs, "stats": stats, "timings": timings,
                                           "kernel_drift": drift}, indent=None)
    write_report(out, meta, stats, timings, impls, drift)
    try:
        plot(out, stats, impls)
    except ImportError:
        pass
    print(f"wrote {out / 'study.md'} ({meta['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
