"""What one cell of an ablation grid costs on this machine, before the grid is launched.

    python -m benchmarks.cell --config configs/ablate_fair.yaml [--arm pformer:100] [--target-minutes 15]

A cell is an arm's stage 2a (``stage2_steps``, when the arm has one) and its generative stage
(``generative_steps``); stage 1 runs once per grid and is reported beside it. Each stage's training step is built
as ``benchmarks.bench`` builds it, at the grid's shapes (its dataset's captions, the stage overrides of the grid and
the arm's settings and weights, the stage's micro-batch), timed after warm-up in a fresh subprocess, and its model
FLOPs counted from the architecture. The report gives, per stage and for the cell:

* the projected training time: steps x the measured median step time (x gradient-accumulation steps);
* the floor: steps x FLOPs per step / the matmul peak measured in the same run, the time at 100% MFU; no kernel work
  can go below it on this machine, so a target under the floor needs fewer FLOPs (steps, batch, sizes) or another
  machine.

Evaluation, checkpoints and data loading are not in the projection. Writes ``DIR/cell.json`` and ``DIR/cell.md``
(default ``runs/bench_cell``).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks import bench


def stage_overrides(cfg, arm_name: str) -> dict[str, list[str]]:
    """The config overrides that shape each stage's step in one cell of ``cfg`` (an ``AblateConfig``), as
    ``pipelines.ablate.run_cell`` composes them; paths, logging and evaluation settings left out (they do not change
    the step). Stage 1 is the grid's; a representation stage only for arms that have one."""
    from dvlp_common.config import ConfigError
    from pipelines.ablate import arm_of, arm_settings

    arm = arm_of(arm_name)
    if arm.video is not None:
        raise ConfigError("arms", f"{arm_name!r}: the video fronts' steps are not built by benchmarks.bench; time "
                                  "them from a cell's generative_summary.json (samples/s)")
    common = [f"data.source={cfg.dataset}", f"front.kind={arm.front}", f"align.kind={arm.kind}"]
    out = {"stage1": [f"data.source={cfg.dataset}", *cfg.stage1_overrides]}
    if arm.front != "tome" and arm.representation:
        out["representation"] = [*common, f"align.weight={arm.w1}", *cfg.stage2_overrides, *arm_settings(arm)]
    out["generative"] = [*common, f"align.weight={arm.w2}", *cfg.generative_overrides, *arm_settings(arm)]
    return out


def _stage_shape(stage: str, front: str | None, overrides: list[str]) -> tuple[int, int, int]:
    """(micro-batch, gradient-accumulation steps, image size) of a stage's config with these overrides."""
    stage_cfg = bench.stage_config(stage, front, overrides)
    vision = getattr(stage_cfg, "vision", None)
    return (stage_cfg.optim.micro_batch_size, stage_cfg.optim.grad_accum_steps,
            vision.image_size if vision is not None else bench.MAIN_SIZE)


def plan(cfg, arm_name: str, device: str, dtype: str, warmup: int, steps: int) -> list[dict]:
    """The measurements: the matmul peak, then one step per stage of the cell (and stage 1)."""
    from pipelines.ablate import arm_of

    # the peak before and after the steps: on shared VMs it drifts between processes (0.42-0.71 TFLOP/s bf16 seen on
    # one 2-core EPYC); the higher one sets the floor, so that the floor is not flattered by a slow moment
    cases = [bench.peak_spec(device, repeats=5)]
    counts = {"stage1": cfg.stage1_steps, "representation": cfg.stage2_steps, "generative": cfg.generative_steps}
    arm_front = arm_of(arm_name).front
    for stage, overrides in stage_overrides(cfg, arm_name).items():
        front = None if stage == "stage1" else arm_front
        batch, accumulation, image_size = _stage_shape(stage, front, overrides)
        cases.append({"name": stage, "kind": "step", "stage": stage, "front": front, "device": device,
                      "dtype": dtype, "image_size": image_size, "batch": batch, "overrides": overrides,
                      "warmup": warmup, "steps": steps, "count_executed": False,
                      "cell_steps": counts[stage], "accumulation": accumulation})
    cases.append(bench.peak_spec(device, repeats=5, name="matmul_peak_after"))
    return cases


def assemble(results: list[dict], target_minutes: float | None) -> dict:
    """Per stage and for the cell: projected seconds at the measured step time, and the floor at the matmul peak."""
    peaks = [r["peak"] for r in results if r["spec"]["kind"] == "peak" and "error" not in r]
    best = {dtype: max(p[dtype]["tflops"] for p in peaks) for dtype in peaks[0]}
    stages = {}
    for r in results:
        spec = r["spec"]
        if spec["kind"] != "step":
            continue
        if "error" in r:
            stages[spec["name"]] = {"error": r["error"], "log_tail": r.get("log_tail", "")}
            continue
        peak = best[spec["dtype"]] * 1e12
        step_s = r["step_time_s"] * spec["accumulation"]
        flops = r["flops_per_sample"]["total"] * spec["batch"] * spec["accumulation"]
        stages[spec["name"]] = {
            "steps": spec["cell_steps"], "batch": spec["batch"] * spec["accumulation"], "s_per_step": step_s,
            "step_times_s": r["step_times_s"], "gflop_per_step": flops / 1e9, "floor_s_per_step": flops / peak,
            "mfu": flops / peak / step_s, "projected_s": spec["cell_steps"] * step_s,
            "floor_s": spec["cell_steps"] * flops / peak, "peak_rss_mb": r["peak_rss_mb"]}
    cell_stages = [s for name, s in stages.items() if name != "stage1" and "error" not in s]
    cell = {"projected_s": sum(s["projected_s"] for s in cell_stages),
            "floor_s": sum(s["floor_s"] for s in cell_stages)}
    if target_minutes:
        cell["target_s"] = target_minutes * 60
        # the MFU the cell would need on this machine to fit the target (above 1: no kernel work can reach it)
        cell["mfu_needed"] = cell["floor_s"] / cell["target_s"]
        cell["speedup_needed"] = cell["projected_s"] / cell["target_s"]
    return {"peak_tflops": best, "peaks_measured_tflops": [{k: v["tflops"] for k, v in p.items()} for p in peaks],
            "stages": stages, "cell": cell}


def _minutes(s: float) -> str:
    return f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.2f} h"


def write_markdown(report: dict, path: Path) -> None:
    m, r = report["machine"], report["result"]
    lines = [f"# Cost of one cell: `{report['config']}`, arm `{report['arm']}`\n",
             f"Machine: {m['gpu'] or m['cpu']}; {m['usable_cores']} usable cores, {m['torch_threads']} torch threads; "
             f"torch {m['torch']}. Load average (1 min) {m['load_average_start'][0]:.2f} at the start, "
             f"{report['load_average_end'][0]:.2f} at the end (other work on the machine slows the steps). "
             f"Compute dtype **{report['dtype']}**; matmul peak, the higher of its measurements before and after the "
               "steps: " + ", ".join(f"{k} {v * 1e3:.0f} GFLOP/s (measured "
                                     + " and ".join(f"{p[k] * 1e3:.0f}" for p in r["peaks_measured_tflops"]) + ")"
                                     for k, v in r["peak_tflops"].items())
             + f". {report['timed_steps']} timed steps per stage after {report['warmup_steps']} warm-up steps. "
               f"Total wall time {report['wall_s']:.0f} s.\n",
             "| stage | steps | batch | s/step (median) | GFLOP/step | s/step at 100% MFU | MFU | projected | floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in r["stages"].items():
        if "error" in s:
            lines.append(f"| {name} | error: {s['error']} | | | | | | | |")
            continue
        label = name + (" (once per grid)" if name == "stage1" else "")
        lines.append(f"| {label} | {s['steps']} | {s['batch']} | {s['s_per_step']:.3f} | {s['gflop_per_step']:.0f} | "
                     f"{s['floor_s_per_step']:.3f} | {100 * s['mfu']:.1f}% | {_minutes(s['projected_s'])} | "
                     f"{_minutes(s['floor_s'])} |")
    cell = r["cell"]
    lines += ["", f"**One cell** (stage 2a + generative training; evaluation not included): projected "
                  f"**{_minutes(cell['projected_s'])}**, floor at the matmul peak {_minutes(cell['floor_s'])}."]
    if "target_s" in cell:
        verdict = ("reachable by kernel work alone" if cell["mfu_needed"] <= 1 else
                   "below the floor: no kernel work reaches it on this machine at these step counts and shapes")
        lines.append(f"Target {_minutes(cell['target_s'])}: {cell['speedup_needed']:.1f}x faster than measured, "
                     f"{100 * cell['mfu_needed']:.0f}% MFU needed ({verdict}).")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cell", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="an ablation grid's YAML (configs/ablate_*.yaml)")
    p.add_argument("--arm", default=None, help="the arm whose cell is timed (default: the grid's first aligning arm, "
                                               "else its first arm)")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first (the first steps fault in fresh pages)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per stage")
    p.add_argument("--target-minutes", type=float, default=None, help="say what a cell in this time would need")
    p.add_argument("--out", default=str(bench.REPO / "runs" / "bench_cell"))
    p.add_argument("--timeout", type=float, default=1200, help="seconds per measurement")
    p.add_argument("overrides", nargs="*", help="overrides of the grid's config, e.g. stage2_steps=1500")
    args = p.parse_args(argv)

    import torch

    from dvlp_common import precision
    from dvlp_common.config import load_config
    from pipelines.ablate import AblateConfig, arm_of

    cfg = load_config(AblateConfig, args.config, args.overrides)
    arm = args.arm or next((a for a in cfg.arms if arm_of(a).w1 or arm_of(a).w2), cfg.arms[0])
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = str(precision.compute_dtype("auto", torch.device(device))).replace("torch.", "")
    cases = plan(cfg, arm, device, dtype, args.warmup, args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in cases:
        results.append(bench.measure_in_subprocess(spec, out / "logs", args.timeout))
        r = results[-1]
        msg = r.get("error") or (f"{r['step_time_s']:.3f} s/step" if spec["kind"] == "step" else
                                 ", ".join(f"{k} {v['tflops'] * 1e3:.0f} GFLOP/s" for k, v in r["peak"].items()))
        print(f"{spec['name']}: {msg} ({r['wall_s']:.0f} s)", flush=True)
    if all("error" in r for r in results if r["spec"]["kind"] == "peak"):
        print(f"the matmul peak failed: {results[0]['error']}", flush=True)
        return 1
    report = {"config": args.config, "arm": arm, "overrides": args.overrides, "dtype": dtype,
              "machine": bench.machine_info(device), "warmup_steps": args.warmup, "timed_steps": args.steps,
              "result": assemble(results, args.target_minutes), "wall_s": time.perf_counter() - start,
              "load_average_end": list(os.getloadavg())}
    (out / "cell.json").write_text(json.dumps(report, indent=2))
    write_markdown(report, out / "cell.md")
    print((out / "cell.md").read_text(), flush=True)
    return 1 if any("error" in s for s in report["result"]["stages"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
