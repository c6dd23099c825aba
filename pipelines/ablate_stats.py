"""Statistics of the ablation grid over its cell rows (plain dicts, one per finished cell): mean ± std over seeds,
collapse rate, unpaired and paired-by-seed comparisons to the baseline arm (Student-t critical values), the
multiplicity note, time to the baseline's final quality on the seed-mean curves, and the fraction of the baseline's
data gap that each arm closes. No file I/O, no plotting.
"""
from __future__ import annotations

import math

from vl_align.scenes import SLOTS


def slot_keys(prefix: str) -> dict[str, str]:
    """Cell-row keys of the slot accuracy of scenes captions: ``{slot_accuracy's name: "<prefix>_<name>"}``."""
    return {name: f"{prefix}_{name.replace(' ', '_')}" for name in ("well_formed", *SLOTS)}


# slot accuracy of scenes captions (nan on other data): after the generative stage, and zero-shot after stage 2a
SLOT_METRICS = (*slot_keys("slot").values(), *slot_keys("zero_shot_slot").values())
# the metrics of a cell row that are averaged over seeds (the first five are the captioning scores)
METRICS = ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L", "exact_match", "vqa_accuracy", "caption_validity", "final_lm",
           "retrieval_itc_r_mean", "retrieval_itm_r_mean", "align_r2_2a", "heldout_align_r2_2a", "align_r2_2b",
           "align_share_2a", "align_share_2b",
           "zero_shot_CIDEr_2a", "heldout_lm_step0", "kw_order", "kw_set", "kw_order_reversed",
           "kw_order_reversed_shown", "kw_set_reversed", "kw_order_shuffled", "kw_set_shuffled", "seconds_per_step",
           *SLOT_METRICS)
NAN = float("nan")  # a metric a cell did not record (older cells, arms without P(y)) counts as missing


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample std (ddof 1; 0 for one value) and count of the finite values."""
    xs = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not xs:
        return float("nan"), float("nan"), 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std, len(xs)


def group_cells(cells: list[dict]) -> list[dict]:
    """One row per (arm, pairs, lr): mean and std over seeds of every metric, collapse rate, cost."""
    keys = sorted({(c["arm"], c["pairs"], c["lr"]) for c in cells}, key=lambda k: (k[1], k[2], k[0]))
    groups = []
    for arm, pairs, lr in keys:
        members = [c for c in cells if (c["arm"], c["pairs"], c["lr"]) == (arm, pairs, lr)]
        row = {"arm": arm, "pairs": pairs, "lr": lr, "seeds": len(members),
               "collapse_rate": sum(c["collapsed"] for c in members) / len(members)}
        for metric in (*METRICS, "train_seconds", "samples_per_s", "prefix_tokens"):
            mean, std, _ = mean_std([c.get(metric, NAN) for c in members])
            row[metric], row[f"{metric}_std"] = mean, std
        groups.append(row)
    return groups


# two-sided 95% critical values of Student's t by degrees of freedom (beyond 30: the normal's 1.96)
_T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
          12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t_critical(df: int) -> float:
    """t_{0.975, df}, conservative between tabulated values (the next smaller df's)."""
    if df < 1:
        return float("nan")
    return 1.96 if df > 30 else _T_975[max(k for k in _T_975 if k <= df)]


def compare_to_baseline(cells: list[dict], baseline: str, metrics=("CIDEr", "exact_match", "vqa_accuracy")) -> list[dict]:
    """Δ(arm − baseline) per (pairs, lr) and metric, and whether it exceeds the seed spread.

    Unpaired: |Δ| > 2·SE with SE = sqrt(s_a²/n_a + s_b²/n_b) (needs ≥ 2 seeds per side). Paired: a seed fixes the
    pair subset, the initialisation and the data order for every arm, so most of the seed-to-seed spread is shared
    and cancels in the per-seed difference d_s = arm_s − baseline_s; the paired test is |mean d| > t_{0.975, n−1} ·
    sd(d)/√n over the n seeds both arms finished (needs n ≥ 2). The paired verdict is the one to read when seeds
    are shared; the unpaired one stays for grids whose arms ran different seeds."""
    out = []
    for arm, pairs, lr in sorted({(c["arm"], c["pairs"], c["lr"]) for c in cells if c["arm"] != baseline},
                                 key=lambda k: (k[1], k[2], k[0])):
        mine = [c for c in cells if (c["arm"], c["pairs"], c["lr"]) == (arm, pairs, lr)]
        base = [c for c in cells if (c["arm"], c["pairs"], c["lr"]) == (baseline, pairs, lr)]
        if not base:
            continue
        base_by_seed = {c["seed"]: c for c in base}
        for metric in metrics:
            ma, sa, na = mean_std([c.get(metric, NAN) for c in mine])
            mb, sb, nb = mean_std([c.get(metric, NAN) for c in base])
            se = math.sqrt(sa ** 2 / na + sb ** 2 / nb) if na >= 2 and nb >= 2 else float("nan")
            delta = ma - mb
            verdict = ("one seed: no test" if not math.isfinite(se) else
                       "beyond seed spread" if abs(delta) > 2 * se else "within seed spread")
            diffs = [c.get(metric, NAN) - base_by_seed[c["seed"]].get(metric, NAN)
                     for c in mine if c["seed"] in base_by_seed]
            d_mean, d_std, n = mean_std(diffs)
            if n >= 2:
                p_se, t = d_std / math.sqrt(n), t_critical(n - 1)
                paired = "beyond seed spread" if abs(d_mean) > t * p_se else "within seed spread"
            else:
                p_se, t, paired = float("nan"), float("nan"), "under 2 shared seeds: no test"
            out.append({"arm": arm, "pairs": pairs, "lr": lr, "metric": metric, "delta": delta, "se": se,
                        "verdict": verdict, "paired_delta": d_mean, "paired_se": p_se, "paired_seeds": n,
                        "paired_t_crit": t, "paired_verdict": paired})
    return out


def multiplicity_note(comparisons: list[dict]) -> str:
    """Each paired test has a 5% false-positive rate, so a grid of many arms x metrics crosses the seed spread by
    chance about 0.05·N times even when no arm differs; say so next to the verdicts, with the Bonferroni count."""
    tested = [c for c in comparisons if c["paired_verdict"] in ("beyond seed spread", "within seed spread")]
    if not tested:
        return ""
    beyond = sum(c["paired_verdict"] == "beyond seed spread" for c in tested)
    n = len(tested)
    return (f"{beyond} of {n} paired tests are beyond the seed spread. At the 5% level each, about "
            f"{0.05 * n:.2f} would be by chance if no arm differed; read single verdicts with that in mind "
            f"(for a family-wise 5%, Bonferroni: test each at 0.05/{n}).")


def gap_closed(cells: list[dict], baseline: str, metric: str = "CIDEr") -> list[dict]:
    """The data-efficiency headline (the P-Former paper: aligning to P(y) closes about half of the gap between
    BLIP-2 trained on 4M and on 129M pairs). Per lr, the reference is the baseline at the grid's largest pair count
    P; at each scarcer count p, with the seeds that ran all three cells:

        fraction = mean_s(arm_s(p) - base_s(p)) / mean_s(base_s(P) - base_s(p))

    1: the arm at p matches the baseline at P; 0: no better than the baseline at p; negative: worse. The gap's paired
    t·SE says whether there is a gap to close at all: where the gap is within the seed spread the fraction is not
    defined (nan, ``gap_verdict`` says why). ``seed_fractions`` are the per-seed ratios, for their spread."""
    out = []
    for lr in sorted({c["lr"] for c in cells}):
        base = {(c["pairs"], c["seed"]): c.get(metric, NAN) for c in cells if (c["arm"], c["lr"]) == (baseline, lr)}
        if not base:
            continue
        top = max(p for p, _ in base)
        arms = sorted({c["arm"] for c in cells if c["lr"] == lr and c["arm"] != baseline})
        for pairs in sorted({p for p, _ in base if p < top}):
            for arm in arms:
                mine = {c["seed"]: c.get(metric, NAN) for c in cells if (c["arm"], c["lr"], c["pairs"]) ==
                        (arm, lr, pairs)}
                seeds = sorted(s for s in mine if (pairs, s) in base and (top, s) in base and all(
                    math.isfinite(v) for v in (mine[s], base[(pairs, s)], base[(top, s)])))
                if not seeds:
                    continue
                gains = [mine[s] - base[(pairs, s)] for s in seeds]
                gaps = [base[(top, s)] - base[(pairs, s)] for s in seeds]
                gain, _, n = mean_std(gains)
                gap, gap_std, _ = mean_std(gaps)
                gap_half_width = t_critical(n - 1) * gap_std / math.sqrt(n) if n >= 2 else float("nan")
                within_spread = n >= 2 and gap <= gap_half_width
                gap_verdict = ("under 2 seeds: no test" if n < 2 else
                               f"no gap beyond seed spread at {top} pairs" if within_spread else
                               "gap beyond seed spread")
                defined = gap > 0 and not within_spread
                out.append({"arm": arm, "pairs": pairs, "lr": lr, "metric": metric, "reference_pairs": top,
                            "seeds": n, "baseline": sum(base[(pairs, s)] for s in seeds) / n,
                            "baseline_reference": sum(base[(top, s)] for s in seeds) / n, "gap": gap,
                            "gap_half_width": gap_half_width, "gap_verdict": gap_verdict, "gain": gain,
                            "fraction": gain / gap if defined else float("nan"),
                            "seed_fractions": [g / d if d > 0 else float("nan") for g, d in zip(gains, gaps)]})
    return out


def time_to_baseline_quality(cells: list[dict], baseline: str) -> list[dict]:
    """SimVLG's claim is time to quality: per (pairs, lr), the training seconds (stage 2a included) at which each
    arm's seed-averaged curve of held-out CIDEr first reaches the baseline's final curve value, and its ratio to the
    baseline's total training seconds. Curve points use the same held-out images for every arm; nan when never
    reached, or when the baseline ends at CIDEr 0 (a collapsed baseline sets no target)."""
    out = []
    for pairs, lr in sorted({(c["pairs"], c["lr"]) for c in cells}):
        base = [c for c in cells if (c["arm"], c["pairs"], c["lr"]) == (baseline, pairs, lr) and c["curve"]]
        if not base:
            continue
        base_seconds, base_cider = mean_curve(base, "curve", "train_seconds", "CIDEr")
        if not base_cider:
            continue
        target, base_total = base_cider[-1], base_seconds[-1]
        for arm in sorted({c["arm"] for c in cells if (c["pairs"], c["lr"]) == (pairs, lr)}):
            mine = [c for c in cells if (c["arm"], c["pairs"], c["lr"]) == (arm, pairs, lr) and c["curve"]]
            if not mine:
                continue
            seconds, cider = mean_curve(mine, "curve", "train_seconds", "CIDEr")
            reached = next((t for t, v in zip(seconds, cider) if v >= target), float("nan")) if target > 0 \
                else float("nan")
            out.append({"arm": arm, "pairs": pairs, "lr": lr, "target_CIDEr": target,
                        "seconds_to_target": reached, "baseline_seconds": base_total,
                        "ratio": reached / base_total if base_total > 0 else float("nan"),
                        "final_CIDEr": cider[-1] if cider else float("nan"),
                        "final_seconds": seconds[-1] if seconds else float("nan")})
    return out


def mean_curve(members: list[dict], key: str, x: str, y: str) -> tuple[list[float], list[float]]:
    """Average the curves of several seeds at the steps they share."""
    steps = sorted(set.intersection(*[{r["step"] for r in m[key]} for m in members])) if members else []
    xs, ys = [], []
    for s in steps:
        pts = [next(r for r in m[key] if r["step"] == s) for m in members]
        xs.append(sum(p[x] for p in pts) / len(pts))
        ys.append(sum(p[y] for p in pts) / len(pts))
    return xs, ys
