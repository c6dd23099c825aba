"""Paired A/B timing of two training steps (one step under two sets of overrides, or two steps) in one process.

    python -m benchmarks.ab --step representation/qformer --a deepspeed.cpu_dropout=torch \\
        --b deepspeed.cpu_dropout=bits [--set front.num_query_tokens=32] [--batch 32] [--rounds 12] [--out DIR]
    python -m benchmarks.ab --step reference/features --step-b generative/qformer    # transformers' BLIP-2 vs ours
    python -m benchmarks.ab --step generative/tome --set data.source=embedded:motion --set front.video.enabled=true \
        --a front.video.num_frames=1 "front.video.blocks=[]" --b "front.video.blocks=[8,9,10,11]"   # video vs frame

Why: on a shared VM the machine's speed drifts between processes (the matmul peak measured by ``benchmarks.bench``
moved between 0.47 and 0.71 TFLOP/s in consecutive runs here), so two separate benchmark runs cannot resolve a 10%
change. Here both steps are built in the same process (``benchmarks.bench.build_step``, as the stages build them,
the same seed), and each round times one step of each, in alternating order; the per-round ratio B/A pairs two steps
taken seconds apart. Reports each arm's median step time, the median and spread of the paired ratios, and how many
rounds B was faster. Writes ``DIR/ab.json`` and ``DIR/ab.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from benchmarks import bench
from dvlp_common.memory import keep_freed_memory

# name -> (stage, front, vision input of the transformers reference)
STAGES = {"stage1": ("stage1", None, None), "representation/qformer": ("representation", "qformer", None),
          "representation/elip": ("representation", "elip", None),
          "representation/qformer+tower": ("representation", bench.LIVE_TOWER_QFORMER, None),
          "generative/qformer": ("generative", "qformer", None), "generative/tome": ("generative", "tome", None),
          "generative/elip": ("generative", "elip", None),
          "reference/features": ("reference", "blip2_hf_features", "features"),
          "reference/pixels": ("reference", "blip2_hf_pixels", "pixels")}


def _cpu() -> str:
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def build(step: str, overrides: list[str], batch: int, device, dtype, image_size: int = bench.MAIN_SIZE):
    """One arm: a step closure over its own model and optimizer (seed 0, as the benchmark builds it)."""
    import torch

    from dvlp_common import precision
    from dvlp_common.seeding import seed_everything
    from pipelines import optim

    stage, front, vision_input = STAGES[step]
    seed_everything(0)
    spec = {"stage": stage, "front": front, "image_size": image_size, "batch": batch, "overrides": overrides,
            "vision_input": vision_input}
    model, loss_fn, _ledger, _tokens, _shapes, optim_cfg, kernels = bench.build_step(spec, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optim.build_optimizer(model, optim_cfg)

    def run() -> float:  # one timed step, under this arm's CPU kernel settings (process-wide, so set each time)
        bench.use_kernels(kernels)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast(device, dtype):
            loss, _ = loss_fn()
        loss.backward()
        if optim_cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, optim_cfg.grad_clip)
        optimizer.step()
        return time.perf_counter() - start

    from dvlp_common.cpu_kernels import BitDropout

    return run, sum(isinstance(m, BitDropout) for m in model.modules())


def measure(step: str, a: list[str], b: list[str], common: list[str], batch: int, rounds: int, warmup: int,
            step_b: str | None = None, image_size: int = bench.MAIN_SIZE) -> dict:
    """Arm A is ``step`` with overrides ``a``; arm B is ``step_b`` (default: the same step) with overrides ``b``."""
    import torch

    from dvlp_common import precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = precision.compute_dtype("auto", device)
    built = {"A": build(step, [*common, *a], batch, device, dtype, image_size),
             "B": build(step_b or step, [*common, *b], batch, device, dtype, image_size)}
    arms = {name: run for name, (run, _) in built.items()}
    for _ in range(warmup):
        for run in arms.values():
            run()
    times: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(rounds):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")  # alternate who goes first
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(arms[name]())
            if device.type == "cuda":
                torch.cuda.synchronize()
    ratios = [tb / ta for ta, tb in zip(times["A"], times["B"])]
    return {"step": step, "step_b": step_b or step, "batch": batch, "image_size": image_size, "dtype": str(dtype).replace("torch.", ""),
            "device": device.type,
            "threads": torch.get_num_threads(), "cpu": _cpu(), "common": common, "a": a, "b": b, "rounds": rounds,
            "times_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
            "ratios_b_over_a": ratios, "median_ratio": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)], "b_faster_rounds": sum(x < 1 for x in ratios),
            "dropout_modules": {name: swapped for name, (_, swapped) in built.items()}}


def write(result: dict, out: Path) -> None:
    from dvlp_common.io import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "ab.json", result)
    med = result["median_s"]
    steps = result["step"] if result["step_b"] == result["step"] else f"{result['step']} vs {result['step_b']}"
    lines = [f"# A/B: {steps} ({result['image_size']} px, batch {result['batch']}, {result['dtype']}, {result['threads']} threads, "
             f"{result['cpu']})", "",
             f"Common overrides: {' '.join(result['common']) or 'none'}; A: {result['step']} "
             f"{' '.join(result['a'])}; B: {result['step_b']} {' '.join(result['b'])}. {result['rounds']} rounds, "
             "one step of each per round in "
             "alternating order, one process.", "",
             "| arm | median s/step |", "|---|---|",
             f"| A | {med['A']:.3f} |", f"| B | {med['B']:.3f} |", "",
             f"Paired B/A per round: median {result['median_ratio']:.3f} (range {result['ratio_range'][0]:.3f}-"
             f"{result['ratio_range'][1]:.3f}); B faster in {result['b_faster_rounds']} of {result['rounds']} rounds; "
             f"speed-up A/B {1 / result['median_ratio']:.2f}x."]
    write_text_atomic(out / "ab.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n")[0])
    p.add_argument("--step", required=True, choices=sorted(STAGES))
    p.add_argument("--step-b", default=None, choices=sorted(STAGES),
                   help="arm B's step when it differs from arm A's (e.g. generative/qformer against "
                        "reference/features, transformers' Blip2ForConditionalGeneration on the same batch)")
    p.add_argument("--a", nargs="*", default=[], help="overrides of arm A")
    p.add_argument("--b", nargs="*", default=[], help="overrides of arm B")
    p.add_argument("--set", action="append", default=[], help="an override of both arms (repeatable)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=bench.MAIN_SIZE)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None, help="folder for ab.json / ab.md")
    args = p.parse_args(argv)
    keep_freed_memory()
    result = measure(args.step, args.a, args.b, args.set, args.batch, args.rounds, args.warmup,
                     args.step_b, args.image_size)
    if args.out:
        write(result, Path(args.out))
    print(json.dumps({k: result[k] for k in ("step", "median_s", "median_ratio", "ratio_range", "b_faster_rounds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
