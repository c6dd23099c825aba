"""Held-out evaluation of a video front: video captioning (the image metrics: BLEU-4, METEOR, ROUGE-L, CIDEr, exact
match) and, where the records carry key words (``embedded:motion``), the key-word accuracy of each caption family
and category (``vl_align.motion.keyword_accuracy``: did the caption say "left" when the shape moved left).

``eval.frame_order`` feeds the uniformly sampled frames as sampled, reversed or shuffled. Reversal turns an
order-family clip into its pair partner (the same frames in the opposite order, the opposite caption), so under
``reversed`` the key words are scored twice: against the clip's own labels (``keywords``: an order-aware model
falls, it answers the partner's caption) and against what the fed frames show (``keywords_shown``: the partner's
labels for the order family; set-family contents do not change with order). An order-blind model scores the same
in all three orders; one that reads order is high on ``keywords_shown`` under reversal and at chance on the order
family under shuffling.

Files, as the image evaluation: ``eval.json``, ``eval.md``, ``predictions.json`` (``captions``: video id, path,
prediction, references).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from dvlp_common.config import ConfigError
from dvlp_common.precision import autocast
from dvlp_common.reports import write_report

from .generative import generate
from .metrics import java_available, load_metric
from .motion import keyword_accuracy
from .video_inputs import VideoInputs, VideoRecord, front_frames, held_out_videos


def video_test_records(cfg, data, num_frames: int) -> list[VideoRecord] | None:
    """The held-out clips: ``cfg.captions_source`` (a video caption file) or the test split of an embedded video
    ``data.source``; None when there is neither."""
    if cfg.split != "test":
        raise ConfigError("eval.split", "'validation' carves images out of an image set; a video front evaluates "
                                        "on its test split or eval.captions_source")
    # no VQA: the question files are about images (eval.max_questions does not apply to a video front)
    return held_out_videos(data, num_frames, cfg.captions_source, data.video.eval_annotation_split)


def shown_records(records: list[dict], all_records: list[dict], frame_order: str) -> list[dict]:
    """What the fed frames show, as key-word records: under ``reversed`` an order-family clip shows its pair
    partner's content (its time reversal), so it is scored with the partner's key words; everything else keeps its
    own."""
    if frame_order != "reversed":
        return records
    by_pair: dict[str, list[dict]] = defaultdict(list)
    for r in all_records:
        by_pair[r["pair_id"]].append(r)
    out = []
    for r in records:
        if r.get("family") != "order":
            out.append(r)
            continue
        partner = [p for p in by_pair[r["pair_id"]] if p["video_id"] != r["video_id"]]
        if len(partner) != 1:  # an odd split's last pair has no partner: its reversal's truth is unknown
            continue
        out.append({**partner[0], "video_id": r["video_id"]})
    return out


def evaluate_video_generative(front, llm, tower, cfg, data, run_dir: Path, device, dtype,
                              first_images: Callable[[Iterable[str], int | None], list[str]]) -> dict | None:
    """Caption the first ``cfg.max_images`` held-out clips (by id, ``first_images``: the image evaluation's rule,
    ``vl_align.evaluation.first_images``, passed in because that module dispatches here) with ``front``'s T uniformly sampled frames in
    ``cfg.frame_order``; score the captions and, where there are key words, the key-word accuracy. None, with a
    message, when there is no held-out set."""
    num_frames = front_frames(front)
    records = video_test_records(cfg, data, num_frames)
    if records is None:
        print(f"video captioning evaluation skipped: data.source={data.source} has no known held-out split; set "
              "eval.captions_source", flush=True)
        return None
    by_video: dict[str, list[str]] = defaultdict(list)
    first: dict[str, VideoRecord] = {}
    for r in records:
        by_video[r.image_id].append(r.caption)
        first.setdefault(r.image_id, r)
    video_ids = first_images(by_video, cfg.max_images)
    inputs = VideoInputs(tower, num_frames, train=False, frame_order=cfg.frame_order)
    gen_kwargs = {"max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams, "do_sample": cfg.do_sample,
                  "top_p": cfg.top_p, "min_new_tokens": cfg.min_new_tokens}
    captions: list[str] = []
    for start in range(0, len(video_ids), cfg.batch_size):
        chunk = video_ids[start:start + cfg.batch_size]
        clips = inputs([first[v].video_path for v in chunk], device)
        captions += generate(front, llm, prompts=[cfg.caption_prompt] * len(chunk), **clips, **gen_kwargs)
    refs = [by_video[v] for v in video_ids]
    use_meteor = cfg.meteor and java_available()
    scores = load_metric("coco_caption").compute(predictions=captions, references=refs, meteor=use_meteor)
    scores["exact_match"] = sum(c.strip().lower().rstrip(".") in [x.lower() for x in rs]
                                for c, rs in zip(captions, refs)) / max(len(captions), 1)
    result: dict[str, dict] = {"captioning": {"num_images": len(video_ids), "num_frames": num_frames, **scores}}
    row = {"frame_order": cfg.frame_order, **{k: v for k, v in scores.items() if isinstance(v, float)}}
    keyed = [first[v].meta for v in video_ids]
    if keyed and all("keywords" in m for m in keyed):
        preds = dict(zip(video_ids, captions))
        result["keywords"] = keyword_accuracy(preds, keyed, by="family")
        result["keywords_by_category"] = keyword_accuracy(preds, keyed, by="category")
        row.update({f"keywords_{k}": v for k, v in result["keywords"].items()})
        if cfg.frame_order == "reversed":
            shown = shown_records(keyed, [r.meta for r in records], cfg.frame_order)
            result["keywords_shown"] = keyword_accuracy(preds, shown, by="family")
            row.update({f"shown_{k}": v for k, v in result["keywords_shown"].items()})
    predictions = [{"image_id": v, "image_path": first[v].video_path, "prediction": c, "references": rs,
                    **({"category": first[v].meta["category"]} if "category" in first[v].meta else {})}
                   for v, c, rs in zip(video_ids, captions, refs)]
    note = (f"Clips: {num_frames} uniformly sampled frames fed {cfg.frame_order.replace('_', ' ')}. keywords_*: "
            "share of captions holding every key word of the clip's label and none of its contrast words, per "
            "caption family (order: the answer depends on frame order, chance 0.5 for a model that names one side; "
            "set: needs more than one frame).")
    if "keywords_shown" in result:
        note += " shown_*: the same against what the reversed frames show (an order-family clip reversed is its " \
                "pair partner)."
    write_report(run_dir, "eval", result, [row], f"Held-out video captioning ({len(video_ids)} clips)",
                 {"captions": predictions, "vqa": []}, note)
    return result


@torch.no_grad()
def heldout_video_lm_loss(front, llm, tower, cfg, data, device, dtype, max_text_length: int | None,
                          first_images: Callable[[Iterable[str], int | None], list[str]]) -> dict | None:
    """The frozen LLM's caption loss on the held-out clips with the front's prefix (the video twin of
    ``vl_align.evaluation.heldout_lm_loss``). None without a held-out set."""
    num_frames = front_frames(front)
    records = video_test_records(cfg, data, num_frames)
    if records is None:
        return None
    chosen = set(first_images({r.image_id for r in records}, cfg.max_images))
    records = [r for r in records if r.image_id in chosen]
    inputs = VideoInputs(tower, num_frames, train=False)
    total, tokens = 0.0, 0
    with autocast(device, dtype):
        for start in range(0, len(records), cfg.batch_size):
            chunk = records[start:start + cfg.batch_size]
            prefix = front("queries", **inputs([r.video_path for r in chunk], device))["prompt_pred"]
            target_ids, target_mask = llm.tokenize_targets([r.caption for r in chunk], max_text_length, device)
            count = int(target_mask.sum())
            total += float(llm.prefix_lm(prefix, target_ids, target_mask).loss) * count
            tokens += count
    return {"lm_loss": total / max(tokens, 1), "tokens": tokens, "pairs": len(records)}


__all__ = ["evaluate_video_generative", "heldout_video_lm_loss", "shown_records", "video_test_records"]
