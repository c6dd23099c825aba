"""The embedded default dataset, built from the ``easy-vqa`` package (no download needed).

easy-VQA (https://github.com/vzhou842/easy-VQA) ships 4,000 train / 1,000 test 64x64 PNG images, each with
one coloured shape on a noisy white background, and ``questions.json`` per split: a list of
``[question, answer, image_id]`` (38,575 train / 9,673 test questions; 13 answers: 8 colours, 3 shapes,
yes/no). The package is installed with ``pip install --no-deps easy-vqa``; we only read its data folder
and never import it.

What is built (deterministically, see ``build_embedded_easy_vqa``):

* **image-caption pairs** per split: an image's colour and shape are derived from its own questions
  (``derive_colour_shape``); the caption is ``"a {colour} {shape}"``. An image whose colour or shape the
  questions do not determine is a counted skip (about 10% of the images, see ``README.md`` written by the
  builder). All 24 colour/shape combinations occur in both splits, so train and test captions coincide.
* **VQA questions** per split (question, answer, image_id, image_path, answer_type) for zero-shot VQA.
* **a text-only caption corpus** for stage 1: templates x paraphrases over colours, shapes, sizes,
  positions and adjectives; a few thousand distinct sentences, none equal to a test caption.

Image ids are ``"{split}/{n}"`` (the numeric id in easy-VQA restarts at 0 in each split).
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import os
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

import datasets

from dvlp_common.io import building_folder
from dvlp_common.records import SkipReport
from vl_align.data import verify_image
from vl_align.embedded_build import built_paths, is_built, write_build_files

__all__ = [
    "BUILDER_VERSION",
    "COLOURS",
    "SHAPES",
    "SPLITS",
    "EASY_VQA_COUNTS",
    "easy_vqa_data_dir",
    "read_easy_vqa_questions",
    "derive_colour_shape",
    "easy_vqa_pair_records",
    "easy_vqa_pairs",
    "easy_vqa_vqa_records",
    "easy_vqa_questions",
    "build_caption_corpus",
    "build_embedded_easy_vqa",
    "load_embedded_easy_vqa",
]

BUILDER_VERSION = "1"
SPLITS = ("train", "test")
COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
# documented in easy_vqa/data/README.md; checked by the slow tests
EASY_VQA_COUNTS = {"train": {"images": 4000, "questions": 38575}, "test": {"images": 1000, "questions": 9673}}
# a colour or shape that the questions leave open is an expected skip (~11%): allow up to this fraction
DERIVATION_MAX_SKIP_FRACTION = 0.15
FILES = {
    "pairs_train": "pairs_train.jsonl",
    "pairs_test": "pairs_test.jsonl",
    "vqa_train": "vqa_train.jsonl",
    "vqa_test": "vqa_test.jsonl",
    "caption_corpus": "caption_corpus.txt",
    "readme": "README.md",
    "build_info": "BUILD_INFO.json",
}


# ----------------------------------------------------------------------------------------------------------
# the package's data
# ----------------------------------------------------------------------------------------------------------
def easy_vqa_data_dir() -> Path:
    """The ``data`` folder of the installed easy-vqa package (found without importing it)."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the easy-vqa package is not installed; it provides the embedded default dataset: "
            "pip install --no-deps easy-vqa"
        )
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    for split in SPLITS:
        for need in (data / split / "questions.json", data / split / "images"):
            if not need.exists():
                raise FileNotFoundError(
                    f"easy-vqa package is incomplete: {str(need)!r} is missing; reinstall it: "
                    "pip install --force-reinstall --no-deps easy-vqa"
                )
    return data


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown easy-VQA split {split!r}; expected one of {SPLITS}")


def read_easy_vqa_questions(split: str, report: SkipReport | None = None) -> list[tuple[str, str, int]]:
    """``[(question, answer, image_id), ...]`` of one split, in file order.

    A malformed entry (not ``[str, str, int]``) or an answer outside ``answers.txt`` is a counted skip
    (``questions.json:index``) in ``report``.
    """
    _check_split(split)
    data = easy_vqa_data_dir()
    path = data / split / "questions.json"
    answers = set(_answers(data))
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not a readable JSON file: {e}") from e
    if not isinstance(raw, list):
        raise ValueError(f"{str(path)!r}: expected a list of [question, answer, image_id], got {type(raw).__name__}")
    rep = report if report is not None else SkipReport(max_skip_fraction=1.0)
    out = []
    for i, entry in enumerate(raw):
        where = f"{path}:{i}"
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
            and isinstance(entry[2], int)
        ):
            rep.skip("malformed_question_entry", where)
            continue
        if entry[1] not in answers:
            rep.skip("unknown_answer", where)
            continue
        if not entry[0].strip():
            rep.skip("empty_question", where)
            continue
        out.append((entry[0].strip(), entry[1], entry[2]))
    return out


def _answers(data: Path) -> list[str]:
    path = data / "answers.txt"
    answers = [a.strip() for a in path.read_text(encoding="utf-8").splitlines() if a.strip()]
    expected = set(COLOURS) | set(SHAPES) | {"yes", "no"}
    if set(answers) != expected:
        raise ValueError(
            f"{str(path)!r} lists answers {sorted(answers)}, not the 13 this builder knows ({sorted(expected)}); "
            "the easy-vqa package version is not supported"
        )
    return answers


def _image_files(data: Path, split: str) -> dict[int, Path]:
    out = {}
    for entry in os.scandir(data / split / "images"):
        stem, ext = os.path.splitext(entry.name)
        if ext == ".png" and stem.isdigit():
            out[int(stem)] = Path(entry.path)
    return out


# ----------------------------------------------------------------------------------------------------------
# colour / shape from the questions
# ----------------------------------------------------------------------------------------------------------
_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
# "what color is the shape?", "what is the color of the circle?" -> answer is the colour (the shape word, if
# any, presupposes the shape)
_Q_COLOUR = re.compile(rf"^what (?:color is|is the color of) the (shape|{_S})\?$")
# "what shape is present?", "what is the blue shape?" -> answer is the shape (a colour word presupposes it)
_Q_SHAPE = re.compile(rf"^what (?:shape (?:does the image contain|is in the image|is present)|is the ({_C}) shape)\?$")
# yes/no: "is there (not) a red shape (in the image)?", "does the image (not) contain a circle?",
# "is a/no teal shape present?"
_Q_YESNO = re.compile(
    rf"^(?:does the image (not )?contain a|is there (not )?a|is (a|no)) (?:({_C}) shape|({_S}))(?: present| in the image)?\?$"
)


def _evidence() -> dict:
    return {k: set() for k in ("colour", "colour_pre", "colour_yes", "colour_no", "shape", "shape_pre", "shape_yes", "shape_no")}


def _add_evidence(ev: dict, question: str, answer: str) -> bool:
    """Update ``ev`` with what one (question, answer) says; False if the question's template is unknown."""
    m = _Q_COLOUR.match(question)
    if m:
        ev["colour"].add(answer)
        if m.group(1) != "shape":
            ev["shape_pre"].add(m.group(1))
        return True
    m = _Q_SHAPE.match(question)
    if m:
        ev["shape"].add(answer)
        if m.group(1):
            ev["colour_pre"].add(m.group(1))
        return True
    m = _Q_YESNO.match(question)
    if m and answer in ("yes", "no"):
        negated = bool(m.group(1) or m.group(2) or m.group(3) == "no")
        present = (answer == "yes") != negated
        kind, value = ("colour", m.group(4)) if m.group(4) else ("shape", m.group(5))
        ev[f"{kind}_{'yes' if present else 'no'}"].add(value)
        return True
    return False


def _decide(ev: dict, kind: str, values: tuple[str, ...]) -> tuple[str | None, str]:
    """-> (value or None, how): how is direct / presupposed / yes_no / elimination / conflict / undetermined."""
    direct, pre, yes, no = ev[kind], ev[f"{kind}_pre"], ev[f"{kind}_yes"], ev[f"{kind}_no"]
    positive = direct | pre | yes
    if len(positive) > 1 or positive & no:
        return None, "conflict"
    if positive:
        how = "direct" if direct else ("presupposed" if pre else "yes_no")
        return next(iter(positive)), how
    left = [v for v in values if v not in no]
    if len(left) == 1:
        return left[0], "elimination"
    return None, "undetermined"


def derive_colour_shape(qas: Iterable[tuple[str, str]]) -> dict:
    """Derive an image's colour and shape from its ``(question, answer)`` pairs.

    Reliable evidence, checked on the whole package (no conflicts; the derived colour always equals the
    shape's exact palette colour in the pixels):

    * ``what color is the shape/{shape}?``, ``what is the color of the shape/{shape}?`` -> the answer is the
      colour; a shape word in the question presupposes the shape;
    * ``what shape is present / is in the image / does the image contain?``, ``what is the {colour} shape?``
      -> the answer is the shape; a colour word presupposes the colour;
    * yes/no questions about a colour or a shape (``is there (not) a ...``, ``does the image (not) contain
      a ...``, ``is a/no ... present``): a positive fact names the value, a negative one rules it out; the
      value is taken when all others are ruled out.

    Returns ``{"colour", "shape", "colour_how", "shape_how", "unparsed"}`` (value None when undetermined
    or conflicting; ``unparsed`` = questions of an unknown template, which are ignored).
    """
    ev = _evidence()
    unparsed = 0
    for q, a in qas:
        if not _add_evidence(ev, q, a):
            unparsed += 1
    colour, colour_how = _decide(ev, "colour", COLOURS)
    shape, shape_how = _decide(ev, "shape", SHAPES)
    return {"colour": colour, "shape": shape, "colour_how": colour_how, "shape_how": shape_how, "unparsed": unparsed}


def _pairs_and_stats(split: str, report: SkipReport) -> tuple[list[dict], dict]:
    data = easy_vqa_data_dir()
    files = _image_files(data, split)
    qrep = SkipReport(max_skip_fraction=1.0, name=f"{split}/questions.json")
    per_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for q, a, iid in read_easy_vqa_questions(split, qrep):
        per_image[iid].append((q, a))
    report.merge(qrep)
    how = Counter()
    unparsed = 0
    records = []
    for iid in sorted(set(files) | set(per_image)):
        where = f"{split}/{iid}"
        if iid not in files:
            report.skip("missing_image", where)
            continue
        if iid not in per_image:
            report.skip("no_questions", where)
            continue
        d = derive_colour_shape(per_image[iid])
        unparsed += d["unparsed"]
        how[f"colour_{d['colour_how']}"] += 1
        how[f"shape_{d['shape_how']}"] += 1
        if "conflict" in (d["colour_how"], d["shape_how"]):
            report.skip("conflicting_annotations", where)
            continue
        if d["colour"] is None or d["shape"] is None:
            missing = [k for k in ("colour", "shape") if d[k] is None]
            report.skip(f"{'_and_'.join(missing)}_undetermined", where)
            continue
        why = verify_image(files[iid])
        if why:
            report.skip(why, f"{where} ({files[iid]})")
            continue
        records.append(
            {
                "image_path": str(files[iid].absolute()),
                "caption": f"a {d['colour']} {d['shape']}",
                "image_id": where,
                "colour": d["colour"],
                "shape": d["shape"],
            }
        )
    stats = {
        "images": len(files),
        "images_with_questions": len(per_image),
        "pairs": len(records),
        "derivation": dict(sorted(how.items())),
        "unparsed_questions": unparsed,
    }
    return records, stats


def easy_vqa_pair_records(split: str, report: SkipReport | None = None) -> list[dict]:
    """Image-caption pair dicts (image_path, caption, image_id, colour, shape) of one split, by image id.

    Images whose colour or shape is not determined are counted skips in ``report``; the build aborts with
    ``TooManySkippedRecords`` above ``DERIVATION_MAX_SKIP_FRACTION`` (the expected rate is ~11%).
    """
    _check_split(split)
    rep = SkipReport(max_skip_fraction=DERIVATION_MAX_SKIP_FRACTION, name=f"easy-VQA {split} pairs")
    records, stats = _pairs_and_stats(split, rep)
    if report is not None:
        report.merge(rep)
    rep.check(stats["images"])
    return records


_PAIR_FEATURES = datasets.Features({k: datasets.Value("string") for k in ("image_path", "caption", "image_id", "colour", "shape")})
_VQA_FEATURES = datasets.Features(
    {k: datasets.Value("string") for k in ("question", "answer", "image_id", "image_path", "answer_type")}
)


def _to_dataset(records: list[dict], features: datasets.Features) -> datasets.Dataset:
    return datasets.Dataset.from_dict({k: [r[k] for r in records] for k in features}, features=features)


def easy_vqa_pairs(split: str, report: SkipReport | None = None) -> datasets.Dataset:
    """``easy_vqa_pair_records`` as a ``datasets.Dataset``."""
    return _to_dataset(easy_vqa_pair_records(split, report), _PAIR_FEATURES)


def easy_vqa_vqa_records(split: str, report: SkipReport | None = None) -> list[dict]:
    """VQA dicts (question, answer, image_id, image_path, answer_type) of one split, in file order.

    ``answer_type`` is ``yes/no``, ``colour`` or ``shape``. Questions on an image file that is missing are
    counted skips (none in the package).
    """
    _check_split(split)
    data = easy_vqa_data_dir()
    files = _image_files(data, split)
    rep = SkipReport(max_skip_fraction=0.05, name=f"easy-VQA {split} questions")
    qs = read_easy_vqa_questions(split, rep)
    out = []
    for q, a, iid in qs:
        if iid not in files:
            rep.skip("missing_image", f"{split}/{iid}")
            continue
        kind = "yes/no" if a in ("yes", "no") else ("colour" if a in COLOURS else "shape")
        out.append(
            {"question": q, "answer": a, "image_id": f"{split}/{iid}", "image_path": str(files[iid].absolute()), "answer_type": kind}
        )
    if report is not None:
        report.merge(rep)
    rep.check(len(out) + rep.total)
    return out


def easy_vqa_questions(split: str, report: SkipReport | None = None) -> datasets.Dataset:
    """``easy_vqa_vqa_records`` as a ``datasets.Dataset``."""
    return _to_dataset(easy_vqa_vqa_records(split, report), _VQA_FEATURES)


# ----------------------------------------------------------------------------------------------------------
# the stage-1 caption corpus
# ----------------------------------------------------------------------------------------------------------
SIZES = ("small", "large", "big", "tiny", "medium-sized")
POSITIONS = (
    "in the top left corner",
    "in the top right corner",
    "in the bottom left corner",
    "in the bottom right corner",
    "in the middle",
    "near the top",
    "near the bottom",
    "on the left",
    "on the right",
)
ADJECTIVES = ("bright", "solid", "plain", "simple", "flat", "single")
# {c} colour, {s} shape, {z} size, {p} position, {a} adjective, {c2} another colour, {s2} another shape
TEMPLATES = (
    "there is a {c} {s} in the picture",
    "there is a {c} {s} in the image",
    "the {s} is {c}",
    "the {s} in the image is {c}",
    "a photo of a {z} {c} {s}",
    "a picture of a {c} {s}",
    "an image of a {c} {s}",
    "a {c} shape that is a {s}",
    "a {s} that is {c}",
    "a {z} {c} {s} {p}",
    "a {c} {s} {p}",
    "the {c} {s} is {p}",
    "there is a {z} {c} {s} {p}",
    "a {a} {c} {s}",
    "a {a} {c} {s} on a white background",
    "a {c} {s} on a white background",
    "the image shows a {c} {s}",
    "the image contains a {z} {c} {s}",
    "this picture contains one {c} {s}",
    "the only shape in the picture is a {c} {s}",
    "the colour of the {s} is {c}",
    "the color of the {s} is {c}",
    "the shape is a {s} and it is {c}",
    "a {c} {s} can be seen {p}",
    "a {s} painted {c}",
    "a {s} coloured {c}",
    "a {z} {s} drawn in {c}",
    "the {s} is {c}, not {c2}",
    "it is a {c} {s}, not a {c2} one",
    "it is a {c} {s}, not a {s2}",
    "a {c} {s} and nothing else",
    "a simple drawing of a {c} {s}",
    "one {c} {s} is shown {p}",
    "you can see a {z} {c} {s}",
    "a {z} {s} with a {c} fill",
    "there is exactly one shape: a {c} {s}",
    "a computer-generated image of a {a} {c} {s}",
    "{c} {s}",
    "the {c} object is a {s}",
    "the shape is {c}",
    "the shape in the picture is a {s}",
    "a {z} {a} {c} {s} {p}",
    "the {z} {s} {p} is {c}",
)
PER_TEMPLATE_CAP = 150  # a template with many slot combinations contributes a deterministic sample of this many
CORPUS_SEED = 1234


def forbidden_captions() -> set[str]:
    """Every possible test caption (``"a {colour} {shape}"``): the corpus must contain none verbatim."""
    return {f"a {c} {s}" for c in COLOURS for s in SHAPES}


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def build_caption_corpus(exclude: Iterable[str] = ()) -> list[str]:
    """The deterministic stage-1 caption corpus: distinct sentences, in a fixed shuffled order.

    Every ``"a {colour} {shape}"`` string and everything in ``exclude`` (compared case- and
    whitespace-insensitively) is left out, and this is asserted.
    """
    banned = {_norm(t) for t in forbidden_captions()} | {_norm(t) for t in exclude}
    seen: set[str] = set()
    out: list[str] = []
    for t_idx, template in enumerate(TEMPLATES):
        slots = set(re.findall(r"\{(\w+)\}", template))
        axes = {
            "c": COLOURS,
            "s": SHAPES,
            "z": SIZES if "z" in slots else (None,),
            "p": POSITIONS if "p" in slots else (None,),
            "a": ADJECTIVES if "a" in slots else (None,),
            "c2": COLOURS if "c2" in slots else (None,),
            "s2": SHAPES if "s2" in slots else (None,),
        }
        combos = []
        for c, s, z, p, a, c2, s2 in itertools.product(*axes.values()):
            if c2 == c or s2 == s:
                continue
            combos.append(template.format(c=c, s=s, z=z, p=p, a=a, c2=c2, s2=s2))
        combos = list(dict.fromkeys(combos))  # templates without {s} / {c} repeat sentences
        if len(combos) > PER_TEMPLATE_CAP:
            combos = random.Random(CORPUS_SEED + t_idx).sample(combos, PER_TEMPLATE_CAP)
        for sentence in combos:
            key = _norm(sentence)
            if key in banned or key in seen:
                continue
            seen.add(key)
            out.append(sentence)
    random.Random(CORPUS_SEED).shuffle(out)
    leaked = banned & {_norm(t) for t in out}
    assert not leaked, f"caption corpus contains test captions verbatim: {sorted(leaked)[:5]}"
    return out


# ----------------------------------------------------------------------------------------------------------
# building the files
# ----------------------------------------------------------------------------------------------------------
def _fingerprint(data: Path) -> str:
    h = hashlib.sha256()
    h.update(f"builder={BUILDER_VERSION}\ndata={data.absolute()}\n".encode())
    h.update((data / "answers.txt").read_bytes())
    for split in SPLITS:
        h.update((data / split / "questions.json").read_bytes())
        for iid, p in sorted(_image_files(data, split).items()):
            h.update(f"{split}/{iid}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def write_split_files(folder: Path, pairs: dict[str, list[dict]], vqa: dict[str, list[dict]], corpus: list[str],
                      readme: str, info: dict) -> None:
    """The files of an embedded data set with pairs and VQA questions (easy-VQA, scenes) into ``folder``."""
    jsonl = {f"{kind}_{split}": recs[split] for split in SPLITS for kind, recs in (("pairs", pairs), ("vqa", vqa))}
    write_build_files(folder, FILES, jsonl, corpus, readme, info)


def _readme(info: dict) -> str:
    c = info["counts"]
    lines = [
        "# Embedded easy-VQA data (built by `vl_align.embedded.build_embedded_easy_vqa`)",
        "",
        f"Builder version {info['builder_version']}; source: `{info['source']}` (the `easy-vqa` package, "
        "installed with `pip install --no-deps easy-vqa`). Built deterministically: rebuilding gives the same files.",
        "",
        "## Files",
        "",
        "| file | rows | how it is made |",
        "|---|---|---|",
        f"| `pairs_train.jsonl` | {c['pairs_train']} | one row per train image whose colour and shape the questions determine: "
        "`image_path` (absolute), `caption` = `a {colour} {shape}`, `image_id` (`train/<n>`), `colour`, `shape` |",
        f"| `pairs_test.jsonl` | {c['pairs_test']} | the same for the test images |",
        f"| `vqa_train.jsonl` | {c['vqa_train']} | every train question: `question`, `answer`, `image_id`, `image_path`, "
        "`answer_type` (yes/no, colour, shape) |",
        f"| `vqa_test.jsonl` | {c['vqa_test']} | every test question (zero-shot VQA evaluation) |",
        f"| `caption_corpus.txt` | {c['caption_corpus']} | text-only stage-1 corpus, one sentence a line (see below) |",
        "",
        "Load them with `vl_align.data.load_image_text_pairs(\"pairs_train.jsonl\")` (add `extra_fields=(\"colour\", \"shape\")` "
        "to keep those), `pformer.data.load_text_corpus(\"caption_corpus.txt\")` and "
        "`pformer.data.load_text_corpus(\"vqa_test.jsonl\", text_field=\"question\")` or `vl_align.embedded.load_embedded_easy_vqa(dir)`.",
        "",
        "## Colour and shape of an image",
        "",
        "Derived from the image's own questions (`vl_align.embedded.derive_colour_shape`): `what color is the shape?`-type "
        "answers give the colour, `what shape ...?` answers give the shape, a colour/shape word inside such a question "
        "presupposes it, and yes/no questions (`is there (not) a red shape?`, `does the image (not) contain a circle?`, "
        "`is a/no ... present?`) give positive facts or rule values out (a value is taken when all others are ruled out). "
        "No image has conflicting evidence, and the derived colour equals the shape's exact palette colour in the pixels.",
        "",
        "| split | images | pairs | skipped | derivation (per image) |",
        "|---|---|---|---|---|",
    ]
    for split in SPLITS:
        st = info["stats"][split]
        der = ", ".join(f"{k} {v}" for k, v in st["derivation"].items())
        lines.append(f"| {split} | {st['images']} | {st['pairs']} | {st['skips']['total']} | {der} |")
    lines += ["", "Skipped images (colour and/or shape not determined by the questions):", ""]
    for split in SPLITS:
        sk = info["stats"][split]["skips"]
        counts = ", ".join(f"{k}: {v}" for k, v in sk["counts"].items()) or "none"
        lines.append(f"- {split}: {sk['total']} ({counts}); e.g. {', '.join(sum(sk['examples'].values(), [])[:5])}")
    lines += [
        "",
        f"Distinct captions: {c['distinct_captions_train']} (train), {c['distinct_captions_test']} (test), "
        f"{c['shared_captions']} of them in both splits: paired text is small and repetitive.",
        "",
        "## Caption corpus",
        "",
        f"{len(TEMPLATES)} templates (e.g. `there is a {{c}} {{s}} in the picture`, `the {{s}} is {{c}}`, "
        "`a photo of a {z} {c} {s}`, `a {c} shape that is a {s}`) over 8 colours, 3 shapes, "
        f"{len(SIZES)} sizes, {len(POSITIONS)} positions and {len(ADJECTIVES)} adjectives; a template with more than "
        f"{PER_TEMPLATE_CAP} slot combinations contributes a seeded sample of {PER_TEMPLATE_CAP}. Duplicates are removed "
        f"and the order is a seeded shuffle. {c['caption_corpus']} distinct sentences, "
        "none equal to a test caption (`a {colour} {shape}`, checked by an assertion).",
        "",
        f"Fingerprint: `{info['fingerprint']}`",
        "",
    ]
    return "\n".join(lines)


def build_embedded_easy_vqa(out_dir: str | os.PathLike, force: bool = False) -> dict[str, Path]:
    """Write the embedded dataset into ``out_dir`` and return ``{name: path}`` for its files.

    Files: ``pairs_train.jsonl``, ``pairs_test.jsonl``, ``vqa_train.jsonl``, ``vqa_test.jsonl``,
    ``caption_corpus.txt``, ``README.md`` (how each part is made, counts) and ``BUILD_INFO.json``
    (builder version, fingerprint of the package data, counts, skip reports).

    Idempotent: when ``out_dir`` already holds a build with the same builder version and fingerprint it is
    returned as is (unless ``force``). Atomic: files are written to a temporary sibling folder that is then
    renamed into place, so a reader never sees a half-written build.
    """
    out_dir = Path(out_dir).absolute()
    data = easy_vqa_data_dir()
    fingerprint = _fingerprint(data)
    if not force and is_built(out_dir, FILES, BUILDER_VERSION, fingerprint):
        return built_paths(out_dir, FILES)

    stats: dict = {}
    pairs: dict[str, list[dict]] = {}
    vqa: dict[str, list[dict]] = {}
    for split in SPLITS:
        rep = SkipReport(max_skip_fraction=DERIVATION_MAX_SKIP_FRACTION, max_examples=5, name=f"easy-VQA {split} pairs")
        pairs[split], stats[split] = _pairs_and_stats(split, rep)
        rep.check(stats[split]["images"])
        stats[split]["skips"] = rep.as_dict()
        vrep = SkipReport(max_skip_fraction=0.05)
        vqa[split] = easy_vqa_vqa_records(split, vrep)
        stats[split]["vqa_skips"] = vrep.as_dict()
    test_captions = {r["caption"] for r in pairs["test"]}
    corpus = build_caption_corpus(exclude=test_captions)
    assert not test_captions & set(corpus)
    info = {
        "builder_version": BUILDER_VERSION,
        "fingerprint": fingerprint,
        "source": str(data),
        "counts": {
            "pairs_train": len(pairs["train"]),
            "pairs_test": len(pairs["test"]),
            "vqa_train": len(vqa["train"]),
            "vqa_test": len(vqa["test"]),
            "caption_corpus": len(corpus),
            "distinct_captions_train": len({r["caption"] for r in pairs["train"]}),
            "distinct_captions_test": len(test_captions),
            "shared_captions": len(test_captions & {r["caption"] for r in pairs["train"]}),
        },
        "stats": stats,
    }

    try:
        with building_folder(out_dir) as tmp:
            write_split_files(tmp, pairs, vqa, corpus, _readme(info), info)
    except OSError:
        if not is_built(out_dir, FILES, BUILDER_VERSION, fingerprint):  # else a concurrent builder won the race
            raise
    return built_paths(out_dir, FILES)


def _load_vqa_jsonl(path: Path, report: SkipReport | None = None) -> datasets.Dataset:
    """Read a ``vqa_*.jsonl`` file written by the builder (bad lines are counted skips)."""
    from dvlp_common.records import iter_decoded_lines

    rep = SkipReport(max_skip_fraction=report.max_skip_fraction if report is not None else 0.05, name=str(path))
    records = []
    for lineno, line in iter_decoded_lines(path, rep):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rep.skip("invalid_json", f"{path}:{lineno}")
            continue
        if not isinstance(rec, dict) or any(not isinstance(rec.get(k), str) for k in _VQA_FEATURES):
            rep.skip("missing_field", f"{path}:{lineno}")
            continue
        records.append(rec)
    if report is not None:
        report.merge(rep)
    rep.check(len(records) + rep.total)
    return _to_dataset(records, _VQA_FEATURES)


def load_embedded_easy_vqa(out_dir: str | os.PathLike, verify_images: bool = False) -> dict[str, datasets.Dataset]:
    """Build (if needed) and load the embedded dataset with the project's loaders.

    Returns ``{"pairs_train", "pairs_test"}`` (image_path, caption, image_id, colour, shape),
    ``{"vqa_train", "vqa_test"}`` (the VQA jsonl as a Dataset) and ``"caption_corpus"`` (column ``text``).
    """
    from pformer.data import load_text_corpus
    from vl_align.data import load_image_text_pairs

    paths = build_embedded_easy_vqa(out_dir)
    out: dict[str, datasets.Dataset] = {}
    for split in SPLITS:
        out[f"pairs_{split}"] = load_image_text_pairs(
            paths[f"pairs_{split}"], verify_images=verify_images, extra_fields=("colour", "shape")
        )
        out[f"vqa_{split}"] = _load_vqa_jsonl(paths[f"vqa_{split}"])
    out["caption_corpus"] = load_text_corpus(paths["caption_corpus"])
    return out
