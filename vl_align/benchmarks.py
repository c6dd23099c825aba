"""The papers' benchmarks, read from their files as they are distributed, and scored by the official rules.

``benchmark`` and the files it reads (``bench.*``), then its score:

* ``vqav2``, ``okvqa``: ``questions`` (``{"questions": [{image_id, question, question_id}]}``), ``annotations``
  (``{"annotations": [{question_id, answers: [{answer}] x 10, answer_type}]}``), ``images``. VQA accuracy
  (``vl_align.metrics.vqa_score``: min(#humans who gave it / 3, 1) averaged over the 10 leave-one-out sets of 9),
  overall and per answer type (``yes/no``, ``number``, ``other``).
* ``gqa``: ``questions`` (balanced questions JSON, ``{question_id: {imageId, question, answer}}``), ``images``.
  Exact match after the official VQA normalisation of the prediction (LAVIS's GQA score; the answer as given).
* ``coco_caption``: ``karpathy`` (``dataset_coco.json``, ``{"images": [{filepath, filename, split,
  sentences: [{raw}], cocoid}]}``), ``images``. BLEU-4, METEOR, ROUGE-L, CIDEr of ``bench.split`` (test: 5,000).
* ``nocaps``: ``captions`` (the validation JSON, COCO format, images carry ``domain``), ``images``. The same metrics
  over all images and per domain (in-, near-, out-domain), each set with its own CIDEr IDF, as the official
  evaluation computes them.
* ``coco_retrieval``, ``flickr30k_retrieval``: ``karpathy`` (``dataset_coco.json`` / ``dataset_flickr30k.json``),
  ``images``. R@1/5/10 image->text and text->image; every sentence is its own text, correct only for its image.

Images are found under ``bench.images`` by the official naming, ``bench.image_pattern`` overriding it (a Python
format string over the entry's fields): VQAv2 / OK-VQA ``COCO_val2014_{image_id:012d}.jpg``, GQA ``{imageId}.jpg``,
Karpathy ``{filepath}/{filename}`` (``{filename}`` where entries have no ``filepath``, as Flickr30k's), NoCaps
``{file_name}``.

A key missing from a file is a ``ConfigError`` naming the config key, the file, the entry (index and, where there is
one, its id) and the key. Each reader returns plain records; the scorers take records and predictions, so they are
tested without a model; :func:`evaluate_benchmark` generates (or ranks) with a front and writes the reports.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import torch

from dvlp_common.config import Config, ConfigError, param
from dvlp_common.io import write_json_atomic
from dvlp_common.reports import write_report

from .evaluation import (
    EvalConfig,
    Gallery,
    RetrievalEvalConfig,
    evaluate_gallery,
    first_images,
    generate_batched,
)
from .inputs import ImageInputs
from .metrics import (
    compute_caption_metrics,
    java_available,
    normalize_answer,
    vqa_score,
)

BenchmarkName: TypeAlias = Literal["embedded", "vqav2", "okvqa", "gqa", "coco_caption", "nocaps", "coco_retrieval",
                        "flickr30k_retrieval"]
VQA_BENCHMARKS = ("vqav2", "okvqa", "gqa")
CAPTION_BENCHMARKS = ("coco_caption", "nocaps")
RETRIEVAL_BENCHMARKS = ("coco_retrieval", "flickr30k_retrieval")
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")

# the bench.* file keys each benchmark reads: (required, optional)
_FILE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vqav2": (("questions", "images"), ("annotations",)),
    "okvqa": (("questions", "annotations", "images"), ()),
    "gqa": (("questions", "images"), ()),
    "coco_caption": (("karpathy", "images"), ()),
    "nocaps": (("captions", "images"), ()),
    "coco_retrieval": (("karpathy", "images"), ()),
    "flickr30k_retrieval": (("karpathy", "images"), ()),
}
_DEFAULT_PATTERN = {"vqav2": "COCO_val2014_{image_id:012d}.jpg", "okvqa": "COCO_val2014_{image_id:012d}.jpg",
                    "gqa": "{imageId}.jpg", "nocaps": "{file_name}"}  # Karpathy: see _karpathy_path


@dataclass
class BenchmarkConfig(Config):
    questions: str | None = param(None, help="vqav2/okvqa: the official questions JSON (e.g. "
                                             "v2_OpenEnded_mscoco_val2014_questions.json); gqa: the balanced "
                                             "questions JSON (e.g. testdev_balanced_questions.json)")
    annotations: str | None = param(None, help="vqav2/okvqa: the official annotations JSON (e.g. "
                                               "v2_mscoco_val2014_annotations.json); vqav2 without it (test-dev): "
                                               "predictions and the server's results file only, no score")
    karpathy: str | None = param(None, help="coco_caption/coco_retrieval: dataset_coco.json; flickr30k_retrieval: "
                                            "dataset_flickr30k.json (Karpathy's split files)")
    captions: str | None = param(None, help="nocaps: the validation JSON (nocaps_val_4500_captions.json, COCO "
                                            "format whose images carry 'domain')")
    images: str | None = param(None, help="folder holding the benchmark's images")
    image_pattern: str | None = param(None, help="file name of an image under bench.images, a Python format "
                                                 "string over the entry's fields; None: the official naming "
                                                 "(vqav2/okvqa COCO_val2014_{image_id:012d}.jpg, gqa "
                                                 "{imageId}.jpg, Karpathy {filepath}/{filename}, nocaps "
                                                 "{file_name})")
    split: Literal["test", "val", "train", "restval"] = param("test", help="Karpathy split evaluated (coco_caption, "
                                                                          "*_retrieval)")
    length_penalty: float = param(1.0, help="beam search: score = summed log-prob / length**length_penalty. LAVIS's "
                                            "BLIP-2 VQA: 0 (OPT) or -1 (Flan-T5); captions 1")
    k: int = param(128, ge=1, help="retrieval: ITC candidates per query re-ranked by ITM (LAVIS k_test: 128)")
    spice: bool = param(False, help="captioning: also SPICE (needs the Stanford CoreNLP 3.6.0 jars in "
                                    "pycocoevalcap, which are not downloaded here)")

    def file_keys(self) -> dict[str, str | None]:
        return {k: getattr(self, k) for k in ("questions", "annotations", "karpathy", "captions", "images")}


def check_benchmark(benchmark: str, bench: BenchmarkConfig, prefix: str = "bench") -> None:
    """The files ``benchmark`` reads are set, and none it does not read: a ConfigError naming the key otherwise."""
    given = {k for k, v in bench.file_keys().items() if v is not None}
    if benchmark == "embedded":
        if given:
            key = min(given)
            raise ConfigError(f"{prefix}.{key}", "is read only by a benchmark; set benchmark=vqav2, okvqa, gqa, "
                                                 "coco_caption, nocaps, coco_retrieval or flickr30k_retrieval")
        return
    required, optional = _FILE_KEYS[benchmark]
    for key in required:
        if key not in given:
            raise ConfigError(f"{prefix}.{key}", f"benchmark={benchmark} needs it (it reads "
                                                 f"{', '.join(f'{prefix}.{k}' for k in required + optional)})")
    for key in sorted(given - set(required) - set(optional)):
        raise ConfigError(f"{prefix}.{key}", f"benchmark={benchmark} does not read it (it reads "
                                             f"{', '.join(f'{prefix}.{k}' for k in required + optional)})")


# ----------------------------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VqaItem:
    """One question: VQAv2 / OK-VQA (10 human answers, an answer type) or GQA (one answer)."""
    question_id: Any  # as the file gives it (VQA: int, GQA: str), so the results file matches the server's
    image_id: str
    image_path: str
    question: str
    answers: tuple[str, ...] = ()  # empty: no annotations (test-dev), nothing to score
    answer_type: str | None = None


@dataclass(frozen=True)
class CaptionItem:
    """One image with its reference captions (NoCaps: and its domain)."""
    image_id: Any  # as the file gives it (COCO: int), so the results file matches the server's
    image_path: str
    references: tuple[str, ...]
    domain: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------
def _load_json(path: str, key: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{key}={path} not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(key, f"{path} is not JSON: {err}") from None


def _field(entry: Any, name: str, path: str, where: str, key: str) -> Any:
    if not isinstance(entry, dict):
        raise ConfigError(key, f"{path}: {where} is a {type(entry).__name__}, not an object")
    if name not in entry:
        raise ConfigError(key, f"{path}: {where} has no '{name}'")
    return entry[name]


def _list_field(data: Any, name: str, path: str, key: str) -> list:
    value = _field(data, name, path, "the top level", key)
    if not isinstance(value, list):
        raise ConfigError(key, f"{path}: '{name}' is a {type(value).__name__}, not a list")
    return value


def _image_path(images: str, pattern: str, fields: dict, path: str, where: str) -> str:
    try:
        name = pattern.format(**fields)
    except KeyError as err:
        raise ConfigError("bench.image_pattern", f"{pattern!r} names {err}, which {where} of {path} does not have "
                                                 f"(it has {', '.join(sorted(fields))})") from None
    except (ValueError, TypeError) as err:
        raise ConfigError("bench.image_pattern", f"{pattern!r} does not format {where} of {path}: {err}") from None
    return str(Path(images) / name)


def read_vqa(questions: str, annotations: str | None, images: str, image_pattern: str | None = None,
             benchmark: str = "vqav2") -> list[VqaItem]:
    """VQAv2 / OK-VQA questions in file order, joined with their annotations by ``question_id`` (a question without
    an annotation is an error; annotations of questions not in the file are not used). ``annotations=None``: the
    questions alone (test-dev), no answers."""
    pattern = image_pattern or _DEFAULT_PATTERN[benchmark]
    by_id: dict[Any, tuple[tuple[str, ...], str]] = {}
    if annotations is not None:
        for i, a in enumerate(_list_field(_load_json(annotations, "bench.annotations"), "annotations", annotations,
                                          "bench.annotations")):
            where = f"annotations[{i}]"
            qid = _field(a, "question_id", annotations, where, "bench.annotations")
            where = f"annotations[{i}] (question_id {qid})"
            answers = _field(a, "answers", annotations, where, "bench.annotations")
            if not isinstance(answers, list) or not answers:
                raise ConfigError("bench.annotations", f"{annotations}: {where}: 'answers' is not a non-empty list")
            texts = tuple(str(_field(x, "answer", annotations, f"{where}.answers[{j}]", "bench.annotations"))
                          for j, x in enumerate(answers))
            by_id[qid] = (texts, str(_field(a, "answer_type", annotations, where, "bench.annotations")))
    items = []
    for i, q in enumerate(_list_field(_load_json(questions, "bench.questions"), "questions", questions,
                                      "bench.questions")):
        where = f"questions[{i}]"
        qid = _field(q, "question_id", questions, where, "bench.questions")
        where = f"questions[{i}] (question_id {qid})"
        image_id = _field(q, "image_id", questions, where, "bench.questions")
        text = _field(q, "question", questions, where, "bench.questions")
        answers, answer_type = (), None
        if annotations is not None:
            if qid not in by_id:
                raise ConfigError("bench.annotations", f"{annotations} has no annotation of question_id {qid} "
                                                       f"({where} of {questions})")
            answers, answer_type = by_id[qid]
        items.append(VqaItem(qid, str(image_id), _image_path(images, pattern, q, questions, where), str(text),
                             answers, answer_type))
    return items


def read_gqa(questions: str, images: str, image_pattern: str | None = None) -> list[VqaItem]:
    """GQA balanced questions (a dict question id -> {imageId, question, answer, ...}) in file order."""
    data = _load_json(questions, "bench.questions")
    if not isinstance(data, dict):
        raise ConfigError("bench.questions", f"{questions}: the top level is a {type(data).__name__}, not an object "
                                             "of question id -> question (GQA's balanced questions JSON)")
    pattern = image_pattern or _DEFAULT_PATTERN["gqa"]
    items = []
    for i, (qid, q) in enumerate(data.items()):
        where = f"entry {i} (question id {qid})"
        image_id = str(_field(q, "imageId", questions, where, "bench.questions"))
        text = _field(q, "question", questions, where, "bench.questions")
        answer = _field(q, "answer", questions, where, "bench.questions")
        fields = {**q, "image_id": image_id, "question_id": qid}
        items.append(VqaItem(qid, image_id, _image_path(images, pattern, fields, questions, where), str(text),
                             (str(answer),)))
    return items


def _karpathy_path(images: str, pattern: str | None, entry: dict, path: str, where: str) -> str:
    if pattern is None:
        pattern = "{filepath}/{filename}" if "filepath" in entry else "{filename}"
    return _image_path(images, pattern, entry, path, where)


def read_karpathy(karpathy: str, images: str, split: str = "test",
                  image_pattern: str | None = None) -> list[CaptionItem]:
    """The images of ``split`` in Karpathy's split file (``dataset_coco.json``, ``dataset_flickr30k.json``) with
    their raw sentences, in file order. The id is ``cocoid`` (COCO), else ``imgid`` (Flickr30k), else the file name."""
    entries = _list_field(_load_json(karpathy, "bench.karpathy"), "images", karpathy, "bench.karpathy")
    items = []
    for i, e in enumerate(entries):
        if _field(e, "split", karpathy, f"images[{i}]", "bench.karpathy") != split:
            continue
        filename = _field(e, "filename", karpathy, f"images[{i}]", "bench.karpathy")
        image_id = e.get("cocoid", e.get("imgid", filename))
        where = f"images[{i}] ({filename})"
        sentences = _field(e, "sentences", karpathy, where, "bench.karpathy")
        if not isinstance(sentences, list) or not sentences:
            raise ConfigError("bench.karpathy", f"{karpathy}: {where}: 'sentences' is not a non-empty list")
        refs = tuple(str(_field(s, "raw", karpathy, f"{where}.sentences[{j}]", "bench.karpathy")).strip()
                     for j, s in enumerate(sentences))
        items.append(CaptionItem(image_id, _karpathy_path(images, image_pattern, e, karpathy, where), refs))
    if not items:
        raise ConfigError("bench.split", f"{karpathy} has no image of split '{split}'")
    return items


def read_nocaps(captions: str, images: str, image_pattern: str | None = None) -> list[CaptionItem]:
    """NoCaps validation images (file order) with their reference captions and domain. A caption of an unknown image,
    an image without captions (the test JSON has none) or an unknown domain is an error."""
    data = _load_json(captions, "bench.captions")
    pattern = image_pattern or _DEFAULT_PATTERN["nocaps"]
    order, domain, paths = [], {}, {}
    for i, im in enumerate(_list_field(data, "images", captions, "bench.captions")):
        image_id = _field(im, "id", captions, f"images[{i}]", "bench.captions")
        where = f"images[{i}] (id {image_id})"
        file_name = _field(im, "file_name", captions, where, "bench.captions")
        dom = _field(im, "domain", captions, where, "bench.captions")
        if dom not in NOCAPS_DOMAINS:
            raise ConfigError("bench.captions", f"{captions}: {where} has domain {dom!r}, not one of "
                                                f"{', '.join(NOCAPS_DOMAINS)}")
        order.append(image_id)
        domain[image_id] = dom
        paths[image_id] = _image_path(images, pattern, {**im, "file_name": file_name, "image_id": image_id},
                                      captions, where)
    refs: dict[Any, list[str]] = defaultdict(list)
    for i, a in enumerate(_list_field(data, "annotations", captions, "bench.captions")):
        image_id = _field(a, "image_id", captions, f"annotations[{i}]", "bench.captions")
        caption = _field(a, "caption", captions, f"annotations[{i}] (image_id {image_id})", "bench.captions")
        if image_id not in domain:
            raise ConfigError("bench.captions", f"{captions}: annotations[{i}] is a caption of image_id {image_id}, "
                                                "which 'images' does not list")
        refs[image_id].append(str(caption).strip())
    missing = [i for i in order if not refs[i]]
    if missing:
        raise ConfigError("bench.captions", f"{captions}: {len(missing)} images have no reference caption (e.g. id "
                                            f"{missing[0]}); the NoCaps test JSON has none: use the validation JSON")
    return [CaptionItem(i, paths[i], tuple(refs[i]), domain[i]) for i in order]


def read_benchmark(benchmark: str, bench: BenchmarkConfig) -> list[VqaItem] | list[CaptionItem]:
    """The records of ``benchmark`` from the files ``bench`` names (checked by :func:`check_benchmark`)."""
    check_benchmark(benchmark, bench)
    if benchmark in ("vqav2", "okvqa"):
        return read_vqa(bench.questions, bench.annotations, bench.images, bench.image_pattern, benchmark)
    if benchmark == "gqa":
        return read_gqa(bench.questions, bench.images, bench.image_pattern)
    if benchmark == "nocaps":
        return read_nocaps(bench.captions, bench.images, bench.image_pattern)
    return read_karpathy(bench.karpathy, bench.images, bench.split, bench.image_pattern)


# ----------------------------------------------------------------------------------------------------------------
# scoring (no model)
# ----------------------------------------------------------------------------------------------------------------
def score_vqa(items: list[VqaItem], predictions: list[str]) -> dict[str, dict[str, float]]:
    """VQAv2 / OK-VQA: ``{"vqa": {num_questions, accuracy}, "vqa_by_answer_type": {type: accuracy},
    "answer_type_counts": {type: questions}}``; each question scored by ``vl_align.metrics.vqa_score``."""
    _same_length(items, predictions)
    scores = [vqa_score(p, q.answers) for q, p in zip(items, predictions)]
    by_type: dict[str, list[float]] = defaultdict(list)
    for q, s in zip(items, scores):
        by_type[q.answer_type].append(s)
    return {"vqa": {"num_questions": len(items), "accuracy": sum(scores) / len(scores)},
            "vqa_by_answer_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
            "answer_type_counts": {t: len(v) for t, v in sorted(by_type.items())}}


def gqa_correct(prediction: str, answer: str) -> bool:
    """LAVIS's GQA score: the prediction after the official VQA normalisation equals the answer as the file gives it
    (GQA's answers are lower-case and unpunctuated already). As in LAVIS the answer itself is not normalised, so a
    prediction "two" (normalised to "2") does not match an answer written "two"."""
    return normalize_answer(prediction) == answer


def score_gqa(items: list[VqaItem], predictions: list[str]) -> dict[str, dict[str, float]]:
    _same_length(items, predictions)
    correct = sum(gqa_correct(p, q.answers[0]) for q, p in zip(items, predictions))
    return {"vqa": {"num_questions": len(items), "accuracy": correct / len(items)}}


def score_captions(items: list[CaptionItem], predictions: list[str], meteor: bool = True,
                   spice: bool = False) -> dict[str, dict[str, float]]:
    """COCO caption metrics over all images (``captioning``) and, where the items have domains (NoCaps), over each
    domain's images alone (``captioning_in-domain`` ...), as the NoCaps evaluation computes them: CIDEr's IDF then
    comes from that domain's references."""
    _same_length(items, predictions)
    groups = {"captioning": list(range(len(items)))}
    for d in NOCAPS_DOMAINS:
        idx = [i for i, it in enumerate(items) if it.domain == d]
        if idx:
            groups[f"captioning_{d}"] = idx
    out = {}
    for name, idx in groups.items():
        scores = compute_caption_metrics([predictions[i] for i in idx], [list(items[i].references) for i in idx],
                                         meteor=meteor, spice=spice)
        out[name] = {"num_images": len(idx), **scores}
    return out


def retrieval_gallery(items: list[CaptionItem], max_images: int | None = None) -> Gallery:
    """The Karpathy retrieval protocol: the first ``max_images`` images (file order: the 1k/5k test set), every
    sentence its own text (equal sentences of two images stay two texts), a text correct only for its own image."""
    items = items[:max_images or None]
    texts = [r for it in items for r in it.references]
    gold = torch.zeros(len(items), len(texts), dtype=torch.bool)
    start = 0
    for i, it in enumerate(items):
        gold[i, start:start + len(it.references)] = True
        start += len(it.references)
    return Gallery([str(it.image_id) for it in items], [it.image_path for it in items],
                   [list(it.references) for it in items], texts, gold,
                   ground_truth="sentences, each its own text; a text is correct only for the image it was written "
                                "for (the Karpathy split's protocol)")


def _same_length(items: list, predictions: list[str]) -> None:
    if len(items) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
    if not items:
        raise ValueError("nothing to score")


def _check_images(paths: list[str], benchmark: str, bench: BenchmarkConfig) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} images of benchmark={benchmark} are not under "
                                f"bench.images={bench.images} (bench.image_pattern={bench.image_pattern!r}), e.g. "
                                f"{missing[0]}")


# ----------------------------------------------------------------------------------------------------------------
# evaluation with a front
# ----------------------------------------------------------------------------------------------------------------
def evaluate_benchmark(benchmark: str, bench: BenchmarkConfig, eval_cfg: EvalConfig, front, llm, tower,
                       run_dir: Path, device, dtype, tokenizer=None, max_text_length: int = 32) -> dict:
    """Read ``benchmark``, answer / caption / rank with the front, score, and write into ``run_dir``:
    ``eval.json`` / ``eval.md`` / ``predictions.json`` (VQA, captioning) or ``retrieval.*`` (retrieval), and for VQA
    and captioning ``results.json`` in the format the benchmark's evaluation server takes.

    Generation follows ``eval_cfg`` (prompts, beams, ``max_new_tokens``: the limit of what is generated, LAVIS's
    ``max_len``; ``min_new_tokens``) with ``bench.length_penalty``. ``eval_cfg.max_questions`` (VQA, in file order)
    and ``eval_cfg.max_images`` (captioning: the first by id; retrieval: in file order) bound the set; None: all.
    ``tokenizer`` (the Q-Former's) is needed for retrieval only."""
    started = time.perf_counter()
    items = read_benchmark(benchmark, bench)
    run_dir = Path(run_dir)
    if benchmark in RETRIEVAL_BENCHMARKS:
        if tokenizer is None or not hasattr(front, "itm_head"):
            raise ConfigError("front", f"benchmark={benchmark} ranks with ITC and ITM: it needs a representation "
                                       "front (qformer or elip)")
        gallery = retrieval_gallery(items, eval_cfg.max_images)
        _check_images(list(gallery.images), benchmark, bench)
        cfg = RetrievalEvalConfig(max_images=None, k=bench.k, batch_size=eval_cfg.batch_size)
        result = evaluate_gallery(front, tower, tokenizer, cfg, gallery, run_dir, device, dtype, max_text_length)
        return {"benchmark": benchmark, **result}

    gen_kwargs = {"max_new_tokens": eval_cfg.max_new_tokens, "num_beams": eval_cfg.num_beams,
                  "do_sample": eval_cfg.do_sample, "top_p": eval_cfg.top_p, "min_new_tokens": eval_cfg.min_new_tokens,
                  "length_penalty": bench.length_penalty}
    if benchmark in VQA_BENCHMARKS:
        if eval_cfg.max_questions == 0:
            raise ConfigError("eval.max_questions", f"0 evaluates nothing of benchmark={benchmark}")
        items = items[:eval_cfg.max_questions or None]
        paths = [q.image_path for q in items]
        prompts = [eval_cfg.vqa_prompt.format(q.question) for q in items]
    else:
        chosen = set(first_images({str(it.image_id) for it in items}, eval_cfg.max_images))
        items = sorted((it for it in items if str(it.image_id) in chosen), key=lambda it: (len(str(it.image_id)),
                                                                                          str(it.image_id)))
        paths = [it.image_path for it in items]
        prompts = [eval_cfg.caption_prompt] * len(items)
    _check_images(paths, benchmark, bench)
    images = ImageInputs.build(tower, list(dict.fromkeys(paths)), live_tower=front.vision is not None,
                               device=device, dtype=dtype)
    with torch.no_grad():
        outputs = generate_batched(front, llm, images, paths, prompts, eval_cfg.batch_size, device, **gen_kwargs)
    seconds = time.perf_counter() - started
    prompt = eval_cfg.caption_prompt if benchmark in CAPTION_BENCHMARKS else eval_cfg.vqa_prompt

    if benchmark in VQA_BENCHMARKS:
        predictions = [{"question_id": q.question_id, "image_id": q.image_id, "question": q.question,
                        "prediction": a, "answers": list(q.answers), "answer_type": q.answer_type}
                       for q, a in zip(items, outputs)]
        if benchmark == "gqa":
            server = [{"questionId": q.question_id, "prediction": a} for q, a in zip(items, outputs)]
        else:
            server = [{"question_id": q.question_id, "answer": a} for q, a in zip(items, outputs)]
        write_json_atomic(run_dir / "results.json", server)
        if not items[0].answers:  # test-dev: no annotations, the server scores results.json
            result = {"vqa": {"num_questions": len(items)}}
            rows = [{"questions": len(items), "scored": "no (no annotations)"}]
        else:
            result = score_gqa(items, outputs) if benchmark == "gqa" else score_vqa(items, outputs)
            rows = [{"answer type": "all", "questions": len(items), "accuracy": result["vqa"]["accuracy"]}]
            rows += [{"answer type": t, "questions": result["answer_type_counts"][t], "accuracy": a}
                     for t, a in result.get("vqa_by_answer_type", {}).items()]
        title = f"{benchmark}: zero-shot VQA ({len(items)} questions)"
    else:
        meteor = eval_cfg.meteor and java_available()
        result = score_captions(items, outputs, meteor=meteor, spice=bench.spice)
        predictions = [{"image_id": it.image_id, "image_path": it.image_path, "domain": it.domain,
                        "prediction": c, "references": list(it.references)} for it, c in zip(items, outputs)]
        write_json_atomic(run_dir / "results.json", [{"image_id": it.image_id, "caption": c}
                                                     for it, c in zip(items, outputs)])
        keys = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
        rows = [{"images": name.replace("captioning_", "").replace("captioning", "all"), "count": s["num_images"],
                 **{k: s[k] for k in keys if k in s}} for name, s in result.items()]
        title = f"{benchmark}: captioning ({len(items)} images)"
    result["protocol"] = {"seconds": seconds, "num_beams": eval_cfg.num_beams,
                          "max_new_tokens": eval_cfg.max_new_tokens, "min_new_tokens": eval_cfg.min_new_tokens,
                          "length_penalty": bench.length_penalty}
    note = (f"Prompt {prompt!r}; decoding {gen_kwargs}. Scores are fractions (papers print them x100). "
            "results.json is in the format of the benchmark's evaluation server.")
    write_report(run_dir, "eval", result, rows, title, predictions, note)
    return {"benchmark": benchmark, **result}


__all__ = [
    "CAPTION_BENCHMARKS",
    "NOCAPS_DOMAINS",
    "RETRIEVAL_BENCHMARKS",
    "VQA_BENCHMARKS",
    "BenchmarkConfig",
    "BenchmarkName",
    "CaptionItem",
    "VqaItem",
    "check_benchmark",
    "evaluate_benchmark",
    "gqa_correct",
    "read_benchmark",
    "read_gqa",
    "read_karpathy",
    "read_nocaps",
    "read_vqa",
    "retrieval_gallery",
    "score_captions",
    "score_gqa",
    "score_vqa",
]
