"""The ablation's report files in its ``output_dir``: ``results.md`` (tables of mean ± std, the comparisons to the
baseline arm, time to its quality, the fraction of its data gap each arm closes), ``results.csv`` (one row per cell), ``results.json`` (cells, groups,
comparisons), the PNG plots (loss curves, quality against training time, metrics against the number of pairs) and
``captions.md`` (a gallery of held-out captions per arm). ``cfg`` is the grid's :class:`pipelines.ablate.AblateConfig`
(not imported: :mod:`pipelines.ablate` imports this module).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from dvlp_common.io import writing_file

from .ablate_stats import mean_curve, multiplicity_note, slot_keys


def _pm(mean: float, std: float, seeds: int, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def video_section(groups: list[dict]) -> list[str]:
    """The key-word accuracy of each caption family per arm, with the frames as fed, reversed and shuffled (video
    grids; nothing for image grids)."""
    from dvlp_common.reports import markdown_table

    if not any(math.isfinite(g.get("kw_order", float("nan"))) for g in groups):
        return []
    cols = (("order", "kw_order"), ("set", "kw_set"), ("order, reversed", "kw_order_reversed"),
            ("order, reversed (shown)", "kw_order_reversed_shown"), ("set, reversed", "kw_set_reversed"),
            ("order, shuffled", "kw_order_shuffled"), ("set, shuffled", "kw_set_shuffled"))
    table = [{"arm": g["arm"], "pairs": g["pairs"], "lr": f"{g['lr']:g}", "seeds": g["seeds"],
              **{name: _pm(g[key], g[f"{key}_std"], g["seeds"]) for name, key in cols},
              "s / step (2b)": f"{g['seconds_per_step']:.2f}"} for g in groups]
    return ["## Key-word accuracy per caption family (held-out clips)", "",
            ("Share of captions that hold every key word of the clip's label and none of its contrast words. Order "
            "family: the answer depends on frame order (a clip and its time reversal, opposite captions; 0.5 for a "
            "model that names one side at random). Set family: needs more than one frame, not their order. "
            "Reversed: the same clips fed backwards, scored against their own labels and against what the "
            "reversed frames show (the pair partner's label); an order-aware model flips, an order-blind one does "
            "not change. Shuffled: a seeded permutation that is neither the order nor its reversal."), "",
            markdown_table(table), ""]


def alignment_section(groups: list[dict]) -> list[str]:
    """Per arm: how far stage 2a and the generative stage aligned W·Z to P(y), the weighted alignment term's share of
    the other losses, and what the alignment is for, measured before any LM training (issue 19's mechanism): zero-shot
    captions from W·Z and the LLM's held-out caption loss at generative step 0. Nothing for grids without P(y)."""
    from dvlp_common.reports import markdown_table

    keys = ("align_r2_2a", "heldout_align_r2_2a", "align_share_2a", "align_r2_2b", "align_share_2b",
            "zero_shot_CIDEr_2a", "heldout_lm_step0")
    if not any(math.isfinite(g.get(k, float("nan"))) for g in groups for k in keys):
        return []
    names = ("R² 2a (train)", "R² 2a (held-out)", "ω₁·MSE share 2a", "R² 2b (train)", "ω₂·MSE / LM 2b",
             "zero-shot CIDEr from W·Z", "step-0 LM loss (nats)")
    table = [{"arm": g["arm"], "pairs": g["pairs"], "lr": f"{g['lr']:g}", "seeds": g["seeds"],
              **{name: _pm(g.get(k, float("nan")), g.get(f"{k}_std", float("nan")), g["seeds"])
                 for name, k in zip(names, keys)}} for g in groups]
    return ["## The alignment and what it is for", "",
            ("R²: 1 - MSE(W·Z, P(y)) / MSE(corpus-mean prompt, P(y)) at the end of each stage (0: no better than the "
             "one prompt of the whole corpus); train = the last logged training batches, held-out = held-out images "
             "(stage2_overrides=[align_curve.every=N]). Shares: the weighted alignment term over the other losses at "
             "the end (the authors' logs: about 1.9% of ITC+ITM+ITG over stage 2a's first epoch and 0.34% in its "
             "last; about 0.15 of the LM loss in the generative stage). Zero-shot CIDEr and step-0 loss: W·Z through "
             "the frozen LLM after stage 2a, before any LM training (the authors' P-Former run starts the generative "
             "stage 1.27 nats below their baseline)."), "", markdown_table(table), ""]


def slots_section(groups: list[dict]) -> list[str]:
    """What the held-out captions get right, slot by slot of the scenes template, per arm: after the generative
    stage and zero-shot from W·Z after stage 2a (scenes grids; nothing elsewhere)."""
    from dvlp_common.reports import markdown_table

    lines = []
    for prefix, title in (("slot", "after the generative stage"), ("zero_shot_slot", "zero-shot from W·Z after stage 2a")):
        keys = slot_keys(prefix)
        shown = [g for g in groups if any(math.isfinite(g.get(k, float("nan"))) for k in keys.values())]
        if not shown:
            continue
        table = [{"arm": g["arm"], "pairs": g["pairs"], "lr": f"{g['lr']:g}", "seeds": g["seeds"],
                  **{name.replace("_", "-"): _pm(g[k], g[f"{k}_std"], g["seeds"]) for name, k in keys.items()}}
                 for g in shown]
        lines += [f"## Caption slots, {title} (held-out images)", "",
                  ("Share of captions naming the reference's value in each slot of the scenes template (a caption "
                   "off the template counts wrong in every slot; well-formed: the share on it)."), "",
                  markdown_table(table), ""]
    return lines


def report_markdown(cfg, cells: list[dict], groups: list[dict], comparisons: list[dict], stage1_md: str,
                    wall_seconds: float, time_to_quality: list[dict] = (), *, descriptions: dict[str, str],
                    gaps_closed: list[dict] = ()) -> str:
    """The text of results.md; ``descriptions``: arm -> its one-line description, for every arm of ``cfg.arms``."""
    from dvlp_common.reports import markdown_table

    table = [{"arm": g["arm"], "pairs": g["pairs"], "lr": f"{g['lr']:g}", "seeds": g["seeds"],
              "CIDEr": _pm(g["CIDEr"], g["CIDEr_std"], g["seeds"]),
              "exact": _pm(g["exact_match"], g["exact_match_std"], g["seeds"]),
              "METEOR": _pm(g["METEOR"], g["METEOR_std"], g["seeds"]),
              "ROUGE-L": _pm(g["ROUGE_L"], g["ROUGE_L_std"], g["seeds"]),
              "VQA acc": _pm(g["vqa_accuracy"], g["vqa_accuracy_std"], g["seeds"]),
              "retrieval R̄ (ITC)": _pm(g["retrieval_itc_r_mean"], g["retrieval_itc_r_mean_std"], g["seeds"]),
              "final LM loss": _pm(g["final_lm"], g["final_lm_std"], g["seeds"]),
              "collapse": f"{g['collapse_rate']:.0%}", "train s": f"{g['train_seconds']:.0f}",
              "samples/s": f"{g['samples_per_s']:.1f}", "tokens to LLM": f"{g['prefix_tokens']:g}"} for g in groups]
    comp = [{"arm": c["arm"], "pairs": c["pairs"], "lr": f"{c['lr']:g}", "metric": c["metric"],
             "vs": c.get("vs", cfg.baseline), "Δ": f"{c['delta']:+.3f}", "2·SE": f"{2 * c['se']:.3f}" if math.isfinite(c["se"]) else "—",
             "verdict": c["verdict"], "paired Δ": f"{c['paired_delta']:+.3f}" if c["paired_seeds"] else "—",
             "t·SE (paired)": (f"{c['paired_t_crit'] * c['paired_se']:.3f}" if math.isfinite(c["paired_se"])
                               else "—"),
             "paired verdict": c["paired_verdict"]} for c in comparisons]
    speed = [{"arm": t["arm"], "pairs": t["pairs"], "lr": f"{t['lr']:g}",
              f"{cfg.baseline} final CIDEr": f"{t['target_CIDEr']:.3f}",
              "s to reach it": f"{t['seconds_to_target']:.0f}" if math.isfinite(t["seconds_to_target"]) else "never",
              f"{cfg.baseline} total s": f"{t['baseline_seconds']:.0f}",
              "ratio": f"{t['ratio']:.2f}" if math.isfinite(t["ratio"]) else "—",
              "own final CIDEr": f"{t['final_CIDEr']:.3f}", "own total s": f"{t['final_seconds']:.0f}"}
             for t in time_to_quality]
    arms = "\n".join(f"- `{a}`: {descriptions[a]}" for a in cfg.arms)
    gaps = [{"arm": g["arm"], "pairs": g["pairs"], "lr": f"{g['lr']:g}", "seeds": g["seeds"],
             f"{cfg.baseline} at pairs": f"{g['baseline']:.3f}",
             f"{cfg.baseline} at {g['reference_pairs']}": f"{g['baseline_reference']:.3f}",
             "gap (± t·SE)": f"{g['gap']:.3f}" + (f" ± {g['gap_half_width']:.3f}" if math.isfinite(g["gap_half_width"])
                                                   else ""),
             "arm's gain": f"{g['gain']:+.3f}",
             "fraction closed": f"{g['fraction']:+.2f}" if math.isfinite(g["fraction"]) else g["gap_verdict"],
             "per seed": ", ".join(f"{f:+.2f}" if math.isfinite(f) else "—" for f in g["seed_fractions"])}
            for g in gaps_closed]
    lines = [f"# Ablation: {cfg.dataset}", "",
             f"{len(cells)} runs, wall time {wall_seconds / 60:.1f} min in this invocation (finished cells are "
             f"reused). Per cell: {cfg.stage2_steps} representation steps (none for tome) + {cfg.generative_steps} "
             f"generative steps; mean ± std over seeds {cfg.seeds}; collapse = final LM loss > "
             f"{cfg.collapse.lm_loss:g} or fewer than {cfg.collapse.min_valid:.0%} of held-out outputs are captions.",
             "", arms, "", stage1_md, "## Held-out captioning and zero-shot VQA", "", markdown_table(table), "",
             f"## Differences to `{cfg.baseline}` (unpaired: |Δ| > 2·SE; paired by seed: |mean Δ_seed| > t·SE)", "",
             markdown_table(comp) if comp else "(no comparisons)", "", multiplicity_note(comparisons), "",
             f"## Time to `{cfg.baseline}`'s final quality (seed-mean curve of held-out CIDEr on "
             f"{cfg.curve_images} images; training seconds, stage 2a included)", "",
             markdown_table(speed) if speed else "(no curves)", "",
             *([f"## Fraction of `{cfg.baseline}`'s data gap each arm closes (CIDEr; 1 = the arm at that pair count "
                f"matches `{cfg.baseline}` at the largest count, 0 = no better than `{cfg.baseline}` at its own)", "",
                markdown_table(gaps), ""] if gaps else []), *alignment_section(groups), *video_section(groups),
             *slots_section(groups),
             "Plots: `loss_curves.png`, `metrics_vs_pairs.png`, `quality_vs_time.png`"
             + (", `keywords_vs_steps.png`." if has_keyword_curves(cells) else ".")]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, cells: list[dict]) -> None:
    keys = [k for k in cells[0] if k not in ("curve", "loss_curve")]
    with writing_file(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(cells)


def _title(fig, title: str, width_inches: float) -> None:
    """A figure title wrapped to the figure's width (a long dataset name otherwise runs off both edges)."""
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(title, width=int(width_inches * 10))), fontsize=10)


def has_keyword_curves(cells: list[dict]) -> bool:
    """Video arms on a keyed set (embedded:motion) score the order family's key words at each curve point too:
    whether, and when, the caption starts to follow frame order."""
    return any("kw_order" in point for c in cells for point in c["curve"])


def write_plots(out: Path, cfg, cells: list[dict], groups: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    paths = []
    pairs_values, lrs = sorted({c["pairs"] for c in cells}), sorted({c["lr"] for c in cells})
    arms = [a for a in cfg.arms if any(c["arm"] == a for c in cells)]

    def grid(title: str):
        width = max(6.0, 4.2 * len(pairs_values))
        fig, axes = plt.subplots(len(lrs), len(pairs_values), squeeze=False, figsize=(width, 3.2 * len(lrs) + 0.4))
        _title(fig, title, width)
        return fig, axes

    plots = [("loss_curves.png", "loss_curve", "step", "lm", "generative step", "training LM loss"),
             ("quality_vs_time.png", "curve", "train_seconds", "CIDEr", "training seconds (2a + 2b)",
              "held-out CIDEr")]
    if has_keyword_curves(cells):
        plots.append(("keywords_vs_steps.png", "curve", "step", "kw_order", "training step (2a + 2b)",
                      "held-out key words, order family"))
    for name, key, x, y, xlabel, ylabel in plots:
        fig, axes = grid(f"{cfg.dataset}: {ylabel} (mean over seeds)")
        for i, lr in enumerate(lrs):
            for j, pairs in enumerate(pairs_values):
                ax = axes[i][j]
                for arm in arms:
                    # a cell from before a curve carried y (a grid resumed across versions) is left out of its plot
                    members = [c for c in cells if (c["arm"], c["pairs"], c["lr"]) == (arm, pairs, lr) and c[key]
                               and all(y in point for point in c[key])]
                    xs, ys = mean_curve(members, key, x, y)
                    if xs:
                        ax.plot(xs, ys, marker="." if key == "curve" else None, label=arm)
                ax.set_title(f"{pairs} pairs, lr {lr:g}", fontsize=9)
                ax.set_xlabel(xlabel, fontsize=8)
                ax.set_ylabel(ylabel, fontsize=8)
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)

    shown = [("CIDEr", "held-out CIDEr"), ("exact_match", "exact match"), ("vqa_accuracy", "zero-shot VQA acc")]
    width = max(6.0, 4.2 * len(shown))
    fig, axes = plt.subplots(len(lrs), len(shown), squeeze=False, figsize=(width, 3.2 * len(lrs) + 0.4))
    _title(fig, f"{cfg.dataset}: metrics against the number of pairs (mean ± std over seeds)", width)
    for i, lr in enumerate(lrs):
        for j, (metric, label) in enumerate(shown):
            ax = axes[i][j]
            for k, arm in enumerate(arms):
                rows = sorted((g for g in groups if g["arm"] == arm and g["lr"] == lr), key=lambda g: g["pairs"])
                dodge = 1.0 + 0.04 * (k - (len(arms) - 1) / 2)  # arms side by side at one pair count (log axis)
                if rows:
                    ax.errorbar([g["pairs"] * dodge for g in rows], [g[metric] for g in rows],
                                yerr=[g[f"{metric}_std"] for g in rows], marker="o", capsize=3, label=arm)
            ax.set_xscale("log")
            ax.set_xticks(pairs_values, [str(n) for n in pairs_values])
            ax.set_xlim(pairs_values[0] / 1.5, pairs_values[-1] * 1.5)  # room for the dodged arms
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{label}, lr {lr:g}", fontsize=9)
            ax.set_xlabel("training pairs", fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "metrics_vs_pairs.png", dpi=100)
    plt.close(fig)
    paths.append(out / "metrics_vs_pairs.png")
    return paths


def _thumbnail(image_path: str, folder: Path, index: int, size: int = 128) -> str:
    """A small PNG copy of a held-out image beside the report, linked by a relative path, so that the report renders
    wherever its folder is moved (the images themselves live in the data cache)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    name = f"{index:03d}.png"
    with Image.open(image_path) as image:
        image = image.convert("RGB")
        image.thumbnail((size * 4 if image.width > 2 * image.height else size, size))  # a clip's filmstrip: wide
        image.save(folder / name)
    return f"{folder.name}/{name}"


def write_gallery(out: Path, cfg, cell_dirs: dict[str, Path]) -> Path | None:
    """captions.md: a few held-out images with every arm's caption (``cell_dirs``: arm -> its first pairs/lr/seed
    cell)."""
    if not cfg.gallery_images:
        return None
    preds = {}
    for arm, cell_dir in cell_dirs.items():
        path = cell_dir / "generative" / "predictions.json"
        if path.exists():
            preds[arm] = json.loads(path.read_text())["captions"][:cfg.gallery_images]
    if not preds:
        return None
    arms = list(preds)
    lines = [f"# Held-out captions per arm ({cfg.pairs[0]} pairs, lr {cfg.lrs[0]:g}, seed {cfg.seeds[0]})", "",
             "| image | reference | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for i, item in enumerate(preds[arms[0]]):
        cells = [preds[a][i]["prediction"].replace("|", "/") if i < len(preds[a]) else "" for a in arms]
        lines.append(f"| ![]({_thumbnail(item['image_path'], out / 'gallery', i)}) | {item['references'][0]} | "
                     + " | ".join(cells) + " |")
    path = out / "captions.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_report(out: Path, cfg, cells: list[dict], groups: list[dict], comparisons: list[dict], speed: list[dict],
                 stage1_md: str, wall: float, missing: list[str], descriptions: dict[str, str],
                 gaps_closed: list[dict] = ()) -> str:
    """results.md (returned), results.csv, results.json and the PNG plots in ``out``."""
    text = report_markdown(cfg, cells, groups, comparisons, stage1_md, wall, speed, descriptions=descriptions,
                           gaps_closed=gaps_closed)
    if missing:
        text += f"\nNot finished (left out of this report): {len(missing)} cells: {', '.join(missing)}.\n"
    (out / "results.md").write_text(text)
    write_csv(out / "results.csv", cells)
    (out / "results.json").write_text(json.dumps({"config": cfg.dataset, "wall_seconds": wall, "cells": cells,
                                                  "groups": groups, "comparisons": comparisons,
                                                  "time_to_baseline_quality": speed,
                                                  "gap_closed": list(gaps_closed),
                                                  "missing_cells": missing}, indent=2))
    write_plots(out, cfg, cells, groups)
    return text
