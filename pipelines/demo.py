"""The whole-pipeline demo on the embedded easy-VQA default:

stage 1 (P-Former) -> for each arm: stage 2a (Q-Former representation) -> stage 2b (generative) -> held-out
caption + zero-shot VQA evaluation -> one results table (BLIP-2 baseline vs P-Former vs the caption-free control).

Every arm uses the same pairs, seed and budget; they differ only in the alignment term. Finished stages are reused
when the demo is run again (each stage resumes from its own checkpoints).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from pformer import zoo
from pformer.config import Config, load_config, param, save_config

from .cli import CONFIG_DIR

ARMS = {
    # name: (stage-2a alignment weight, stage-2b alignment weight, alignment target)
    "blip2": (0.0, 0.0, "caption"),
    "pformer": (10.0, 100.0, "caption"),
    "control": (10.0, 100.0, "corpus_mean"),
}


@dataclass
class DemoConfig(Config):
    output_dir: str = param("runs/demo", help="where every stage of the demo writes")
    arms: list[str] = param(default_factory=lambda: list(ARMS), help=f"arms to run, among {', '.join(ARMS)}")
    stage1_steps: int = param(150, ge=1, help="stage-1 optimizer steps")
    stage2_steps: int = param(40, ge=1, help="representation-stage steps per arm")
    generative_steps: int = param(80, ge=1, help="generative-stage steps per arm")
    max_pairs: int = param(500, ge=1, help="image-text pairs per arm (the scarce-pair regime)")
    eval_images: int = param(100, ge=1, help="held-out images captioned per arm")
    eval_questions: int = param(200, ge=0, help="held-out VQA questions per arm")
    seed: int = param(0, help="seed shared by every arm")

    def check(self) -> None:
        from pformer.config import ConfigError

        for arm in self.arms:
            if arm not in ARMS:
                raise ConfigError("arms", f"unknown arm {arm!r}; allowed values: {', '.join(ARMS)}")


def prepare() -> None:
    """Build the offline presets and the embedded dataset into the cache (idempotent)."""
    from .sources import embedded_files

    for name in zoo.PRESETS:
        print(f"{name}: {zoo.resolve(name)}", flush=True)
    for key, path in embedded_files("easy-vqa").items():
        print(f"easy-vqa {key}: {path}", flush=True)


def _warmup(steps: int, wanted: int) -> int:
    return min(wanted, max(1, steps // 5))


def _final(metrics_path: Path, key: str) -> float | None:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    return rows[-1].get(key) if rows else None


def run_demo(cfg: DemoConfig) -> list[dict]:
    from .generative import GenerativeConfig, run_generative
    from .reports import markdown_table
    from .stage1 import Stage1Config, run_stage1
    from .stage2 import Stage2Config, run_stage2

    start = time.perf_counter()
    out = Path(cfg.output_dir)
    save_config(cfg, out / "demo_config.yaml")
    common = [f"seed={cfg.seed}"]
    s1 = load_config(Stage1Config, CONFIG_DIR / "stage1.yaml",
                     common + [f"logging.output_dir={out / 'stage1'}", f"optim.max_steps={cfg.stage1_steps}",
                               f"optim.warmup_steps={_warmup(cfg.stage1_steps, 30)}"])
    t0 = time.perf_counter()
    run_stage1(s1, resume=True)
    timings = {"stage1_s": time.perf_counter() - t0}
    pformer_dir = out / "stage1" / "pformer"
    rows = []
    for arm in cfg.arms:
        w1, w2, target = ARMS[arm]
        data = [f"data.max_pairs={cfg.max_pairs}", f"pformer={pformer_dir}", f"align.target={target}"]
        t0 = time.perf_counter()
        s2 = load_config(Stage2Config, CONFIG_DIR / "stage2.yaml", common + data + [
            f"align.weight={w1}", f"optim.max_steps={cfg.stage2_steps}",
            f"optim.warmup_steps={_warmup(cfg.stage2_steps, 5)}",
            f"logging.output_dir={out / arm / 'stage2'}"])
        run_stage2(s2, resume=True)
        t1 = time.perf_counter()
        gen = load_config(GenerativeConfig, CONFIG_DIR / "generative.yaml", common + data + [
            f"align.weight={w2}", f"optim.max_steps={cfg.generative_steps}",
            f"optim.warmup_steps={_warmup(cfg.generative_steps, 10)}",
            f"init_front={out / arm / 'stage2' / 'front'}", f"logging.output_dir={out / arm / 'generative'}",
            f"eval.max_images={cfg.eval_images}", f"eval.max_questions={cfg.eval_questions}"])
        run_generative(gen, resume=True)
        t2 = time.perf_counter()
        scores = json.loads((out / arm / "generative" / "eval.json").read_text())
        cap = scores["captioning"]
        rows.append({"arm": arm, "align ω1/ω2": f"{w1:g}/{w2:g}", "target": target,
                     "CIDEr": cap["CIDEr"], "BLEU-4": cap["Bleu_4"], "METEOR": cap.get("METEOR", float("nan")),
                     "ROUGE-L": cap["ROUGE_L"], "exact": cap["exact_match"],
                     "VQA acc": scores.get("vqa", {}).get("accuracy", float("nan")),
                     "final LM loss": _final(out / arm / "generative" / "metrics.jsonl", "lm"),
                     "train s": (t1 - t0) + (t2 - t1)})
    wall = time.perf_counter() - start
    table = markdown_table(rows, digits=3)
    stage1_md = (out / "stage1" / "stage1_eval.md").read_text() if (out / "stage1" / "stage1_eval.md").exists() else ""
    text = "\n".join([
        "# Demo results (embedded easy-VQA default)", "",
        f"Wall time {wall / 60:.1f} min (stage 1 {timings['stage1_s'] / 60:.1f} min, skipped if already done). "
        f"One seed, {cfg.max_pairs} training pairs, {cfg.stage2_steps} + {cfg.generative_steps} steps per arm: a "
        "smoke-scale comparison, not evidence; differences within seed noise are not meaningful (see the ablation "
        "runner for seeds and spread).", "",
        stage1_md, "## Held-out captioning and zero-shot VQA per arm", "", table])
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "wall_seconds": wall, **timings}, indent=2))
    _write_gallery(out, cfg.arms)
    print(text, flush=True)
    return rows


def _write_gallery(out: Path, arms: list[str], n: int = 8) -> None:
    """A markdown page with a few held-out images and every arm's caption for them."""
    preds = {arm: json.loads((out / arm / "generative" / "predictions.json").read_text())["captions"][:n]
             for arm in arms}
    lines = ["# Held-out captions per arm", "", "| image | reference | " + " | ".join(arms) + " |",
             "|---|---|" + "---|" * len(arms)]
    for i, first in enumerate(preds[arms[0]]):
        cells = [preds[a][i]["prediction"] for a in arms]
        lines.append(f"| ![]({first['image_path']}) | {first['references'][0]} | " + " | ".join(cells) + " |")
    (out / "captions.md").write_text("\n".join(lines) + "\n")
