"""``dvlp ablate``: does decoupled language pre-training help, and what does token merging cost or save?

Stage 1 runs once (or a given P-Former is reused); then every cell (arm x number of pairs x learning rate x seed)
runs the arm's stages on the same data, seed and budget: the representation stage (2a) where the arm has one, the
generative stage (2b) with periodic held-out captioning (quality against training time), and the final captioning +
zero-shot VQA evaluation. A cell is finished when its ``cell.json`` exists; re-running skips finished cells and
resumes unfinished stages from their checkpoints.

This module holds the grid (arms, config, collapse criteria) and its runner: running, resuming, re-evaluating and
summarising cells. A cell collapsed when its final LM loss is above ``collapse.lm_loss`` or its held-out outputs are
mostly not captions. The statistics over the cells (mean ± std over seeds, collapse rate, unpaired and paired-by-seed
comparisons to the baseline arm) are in :mod:`pipelines.ablate_stats`; the report files in ``output_dir``
(``results.md``, ``results.csv``, ``results.json``, PNG plots, ``captions.md``) are written by
:mod:`pipelines.ablate_report`.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

from dvlp_common.config import Config, ConfigError, load_config, param, save_config, to_dict
from dvlp_common.io import read_jsonl, write_json_atomic
from vl_align.scenes import template_slot_accuracy
from vl_align.video_inputs import is_video_source

from .ablate_report import write_gallery, write_report
from .ablate_stats import METRICS, compare_to_baseline, gap_closed, group_cells, slot_keys, time_to_baseline_quality
from .config import CONFIG_DIR


@dataclass(frozen=True)
class Arm:
    front: Literal["qformer", "tome", "elip"]
    w1: float  # representation-stage alignment weight (unused by tome: no representation stage)
    w2: float  # generative-stage alignment weight
    kind: str = "mse"
    target: str = "caption"
    description: str = ""
    sequential: bool = False  # generative stage in two phases: ω₂·align alone, then the LM loss alone
    video: tuple[str, ...] | None = None  # a video front (front.video.enabled) with these front overrides
    representation: bool = True  # a qformer arm runs stage 2a first
    reference: str | None = None  # the arm this one is compared with (default: the grid's baseline)
    overrides: tuple[str, ...] = ()  # front settings that make the arm (both stages; after the grid's overrides)


ARMS: dict[str, Arm] = {
    "blip2": Arm("qformer", 0.0, 0.0, description="BLIP-2 baseline (ω₁ = ω₂ = 0)"),
    "pformer": Arm("qformer", 10.0, 100.0, description="P-Former as in the paper: 10·MSE, 100·MSE"),
    "control": Arm("qformer", 10.0, 100.0, target="corpus_mean",
                   description="caption-free control: same weights, target = the corpus-mean P(y)"),
    "pformer_seq": Arm("qformer", 10.0, 100.0, sequential=True,
                       description="P-Former, generative stage in two phases as the authors' video recipe: 100·MSE "
                                   "alone, then the LM loss alone, at the same total steps"),
    "pformer_std": Arm("qformer", 1.0, 1.0, kind="standardized_mse",
                       description="MSE after removing the corpus-mean prompt and dividing by the corpus std"),
    "pformer_cos": Arm("qformer", 1.0, 1.0, kind="cosine", description="cosine to the centred P(y)"),
    "pformer_nce": Arm("qformer", 1.0, 1.0, kind="contrastive",
                       description="in-batch InfoNCE between centred W·Z and P(y)"),
    "tome": Arm("tome", 0.0, 0.0, description="SimVLG: ToMe connector, generative stage and LM loss only"),
    "elip": Arm("elip", 0.0, 0.0, description="BLIP-2 with ELIP's text-guided pruning in the ViT"),
    "elip_la1": Arm("elip", 0.0, 0.0, overrides=("front.elip.lookahead_depths=[1,1,1]",),
                    description="ELIP's pruning points and keep ratios, each scored with the next block's attention "
                                "(look-ahead 1: no extra blocks; 1.28x the unpruned tower's step at 224 px, session 8)"),
    # video (issue 20; dataset embedded:motion or a video caption file): SimVLG's recipe (tome connector, LM loss)
    # with the temporal modules varied, and P-Former on the video front against the same front without it
    "video_frame": Arm("tome", 0.0, 0.0, video=("front.video.num_frames=1", "front.video.blocks=[]"),
                       description="single frame: T = 1, no temporal modules (the image model on one frame)"),
    "video_mean": Arm("tome", 0.0, 0.0, video=("front.video.blocks=[]",),
                      description="mean pooling: T frames averaged, temporal modules frozen at α = 0 (none built)"),
    "video_faithful": Arm("tome", 0.0, 0.0, video=(),
                          description="SimVLG's temporal modules (in every block, or in the blocks of front.video.blocks), "
                                      "frames averaged (blind to order)"),
    "video_position": Arm("tome", 0.0, 0.0, video=("front.video.max_frames=8",),
                          description="the faithful modules plus learned per-frame positions (max_frames=8, our "
                                      "extension: order-aware)"),
    "video_qformer": Arm("qformer", 0.0, 0.0, video=(), representation=False,
                         description="Q-Former video front with the faithful modules, LM loss only (the reference "
                                     "of video_pformer)"),
    "video_pformer": Arm("qformer", 0.0, 100.0, sequential=True, video=(), representation=False,
                         reference="video_qformer",
                         description="P-Former on the Q-Former video front as BLIText-video: 100·MSE(W·Z, P(y)) "
                                     "alone, then the LM loss alone (seq_align_fraction of the steps aligning)"),
}


def arm_of(name: str) -> Arm:
    """An arm by name, with its alignment weights optionally set, for calibrating them:
    - ``<arm>:<ω₂>``: ω₂ and ω₁ = ω₂ / 10 (the paper's 1:10), e.g. ``pformer:30``;
    - ``<arm>:w1=<ω₁>,w2=<ω₂>`` (either key may be left out: ω₂ then keeps the arm's, ω₁ is ω₂ / 10), e.g.
      ``pformer:w1=100,w2=100``: ω₁ set on its own, since stage 2a may need a stronger alignment than the paper's
      ratio gives (docs/fair_test/omega1)."""
    base, _, spec = name.partition(":")
    if base not in ARMS:
        raise ConfigError("arms", f"unknown arm {name!r}; allowed values: {', '.join(ARMS)}, or <arm>:<ω₂>, or "
                                  "<arm>:w1=<ω₁>,w2=<ω₂>")
    arm = ARMS[base]
    if not spec:
        return arm
    weights: dict[str, float] = {}
    for item in spec.split(",") if "=" in spec else [f"w2={spec}"]:
        key, _, value = item.partition("=")
        if key not in ("w1", "w2") or key in weights:
            raise ConfigError("arms", f"{name!r}: expected <arm>:<ω₂> or <arm>:w1=<ω₁>,w2=<ω₂> (each key once)")
        try:
            weights[key] = float(value)
        except ValueError:
            raise ConfigError("arms", f"{name!r}: the weight {key}={value!r} must be a number") from None
    w2 = weights.get("w2", arm.w2)
    w1 = weights.get("w1", w2 / 10)
    if not arm.w2 or w2 <= 0 or w1 < 0:
        raise ConfigError("arms", f"{name!r}: only an aligning arm takes weights; ω₂ must be > 0 and ω₁ >= 0")
    return replace(arm, w1=w1, w2=w2, description=f"{arm.description}; ω₂ = {w2:g}, ω₁ = {w1:g}")


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
    validation_images: int = param(0, ge=0, help="training images held out of every cell's pairs as the validation "
                                                 "split (data.validation_images of every stage)")
    eval_split: Literal["test", "validation"] = param("test", help="what the cells are evaluated on: the test "
                                                                   "split, or (choosing settings, e.g. the "
                                                                   "alignment weights) the validation images")
    seq_align_fraction: float = param(0.5, gt=0.0, lt=1.0, help="sequential arms (pformer_seq): the share of "
                                                                 "the generative steps spent on alignment alone")
    zero_shot_images: int = param(0, ge=0, help="held-out images captioned from W·Z through the frozen LLM at the "
                                                "end of each stage 2a, with the LLM's held-out caption loss there "
                                                "(the generative stage's step 0; 0: off)")
    stage2_overrides: list[str] = param(default_factory=list, help="extra overrides of every representation stage")
    generative_overrides: list[str] = param(default_factory=list, help="extra overrides of every generative stage")
    frame_orders: list[Literal["reversed", "shuffled"]] = param(
        default_factory=lambda: ["reversed", "shuffled"], help="video arms: the held-out clips evaluated again with "
                                                               "their frames in these orders (eval.frame_order)")
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
            arm_of(arm)
        if not self.arms:
            raise ConfigError("arms", "needs at least one arm")
        video = {a for a in self.arms if arm_of(a).video is not None}
        if video and len(video) != len(self.arms):
            raise ConfigError("arms", f"mixes video arms {sorted(video)} with image arms: one grid has one dataset")
        if video and self.dataset.startswith("embedded:") and not is_video_source(self.dataset):
            raise ConfigError("dataset", f"{self.dataset} is an image set; the video arms need embedded:motion")
        if not video and is_video_source(self.dataset):
            raise ConfigError("arms", f"{self.dataset} is a video set; its arms are the video_* arms")
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
        if self.eval_split == "validation" and not self.validation_images:
            raise ConfigError("eval_split", "'validation' needs validation_images > 0")
        if self.re_evaluate and self.report_only:
            raise ConfigError("re_evaluate", "runs evaluations; report_only runs nothing: set one of them")


# ---------------------------------------------------------------------------------------------------------------
# one cell
def cell_name(arm: str, pairs: int, lr: float, seed: int) -> str:
    # no ':' (nor '=' or ',') in file names: pformer:30 -> pformer_w30, pformer:w1=100,w2=100 -> pformer_w1-100_w2-100
    base, _, spec = arm.partition(":")
    weights = ("_" + spec.replace("=", "-").replace(",", "_")) if "=" in spec else (f"_w{spec}" if spec else "")
    return f"{base}{weights}/pairs{pairs}_lr{lr:g}_seed{seed}"


def arm_settings(arm: Arm) -> list[str]:
    """What makes the arm (a video front's frames, modules, positions; its front settings): the overrides of both
    stages, applied after the grid's stage overrides so that they win."""
    return [*(["front.video.enabled=true", *arm.video] if arm.video is not None else []), *arm.overrides]


def _warmup(steps: int, wanted: int) -> int:
    return min(wanted, max(1, steps // 5))


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


def _final(history: list[dict], key: str) -> float:
    """The mean of ``key`` over the last 10% of the logged steps (nan where it was not logged)."""
    tail = [r[key] for r in history[-max(1, len(history) // 10):] if key in r]
    return sum(tail) / len(tail) if tail else float("nan")


def summarize_cell(cell_dir: Path, has_stage2: bool, checker: CaptionChecker, collapse: CollapseConfig) -> dict:
    """Everything the report needs from one finished cell's files."""
    gen = cell_dir / "generative"
    scores = json.loads((gen / "eval.json").read_text())
    summary = json.loads((gen / "generative_summary.json").read_text())
    history = read_jsonl(gen / "metrics.jsonl")
    final_lm = _final(history, "lm")
    preds = json.loads((gen / "predictions.json").read_text())["captions"]
    validity = sum(checker(p["prediction"]) for p in preds) / max(len(preds), 1)
    stage2_seconds, retrieval, history_2a, zero_shot, heldout_align = 0.0, {}, [], {}, {}
    if has_stage2:
        history_2a = read_jsonl(cell_dir / "stage2" / "metrics.jsonl")
        stage2_summary = json.loads((cell_dir / "stage2" / "stage2_summary.json").read_text())
        stage2_seconds, zero_shot = stage2_summary["wall_seconds"], stage2_summary.get("zero_shot") or {}
        heldout_align = stage2_summary.get("heldout_align") or {}
        if (cell_dir / "stage2" / "retrieval.json").exists():
            retrieval = json.loads((cell_dir / "stage2" / "retrieval.json").read_text())
    # a sequential arm's alignment-only phase counts as generative training time before the LM phase's clock
    align_phase = cell_dir / "generative_align" / "generative_summary.json"
    align_seconds, align_steps = 0.0, 0
    if align_phase.exists():
        phase = json.loads(align_phase.read_text())
        align_seconds, align_steps = phase["train_seconds"], phase["steps"]
    generative_seconds = align_seconds + summary["train_seconds"]
    cap = scores["captioning"]
    row = {metric: float(cap.get(metric, float("nan"))) for metric in METRICS[:5]}
    row.update(vqa_accuracy=float(scores.get("vqa", {}).get("accuracy", float("nan"))), caption_validity=validity,
               final_lm=final_lm, stage2_seconds=stage2_seconds, generative_seconds=generative_seconds,
               train_seconds=stage2_seconds + generative_seconds,
               samples_per_s=sum(r["samples_per_s"] for r in history) / max(len(history), 1),
               prefix_tokens=summary["prefix_tokens"],
               retrieval_itc_r_mean=float(retrieval.get("itc", {}).get("r_mean", float("nan"))),
               retrieval_itm_r_mean=float(retrieval.get("itm_rerank", {}).get("r_mean", float("nan"))))
    row["zero_shot_CIDEr_2a"] = float((zero_shot.get("captioning") or {}).get("CIDEr", float("nan")))
    row["zero_shot_exact_2a"] = float((zero_shot.get("captioning") or {}).get("exact_match", float("nan")))
    row["heldout_lm_step0"] = float((zero_shot.get("heldout_lm") or {}).get("lm_loss", float("nan")))
    # stage 2a's alignment on held-out images (stage2_overrides=[align_curve.every=N]); nan without it
    row["heldout_align_r2_2a"] = float(heldout_align.get("align_r2", float("nan")))
    for stage, rows in (("2a", history_2a), ("2b", history)):  # the alignment diagnostics (nan without P(y))
        for key in ("align_r2", "align_rel", "align_share"):
            row[f"{key}_{stage}"] = _final(rows, key)
    row.update(_video_metrics(gen, scores))
    zero_shot_preds = cell_dir / "stage2" / "zero_shot" / "predictions.json"
    row.update(_slot_metrics(preds, "slot"))
    row.update(_slot_metrics(json.loads(zero_shot_preds.read_text())["captions"]
                             if has_stage2 and zero_shot_preds.exists() else [], "zero_shot_slot"))
    steps = align_steps + summary["steps"]
    row["seconds_per_step"] = generative_seconds / steps if steps else float("nan")  # 2b, against the image arms
    row["collapsed"] = bool(not math.isfinite(final_lm) or final_lm > collapse.lm_loss
                            or validity < collapse.min_valid)
    before_lm = stage2_seconds + align_seconds
    row["curve"] = [{"step": align_steps + r["step"], "train_seconds": before_lm + r["train_seconds"],
                     "CIDEr": r["CIDEr"], "exact_match": r.get("exact_match", float("nan")),
                     **{f"kw_{family}": r[f"keywords_{family}"] for family in ("order", "set")
                        if f"keywords_{family}" in r}}
                    for r in read_jsonl(gen / "eval_curve.jsonl")]
    row["loss_curve"] = [{"step": r["step"], "lm": r["lm"]} for r in history]
    return row


def _slot_metrics(predictions: list[dict], prefix: str) -> dict:
    """Slot accuracy of scenes captions (``vl_align.scenes.slot_accuracy``) as ``<prefix>_<slot>``; nan where the
    references are not scenes captions or there are no predictions."""
    slots = template_slot_accuracy([p["prediction"] for p in predictions], [p["references"][0] for p in predictions])
    return {key: float((slots or {}).get(name, float("nan"))) for name, key in slot_keys(prefix).items()}


def _video_metrics(gen: Path, scores: dict) -> dict:
    """Key-word accuracy per caption family (nan where the held-out set has no key words, as for images): as fed
    (``kw_order``, ``kw_set``), and on the frames reversed and shuffled (``frames_<order>/eval.json``); reversed is
    also scored against what the reversed frames show (``kw_order_reversed_shown``: the pair partner's labels)."""
    row = {}
    for suffix, result in (("", scores), ("_reversed", None), ("_shuffled", None)):
        if result is None:
            path = gen / f"frames{suffix}" / "eval.json"
            result = json.loads(path.read_text()) if path.exists() else {}
        for family in ("order", "set"):
            row[f"kw_{family}{suffix}"] = float(result.get("keywords", {}).get(family, float("nan")))
        if suffix == "_reversed":
            row["kw_order_reversed_shown"] = float(result.get("keywords_shown", {}).get("order", float("nan")))
    return row


def run_cell(cfg: AblateConfig, arm_name: str, pairs: int, lr: float, seed: int, pformer_dir: Path,
             checker: CaptionChecker) -> dict:
    from .generative import GenerativeConfig, run_generative
    from .stage2 import Stage2Config, run_stage2

    arm = arm_of(arm_name)
    cell_dir = Path(cfg.output_dir) / "cells" / cell_name(arm_name, pairs, lr, seed)
    done = cell_dir / "cell.json"
    common = [f"seed={seed}", f"data.source={cfg.dataset}", f"align_stats_source={cfg.dataset}",
              f"pformer={pformer_dir}", f"data.max_pairs={pairs}", f"front.kind={arm.front}",
              f"align.kind={arm.kind}", f"align.target={arm.target}",
              f"data.validation_images={cfg.validation_images}"]
    settings = arm_settings(arm)
    has_stage2 = arm.front != "tome" and arm.representation
    gen = load_config(GenerativeConfig, cfg.generative_config, common + [
        f"align.weight={arm.w2}", f"optim.lr={lr}", f"optim.min_lr={lr / 10}",
        f"optim.max_steps={cfg.generative_steps}", f"optim.warmup_steps={_warmup(cfg.generative_steps, 10)}",
        f"init_front={cell_dir / 'stage2' / 'front' if has_stage2 else 'null'}",
        f"logging.output_dir={cell_dir / 'generative'}", "logging.progress_bar=false",
        f"eval.max_images={cfg.eval_images}", f"eval.max_questions={cfg.eval_questions}",
        f"eval.split={cfg.eval_split}",
        f"curve.every={cfg.curve_every}", f"curve.images={cfg.curve_images}", *cfg.generative_overrides,
        *settings])
    protocol = to_dict(gen.eval)
    if done.exists():
        row = json.loads(done.read_text())
        if cfg.re_evaluate and _recorded_protocol(row, type(gen.eval)) != protocol:
            return _re_evaluate_cell(cfg, row, cell_dir, gen, protocol, has_stage2, checker)
        return row
    started = time.perf_counter()
    if arm.sequential:  # phase 2 (``gen``) takes the rest of the steps and starts from phase 1's front
        align_steps = max(1, round(cfg.seq_align_fraction * cfg.generative_steps))
        if align_steps >= cfg.generative_steps:
            raise ConfigError("seq_align_fraction", f"leaves no LM steps of generative_steps="
                                                    f"{cfg.generative_steps}")
        phase1 = load_config(GenerativeConfig, cfg.generative_config, common + [
            f"align.weight={arm.w2}", "weights.lm=0", f"optim.lr={lr}", f"optim.min_lr={lr / 10}",
            f"optim.max_steps={align_steps}", f"optim.warmup_steps={_warmup(align_steps, 10)}",
            f"init_front={cell_dir / 'stage2' / 'front' if has_stage2 else 'null'}",
            f"logging.output_dir={cell_dir / 'generative_align'}",
            "logging.progress_bar=false", "eval.enabled=false", "curve.every=0", *cfg.generative_overrides,
            *settings])
        lm_steps = cfg.generative_steps - align_steps
        gen = gen.replace(align=gen.align.replace(weight=0.0), init_front=str(cell_dir / "generative_align" / "front"),
                          optim=gen.optim.replace(max_steps=lm_steps, warmup_steps=_warmup(lm_steps, 10)))
    shared = None
    if has_stage2:
        s2 = load_config(Stage2Config, cfg.stage2_config, common + [
            f"align.weight={arm.w1}", f"optim.max_steps={cfg.stage2_steps}",
            f"optim.warmup_steps={_warmup(cfg.stage2_steps, 5)}", f"logging.output_dir={cell_dir / 'stage2'}",
            "logging.progress_bar=false", f"eval.enabled={bool(cfg.retrieval_images)}",
            f"eval.max_images={cfg.retrieval_images or 1}", f"zero_shot.enabled={bool(cfg.zero_shot_images)}",
            f"zero_shot.max_images={cfg.zero_shot_images or 1}", "zero_shot.meteor=false",
            f"zero_shot.split={cfg.eval_split}", *cfg.stage2_overrides, *settings])
        shared = _run_stage2_once(cfg, cell_dir, s2, run_stage2)
    if arm.sequential:
        run_generative(phase1, resume=True)
    run_generative(gen, resume=True)
    if arm.video is not None:
        _evaluate_frame_orders(cfg, cell_dir, gen)
    row = {"arm": arm_name, "front": arm.front, "pairs": pairs, "lr": lr, "seed": seed,
           **summarize_cell(cell_dir, has_stage2, checker, cfg.collapse),
           "wall_seconds": time.perf_counter() - started, "eval_protocol": protocol}
    if has_stage2 and shared:
        row["stage2_run"] = shared  # the shared stage-2a run (its time is counted in each cell's stage2_seconds)
    write_json_atomic(done, row)  # its presence marks the cell finished: never half written
    if not cfg.keep_cell_checkpoints:  # only an unfinished cell resumes from them
        for stage in ("stage2", "generative_align", "generative"):
            shutil.rmtree(cell_dir / stage / "checkpoints", ignore_errors=True)
    return row


# Stage-2a settings added after grids were keyed by their config: left out of the key while at their defaults, so a
# grid running since before they existed finds its shared runs again (a non-default value is part of the key).
_KEY_OMITS_AT_DEFAULT = ("optim.schedule", "optim.decay_fraction", "optim.decay_shape", "align_curve")


def stage2_run_key(s2) -> str:
    """The digest that names a shared stage-2a run: its whole config but the output folder (and the settings of
    ``_KEY_OMITS_AT_DEFAULT`` at their defaults)."""
    from dvlp_common.cache import fingerprint

    settings = to_dict(s2)
    settings["logging"] = {k: v for k, v in settings["logging"].items() if k != "output_dir"}
    defaults = to_dict(type(s2)())
    for dotted in _KEY_OMITS_AT_DEFAULT:
        *sections, key = dotted.split(".")
        here, there = settings, defaults
        for section in sections:
            here, there = here[section], there[section]
        if here[key] == there[key]:
            del here[key]
    return fingerprint(settings)


def _run_stage2_once(cfg: AblateConfig, cell_dir: Path, s2, run_stage2) -> str | None:
    """Run a cell's stage 2a, once per distinct stage-2a config: arms whose representation stages are the same run
    (``pformer`` and ``pformer_seq`` differ only in the generative stage; same seed, pairs and weights) share one run
    under ``output_dir/stage2_runs/<digest of its config>``, and each cell's ``stage2`` links to it. A file lock
    keeps two grid processes from training it twice (the second gets :class:`CellBusy` and runs other cells
    meanwhile); its ``stage2_summary.json`` (written last) marks it done.
    A cell of an older grid with a ``stage2`` folder of its own keeps it. Returns the shared run's folder (relative
    to ``output_dir``), or None for a cell's own folder."""
    from filelock import FileLock, Timeout

    own = cell_dir / "stage2"
    if own.is_dir() and not own.is_symlink():
        run_stage2(s2, resume=True)
        return None
    home = Path(cfg.output_dir) / "stage2_runs" / stage2_run_key(s2)
    home.parent.mkdir(parents=True, exist_ok=True)
    if not (home / "stage2_summary.json").exists():
        lock = FileLock(str(home) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise CellBusy(f"another grid process is training its stage 2a (stage2_runs/{home.name})") from None
        try:
            if not (home / "stage2_summary.json").exists():  # not finished between the check above and the lock
                run_stage2(s2.replace(logging=s2.logging.replace(output_dir=str(home))), resume=True)
        finally:
            lock.release()
    if not own.is_symlink():
        cell_dir.mkdir(parents=True, exist_ok=True)
        own.symlink_to(os.path.relpath(home, cell_dir), target_is_directory=True)
    return str(home.relative_to(cfg.output_dir))


def _recorded_protocol(row: dict, eval_class) -> dict | None:
    """A finished cell's evaluation settings, with the defaults of settings added since it ran (a new setting's
    default keeps the old behaviour, so it alone is no protocol change)."""
    recorded = row.get("eval_protocol")
    return None if recorded is None else {**to_dict(eval_class()), **recorded}


def _re_evaluate_cell(cfg: AblateConfig, row: dict, cell_dir: Path, gen, protocol: dict, has_stage2: bool,
                      checker: CaptionChecker) -> dict:
    """The final held-out evaluation of a finished cell's trained front again, under the current eval settings
    (e.g. a changed generation protocol); training and the curve points are not repeated."""
    from .evaluate import EvaluateConfig, run_evaluate

    print(f"   re-evaluating {cell_dir.name} of {row['arm']} under the current eval settings", flush=True)
    run_evaluate(EvaluateConfig(front=str(cell_dir / "generative" / "front"), output_dir=str(cell_dir / "generative"),
                                data_source=cfg.dataset, precision=gen.deepspeed.precision, eval=gen.eval,
                                video=gen.data.video))
    if gen.front.video.enabled:
        _evaluate_frame_orders(cfg, cell_dir, gen, again=True)
    row = {**row, **summarize_cell(cell_dir, has_stage2, checker, cfg.collapse), "eval_protocol": protocol}
    write_json_atomic(cell_dir / "cell.json", row)
    return row


def _evaluate_frame_orders(cfg: AblateConfig, cell_dir: Path, gen, again: bool = False) -> None:
    """A video cell's trained front on the same held-out clips with the frames reversed and shuffled
    (``cfg.frame_orders``), into ``generative/frames_<order>/`` (kept when there unless ``again``)."""
    from .evaluate import EvaluateConfig, run_evaluate

    for order in cfg.frame_orders:
        out = cell_dir / "generative" / f"frames_{order}"
        if again or not (out / "eval.json").exists():
            run_evaluate(EvaluateConfig(front=str(cell_dir / "generative" / "front"), output_dir=str(out),
                                        data_source=cfg.dataset, precision=gen.deepspeed.precision,
                                        eval=gen.eval.replace(frame_order=order), video=gen.data.video))


# ---------------------------------------------------------------------------------------------------------------
# the runner
def run_stage1_once(cfg: AblateConfig, out: Path) -> tuple[Path, str]:
    """The stage-1 P-Former of this dataset (trained here unless ``cfg.pformer`` names one) and its report."""
    if cfg.pformer:
        if not Path(cfg.pformer).is_dir():
            raise ConfigError("pformer", f"{cfg.pformer} is not a P-Former folder")
        return Path(cfg.pformer), ""
    from filelock import FileLock

    from .stage1 import Stage1Config, run_stage1

    with FileLock(str(out / "stage1.lock")):  # a second grid process on this output_dir waits for the first's
        if not ((out / "stage1" / "stage1_summary.json").exists() and (out / "stage1" / "pformer").is_dir()):
            s1 = load_config(Stage1Config, cfg.stage1_config, [
                f"data.source={cfg.dataset}", f"logging.output_dir={out / 'stage1'}",
                f"optim.max_steps={cfg.stage1_steps}", f"optim.warmup_steps={_warmup(cfg.stage1_steps, 30)}",
                "logging.progress_bar=false", *cfg.stage1_overrides])
            run_stage1(s1, resume=True)
    report = next((p for p in (out / "stage1" / "eval.md", out / "stage1" / "stage1_eval.md") if p.exists()), None)
    return out / "stage1" / "pformer", report.read_text() if report else ""


def caption_checker(dataset: str) -> CaptionChecker:
    from pformer.data import load_text_corpus
    from vl_align.sources import resolve_text_source

    return CaptionChecker(list(load_text_corpus(resolve_text_source(dataset))["text"]))


VIDEO_METRICS = ("CIDEr", "exact_match", "kw_order", "kw_set", "kw_order_reversed", "kw_order_shuffled")


def compare_arms(cfg: AblateConfig, cells: list[dict]) -> list[dict]:
    """Paired and unpaired Δ of every arm against the grid's baseline, or against its own ``reference`` arm where it
    names one that is in the grid (video_pformer against video_qformer: the same front without the alignment);
    video grids compare the key-word accuracies per family too. Each row names what it was compared with (``vs``)."""
    video = any(arm_of(a).video is not None for a in cfg.arms)
    metrics = VIDEO_METRICS if video else ("CIDEr", "exact_match", "vqa_accuracy")
    own = {a: arm_of(a).reference for a in cfg.arms if arm_of(a).reference in cfg.arms}
    rows = [{**r, "vs": cfg.baseline}
            for r in compare_to_baseline([c for c in cells if c["arm"] not in own], cfg.baseline, metrics)]
    for arm, ref in own.items():
        rows += [{**r, "vs": ref} for r in compare_to_baseline([c for c in cells if c["arm"] in (arm, ref)], ref,
                                                               metrics)]
    return rows


class CellBusy(Exception):
    """A cell cannot start yet: another grid process is training the stage-2a run it shares."""


def run_cells_once(names: list[str], cells_dir: Path, run_one: Callable[[str], dict],
                   busy_poll_s: float = 30.0) -> dict[str, dict]:
    """``run_one(name)`` for each cell, in order, under the cell's file lock (``cells_dir/<name>.lock``), so that
    several grid processes on one ``output_dir`` share its cells instead of training one cell twice. A cell that
    another process holds is put off: this process runs the free cells meanwhile, then waits for it. By then it is
    finished (``run_one`` reads its row back) or its holder died, and this process resumes it. ``run_one`` raising
    :class:`CellBusy` (its shared stage 2a is held) puts the cell off the same way. Returns the rows by name."""
    from filelock import FileLock, Timeout

    def lock_of(name: str) -> FileLock:
        path = Path(f"{cells_dir / name}.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path))

    rows, busy = {}, []
    for name in names:
        lock = lock_of(name)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"== cell {name}: another grid process holds it; taken up after the free cells", flush=True)
            busy.append(name)
            continue
        try:
            rows[name] = run_one(name)
        except CellBusy as why:
            print(f"== cell {name}: {why}; taken up after the free cells", flush=True)
            busy.append(name)
        finally:
            lock.release()
    while busy:  # the put-off cells: wait for whoever holds them
        name = busy.pop(0)
        with lock_of(name):
            try:
                rows[name] = run_one(name)
            except CellBusy:
                busy.append(name)
                time.sleep(busy_poll_s)
    return rows


def run_ablation(cfg: AblateConfig) -> dict:
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "ablate_config.yaml")
    if cfg.report_only and not (cfg.pformer or (out / "stage1" / "pformer").exists()):
        raise ConfigError("report_only", f"no finished stage 1 in {out / 'stage1'} (and no pformer=DIR)")
    pformer_dir, stage1_md = run_stage1_once(cfg, out)
    checker = caption_checker(cfg.dataset)
    # seeds outermost: an interrupted run has compared every arm on the first seeds
    grid = {cell_name(arm, pairs, lr, seed): (arm, pairs, lr, seed)
            for seed in cfg.seeds for pairs in cfg.pairs for lr in cfg.lrs for arm in cfg.arms}
    missing = [n for n in grid if cfg.report_only and not (out / "cells" / n / "cell.json").exists()]
    todo = [n for n in grid if n not in missing]

    def run_one(name: str) -> dict:
        print(f"== cell {name}", flush=True)
        return run_cell(cfg, *grid[name], pformer_dir, checker)

    rows = run_cells_once(todo, out / "cells", run_one)
    cells = [rows[n] for n in todo]
    if not cells:
        raise ConfigError("report_only", f"no finished cell of this grid in {out / 'cells'}")
    groups = group_cells(cells)
    comparisons = compare_arms(cfg, cells)
    speed = time_to_baseline_quality(cells, cfg.baseline)
    gaps = gap_closed(cells, cfg.baseline)
    wall = time.perf_counter() - start
    text = write_report(out, cfg, cells, groups, comparisons, speed, stage1_md, wall, missing,
                        descriptions={a: arm_of(a).description for a in cfg.arms}, gaps_closed=gaps)
    write_gallery(out, cfg, {a: out / "cells" / cell_name(a, cfg.pairs[0], cfg.lrs[0], cfg.seeds[0]) for a in cfg.arms})
    print(text, flush=True)
    return {"cells": cells, "groups": groups, "comparisons": comparisons, "time_to_baseline_quality": speed,
            "gap_closed": gaps,
            "missing_cells": missing, "wall_seconds": wall}
