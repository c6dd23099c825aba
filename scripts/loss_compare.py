"""Loss-comparison run: guards refactors (torchtitan's practice). Runs every stage for a few seeded steps through
the ``dvlp`` command line, with every step logged, and writes the per-step losses to one JSON; ``compare`` then
checks two such files step by step.

    python scripts/loss_compare.py run --out before.json [--steps 6] [--workdir DIR]
    python scripts/loss_compare.py compare before.json after.json [--atol 1e-6]

The command line and its config keys are the interface, so the same script measures the code before and after a
change (run it from each checkout). fp32 throughout: a bf16 probe that decides differently on two days would make
two runs of the same code differ.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

COMMON = ["deepspeed.precision=fp32", "logging.log_every=1", "logging.tensorboard=false",
          "logging.progress_bar=false", "seed=3"]


def stage_runs(work: Path, steps: int) -> list[tuple[str, str, list[str]]]:
    """(name, subcommand, overrides) in dependency order: stage 1 feeds the P-Former, stage 2a the init front."""
    budget = [f"optim.max_steps={steps}", "optim.warmup_steps=2", "optim.micro_batch_size=8",
              f"logging.save_every={steps}"]
    pformer = str(work / "stage1" / "pformer")
    pairs = ["data.max_pairs=64", f"pformer={pformer}"]
    return [
        ("stage1", "stage1", budget + [f"logging.output_dir={work / 'stage1'}", "data.holdout=16"]),
        ("stage2_qformer", "stage2", budget + pairs + [f"logging.output_dir={work / 'stage2_qformer'}",
                                                       "eval.enabled=false"]),
        ("stage2_elip", "stage2", budget + pairs + [f"logging.output_dir={work / 'stage2_elip'}", "front.kind=elip",
                                                    "eval.enabled=false"]),
        ("generative_qformer", "generate-stage",
         budget + pairs + [f"logging.output_dir={work / 'generative_qformer'}", "eval.enabled=false",
                           f"init_front={work / 'stage2_qformer' / 'front'}"]),
        ("generative_tome", "generate-stage",
         budget + pairs + [f"logging.output_dir={work / 'generative_tome'}", "eval.enabled=false", "front.kind=tome",
                           "init_front=null", "align.weight=0"]),
        ("generative_elip", "generate-stage",
         budget + pairs + [f"logging.output_dir={work / 'generative_elip'}", "eval.enabled=false", "front.kind=elip",
                           "init_front=null"]),
    ]


def run(out: Path, steps: int, workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    result = {"steps": steps, "stages": {}}
    for name, command, overrides in stage_runs(workdir, steps):
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "pipelines.cli", command, *overrides, *COMMON]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        rows = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
        keep = [k for k in rows[0] if k not in ("step", "lr", "epoch", "samples_per_s", "elapsed_s")]
        result["stages"][name] = {k: [r[k] for r in rows] for k in keep}
        print(f"{name}: {time.perf_counter() - started:.0f} s, loss {[round(v, 4) for v in result['stages'][name]['loss']]}",
              flush=True)
    out.write_text(json.dumps(result, indent=1))


def compare(a: Path, b: Path, atol: float) -> int:
    left, right = json.loads(a.read_text())["stages"], json.loads(b.read_text())["stages"]
    worst_all = 0.0
    for name in left:
        if name not in right:
            print(f"{name}: missing in {b}")
            worst_all = math.inf
            continue
        for key in left[name]:
            x, y = left[name][key], right[name].get(key)
            if y is None or len(x) != len(y):
                print(f"{name}.{key}: missing or of another length in {b}")
                worst_all = math.inf
                continue
            worst = max(abs(p - q) for p, q in zip(x, y))
            worst_all = max(worst_all, worst)
            print(f"{name:20s} {key:12s} steps {len(x)}  max |Δ| {worst:.3g}  last {x[-1]:.6f} vs {y[-1]:.6f}")
    print(f"largest difference {worst_all:.3g} (tolerance {atol:g})")
    return 0 if worst_all <= atol else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--workdir", type=Path, default=Path("runs/loss_compare"))
    p = sub.add_parser("compare")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--atol", type=float, default=1e-6)
    args = parser.parse_args()
    if args.command == "run":
        run(args.out, args.steps, args.workdir)
        return 0
    return compare(args.a, args.b, args.atol)


if __name__ == "__main__":
    sys.exit(main())
