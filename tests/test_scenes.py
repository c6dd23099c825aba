"""The embedded generated-scenes dataset (vl_align/scenes.py): determinism, captions true of the pixels, a corpus
free of test captions, VQA answers that follow from the captions, and the pipeline loaders reading it.

Most tests use a small build (a few hundred images); one slow test builds the default size.
"""

from __future__ import annotations

import functools
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dvlp_common.config import ConfigError
from pformer.data import load_text_corpus
from vl_align.data import load_image_text_pairs

SMALL = dict(num_train=160, num_test=80, image_size=112, corpus_size=3000)


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    from vl_align.scenes import build_embedded_scenes

    out = tmp_path_factory.mktemp("scenes") / "scenes"
    return out, build_embedded_scenes(out, seed=3, **SMALL)


# ----------------------------------------------------------------------------------------------------------
# caption space and corpus
# ----------------------------------------------------------------------------------------------------------
def test_caption_space_size_and_round_trip():
    from vl_align.scenes import COLOURS, SHAPES, caption_of, caption_space, parse_caption

    space = caption_space()
    objects = len(COLOURS) * len(SHAPES)  # per size
    # different sizes: large named first, 4 relations; same size: reading order, 2 relations; colours differ
    expected = objects * (objects - len(SHAPES)) * 4 + 2 * objects * (objects - len(SHAPES)) * 2
    assert len(space) == expected == 25920
    captions = [caption_of(k) for k in space]
    assert len(set(captions)) == len(space)
    assert all(parse_caption(c) == k for c, k in zip(captions[::97], space[::97]))
    for bad in ("a small red circle left of a large blue square",  # smaller named first
                "a small red circle right of a small blue square",  # same size, not reading order
                "a large red circle left of a small red square",  # repeated colour
                "a red circle"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_corpus_excludes_test_scenes():
    from vl_align.scenes import INVERSE, build_scene_corpus, caption_of, caption_space

    space = caption_space()
    test_keys = set(space[::50])
    corpus = build_scene_corpus(test_keys, 6000, seed=0)
    assert len(corpus) == len(set(corpus)) == 6000
    assert corpus == build_scene_corpus(test_keys, 6000, seed=0)
    assert not {caption_of(k) for k in test_keys} & set(corpus)
    # nor any full paraphrase (here: the inverse phrasing) of a test scene
    inverse = {f"a {k.second.phrase} {INVERSE[k.relation]} a {k.first.phrase}" for k in test_keys}
    assert not inverse & set(corpus)
    canonical = set(corpus) & {caption_of(k) for k in space}
    assert 0.4 * len(corpus) <= len(canonical) <= 0.6 * len(corpus)  # half canonical captions, half paraphrases


# ----------------------------------------------------------------------------------------------------------
# the built files
# ----------------------------------------------------------------------------------------------------------
def test_files_counts_and_overlap(small_build):
    from vl_align.embedded import FILES

    out, paths = small_build
    assert set(paths) == set(FILES) and all(p.is_file() for p in paths.values())
    info = json.loads(paths["build_info"].read_text())
    c = info["counts"]
    assert (c["pairs_train"], c["pairs_test"], c["caption_corpus"]) == (160, 80, 3000)
    assert c["caption_space"] == 25920 and c["vqa_test"] == 8 * 80
    train = _read_jsonl(paths["pairs_train"])
    test = _read_jsonl(paths["pairs_test"])
    train_caps = {r["caption"] for r in train}
    seen = [r["caption"] in train_caps for r in test]
    assert [r["seen_in_train"] == "yes" for r in test] == seen and sum(seen) == c["test_pairs_seen_in_train"]
    assert sum(seen) / len(test) < 0.2  # most test captions were never a train pair
    corpus = set(paths["caption_corpus"].read_text().splitlines())
    assert not corpus & {r["caption"] for r in test}
    assert all(r["image_path"].startswith(str(out)) for r in train + test)
    assert len({r["image_id"] for r in train + test}) == 240


def test_deterministic_build(small_build, tmp_path):
    from vl_align.scenes import build_embedded_scenes

    out, paths = small_build
    before = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    t0 = time.perf_counter()
    assert build_embedded_scenes(out, seed=3, **SMALL) == paths  # already built: returned as is
    assert time.perf_counter() - t0 < 5 and {k: p.stat().st_mtime_ns for k, p in paths.items()} == before

    same = build_embedded_scenes(tmp_path / "same", seed=3, **SMALL)
    for k in paths:  # identical up to the folder named in the absolute image paths
        assert same[k].read_bytes() == paths[k].read_bytes().replace(str(out).encode(), str(tmp_path / "same").encode()), k
    pngs = sorted(p.relative_to(out) for p in out.glob("images/*/*.png"))
    assert len(pngs) == 240 and pngs == sorted(p.relative_to(tmp_path / "same") for p in (tmp_path / "same").glob("images/*/*.png"))
    assert all((out / p).read_bytes() == (tmp_path / "same" / p).read_bytes() for p in pngs)

    other = build_embedded_scenes(tmp_path / "other", seed=4, **SMALL)
    assert other["pairs_train"].read_text().replace(str(tmp_path / "other"), str(out)) != paths["pairs_train"].read_text()
    assert (tmp_path / "other/images/train/00000.png").read_bytes() != (out / "images/train/00000.png").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left

    # a different parameter in the same folder rebuilds it
    rebuilt = build_embedded_scenes(tmp_path / "same", seed=3, **{**SMALL, "num_test": 10})
    assert len(_read_jsonl(rebuilt["pairs_test"])) == 10


def _shape_from_pixels(mask: np.ndarray) -> str:
    """An independent classifier: fill ratio of the bounding box and the widths of its top / middle / bottom rows."""
    ys, xs = np.nonzero(mask)
    m = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = m.shape
    fill = m.mean()
    if fill > 0.93:
        return "square"
    if 0.7 <= fill <= 0.88:
        return "circle"
    if fill < 0.45:
        return "star"
    top, bottom = m[0].sum() / w, m[-1].sum() / w
    mid = m[h // 2 - 1:h // 2 + 2].sum(1).max() / w  # the widest of the middle rows (even heights)
    if bottom > 0.8 and top < 0.3:
        return "triangle"
    if top > 0.2 and bottom > 0.2 and mid > 0.9:
        return "cross"
    if mid > 0.85 and top < 0.2 and bottom < 0.2:
        return "diamond"
    return f"unknown (fill {fill:.2f}, rows {top:.2f} {mid:.2f} {bottom:.2f})"


def test_captions_are_true_of_the_pixels(small_build):
    """Colours, shapes, sizes and the relation read back from the image agree with the caption."""
    from vl_align.scenes import COLOURS, parse_caption

    _, paths = small_build
    records = _read_jsonl(paths["pairs_train"])[::2] + _read_jsonl(paths["pairs_test"])
    for rec in records:
        px = np.asarray(Image.open(rec["image_path"]).convert("RGB"))
        assert px.shape == (112, 112, 3)
        masks = {c: (px == np.array(rgb)).all(-1) for c, rgb in COLOURS.items()}
        present = {c for c, m in masks.items() if m.sum() > 20}
        key = parse_caption(rec["caption"])
        a, b = key.first, key.second
        assert present == {a.colour, b.colour}, rec
        # everything else is background: light, every channel >= 215
        other = ~(masks[a.colour] | masks[b.colour])
        assert px[other].min() >= 215
        boxes = {}
        for o in (a, b):
            ys, xs = np.nonzero(masks[o.colour])
            boxes[o.colour] = (xs.min(), ys.min(), xs.max(), ys.max())
            assert _shape_from_pixels(masks[o.colour]) == o.shape, (rec, o)
            assert ",".join(map(str, boxes[o.colour])) == rec["box1" if o is a else "box2"]
        ext = {c: max(x1 - x0, y1 - y0) + 1 for c, (x0, y0, x1, y1) in boxes.items()}
        if a.size == b.size:
            assert max(ext.values()) / min(ext.values()) < 1.4, rec
        else:
            large, small = (a, b) if a.size == "large" else (b, a)
            assert ext[large.colour] >= 1.6 * ext[small.colour], rec
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a.colour], boxes[b.colour]
        acx, acy, bcx, bcy = (ax0 + ax1) / 2, (ay0 + ay1) / 2, (bx0 + bx1) / 2, (by0 + by1) / 2
        # the relation holds with a clear gap, and the pair is not diagonal
        horizontal = {"left of": ax1 + 5 < bx0, "right of": bx1 + 5 < ax0}
        vertical = {"above": ay1 + 5 < by0, "below": by1 + 5 < ay0}
        if key.relation in horizontal:
            assert horizontal[key.relation] and abs(acy - bcy) < 2 * abs(acx - bcx) / 3 and not any(vertical.values()), rec
        else:
            assert vertical[key.relation] and abs(acx - bcx) < 2 * abs(acy - bcy) / 3 and not any(horizontal.values()), rec
        # same size: named in reading order
        if a.size == b.size:
            assert key.relation in ("left of", "above")


_OBJ = r"(?:the )?(?:(small|large) )?(\w+) (\w+)"


def _answer(question: str, caption: str) -> str:
    """The answer to a scenes question, worked out from the caption alone (independently of the builder)."""
    from vl_align.scenes import COLOURS, parse_caption

    key = parse_caption(caption)
    objs = [key.first, key.second]
    inv = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

    def rel(i: int) -> str:  # relation of objs[i] to the other
        return key.relation if i == 0 else inv[key.relation]

    def find(colour: str, shape: str | None = None) -> int:
        hits = [i for i, o in enumerate(objs) if o.colour == colour and shape in (None, o.shape)]
        assert len(hits) == 1, (question, caption)
        return hits[0]

    if m := re.fullmatch(r"what color is the (small |large )?(\w+)\?", question):
        hits = [o for o in objs if o.shape == m[2] and (m[1] is None or o.size == m[1].strip())]
        assert len(hits) == 1, (question, caption)
        return hits[0].colour
    if m := re.fullmatch(r"what color is the (small|large) object (.+) the (\w+) one\?", question):
        j = find(m[3])
        assert rel(1 - j) == m[2] and objs[1 - j].size == m[1]
        return objs[1 - j].colour
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        return objs[find(m[1])].shape
    if m := re.fullmatch(r"what size is the (\w+) (\w+)\?", question):
        return objs[find(m[1], m[2])].size
    if m := re.fullmatch(r"what (shape|color) is (?:the shape )?(left of|right of|above|below) the (\w+) (\w+)\?", question):
        j = find(m[3], m[4])
        assert rel(1 - j) == m[2], (question, caption)
        return objs[1 - j].shape if m[1] == "shape" else objs[1 - j].colour
    if m := re.fullmatch(r"is the (\w+) (\w+) (small|large)\?", question):
        return "yes" if objs[find(m[1], m[2])].size == m[3] else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", question):
        i, j = find(m[1], m[2]), find(m[4], m[5])
        assert i != j
        return "yes" if rel(i) == m[3] else "no"
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        assert m[1] in COLOURS
        return "yes" if any((o.colour, o.shape) == (m[1], m[2]) for o in objs) else "no"
    raise AssertionError(f"unknown question template: {question!r}")


def test_vqa_answers_follow_from_captions(small_build):
    from vl_align.scenes import COLOURS, SHAPES, SIZES

    _, paths = small_build
    captions = {r["image_id"]: r["caption"] for s in ("train", "test") for r in _read_jsonl(paths[f"pairs_{s}"])}
    image_paths = {r["image_id"]: r["image_path"] for s in ("train", "test") for r in _read_jsonl(paths[f"pairs_{s}"])}
    for split in ("train", "test"):
        vqa = _read_jsonl(paths[f"vqa_{split}"])
        assert all(set(q) == {"question", "answer", "image_id", "image_path", "answer_type"} for q in vqa)
        for q in vqa:
            assert q["image_id"].startswith(split + "/") and q["image_path"] == image_paths[q["image_id"]]
            assert q["answer"] == _answer(q["question"], captions[q["image_id"]]), q
            kinds = {"colour": set(COLOURS), "shape": set(SHAPES), "size": set(SIZES), "yes/no": {"yes", "no"}}
            assert q["answer"] in kinds[q["answer_type"]] and " " not in q["answer"]
        yes = sum(q["answer"] == "yes" for q in vqa) / sum(q["answer_type"] == "yes/no" for q in vqa)
        assert 0.35 < yes < 0.65
    # the format easy-VQA's loader reads
    assert len(load_text_corpus(paths["vqa_test"], text_field="question")) == 8 * 80


# ----------------------------------------------------------------------------------------------------------
# the pipeline's loaders
# ----------------------------------------------------------------------------------------------------------
def test_pipeline_loaders_read_embedded_scenes(tmp_path, monkeypatch):
    from vl_align import sources
    from vl_align.pairs import PairDataConfig, load_pairs, resolve_pair_source
    from vl_align import scenes

    monkeypatch.setenv("DVLP_CACHE", str(tmp_path / "cache"))
    # a small build in place of the default size (sources looks the builder up at call time)
    monkeypatch.setattr(scenes, "build_embedded_scenes", functools.partial(scenes.build_embedded_scenes, **SMALL))
    assert "scenes" in sources.EMBEDDED
    files = sources.embedded_files("scenes")
    assert files["pairs_train"].parent == tmp_path / "cache" / "data" / "scenes"

    data = PairDataConfig(source="embedded:scenes")
    assert resolve_pair_source(data, "test") == (str(files["pairs_test"]), "jsonl")
    records, report = load_pairs(data, seed=0)
    assert len(records) == 160 and report.total == 0
    assert Path(records[0].image_path).is_file() and records[0].image_bytes is None and records[0].caption
    sub, _ = load_pairs(PairDataConfig(source="embedded:scenes", max_pairs=20), seed=0)
    assert len(sub) == 20
    test, _ = load_pairs(data, seed=0, split="test")
    assert len(test) == 80

    corpus = load_text_corpus(sources.resolve_text_source("embedded:scenes"))
    assert len(corpus) == 3000 and not set(corpus["text"]) & {r.caption for r in test}

    pairs = load_image_text_pairs(files["pairs_test"], extra_fields=("relation", "seen_in_train"))
    assert set(pairs["relation"]) <= {"left of", "right of", "above", "below"} and set(pairs["seen_in_train"]) <= {"yes", "no"}

    from vl_align.evaluation import EvalConfig, _test_records

    pairs_test, vqa_test = _test_records(EvalConfig(), PairDataConfig(source="embedded:scenes"))
    assert len(pairs_test) == 80 and len(vqa_test) == 640

    # the validation split: images carved out of the training pairs, the same for every seed, never trained on
    with_val = PairDataConfig(source="embedded:scenes", validation_images=10)
    val_pairs, val_questions = _test_records(EvalConfig(split="validation"), with_val)
    val_images = {r["image_path"] for r in val_pairs}
    assert len(val_pairs) == 10 and val_images <= {r.image_path for r in records}
    assert val_questions and {q["image_path"] for q in val_questions} <= val_images  # their training questions
    for seed in (0, 1):
        train, _ = load_pairs(with_val.replace(max_pairs=100), seed=seed)
        assert len(train) == 100 and not {r.image_path for r in train} & val_images
    assert len(load_pairs(with_val, seed=0)[0]) == 150
    with pytest.raises(ConfigError, match="validation_images"):
        _test_records(EvalConfig(split="validation"), PairDataConfig(source="embedded:scenes"))


def test_bad_parameters():
    from vl_align.scenes import build_embedded_scenes

    for bad in ({"num_train": 0}, {"image_size": 16}, {"corpus_size": 0}):
        with pytest.raises(ValueError):
            build_embedded_scenes("/nonexistent/never-written", **bad)


@pytest.mark.slow
def test_default_build_size_and_time(tmp_path):
    """The default build (4,000 + 500 images, 30,000 corpus sentences) in well under a minute."""
    from vl_align.scenes import build_embedded_scenes

    t0 = time.perf_counter()
    paths = build_embedded_scenes(tmp_path / "scenes")
    elapsed = time.perf_counter() - t0
    info = json.loads(paths["build_info"].read_text())
    c = info["counts"]
    assert (c["pairs_train"], c["pairs_test"], c["caption_corpus"], c["caption_space"]) == (4000, 500, 30000, 25920)
    assert info["test_seen_fraction"] < 0.25
    assert elapsed < 60, f"default build took {elapsed:.1f} s"


def test_slot_accuracy_scores_each_part_of_the_template():
    from vl_align.scenes import SLOTS, slot_accuracy

    refs = ["a large pink circle left of a small red star"] * 4
    preds = ["a large pink circle left of a small gray star",  # second colour wrong
             "a large pink circle above a small red star",  # relation wrong
             "a small red star right of a large pink circle",  # objects swapped: off the canonical order
             "a pink circle"]  # off the template
    acc = slot_accuracy(preds, refs)
    assert acc["well_formed"] == 0.75 and acc["exact"] == 0.0
    assert acc["first size"] == acc["first colour"] == acc["first shape"] == 0.5
    assert acc["relation"] == 0.25 and acc["second colour"] == 0.25 and acc["second shape"] == 0.5
    assert set(SLOTS) < set(acc)
    assert slot_accuracy(refs[:1], refs[:1])["exact"] == 1.0
    assert slot_accuracy(["A large pink circle left of a small red star. "], refs[:1])["exact"] == 1.0
    with pytest.raises(ValueError, match="as many"):
        slot_accuracy(preds, refs[:2])
