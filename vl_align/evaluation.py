"""Held-out evaluations of trained fronts, and their reports.

* Generative front (stage 2b): captioning (BLEU-4, METEOR, ROUGE-L, CIDEr through our local `evaluate` modules) and
  zero-shot VQA accuracy (VQAv2 normalisation).
* Representation front (stage 2a, ``qformer`` / ``elip``): image<->text retrieval R@1/5/10, ranked by ITC and then
  re-ranked by ITM (BLIP-2's protocol, see ``vl_align.retrieval``).

Every evaluation writes the same three files through ``dvlp_common.reports.write_report``: ``<name>.json`` (a dict of
named sections of numeric scores), ``<name>.md`` (a markdown table) and the predictions for inspection.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from dvlp_common.config import Config, ConfigError, param
from dvlp_common.precision import autocast
from dvlp_common.reports import write_report

from .generative import generate
from .inputs import ImageInputs
from .metrics import java_available, load_metric
from .data import load_image_text_pairs
from .pairs import ImageTextPair, PairDataConfig, load_pairs
from .retrieval import itc_similarity, recalls, rerank_with_itm, top_k
from .sources import embedded_files
from .video_inputs import VideoInputs, front_frames, is_video_front


@dataclass
class EvalConfig(Config):
    enabled: bool = param(True, help="evaluate after training")
    max_images: Optional[int] = param(200, help="held-out images to caption (None: all)")
    max_questions: Optional[int] = param(300, help="held-out VQA questions (None: all; 0: no VQA)")
    caption_prompt: str = param("", help="text after the prefix when captioning (e.g. 'a photo of ')")
    vqa_prompt: str = param("Question: {} Short answer:", help="VQA prompt; {} is the question")
    batch_size: int = param(32, ge=1, help="images per generation batch")
    max_new_tokens: int = param(20, ge=1, help="generation length limit")
    min_new_tokens: int = param(1, ge=0, help="the stop tokens (EOS, newline) are suppressed until this many new "
                                              "tokens with visible text, so an answer or caption is never empty "
                                              "(BLIP-2's LAVIS protocol, min_len=1 with newline as EOS, except that "
                                              "whitespace does not count); 0: a model may answer nothing, which "
                                              "scores as wrong")
    num_beams: int = param(1, ge=1, help="beam search width (1: greedy)")
    do_sample: bool = param(False, help="nucleus sampling instead of greedy/beam")
    top_p: float = param(0.9, gt=0.0, le=1.0, help="nucleus mass when sampling")
    meteor: bool = param(True, help="compute METEOR (needs Java)")
    captions_source: Optional[str] = param(None, help="held-out image-caption pairs with image paths (COCO caption "
                                                      "JSON or JSONL, as data.source; all captions of an image are "
                                                      "its references); None: the test split of an embedded "
                                                      "data.source")
    questions_source: Optional[str] = param(None, help="held-out VQA questions: JSONL of {image_path, question, "
                                                       "answer | answers: [...]}, paths relative to the file; "
                                                       "None: those of an embedded data.source")

    split: Literal["test", "validation"] = param("test", help="the held-out images: the test split, or the "
                                                            "validation images carved out of the training pairs "
                                                            "(data.validation_images) for choosing settings")
    frame_order: Literal["as_is", "reversed", "shuffled"] = param(
        "as_is", help="video fronts: feed the uniformly sampled frames as sampled, reversed or shuffled (a seeded "
                      "permutation per clip), to probe whether the front reads frame order (vl_align.video_eval)")

    def check(self) -> None:
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError("min_new_tokens", f"{self.min_new_tokens} is above max_new_tokens "
                                                f"{self.max_new_tokens}")


def _test_records(cfg: EvalConfig, data: PairDataConfig) -> tuple[list[dict], list[dict]] | None:
    """Held-out (pairs, questions): the validation images of ``data`` (``cfg.split``), or ``cfg.captions_source`` /
    ``cfg.questions_source``, else the test split of an embedded ``data.source``; None when there is no held-out
    caption set to evaluate on."""
    source = data.source
    files = embedded_files(source.split(":", 1)[1]) if source.startswith("embedded:") else {}
    if cfg.split == "validation":
        if not data.validation_images:
            raise ConfigError("eval.split", "'validation' needs data.validation_images > 0")
        held = load_pairs(data, seed=0, split="validation")[0]
        if any(r.image_path is None for r in held):
            raise ConfigError("eval.split", f"'validation' evaluates images by path; {source} has none")
        pairs = [{"image_id": r.image_id, "image_path": r.image_path, "caption": r.caption} for r in held]
        paths = {r["image_path"] for r in pairs}
        questions = [q for q in _read_jsonl_records(files["vqa_train"], ("image_path", "question"))
                     if q["image_path"] in paths] if files and not cfg.questions_source else []
        if cfg.questions_source:
            questions = _questions_file(cfg.questions_source)
        return pairs, questions
    if cfg.captions_source:
        dataset = load_image_text_pairs(cfg.captions_source)
        if "image_path" not in dataset.column_names:
            raise ConfigError("eval.captions_source", f"{cfg.captions_source} has no image paths (columns "
                                                      f"{dataset.column_names}); use a COCO caption JSON or JSONL")
        pairs = [{"image_id": str(r["image_id"]), "image_path": r["image_path"], "caption": r["caption"]}
                 for r in dataset]
    elif files:
        pairs = _read_jsonl_records(files["pairs_test"], ("image_id", "image_path", "caption"))
    else:
        return None
    if cfg.questions_source:
        questions = _questions_file(cfg.questions_source)
    else:
        questions = _read_jsonl_records(files["vqa_test"], ("image_path", "question")) if files else []
    return pairs, questions


def _questions_file(path: str) -> list[dict]:
    """A JSONL of ``image_path`` (relative to the file), ``question`` and ``answer`` or ``answers``."""
    questions = _read_jsonl_records(Path(path), ("image_path", "question"))
    root = Path(path).resolve().parent
    for i, q in enumerate(questions):
        q["image_path"] = str(root / q["image_path"])  # an absolute path stays as it is
        if "answer" not in q and "answers" not in q:
            raise ConfigError("eval.questions_source", f"question {i + 1} has neither 'answer' nor 'answers'")
    return questions


def first_images(image_ids, max_images: int | None) -> list[str]:
    """The held-out images every evaluation takes: the first ``max_images`` by id (shorter ids first, so "10" comes
    after "9"); all of them for None."""
    return sorted(image_ids, key=lambda i: (len(i), i))[:max_images or None]


def _read_jsonl_records(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(str(path), f"line {number} is not JSON: {err}") from None
        missing = [k for k in required if k not in record]
        if missing:
            raise ConfigError(str(path), f"line {number} lacks {', '.join(missing)}")
        records.append(record)
    return records


def generate_batched(front, llm, images: ImageInputs, image_refs: list[str | bytes], prompts: list[str],
                     batch_size: int, device, **gen_kwargs) -> list[str]:
    """One generated text per (image, prompt), ``batch_size`` at a time; ``gen_kwargs`` go to ``FrozenLLM.generate``."""
    out: list[str] = []
    for start in range(0, len(image_refs), batch_size):
        inputs = images(image_refs[start:start + batch_size], device)
        out += generate(front, llm, prompts=prompts[start:start + batch_size], **inputs, **gen_kwargs)
    return out


def evaluate_generative(front, llm, tower, cfg: EvalConfig, data: PairDataConfig, run_dir: Path, device,
                        dtype) -> dict | None:
    """Held-out captioning (BLEU, METEOR, ROUGE-L, CIDEr, exact match) and zero-shot VQA; eval.json, eval.md and
    predictions.json in ``run_dir``. None, with a message, when there is no held-out set (see ``_test_records``).
    A video front is evaluated on held-out clips instead (``vl_align.video_eval``)."""
    if is_video_front(front):
        from .video_eval import evaluate_video_generative

        return evaluate_video_generative(front, llm, tower, cfg, data, run_dir, device, dtype, first_images)
    if cfg.frame_order != "as_is":
        raise ConfigError("eval.frame_order", f"{cfg.frame_order!r} reorders a video front's frames; this front "
                                              "takes images")
    records = _test_records(cfg, data)
    if records is None:
        print(f"caption/VQA evaluation skipped: data.source={data.source} has no known held-out split; set "
              "eval.captions_source (and eval.questions_source)", flush=True)
        return None
    pairs, questions = records
    by_image: dict[str, list[str]] = defaultdict(list)
    paths: dict[str, str] = {}
    for r in pairs:
        by_image[r["image_id"]].append(r["caption"])
        paths[r["image_id"]] = r["image_path"]
    image_ids = first_images(by_image, cfg.max_images)
    gen_kwargs = dict(max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, do_sample=cfg.do_sample,
                      top_p=cfg.top_p, min_new_tokens=cfg.min_new_tokens)
    qs = questions[:cfg.max_questions or None] if cfg.max_questions != 0 else []
    images = ImageInputs.build(tower, [paths[i] for i in image_ids] + [q["image_path"] for q in qs],
                               live_tower=front.vision is not None, device=device, dtype=dtype)
    captions = generate_batched(front, llm, images, [paths[i] for i in image_ids],
                                [cfg.caption_prompt] * len(image_ids), cfg.batch_size, device, **gen_kwargs)
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
        vqa_kwargs = {**gen_kwargs, "max_new_tokens": max(min(cfg.max_new_tokens, 8), cfg.min_new_tokens)}
        answers = generate_batched(front, llm, images, [q["image_path"] for q in qs],
                                   [cfg.vqa_prompt.format(q["question"]) for q in qs], cfg.batch_size, device,
                                   **vqa_kwargs)
        acc = load_metric("vqa_accuracy").compute(predictions=answers,
                                                  references=[q.get("answers") or [q["answer"]] for q in qs])
        result["vqa"] = {"num_questions": len(qs), **acc}
        vqa_rows = [{"question": q["question"], "image_path": q["image_path"],
                     "answer": q.get("answer", (q.get("answers") or [None])[0]), "prediction": a}
                    for q, a in zip(qs, answers)]
    row = {k: v for k, v in result["captioning"].items() if isinstance(v, float)}
    if "vqa" in result:
        row["vqa_accuracy"] = result["vqa"]["accuracy"]
    write_report(run_dir, "eval", result, [row], f"Held-out evaluation ({len(image_ids)} images)",
                 {"captions": predictions, "vqa": vqa_rows})
    return result


def heldout_caption_pairs(cfg: EvalConfig, data: PairDataConfig) -> list[dict] | None:
    """Every (image, caption) pair of the first ``cfg.max_images`` held-out images (None without a held-out set): what
    the step-0 loss and the held-out alignment read."""
    records = _test_records(cfg, data)
    if records is None:
        return None
    chosen = set(first_images({r["image_id"] for r in records[0]}, cfg.max_images))
    return [r for r in records[0] if r["image_id"] in chosen]


@torch.no_grad()
def heldout_lm_loss(front, llm, tower, cfg: EvalConfig, data: PairDataConfig, device, dtype,
                    max_text_length: int | None = None) -> dict | None:
    """The frozen LLM's caption loss on held-out images with the front's prefix W·Z, as the generative stage would
    score it before any LM training (its step 0): the mean over all caption tokens (and their count). The images
    and references are those of :func:`evaluate_generative`. None without a held-out set."""
    if is_video_front(front):
        from .video_eval import heldout_video_lm_loss

        return heldout_video_lm_loss(front, llm, tower, cfg, data, device, dtype, max_text_length, first_images)
    pairs = heldout_caption_pairs(cfg, data)
    if pairs is None:
        return None
    images = ImageInputs.build(tower, [r["image_path"] for r in pairs], live_tower=front.vision is not None,
                               device=device, dtype=dtype)
    total, tokens = 0.0, 0
    with autocast(device, dtype):
        for start in range(0, len(pairs), cfg.batch_size):
            chunk = pairs[start:start + cfg.batch_size]
            prefix = front("queries", **images([r["image_path"] for r in chunk], device))["prompt_pred"]
            target_ids, target_mask = llm.tokenize_targets([r["caption"] for r in chunk], max_text_length, device)
            count = int(target_mask.sum())
            total += float(llm.prefix_lm(prefix, target_ids, target_mask).loss) * count
            tokens += count
    return {"lm_loss": total / max(tokens, 1), "tokens": tokens, "pairs": len(pairs)}


class HeldoutAlignment:
    """How close W·Z is to P(y) on held-out images, not the training batches: stage 2a's convergence instrument (at
    hundreds of epochs over a small pair set the training batches' R² also measures memorisation). The images and
    captions are those of :func:`heldout_lm_loss` (:func:`heldout_caption_pairs`); their features and P(y) are
    computed once, here, and each call runs only the front.

    ``center`` is the corpus-mean prompt [n, d] of the training-batch diagnostics, so ``align_r2`` here and there are
    the same quantity (:func:`vl_align.alignment.alignment_diagnostics`) on different pairs."""

    def __init__(self, tower, cfg: EvalConfig, data: PairDataConfig, pformer_dir: str, center: torch.Tensor,
                 live_tower: bool, device, dtype, cache_root: str | Path):
        from pformer.targets import prompt_target_cache

        self.pairs = heldout_caption_pairs(cfg, data)
        if self.pairs is None:
            raise ConfigError("align_curve.every", f"{data.source} has no held-out images to read the alignment on; "
                                                   "set zero_shot.split=validation with data.validation_images, or "
                                                   "zero_shot.captions_source")
        captions = [r["caption"] for r in self.pairs]
        self.targets = prompt_target_cache(pformer_dir, captions, cache_root, device=device, dtype=dtype).get(
            captions).float()  # [P, n, d]
        self.images = ImageInputs.build(tower, [r["image_path"] for r in self.pairs], live_tower=live_tower,
                                        device=device, dtype=dtype)
        self.center, self.batch_size, self.device, self.dtype = center, cfg.batch_size, device, dtype

    @torch.no_grad()
    def __call__(self, front) -> dict[str, float]:
        from .alignment import alignment_diagnostics

        was_training = front.training
        front.eval()
        preds = []
        with autocast(self.device, self.dtype):
            for start in range(0, len(self.pairs), self.batch_size):
                chunk = self.pairs[start:start + self.batch_size]
                preds.append(front("queries", **self.images([r["image_path"] for r in chunk], self.device))[
                    "prompt_pred"].float())  # [b, n, d]: W·Z
        front.train(was_training)
        pred = torch.cat(preds)
        if pred.shape != self.targets.shape:
            raise ValueError(f"W·Z is {list(pred.shape[1:])} per image but the P-Former's prompts are "
                             f"{list(self.targets.shape[1:])}")
        out = {k: float(v) for k, v in alignment_diagnostics(pred, self.targets.to(pred.device), self.center).items()}
        return {**out, "pairs": len(self.pairs), "images": len({r["image_id"] for r in self.pairs})}


# ----------------------------------------------------------------------------------------------------------------
# image <-> text retrieval (stage 2a)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RetrievalEvalConfig(Config):
    enabled: bool = param(True, help="image-text retrieval on held-out pairs after training (main rank)")
    source: Optional[str] = param(None, help="held-out pairs (any format of data.source); None: the test split of "
                                             "an embedded data.source (other sources are then not evaluated)")
    max_images: Optional[int] = param(200, help="held-out images in the gallery, the first by id (None: all)")
    k: int = param(16, ge=1, help="ITC candidates per query re-ranked by ITM (BLIP-2/LAVIS: 128 on COCO 5k)")
    batch_size: int = param(64, ge=1, help="images, texts or ITM pairs per forward")


@dataclass
class Gallery:
    """What retrieval ranks: distinct images and distinct caption strings, and which pairs are correct."""
    image_ids: list[str]
    images: list[str | bytes]  # each image's path or encoded bytes
    captions: list[list[str]]  # each image's distinct captions
    texts: list[str]  # the distinct captions of all images, in first-seen order
    gold: torch.Tensor  # [I, T] bool: text t is one of image i's captions
    # what ``gold`` means, for the report: after the number of texts
    ground_truth: str = ("distinct captions; a text counts as correct for every image that has it as a caption "
                         "(caption equality)")


def build_gallery(pairs: list[ImageTextPair], max_images: int | None = None) -> Gallery:
    """Group ``pairs`` by image (the first ``max_images`` by id, as the captioning evaluation picks them) and list
    each caption string once (whitespace-stripped, exact match); ``gold`` is caption equality."""
    by_image: dict[str, list[str]] = defaultdict(list)
    images: dict[str, str | bytes] = {}
    for r in pairs:
        image_id, caption = r.image_id, r.caption.strip()
        if caption not in by_image[image_id]:
            by_image[image_id].append(caption)
        images[image_id] = r.image
    image_ids = first_images(by_image, max_images)
    texts = list(dict.fromkeys(c for i in image_ids for c in by_image[i]))
    text_index = {t: j for j, t in enumerate(texts)}
    gold = torch.zeros(len(image_ids), len(texts), dtype=torch.bool)
    for i, image_id in enumerate(image_ids):
        gold[i, [text_index[c] for c in by_image[image_id]]] = True
    return Gallery(image_ids, [images[i] for i in image_ids], [by_image[i] for i in image_ids], texts, gold)


def _path_or_none(image: str | bytes) -> str | None:
    return image if isinstance(image, str) else None  # images from shards have no path to report


def evaluate_retrieval(front, tower, tokenizer, cfg: RetrievalEvalConfig, pairs: list[ImageTextPair], run_dir: Path,
                       device, dtype=None, max_text_length: int = 32) -> dict:
    """R@1/5/10 image->text and text->image of a representation front on held-out ``pairs``.

    Gallery: the first ``cfg.max_images`` distinct images (by id) and the distinct caption strings they own
    (whitespace-stripped, exact match). Ground truth by caption equality: text t is correct for image i iff t is one of
    i's captions, so an image->text hit is any of the image's captions and a text->image hit is ANY image having
    that caption (easy-VQA has 24 distinct captions: many images share one). Listing equal strings once keeps the
    ITM candidates from being spent on copies that would score the same.

    Ranked by ITC, then each query's top ``cfg.k`` re-ranked by ITM + ITC (``vl_align.retrieval``). The front runs in
    eval mode (ELIP then does not prune: pruning is for pre-training). Writes ``retrieval.json`` (sections ``itc``,
    ``itm_rerank``, ``gallery``), ``retrieval.md`` and ``retrieval_predictions.json`` (top 5 per query, both rankings).
    """
    return evaluate_gallery(front, tower, tokenizer, cfg, build_gallery(pairs, cfg.max_images), run_dir, device,
                            dtype, max_text_length)


def evaluate_gallery(front, tower, tokenizer, cfg: RetrievalEvalConfig, gallery: Gallery, run_dir: Path, device,
                     dtype=None, max_text_length: int = 32) -> dict:
    """R@1/5/10 both ways of a representation front on a prepared ``gallery`` (its ``gold`` is the ground truth;
    ``cfg.max_images`` is not applied here); the ranking and the files are those of :func:`evaluate_retrieval`."""
    image_ids, texts, gold = gallery.image_ids, gallery.texts, gallery.gold
    paths = dict(zip(image_ids, gallery.images))
    by_image = dict(zip(image_ids, gallery.captions))

    start_time = time.perf_counter()
    was_training = front.training
    front.eval()
    with torch.no_grad(), autocast(device, dtype):
        tok = tokenizer(texts, padding=True, truncation=True, max_length=max_text_length, return_tensors="pt")
        text_feats = torch.cat([
            front("text", input_ids=tok.input_ids[s:s + cfg.batch_size].to(device),
                  attention_mask=tok.attention_mask[s:s + cfg.batch_size].to(device))["text_feat"].float().cpu()
            for s in range(0, len(texts), cfg.batch_size)])  # [T, E]
        images = (VideoInputs(tower, front_frames(front), train=False) if is_video_front(front) else  # clips
                  ImageInputs.build(tower, [paths[i] for i in image_ids], live_tower=front.vision is not None,
                                    device=device, dtype=dtype))
        image_feats, image_tokens = [], []  # [b, Q, E] each; [b, N, D] each: what the ITM head attends to
        for s in range(0, len(image_ids), cfg.batch_size):
            out = front("queries", **images([paths[i] for i in image_ids[s:s + cfg.batch_size]], device))
            image_feats.append(out["image_feats"].float().cpu())
            image_tokens.append(out["image_embeds"].float().cpu())
        image_feats, image_tokens = torch.cat(image_feats), torch.cat(image_tokens)

        def itm_scorer(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
            mask = tok.attention_mask[txt]
            length = int(mask.sum(1).max())  # drop the padding columns no text of this batch needs
            out = front("match", image_embeds=image_tokens[img].to(device),
                        input_ids=tok.input_ids[txt, :length].to(device), attention_mask=mask[:, :length].to(device))
            return out["itm_logits"][:, 1]  # positive-class logit, averaged over the query positions (LAVIS)

        scores = rerank_with_itm(itc_similarity(image_feats, text_feats), itm_scorer, k=cfg.k,
                                 batch_size=cfg.batch_size)
    front.train(was_training)

    rec = recalls(scores, gold, ks=(1, 5, 10))
    result = {"itc": rec["itc"], "itm_rerank": rec["itm"],
              "gallery": {"num_images": len(image_ids), "num_texts": len(texts), "num_correct_pairs": int(gold.sum()),
                          "k": cfg.k, "itm_pairs_scored": scores.num_itm_pairs,
                          "seconds": time.perf_counter() - start_time}}
    keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["r_mean"]
    rows = [{"ranking": "ITC", **{k: rec["itc"][k] for k in keys}},
            {"ranking": f"ITM re-rank of top {cfg.k}", **{k: rec["itm"][k] for k in keys}}]
    note = (f"{len(texts)} {gallery.ground_truth}. ITC: max over queries of the query-text cosine. ITM re-rank: "
            f"each query's top {cfg.k} by ITC scored ITM positive logit + ITC cosine (LAVIS compute_sim_matrix); "
            "i2t = image->text, t2i = text->image.")

    def listing(ranked, key, names, correct):  # the top 5 of one query: name, score, whether it is correct
        return [{key: names[j], "score": round(v, 4), "hit": bool(correct[j])} for j, v in ranked]

    itc_i2t, itm_i2t = top_k(scores.itc, 5, dim=1), top_k(scores.i2t, 5, dim=1)
    itc_t2i, itm_t2i = top_k(scores.itc, 5, dim=0), top_k(scores.t2i, 5, dim=0)
    predictions = {
        "image_to_text": [{"image_id": image_id, "image_path": _path_or_none(paths[image_id]), "captions": by_image[image_id],
                           "itc_top5": listing(itc_i2t[i], "text", texts, gold[i]),
                           "itm_top5": listing(itm_i2t[i], "text", texts, gold[i])}
                          for i, image_id in enumerate(image_ids)],
        "text_to_image": [{"text": text, "num_correct_images": int(gold[:, t].sum()),
                           "itc_top5": listing(itc_t2i[t], "image_id", image_ids, gold[:, t]),
                           "itm_top5": listing(itm_t2i[t], "image_id", image_ids, gold[:, t])}
                          for t, text in enumerate(texts)],
    }
    write_report(run_dir, "retrieval", result, rows, f"Held-out image-text retrieval ({len(image_ids)} images, "
                                                     f"{len(texts)} texts)", predictions, note)
    return result
