"""Evaluation of a generative front on held-out images: captioning (BLEU-4, METEOR, ROUGE-L, CIDEr through our local
`evaluate` modules) and zero-shot VQA accuracy (VQAv2 normalisation). Writes JSON, a markdown table and the
predictions for inspection.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from pformer import zoo
from pformer.config import Config, param
from vl_align.generative import generate
from vl_align.metrics import java_available, load_metric
from vl_align.vision import vision_feature_cache

from .reports import write_table
from .sources import embedded_files


@dataclass
class EvalConfig(Config):
    enabled: bool = param(True, help="evaluate after training")
    max_images: Optional[int] = param(200, help="held-out images to caption (None: all)")
    max_questions: Optional[int] = param(300, help="held-out VQA questions (None: all; 0: no VQA)")
    caption_prompt: str = param("", help="text after the prefix when captioning (e.g. 'a photo of ')")
    vqa_prompt: str = param("Question: {} Short answer:", help="VQA prompt; {} is the question")
    batch_size: int = param(32, ge=1, help="images per generation batch")
    max_new_tokens: int = param(20, ge=1, help="generation length limit")
    num_beams: int = param(1, ge=1, help="beam search width (1: greedy)")
    do_sample: bool = param(False, help="nucleus sampling instead of greedy/beam")
    top_p: float = param(0.9, gt=0.0, le=1.0, help="nucleus mass when sampling")
    meteor: bool = param(True, help="compute METEOR (needs Java)")


def _test_records(data_source: str) -> tuple[list[dict], list[dict]]:
    if not data_source.startswith("embedded:"):
        raise ValueError("held-out evaluation data: only embedded sources are wired here; pass eval files at scale")
    files = embedded_files(data_source.split(":", 1)[1])
    pairs = [json.loads(line) for line in files["pairs_test"].read_text().splitlines()]
    vqa = [json.loads(line) for line in files["vqa_test"].read_text().splitlines()]
    return pairs, vqa


class _ImageInputs:
    """What the front takes for a list of images: cached features, or pixels when the tower runs inside it."""

    def __init__(self, front, tower, all_paths: list[str], device, dtype):
        self.tower, self.device = tower, device
        self.live = getattr(front, "vision", None) is not None  # ELIP / features not cached
        self.store = None if self.live else vision_feature_cache(tower, all_paths, zoo.cache_root(), device, dtype)

    def __call__(self, paths: list[str]) -> dict:
        if self.live:
            return {"pixel_values": self.tower.preprocess(paths).to(self.device)}
        return {"image_embeds": self.store.get(paths).to(self.device)}


def evaluate_generative(front, llm, tower, cfg: EvalConfig, data, run_dir: Path, device, dtype) -> dict:
    pairs, questions = _test_records(data.source)
    by_image: dict[str, list[str]] = defaultdict(list)
    paths: dict[str, str] = {}
    for r in pairs:
        by_image[r["image_id"]].append(r["caption"])
        paths[r["image_id"]] = r["image_path"]
    image_ids = sorted(by_image, key=lambda i: (len(i), i))[:cfg.max_images or None]
    gen_kwargs = dict(max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, do_sample=cfg.do_sample,
                      top_p=cfg.top_p)
    qs = questions[:cfg.max_questions or None] if cfg.max_questions != 0 else []
    inputs_for = _ImageInputs(front, tower, [paths[i] for i in image_ids] + [q["image_path"] for q in qs], device,
                              dtype)
    captions = []
    for start in range(0, len(image_ids), cfg.batch_size):
        chunk = image_ids[start:start + cfg.batch_size]
        inputs = inputs_for([paths[i] for i in chunk])
        captions += generate(front, llm, prompts=[cfg.caption_prompt] * len(chunk), **inputs, **gen_kwargs)
    refs = [by_image[i] for i in image_ids]
    use_meteor = cfg.meteor and java_available()
    caption_scores = load_metric("coco_caption").compute(predictions=captions, references=refs, meteor=use_meteor)
    exact = sum(c.strip().lower().rstrip(".") in [r.lower() for r in rs] for c, rs in zip(captions, refs))
    caption_scores["exact_match"] = exact / max(len(captions), 1)
    result = {"captioning": {"num_images": len(image_ids), **caption_scores}}
    predictions = [{"image_id": i, "image_path": paths[i], "prediction": c, "references": rs}
                   for i, c, rs in zip(image_ids, captions, refs)]

    vqa_rows = []
    if qs:
        answers = []
        for start in range(0, len(qs), cfg.batch_size):
            chunk = qs[start:start + cfg.batch_size]
            inputs = inputs_for([q["image_path"] for q in chunk])
            answers += generate(front, llm, prompts=[cfg.vqa_prompt.format(q["question"]) for q in chunk],
                                **inputs, **{**gen_kwargs, "max_new_tokens": min(cfg.max_new_tokens, 8)})
        acc = load_metric("vqa_accuracy").compute(predictions=answers, references=[[q["answer"]] for q in qs])
        result["vqa"] = {"num_questions": len(qs), **acc}
        vqa_rows = [{"question": q["question"], "image_path": q["image_path"], "answer": q["answer"],
                     "prediction": a} for q, a in zip(qs, answers)]
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    (run_dir / "predictions.json").write_text(json.dumps({"captions": predictions, "vqa": vqa_rows}, indent=2))
    row = {k: v for k, v in result["captioning"].items() if isinstance(v, float)}
    if "vqa" in result:
        row["vqa_accuracy"] = result["vqa"]["accuracy"]
    write_table(run_dir / "eval.md", [row], title=f"Held-out evaluation ({len(image_ids)} images)")
    return result
