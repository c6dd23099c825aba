"""``dvlp ablate``: does decoupled language pre-training help, and what does token merging cost or save?

Stage 1 runs once (or a given P-Former is reused); then every cell (arm x number of pairs x learning rate x seed)
runs the arm's stages on the same data, seed and budget: the representation stage (2a) where the arm has one, the
generative stage (2b) with periodic held-out captioning (quality against training time), and the final captioning +
zero-shot VQA evaluation. A cell is finished when its ``cell.json`` exists; re-running skips finished cells and
resumes unfinished stages from their checkpoints.

Per group of seeds the report gives mean ± std of every metric and the collapse rate (runs whose final LM loss is
above ``collapse.lm_loss`` or whose held-out outputs are mostly not captions), and says, per metric, which
differences to the baseline arm exceed the seed spread: unpaired (|Δ| > 2 standard errors) and paired by seed
(|mean per-seed Δ| > t_{0.975} standard errors; a seed shares data subset, init and order across arms). Outputs in
``output_dir``:
``results.md``, ``results.csv`` (one row per cell), ``results.json`` (cells, groups, comparisons) and PNG plots.
"""
from __future__ import annotations

import csv
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from dvlp_common.config import Config, ConfigError, load_config, param, save_config, to_dict

from .config import CONFIG_DIR


@dataclass(frozen=True)
class Arm:
    front: Literal["qformer", "tome", "elip"]
    w1: float  # representation-stage alignment weight (unused by tome: no representation stage)
    w2: float  # generative-stage alignment weight
    kind: str = "mse"
    target: str = "caption"
    description: str = ""


ARMS: dict[str, Arm] = {
    "blip2": Arm("qformer", 0.0, 0.0, description="BLIP-2 baseline (ω₁ = ω₂ = 0)"),
    "pformer": Arm("qformer", 10.0, 100.0, description="P-Former as in the paper: 10·MSE, 100·MSE"),
    "control": Arm("qformer", 10.0, 100.0, target="corpus_mean",
                   description="caption-free control: same weights, target = the corpus-mean P(y)"),
    "pformer_std": Arm("qformer", 1.0, 1.0, kind="standardized_mse",
                       description="MSE after removing the corpus-mean prompt and dividing by the corpus std"),
    "pformer_cos": Arm("qformer", 1.0, 1.0, kind="cosine", description="cosine to the centred P(y)"),
    "pformer_nce": Arm("qformer", 1.0, 1.0, kind="contrastive",
                       description="in-batch InfoNCE between centred W·Z and P(y)"),
    "tome": Arm("tome", 0.0, 0.0, description="SimVLG: ToMe connector, generative stage and LM loss only"),
    "elip": Arm("elip", 0.0, 0.0, description="BLIP-2 with ELIP's text-guided pruning in the ViT"),
}
METRICS = ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L", "exact_match", "vqa_accuracy", "caption_validity", "final_lm",
           "retrieval_itc_r_mean", "retrieval_itm_r_mean")


@dataclass
class CollapseConfig(Config):
    lm_loss: float = param(2.0, gt=0.0, help="a run whose final training LM loss is above this has collapsed")
    min_valid: float = param(0.5, ge=0.0, le=1.0, help="a run whose fraction of held-out outputs that are captions "
                                                      "(words of the caption corpus, sane length) is below this "
                                                      "has collapsed")


@dataclass
class AblateConfig(Config):
    output_dir: str = param("runs/ablate", help="stage 1, every cell and the report are written here")
    dataset: str = param("embedded:easy-vqa", help="pairs and text corpus: embedded:easy-vqa | embedded:scenes "
                                                   "(paths at scale: set pairs/corpus through the stage overrides)")
    arms: list[str] = param(default_factory=lambda: ["blip2", "pformer", "control", "pformer_std"],
                            help=f"arms, among {', '.join(ARMS)}")
    baseline: str = param("blip2", help="the arm the others are compared with")
    pairs: list[int] = param(default_factory=lambda: [50, 500], help="training pairs per cell (seeded subsets)")
    lrs: list[float] = param(default_factory=lambda: [2e-4], help="generative-stage peak learning rates")
    seeds: list[int] = param(default_factory=lambda: [0, 1, 2], help="seeds (init, data subset and order)")
    pformer: Optional[str] = param(None, help="reuse this stage-1 P-Former folder instead of running stage 1")
    stage1_steps: int = param(150, ge=1, help="stage-1 optimizer steps")
    stage2_steps: int = param(40, ge=1, help="representation-stage steps per cell")
    generative_steps: int = param(80, ge=1, help="generative-stage steps per cell")
    curve_every: int = param(20, ge=0, help="held-out captioning every this many generative steps (0: off)")
    curve_images: int = param(50, ge=1, help="images captioned at each curve point")
    eval_images: int = param(100, ge=1, help="held-out images captioned at the end of each cell")
    eval_questions: int = param(200, ge=0, help="held-out VQA questions at the end of each cell")
    retrieval_images: int = param(0, ge=0, help="held-out images of the retrieval evaluation after each "
                                                "representation stage (ITC ranking + ITM re-ranking); 0: off")
    stage1_config: str = param(str(CONFIG_DIR / "stage1.yaml"), help="base YAML of stage 1")
    stage2_config: str = param(str(CONFIG_DIR / "stage2.yaml"), help="base YAML of the representation stage")
    generative_config: str = param(str(CONFIG_DIR / "generative.yaml"), help="base YAML of the generative stage")
    stage1_overrides: list[str] = param(default_factory=list, help="extra key=value overrides of stage 1")
    stage2_overrides: list[str] = param(default_factory=list, help="extra overrides of every representation stage")
    generative_overrides: list[str] = param(default_factory=list, help="extra overrides of every generative stage")
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    keep_cell_checkpoints: bool = param(False, help="keep a finished cell's training checkpoints (weights + AdamW "
                                                     "state, ~0.4 GB per stage at the default sizes: hundreds of "
                                                     "GB over a grid); its trained front/ and results stay anyway")
    gallery_images: int = param(8, ge=0, help="held-out images shown with every arm's caption in captions.md")
    re_evaluate: bool = param(False, help="re-run the final held-out evaluation of finished cells whose eval "
                                          "settings differ from the current ones (a protocol change), without "
                                          "retraining; the curve points keep their settings")
    report_only: bool = param(False, help="write the report from the finished cells of the grid and run nothing "
                                          "(for a grid that is still running or was stopped); missing cells are "
                                          "listed")

    def check(self) -> None:
        for arm in self.arms:
            if arm not in ARMS:
                raise ConfigError("arms", f"unknown arm {arm!r}; allowed values: {', '.join(ARMS)}")
        if not self.arms:
            raise ConfigError("arms", "needs at least one arm")
        if self.baseline not in self.arms:
            raise ConfigError("baseline", f"{self.baseline!r} is not among arms {self.arms}")
        for key in ("pairs", "lrs", "seeds"):
            values = getattr(self, key)
            if not values or len(set(values)) != len(values):
                raise ConfigError(key, f"needs at least one value and no repeats, got {values}")
        if any(p < 1 for p in self.pairs):
            raise ConfigError("pairs", f"must be positive, got {self.pairs}")
        if any(lr <= 0 for lr in self.lrs):
            raise ConfigError("lrs", f"must be positive, got {self.lrs}")
        if self.re_evaluate and self.report_only:
            raise ConfigError("re_evaluate", "runs evaluations; report_only runs nothing: set one of them")


# ---------------------------------------------------------------------------------------------------------------
# one cell
def cell_name(arm: str, pairs: int, lr: float, seed: int) -> str:
    return f"{arm}/pairs{pairs}_lr{lr:g}_seed{seed}"


def _warmup(steps: int, wanted: int) -> int:
    return min(wanted, max(1, steps // 5))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class CaptionChecker:
    """Is a generated text a caption? Every word from the caption vocabulary and a length the corpus has (±2).
    Collapsed runs emit empty strings, repeated tokens or unrelated text; this flags them without a threshold
    tuned on the metric being compared."""

    def __init__(self, sentences: list[str]):
        words = [self.words(s) for s in sentences]
        self.vocabulary = {w for ws in words for w in ws}
        lengths = [len(ws) for ws in words if ws]
        self.min_len, self.max_len = max(1, min(lengths) - 2), max(lengths) + 2

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9']+", text.lower())

    def __call__(self, text: str) -> bool:
        ws = self.words(text)
        return self.min_len <= len(ws) <= self.max_len and all(w in self.vocabulary for w in ws)


def summarize_cell(cell_dir: Path, has_stage2: bool, checker: CaptionChecker, collapse: CollapseConfig) -> dict:
    """Everything the report needs from one finished cell's files."""
    gen = cell_dir / "generative"
    scores = json.loads((gen / "eval.json").read_text())
    summary = json.loads((gen / "generative_summary.json").read_text())
    history = _read_jsonl(gen / "metrics.jsonl")
    tail = history[-max(1, len(history) // 10):]  # the last 10% of logged steps
    final_lm = sum(r["lm"] for r in tail) / len(tail) if tail else float("nan")
    preds = json.loads((gen / "predictions.json").read_text())["captions"]
    validity = sum(checker(p["prediction"]) for p in preds) / max(len(preds), 1)
    stage2_seconds, retrieval = 0.0, {}
    if has_stage2:
        stage2_seconds = json.loads((cell_dir / "stage2" / "stage2_summary.json").read_text())["wall_seconds"]
        if (cell_dir / "stage2" / "retrieval.json").exists():
            retrieval = json.loads((cell_dir / "stage2" / "retrieval.json").read_text())
    cap = scores["captioning"]
    row = {metric: float(cap.get(metric, float("nan"))) for metric in METRICS[:5]}
    row.update(vqa_accuracy=float(scores.get("vqa", {}).get("accuracy", float("nan"))), caption_validity=validity,
               final_lm=final_lm, stage2_seconds=stage2_seconds, generative_seconds=summary["train_seconds"],
               train_seconds=stage2_seconds + summary["train_seconds"],
               samples_per_s=sum(r["samples_per_s"] for r in history) / max(len(history), 1),
               prefix_tokens=summary["prefix_tokens"],
               retrieval_itc_r_mean=float(retrieval.get("itc", {}).get("r_mean", float("nan"))),
               retrieval_itm_r_mean=float(retrieval.get("itm_rerank", {}).get("r_mean", float("nan"))))
    row["collapsed"] = bool(not math.isfinite(final_lm) or final_lm > collapse.lm_loss
                            or validity < collapse.min_valid)
    row["curve"] = [{"step": r["step"], "train_seconds": stage2_seconds + r["train_seconds"], "CIDEr": r["CIDEr"],
                     "exact_match": r.get("exact_match", float("nan"))} for r in _read_jsonl(gen / "eval_curve.jsonl")]
    row["loss_curve"] = [{"step": r["step"], "lm": r["lm"]} for r in history]
    return row


def run_cell(cfg: AblateConfig, arm_name: str, pairs: int, lr: float, seed: int, pformer_dir: Path,
             checker: CaptionChecker) -> dict:
    from .generative import GenerativeConfig, run_generative
    from .stage2 import Stage2Config, run_stage2

    arm = ARMS[arm_name]
    cell_dir = Path(cfg.output_dir) / "cells" / cell_name(arm_name, pairs, lr, seed)
    done = cell_dir / "cell.json"
    common = [f"seed={seed}", f"data.source={cfg.dataset}", f"align_stats_source={cfg.dataset}",
              f"pformer={pformer_dir}", f"data.max_pairs={pairs}", f"front.kind={arm.front}",
              f"align.kind={arm.kind}", f"align.target={arm.target}"]
    has_stage2 = arm.front != "tome"
    gen = load_config(GenerativeConfig, cfg.generative_config, common + [
        f"align.weight={arm.w2}", f"optim.lr={lr}", f"optim.min_lr={lr / 10}",
        f"optim.max_steps={cfg.generative_steps}", f"optim.warmup_steps={_warmup(cfg.generative_steps, 10)}",
        f"init_front={cell_dir / 'stage2' / 'front' if has_stage2 else 'null'}",
        f"logging.output_dir={cell_dir / 'generative'}", "logging.progress_bar=false",
        f"eval.max_images={cfg.eval_images}", f"eval.max_questions={cfg.eval_questions}",
        f"curve.every={cfg.curve_every}", f"curve.images={cfg.curve_images}", *cfg.generative_overrides])
    protocol = to_dict(gen.eval)
    if done.exists():
        row = json.loads(done.read_text())
        if cfg.re_evaluate and row.get("eval_protocol") != protocol:
            return _re_evaluate_cell(cfg, row, cell_dir, gen, protocol, has_stage2, checker)
        return row
    started = time.perf_counter()
    if has_stage2:
        s2 = load_config(Stage2Config, cfg.stage2_config, common + [
            f"align.weight={arm.w1}", f"optim.max_steps={cfg.stage2_steps}",
            f"optim.warmup_steps={_warmup(cfg.stage2_steps, 5)}", f"logging.output_dir={cell_dir / 'stage2'}",
            "logging.progress_bar=false", f"eval.enabled={bool(cfg.retrieval_images)}",
            f"eval.max_images={cfg.retrieval_images or 1}", *cfg.stage2_overrides])
        run_stage2(s2, resume=True)
    run_generative(gen, resume=True)
    row = {"arm": arm_name, "front": arm.front, "pairs": pairs, "lr": lr, "seed": seed,
           **summarize_cell(cell_dir, has_stage2, checker, cfg.collapse),
           "wall_seconds": time.perf_counter() - started, "eval_protocol": protocol}
    done.write_text(json.dumps(row, indent=2))
    if not cfg.keep_cell_checkpoints:  # only an unfinished cell resumes from them
        for stage in ("stage2", "generative"):
            shutil.rmtree(cell_dir / stage / "checkpoints", ignore_errors=True)
    return row


def _re_evaluate_cell(cfg: AblateConfig, row: dict, cell_dir: Path, gen, protocol: dict, has_stage2: bool,
                      checker: CaptionChecker) -> dict:
    """The final held-out evaluation of a finished cell's trained front again, under the current eval settings
    (e.g. a changed generation protocol); training and the curve points are not repeated."""
    from .evaluate import EvaluateConfig, run_evaluate

    print(f"   re-evaluating {cell_dir.name} of {row['arm']} under the current eval settings", flush=True)
    run_evaluate(EvaluateConfig(front=str(cell_dir / "generative" / "front"), output_dir=str(cell_dir / "generative"),
                                data_source=cfg.dataset, precision=gen.deepspeed.precision, eval=gen.eval))
    row = {**row, **summarize_cell(cell_dir, has_stage2, checker, cfg.collapse), "eval_protocol": protocol}
    (cell_dir / "cell.json").write_text(json.dumps(row, indent=2))
    return row


# ---------------------------------------------------------------------------------------------------------------
# statistics
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
            mean, std, _ = mean_std([c[metric] for c in members])
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
            ma, sa, na = mean_std([c[metric] for c in mine])
            mb, sb, nb = mean_std([c[metric] for c in base])
            se = math.sqrt(sa ** 2 / na + sb ** 2 / nb) if na >= 2 and nb >= 2 else float("nan")
            delta = ma - mb
            verdict = ("one seed: no test" if not math.isfinite(se) else
                       "beyond seed spread" if abs(delta) > 2 * se else "within seed spread")
            diffs = [c[metric] - base_by_seed[c["seed"]][metric] for c in mine if c["seed"] in base_by_seed]
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
        base_seconds, base_cider = _mean_curve(base, "curve", "train_seconds", "CIDEr")
        if not base_cider:
            continue
        target, base_total = base_cider[-1], base_seconds[-1]
        for arm in sorted({c["arm"] for c in cells if (c["pairs"], c["lr"]) == (pairs, lr)}):
            mine = [c for c in cells if (c["arm"], c["pairs"], c["lr"]) == (arm, pairs, lr) and c["curve"]]
            if not mine:
                continue
            seconds, cider = _mean_curve(mine, "curve", "train_seconds", "CIDEr")
            reached = next((t for t, v in zip(seconds, cider) if v >= target), float("nan")) if target > 0 \
                else float("nan")
            out.append({"arm": arm, "pairs": pairs, "lr": lr, "target_CIDEr": target,
                        "seconds_to_target": reached, "baseline_seconds": base_total,
                        "ratio": reached / base_total if base_total > 0 else float("nan"),
                        "final_CIDEr": cider[-1] if cider else float("nan"),
                        "final_seconds": seconds[-1] if seconds else float("nan")})
    return out


# ---------------------------------------------------------------------------------------------------------------
# report
def _pm(mean: float, std: float, seeds: int, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def report_markdown(cfg: AblateConfig, cells: list[dict], groups: list[dict], comparisons: list[dict],
                    stage1_md: str, wall_seconds: float, time_to_quality: list[dict] = ()) -> str:
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
             "Δ vs " + cfg.baseline: f"{c['delta']:+.3f}", "2·SE": f"{2 * c['se']:.3f}" if math.isfinite(c["se"]) else "—",
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
    arms = "\n".join(f"- `{a}`: {ARMS[a].description}" for a in cfg.arms)
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
             "Plots: `loss_curves.png`, `metrics_vs_pairs.png`, `quality_vs_time.png`."]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, cells: list[dict]) -> None:
    keys = [k for k in cells[0] if k not in ("curve", "loss_curve")]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(cells)


def _mean_curve(members: list[dict], key: str, x: str, y: str) -> tuple[list[float], list[float]]:
    """Average the curves of several seeds at the steps they share."""
    steps = sorted(set.intersection(*[{r["step"] for r in m[key]} for m in members])) if members else []
    xs, ys = [], []
    for s in steps:
        pts = [next(r for r in m[key] if r["step"] == s) for m in members]
        xs.append(sum(p[x] for p in pts) / len(pts))
        ys.append(sum(p[y] for p in pts) / len(pts))
    return xs, ys


def _title(fig, title: str, width_inches: float) -> None:
    """A figure title wrapped to the figure's width (a long dataset name otherwise runs off both edges)."""
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(title, width=int(width_inches * 10))), fontsize=10)


def write_plots(out: Path, cfg: AblateConfig, cells: list[dict], groups: list[dict]) -> list[Path]:
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

    for name, key, x, y, xlabel, ylabel in (
            ("loss_curves.png", "loss_curve", "step", "lm", "generative step", "training LM loss"),
            ("quality_vs_time.png", "curve", "train_seconds", "CIDEr", "training seconds (2a + 2b)",
             "held-out CIDEr")):
        fig, axes = grid(f"{cfg.dataset}: {ylabel} (mean over seeds)")
        for i, lr in enumerate(lrs):
            for j, pairs in enumerate(pairs_values):
                ax = axes[i][j]
                for arm in arms:
                    members = [c for c in cells if (c["arm"], c["pairs"], c["lr"]) == (arm, pairs, lr) and c[key]]
                    xs, ys = _mean_curve(members, key, x, y)
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


def write_gallery(out: Path, cfg: AblateConfig) -> Path | None:
    """captions.md: a few held-out images with every arm's caption (first pairs/lr/seed cell of each arm)."""
    if not cfg.gallery_images:
        return None
    first = lambda arm: out / "cells" / cell_name(arm, cfg.pairs[0], cfg.lrs[0], cfg.seeds[0])  # noqa: E731
    preds = {}
    for arm in cfg.arms:
        path = first(arm) / "generative" / "predictions.json"
        if path.exists():
            preds[arm] = json.loads(path.read_text())["captions"][:cfg.gallery_images]
    if not preds:
        return None
    arms = list(preds)
    lines = [f"# Held-out captions per arm ({cfg.pairs[0]} pairs, lr {cfg.lrs[0]:g}, seed {cfg.seeds[0]})", "",
             "| image | reference | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for i, item in enumerate(preds[arms[0]]):
        cells = [preds[a][i]["prediction"].replace("|", "/") if i < len(preds[a]) else "" for a in arms]
        lines.append(f"| ![]({Path(item['image_path']).resolve()}) | {item['references'][0]} | "
                     + " | ".join(cells) + " |")
    path = out / "captions.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# the runner
def run_stage1_once(cfg: AblateConfig, out: Path) -> tuple[Path, str]:
    """The stage-1 P-Former of this dataset (trained here unless ``cfg.pformer`` names one) and its report."""
    if cfg.pformer:
        if not Path(cfg.pformer).is_dir():
            raise ConfigError("pformer", f"{cfg.pformer} is not a P-Former folder")
        return Path(cfg.pformer), ""
    from .stage1 import Stage1Config, run_stage1

    report = next((p for p in (out / "stage1" / "eval.md", out / "stage1" / "stage1_eval.md") if p.exists()), None)
    if (out / "stage1" / "stage1_summary.json").exists() and (out / "stage1" / "pformer").is_dir():
        return out / "stage1" / "pformer", report.read_text() if report else ""  # finished earlier
    s1 = load_config(Stage1Config, cfg.stage1_config, [
        f"data.source={cfg.dataset}", f"logging.output_dir={out / 'stage1'}", f"optim.max_steps={cfg.stage1_steps}",
        f"optim.warmup_steps={_warmup(cfg.stage1_steps, 30)}", "logging.progress_bar=false", *cfg.stage1_overrides])
    run_stage1(s1, resume=True)
    report = next((p for p in (out / "stage1" / "eval.md", out / "stage1" / "stage1_eval.md") if p.exists()), None)
    return out / "stage1" / "pformer", report.read_text() if report else ""


def caption_checker(dataset: str) -> CaptionChecker:
    from pformer.data import load_text_corpus

    from vl_align.sources import resolve_text_source

    return CaptionChecker(list(load_text_corpus(resolve_text_source(dataset))["text"]))


def run_ablation(cfg: AblateConfig) -> dict:
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "ablate_config.yaml")
    if cfg.report_only and not (cfg.pformer or (out / "stage1" / "pformer").exists()):
        raise ConfigError("report_only", f"no finished stage 1 in {out / 'stage1'} (and no pformer=DIR)")
    pformer_dir, stage1_md = run_stage1_once(cfg, out)
    checker = caption_checker(cfg.dataset)
    cells, missing = [], []
    # seeds outermost: an interrupted run has compared every arm on the first seeds
    for seed in cfg.seeds:
        for pairs in cfg.pairs:
            for lr in cfg.lrs:
                for arm in cfg.arms:
                    name = cell_name(arm, pairs, lr, seed)
                    if cfg.report_only and not (out / "cells" / name / "cell.json").exists():
                        missing.append(name)
                        continue
                    print(f"== cell {name}", flush=True)
                    cells.append(run_cell(cfg, arm, pairs, lr, seed, pformer_dir, checker))
    if not cells:
        raise ConfigError("report_only", f"no finished cell of this grid in {out / 'cells'}")
    groups = group_cells(cells)
    comparisons = compare_to_baseline(cells, cfg.baseline)
    speed = time_to_baseline_quality(cells, cfg.baseline)
    wall = time.perf_counter() - start
    text = report_markdown(cfg, cells, groups, comparisons, stage1_md, wall, speed)
    if missing:
        text += f"\nNot finished (left out of this report): {len(missing)} cells: {', '.join(missing)}.\n"
    (out / "results.md").write_text(text)
    write_csv(out / "results.csv", cells)
    (out / "results.json").write_text(json.dumps({"config": cfg.dataset, "wall_seconds": wall, "cells": cells,
                                                  "groups": groups, "comparisons": comparisons,
                                                  "time_to_baseline_quality": speed,
                                                  "missing_cells": missing}, indent=2))
    write_plots(out, cfg, cells, groups)
    write_gallery(out, cfg)
    print(text, flush=True)
    return {"cells": cells, "groups": groups, "comparisons": comparisons, "time_to_baseline_quality": speed,
            "missing_cells": missing, "wall_seconds": wall}
