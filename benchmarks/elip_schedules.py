"""What an ELIP pruning schedule saves in the frozen tower once its look-ahead is paid for: analytic forward FLOPs
(``benchmarks.flops``, the ledger the step benchmark uses) of the pruned ViT, look-ahead blocks and scoring included,
against the unpruned ViT, for several towers and schedules.

    python -m benchmarks.elip_schedules [--out DIR]

ELIP scores the patches at a pruning point by running the next ``lookahead_depth - 1`` blocks on a text-guided copy
of the sequence (all tokens), then prunes; the paper's schedule (after layers 2, 4, 10, depths 2, 6, 2, keep
0.90 / 0.65 / 0.40 of the patches) spends 7 full-length blocks on look-ahead in a 12-block ViT, which is what its
token savings must beat. Writes ``DIR/elip_schedules.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.flops import NONE, EncoderDims, FlopLedger, ViTDims, elip_vit, vit

# towers: ours (DINOv2-S/14), the ViT-B/16 ELIP reports on, BLIP-2's EVA ViT-g/14 (40 blocks)
TOWERS = {
    "dinov2-s14": ViTDims(EncoderDims(384, 12, 6, 1536), 14, special_tokens=1),
    "vit-b16": ViTDims(EncoderDims(768, 12, 12, 3072), 16, special_tokens=1),
    "eva-vit-g14": ViTDims(EncoderDims(1408, 40, 16, 6144), 14, special_tokens=1),
}
# (name, prune_after_layers, lookahead_depths, keep_ratios) for 12-block towers (see ``_scaled`` for deeper ones);
# a look-ahead depth of 1 scores with the next block's [CLS] attention alone (no extra block)
SCHEDULES = [
    ("paper", (2, 4, 10), (2, 6, 2), (0.90, 0.65, 0.40)),
    ("paper, look-ahead 1", (2, 4, 10), (1, 1, 1), (0.90, 0.65, 0.40)),
    ("paper, look-ahead 2", (2, 4, 10), (2, 2, 2), (0.90, 0.65, 0.40)),
    ("early, look-ahead 1", (3, 6, 9), (1, 1, 1), (0.70, 0.50, 0.35)),
    ("one point after 4, look-ahead 1", (4,), (1,), (0.50,)),
]


def _scaled(schedule, layers: int):
    """A 12-block schedule on a deeper tower: the pruning points at the same relative depth; the paper's look-ahead
    depths scaled alike (its proportions), the fixed ones (1, 2) kept."""
    name, after, depths, keep = schedule
    scale = layers / 12
    after = tuple(max(1, round(a * scale)) for a in after)
    if name == "paper":
        depths = tuple(max(1, round(d * scale)) for d in depths)
    return after, depths, keep


def analyse(image_size: int = 224) -> list[dict]:
    from vl_align.elip import ElipConfig

    rows = []
    for tower, dims in TOWERS.items():
        full = FlopLedger()
        vit(full, "vision", 1, image_size, dims, NONE)
        for schedule in SCHEDULES:
            after, depths, keep = _scaled(schedule, dims.enc.layers)
            cfg = ElipConfig(prune_after_layers=after, lookahead_depths=depths, keep_ratios=keep)
            if any(a + d > dims.enc.layers for a, d in zip(after, depths)):
                continue
            led = FlopLedger()
            info = elip_vit(led, "vision", 1, image_size, dims, cfg)
            scoring = sum(f + b for part, (f, b) in led.parts.items() if part.endswith("_elip_scoring"))
            rows.append({"tower": tower, "image_size": image_size, "schedule": schedule[0],
                         "prune_after_layers": list(after), "lookahead_depths": list(depths),
                         "keep_ratios": list(keep), "mean_tokens_per_layer": info["mean_tokens_per_layer"],
                         "unpruned_tokens": info["unpruned_tokens"],
                         "token_reduction": 1 - info["mean_tokens_per_layer"] / info["unpruned_tokens"],
                         "gflops": led.total / 1e9, "unpruned_gflops": full.total / 1e9,
                         "lookahead_share": scoring / led.total, "speedup_bound": full.total / led.total})
    return rows


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "elip_schedules.json").write_text(json.dumps(rows, indent=1))
    lines = ["# ELIP schedules: forward FLOPs of the frozen tower at 224 px (analytic)", "",
             "| tower | schedule | after | depths | keep | tokens/layer (of) | token reduction | GFLOP (unpruned) | "
             "look-ahead share | FLOP speed-up bound |", "|---|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['tower']} | {r['schedule']} | {r['prune_after_layers']} | {r['lookahead_depths']} | "
                     f"{r['keep_ratios']} | {r['mean_tokens_per_layer']:.1f} ({r['unpruned_tokens']}) | "
                     f"{r['token_reduction']:.0%} | {r['gflops']:.1f} ({r['unpruned_gflops']:.1f}) | "
                     f"{r['lookahead_share']:.0%} | {r['speedup_bound']:.2f}x |")
    (out / "elip_schedules.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.elip_schedules", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "runs" / "elip_schedules"))
    args = p.parse_args(argv)
    rows = analyse()
    write(rows, Path(args.out))
    print((Path(args.out) / "elip_schedules.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
