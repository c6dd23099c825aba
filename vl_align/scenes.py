"""The embedded "generated scenes" dataset: two coloured shapes and a spatial relation, drawn with PIL.

Next to easy-VQA (24 captions, all of them seen in the pairs), this set has a caption space far larger than its
image-text pairs, so most test captions are never seen as a pair and text-only knowledge (a P-Former trained on
the caption corpus) can matter.

Scenes and captions (``caption_of``; parsed back by ``parse_caption``):

* two objects, each ``{size} {colour} {shape}``: 10 colours (``COLOURS``, exact palette RGB, no anti-aliasing),
  6 shapes (``SHAPES``), 2 sizes (small: 16-20% of the image side, large: 33-39%, so a large object is always at
  least 1.65x a small one). The two colours always differ, so "the red object" names one object and a colour mask
  recovers each object from the pixels.
* one relation of the first-named object to the second: ``left of``, ``right of``, ``above``, ``below``;
  caption ``"a {size} {colour} {shape} {relation} a {size} {colour} {shape}"``.
* canonical naming order, so an image has exactly one caption: the larger object is named first; two objects of
  the same size are named in reading order (left one first, top one first), so those use ``left of`` / ``above``
  only. Caption space: 12,960 (different sizes: 60 large x 54 small objects x 4 relations) + 12,960 (same size:
  2 sizes x 60 x 54 x 2 relations) = 25,920 captions (``caption_space``).
* three objects were considered and left out: in this grammar "a X left of a Y above a Z" does not say whether
  "above a Z" attaches to X or Y, and two objects already give tens of thousands of captions.
* a relation holds only where the geometry leaves no doubt (``relation_between``): the pixel boxes are separated
  along the relation's axis by a gap of at least ``min_gap`` (5% of the side) and the centres are offset across it
  by at most half the smaller object's extent (so "left of" is never also "above").
* a light background (grey 225-248 with a slight tint and +-5 noise in 4 px cells; every channel >= 215, while every
  palette colour has a channel <= 210) so object pixels are exactly the palette colour.

Everything is drawn from ``seed``: the caption of sample ``i`` of a split from ``default_rng([seed, split])``, its
image and questions from ``default_rng([seed, split, i])``. Same seed -> byte-identical PNGs and files (the jsonl
files hold absolute image paths, so builds into different folders differ only by that prefix).

Files (``build_embedded_scenes``), the same keys as ``vl_align.embedded.build_embedded_easy_vqa``:

* ``pairs_{train,test}.jsonl``: image_path (absolute), caption, image_id (``{split}/{n}``), plus the ground
  truth (``size1 colour1 shape1 box1 relation size2 colour2 shape2 box2``; boxes ``x0,y0,x1,y1`` inclusive pixels)
  and ``seen_in_train`` (test: whether the caption is also a train caption).
* ``vqa_{train,test}.jsonl``: 8 questions per image with single-word answers (colour, shape, size, yes/no), in
  easy-VQA's format (question, answer, image_id, image_path, answer_type).
* ``caption_corpus.txt``: text-only stage-1 corpus: canonical captions of the space plus paraphrases (inverse
  relation, "the X is to the left of the Y", partial descriptions...). No sentence describes a test scene in
  full (canonical caption or paraphrase): the corpus holds no test caption verbatim (asserted), so what the text
  teaches about test scenes is compositional.
* ``README.md``, ``BUILD_INFO.json`` (parameters, counts, caption-space size, train/test overlap).
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from vl_align.embedded import FILES, _norm, write_split_files
from vl_align.embedded_build import build_once, params_fingerprint

__all__ = [
    "BUILDER_VERSION",
    "COLOURS",
    "SHAPES",
    "SIZES",
    "RELATIONS",
    "SceneObject",
    "SceneKey",
    "caption_space",
    "caption_of",
    "parse_caption",
    "SLOTS",
    "caption_slots",
    "slot_accuracy",
    "template_slot_accuracy",
    "relation_between",
    "render_scene",
    "scene_questions",
    "build_scene_corpus",
    "build_embedded_scenes",
]

BUILDER_VERSION = "1"
SPLITS = ("train", "test")
# exact RGB: drawn without anti-aliasing, so a colour mask recovers an object; each has a channel <= 210
COLOURS = {
    "red": (230, 25, 25),
    "green": (30, 160, 40),
    "blue": (30, 70, 230),
    "yellow": (245, 205, 0),
    "purple": (130, 40, 170),
    "orange": (250, 130, 0),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "pink": (250, 120, 190),
    "brown": (130, 75, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# extent (bounding-box side) as a fraction of the image side: clearly different sizes (large / small >= 1.65)
EXTENT = {"small": (0.16, 0.20), "large": (0.33, 0.39)}
MIN_GAP_FRACTION = 0.05  # empty pixels between the two boxes along the relation's axis
MARGIN = 2  # pixels kept free at the image border
BACKGROUND_MIN = 215  # every background channel is at least this (the palette always has one channel below)
TEXTURE_BLOCK = 4  # background noise cell, pixels
QUESTIONS_PER_IMAGE = 8
DEFAULTS = {"num_train": 4000, "num_test": 500, "image_size": 112, "seed": 0, "corpus_size": 30000}


# ----------------------------------------------------------------------------------------------------------
# the caption space
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class SceneObject:
    size: str
    colour: str
    shape: str

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


class SceneKey(NamedTuple):
    """``first relation second``: what a caption says (the first-named object's relation to the second)."""

    first: SceneObject
    relation: str
    second: SceneObject


def _objects() -> list[SceneObject]:
    return [SceneObject(z, c, s) for z in SIZES for c in COLOURS for s in SHAPES]


def _is_canonical(key: SceneKey) -> bool:
    a, rel, b = key
    if a.colour == b.colour:
        return False
    if a.size != b.size:
        return a.size == "large"  # the larger object is named first, any relation
    return rel in ("left of", "above")  # same size: reading order


@functools.lru_cache(maxsize=1)
def caption_space() -> tuple[SceneKey, ...]:
    """Every canonical scene key, in a fixed order (one caption each): 25,920 keys."""
    objs = _objects()
    return tuple(k for a, b in itertools.permutations(objs, 2) for rel in RELATIONS if _is_canonical(k := SceneKey(a, rel, b)))


def caption_of(key: SceneKey) -> str:
    return f"a {key.first.phrase} {key.relation} a {key.second.phrase}"


_OBJ_RE = rf"({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_CAPTION_RE = re.compile(rf"^a {_OBJ_RE} ({'|'.join(RELATIONS)}) a {_OBJ_RE}$")


def parse_caption(caption: str, canonical: bool = True) -> SceneKey:
    """The scene key of a canonical caption (``ValueError`` otherwise; ``canonical=False`` also takes a
    template-shaped caption that names its objects in another order or repeats a colour, as a model may write)."""
    m = _CAPTION_RE.match(caption)
    if not m:
        raise ValueError(f"not a scenes caption: {caption!r}")
    g = m.groups()
    key = SceneKey(SceneObject(*g[0:3]), g[3], SceneObject(*g[4:7]))
    if canonical and not _is_canonical(key):
        raise ValueError(f"not a canonical scenes caption (naming order or repeated colour): {caption!r}")
    return key


SLOTS = ("first size", "first colour", "first shape", "relation", "second size", "second colour", "second shape")


def caption_slots(caption: str) -> tuple[str, ...]:
    """The values of a template-shaped caption's ``SLOTS`` (case and a final full stop aside; ``ValueError`` off
    the template)."""
    a, rel, b = parse_caption(caption.strip().rstrip(".").rstrip().lower(), canonical=False)
    return (a.size, a.colour, a.shape, rel, b.size, b.colour, b.shape)


def slot_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """What generated captions get right, slot by slot of the template (``SLOTS``): per slot the share of
    predictions naming the reference's value, ``well_formed`` (the share that follow the template, case and a final
    full stop aside, as the caption metrics' tokenizer ignores them) and ``exact``. A prediction off the template
    counts wrong in every slot (the denominator is always every prediction)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references (got {len(predictions)} and {len(references)})")
    right = [0] * len(SLOTS)
    well_formed = exact = 0
    for pred, ref in zip(predictions, references):
        want = caption_slots(ref)
        try:
            got = caption_slots(pred)
        except ValueError:
            continue
        well_formed += 1
        exact += got == want
        right = [r + (g == w) for r, g, w in zip(right, got, want)]
    n = len(predictions)
    return {"well_formed": well_formed / n, **{slot: r / n for slot, r in zip(SLOTS, right)}, "exact": exact / n}


def template_slot_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float] | None:
    """:func:`slot_accuracy` where every reference follows the scenes template; None otherwise (another data set)."""
    try:
        for ref in references:
            caption_slots(ref)
    except ValueError:
        return None
    return slot_accuracy(predictions, references) if predictions else None


# ----------------------------------------------------------------------------------------------------------
# geometry and drawing
# ----------------------------------------------------------------------------------------------------------
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive pixels


def relation_between(a: Box, b: Box, min_gap: int) -> str | None:
    """The relation of box ``a`` to box ``b`` when the geometry leaves no doubt, else None.

    "left of": at least ``min_gap`` empty columns between a's right edge and b's left edge, and the vertical
    centres differ by at most half the smaller height (so the pair is side by side, not diagonal). Likewise for
    the other three relations.
    """
    acx, acy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    bcx, bcy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    tol_y = min(a[3] - a[1] + 1, b[3] - b[1] + 1) / 2
    tol_x = min(a[2] - a[0] + 1, b[2] - b[0] + 1) / 2
    if abs(acy - bcy) <= tol_y:
        if b[0] - a[2] - 1 >= min_gap:
            return "left of"
        if a[0] - b[2] - 1 >= min_gap:
            return "right of"
    if abs(acx - bcx) <= tol_x:
        if b[1] - a[3] - 1 >= min_gap:
            return "above"
        if a[1] - b[3] - 1 >= min_gap:
            return "below"
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, e: int) -> None:
    """Draw ``shape`` filling (as far as the shape does) the e x e box whose top-left pixel is (x0, y0)."""
    x1, y1 = x0 + e - 1, y0 + e - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif shape == "star":
        # 5 points; the centre sits lower than the box centre so the star spans the box's height
        r_out = (e - 1) / 2
        r_in = 0.45 * r_out
        ccy = y0 + r_out * (1 + (1 - np.cos(np.pi / 5)) / 2)
        pts = []
        for k in range(10):
            r = r_out if k % 2 == 0 else r_in
            t = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + r * np.cos(t), ccy + r * np.sin(t)))
        draw.polygon([(float(x), float(y)) for x, y in pts], fill=255)
    elif shape == "cross":
        arm = max(2, round(e / 3))
        a0 = x0 + (e - arm) // 2
        b0 = y0 + (e - arm) // 2
        draw.rectangle([a0, y0, a0 + arm - 1, y1], fill=255)
        draw.rectangle([x0, b0, x1, b0 + arm - 1], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _mask(shape: str, x0: int, y0: int, e: int, image_size: int) -> np.ndarray:
    m = Image.new("L", (image_size, image_size), 0)
    _draw_shape(ImageDraw.Draw(m), shape, x0, y0, e)
    return np.asarray(m) > 0


def _bbox(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _extent(size: str, image_size: int, rng: np.random.Generator) -> int:
    lo, hi = EXTENT[size]
    return int(rng.integers(round(lo * image_size), round(hi * image_size) + 1))


def _place(key: SceneKey, image_size: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[Box]]:
    """Sample positions until the drawn pixel boxes satisfy ``relation_between`` (first object to second)."""
    min_gap = max(2, round(MIN_GAP_FRACTION * image_size))
    s = image_size
    horizontal = key.relation in ("left of", "right of")
    first_leads = key.relation in ("left of", "above")  # the first object has the smaller coordinate on the axis
    for _ in range(200):
        e1, e2 = _extent(key.first.size, s, rng), _extent(key.second.size, s, rng)
        e_lead, e_trail = (e1, e2) if first_leads else (e2, e1)
        # along the axis: lead box, a gap of more than min_gap, trail box, all inside the margins
        room = s - 2 * MARGIN - e_lead - e_trail
        if room < min_gap + 1:
            raise ValueError(f"image_size {s} is too small for two objects of extents {e1}, {e2}")
        gap = int(rng.integers(min_gap + 1, room + 1))
        lead_main = int(rng.integers(MARGIN, s - MARGIN - (e_lead + gap + e_trail) + 1))
        trail_main = lead_main + e_lead + gap
        # across the axis: centres within 0.3 of the smaller extent of each other (clamped into the image)
        half = MARGIN + max(e1, e2) / 2
        centre = rng.uniform(half, s - half)
        off = rng.uniform(-0.3, 0.3) * min(e1, e2)
        corners = []
        for main, e, c in ((lead_main, e_lead, centre + off / 2), (trail_main, e_trail, centre - off / 2)):
            cross = min(max(int(round(c - e / 2)), MARGIN), s - MARGIN - e)
            corners.append((main, cross) if horizontal else (cross, main))
        if not first_leads:
            corners.reverse()
        masks = [_mask(key.first.shape, *corners[0], e1, s), _mask(key.second.shape, *corners[1], e2, s)]
        boxes = [_bbox(m) for m in masks]
        # the drawn pixels decide (a star's box is not its nominal box): resample until the relation is clear
        if relation_between(boxes[0], boxes[1], min_gap) == key.relation:
            return masks, boxes
    raise RuntimeError(f"could not place {caption_of(key)!r} in {s} px")  # pragma: no cover (never seen)


def render_scene(key: SceneKey, image_size: int, rng: np.random.Generator) -> tuple[Image.Image, list[Box]]:
    """The RGB image of ``key`` and the pixel boxes of its (first, second) objects."""
    masks, boxes = _place(key, image_size, rng)
    base = int(rng.integers(225, 249))
    tint = rng.integers(-4, 5, size=3)
    # mottled in 4 px blocks: a light texture that PNG still compresses well (per-pixel noise: 8x the bytes)
    cells = -(-image_size // TEXTURE_BLOCK)
    noise = rng.integers(-5, 6, size=(cells, cells, 1)).repeat(TEXTURE_BLOCK, 0).repeat(TEXTURE_BLOCK, 1)
    noise = noise[:image_size, :image_size]
    px = np.clip(base + tint + noise, BACKGROUND_MIN, 255).astype(np.uint8)
    for obj, m in zip((key.first, key.second), masks):
        px[m] = COLOURS[obj.colour]
    return Image.fromarray(px, "RGB"), boxes


# ----------------------------------------------------------------------------------------------------------
# VQA questions from the ground truth
# ----------------------------------------------------------------------------------------------------------
def _relation_of(key: SceneKey, target: int) -> str:
    """Relation of object ``target`` (0: first, 1: second) to the other one."""
    return key.relation if target == 0 else INVERSE[key.relation]


def scene_questions(key: SceneKey, rng: random.Random) -> list[tuple[str, str, str]]:
    """``QUESTIONS_PER_IMAGE`` (question, answer, answer_type) about the scene, in a seeded order.

    Kinds: colour of a shape, shape of a colour, size of an object, shape / colour of the object in a relation
    to the other, and yes/no on a size, a relation and an object's presence (half of them true).
    answer_type: ``colour``, ``shape``, ``size`` or ``yes/no``. Objects are referred to unambiguously (colours
    differ; "the circle" only when one circle).
    """
    objs = (key.first, key.second)

    def ref(o: SceneObject) -> str:
        return f"the {o.colour} {o.shape}"

    out = []
    # what color is the X?  (the shape alone when it names one object, else size + shape, else shape of a colour)
    i = rng.randrange(2)
    o, other = objs[i], objs[1 - i]
    if o.shape != other.shape:
        out.append((f"what color is the {o.shape}?", o.colour, "colour"))
    elif o.size != other.size:
        out.append((f"what color is the {o.size} {o.shape}?", o.colour, "colour"))
    else:
        out.append((f"what color is the {o.size} object {_relation_of(key, i)} the {other.colour} one?", o.colour, "colour"))
    o = objs[rng.randrange(2)]
    out.append((f"what shape is the {o.colour} object?", o.shape, "shape"))
    o = objs[rng.randrange(2)]
    out.append((f"what size is {ref(o)}?", o.size, "size"))
    t = rng.randrange(2)
    out.append((f"what shape is {_relation_of(key, t)} {ref(objs[1 - t])}?", objs[t].shape, "shape"))
    t = rng.randrange(2)
    out.append((f"what color is the shape {_relation_of(key, t)} {ref(objs[1 - t])}?", objs[t].colour, "colour"))
    # yes/no: each true with probability 1/2
    o = objs[rng.randrange(2)]
    size = o.size if rng.random() < 0.5 else ("large" if o.size == "small" else "small")
    out.append((f"is {ref(o)} {size}?", "yes" if size == o.size else "no", "yes/no"))
    t = rng.randrange(2)
    true_rel = _relation_of(key, t)
    rel = true_rel if rng.random() < 0.5 else rng.choice([r for r in RELATIONS if r != true_rel])
    out.append((f"is {ref(objs[t])} {rel} {ref(objs[1 - t])}?", "yes" if rel == true_rel else "no", "yes/no"))
    o = objs[rng.randrange(2)]
    if rng.random() < 0.5:
        colour, shape = o.colour, o.shape
    elif rng.random() < 0.5:  # near misses: a present colour on another shape (colours differ, so absent)...
        colour, shape = o.colour, rng.choice([sh for sh in SHAPES if sh != o.shape])
    else:  # ... or a present shape in a colour neither object has
        colour, shape = rng.choice([c for c in COLOURS if c not in (key.first.colour, key.second.colour)]), o.shape
    present = any((p.colour, p.shape) == (colour, shape) for p in objs)
    out.append((f"is there a {colour} {shape}?", "yes" if present else "no", "yes/no"))
    rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# the text-only caption corpus
# ----------------------------------------------------------------------------------------------------------
_LONG = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
# paraphrases of a key: A/B first/second object phrase, r relation, i inverse, R/I long forms, a/b "colour shape"
# of A/B, za/zb their sizes. The last three omit part of the scene (partial descriptions).
PARAPHRASES = (
    "a {B} {i} a {A}",
    "there is a {A} {r} a {B}",
    "a picture of a {A} {r} a {B}",
    "an image with a {A} {R} a {B}",
    "the {A} is {R} the {B}",
    "the {B} is {I} the {A}",
    "a {B} with a {A} {r} it",
    "a {A} sits {R} a {B}",
    "a {A} {r} a {B} on a light background",
    "a {A} and a {B}",
    "the {a} is {za} and the {b} is {zb}",
    "the {a} is {R} the {b}",
)
CANONICAL_SHARE = 0.5  # of the corpus: canonical captions; the rest: paraphrases


def _paraphrase(template: str, key: SceneKey) -> str:
    a, rel, b = key
    return template.format(A=a.phrase, B=b.phrase, r=rel, i=INVERSE[rel], R=_LONG[rel], I=_LONG[INVERSE[rel]],
                           a=f"{a.colour} {a.shape}", b=f"{b.colour} {b.shape}", za=a.size, zb=b.size)


def build_scene_corpus(test_keys: set[SceneKey], size: int, seed: int) -> list[str]:
    """``size`` distinct sentences in a seeded order: canonical captions of non-test keys (``CANONICAL_SHARE``)
    and paraphrases of non-test keys. No sentence is a test caption (asserted)."""
    rng = random.Random(f"scenes-corpus-{seed}")
    allowed = [k for k in caption_space() if k not in test_keys]
    n_canon = min(round(CANONICAL_SHARE * size), len(allowed))
    out = [caption_of(k) for k in rng.sample(allowed, n_canon)]
    seen = set(out)
    for _ in range(50 * size):
        if len(out) >= size:
            break
        s = _paraphrase(rng.choice(PARAPHRASES), rng.choice(allowed))
        if s not in seen:
            seen.add(s)
            out.append(s)
    if len(out) < size:
        raise ValueError(f"corpus_size {size} is more distinct sentences than the templates give ({len(out)})")
    rng.shuffle(out)
    leaked = {_norm(caption_of(k)) for k in test_keys} & {_norm(s) for s in out}
    assert not leaked, f"scenes caption corpus contains test captions: {sorted(leaked)[:5]}"
    return out


# ----------------------------------------------------------------------------------------------------------
# building the files
# ----------------------------------------------------------------------------------------------------------
def _sample_keys(space: tuple[SceneKey, ...], n: int, seed: int, split: str) -> list[SceneKey]:
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    return [space[int(j)] for j in rng.integers(len(space), size=n)]


def _split_records(split: str, keys: list[SceneKey], image_size: int, seed: int, final_dir: Path, tmp_dir: Path):
    pairs, vqa = [], []
    (tmp_dir / "images" / split).mkdir(parents=True)
    for n, key in enumerate(keys):
        rng = np.random.default_rng([seed, SPLITS.index(split), n])
        img, boxes = render_scene(key, image_size, rng)
        rel_path = Path("images") / split / f"{n:05d}.png"
        # compress_level fixed so the bytes do not depend on a changed PIL default
        img.save(tmp_dir / rel_path, format="PNG", compress_level=6)
        path = str(final_dir / rel_path)  # where the file will be once the build folder is renamed into place
        iid = f"{split}/{n}"
        a, rel, b = key
        pairs.append({"image_path": path, "caption": caption_of(key), "image_id": iid,
                      "size1": a.size, "colour1": a.colour, "shape1": a.shape, "box1": ",".join(map(str, boxes[0])),
                      "relation": rel,
                      "size2": b.size, "colour2": b.colour, "shape2": b.shape, "box2": ",".join(map(str, boxes[1]))})
        qrng = random.Random(f"scenes-vqa-{seed}-{split}-{n}")
        for q, ans, kind in scene_questions(key, qrng):
            vqa.append({"question": q, "answer": ans, "image_id": iid, "image_path": path, "answer_type": kind})
    return pairs, vqa


def _readme(info: dict) -> str:
    c, p = info["counts"], info["params"]
    return "\n".join([
        "# Embedded generated-scenes data (built by `vl_align.scenes.build_embedded_scenes`)",
        "",
        f"Builder version {info['builder_version']}; seed {p['seed']}, {p['image_size']} px. Two coloured shapes and "
        "a spatial relation, drawn with PIL; rebuilding with the same parameters gives the same files. See the "
        "docstring of `vl_align/scenes.py` for the caption grammar and the geometry rules.",
        "",
        "| file | rows | what |",
        "|---|---|---|",
        f"| `pairs_train.jsonl` | {c['pairs_train']} | image_path, caption, image_id, ground truth (sizes, colours, shapes, "
        "boxes, relation) |",
        f"| `pairs_test.jsonl` | {c['pairs_test']} | the same, plus `seen_in_train` |",
        f"| `vqa_train.jsonl` | {c['vqa_train']} | {QUESTIONS_PER_IMAGE} questions per image (colour, shape, size, yes/no) |",
        f"| `vqa_test.jsonl` | {c['vqa_test']} | the same for the test images (zero-shot VQA) |",
        f"| `caption_corpus.txt` | {c['caption_corpus']} | text-only stage-1 corpus; describes no test scene in full |",
        "",
        f"Caption space: {c['caption_space']} captions. Distinct captions: {c['distinct_captions_train']} (train), "
        f"{c['distinct_captions_test']} (test). Test pairs whose caption is a train caption: {c['test_pairs_seen_in_train']} "
        f"({info['test_seen_fraction']:.1%}). Train captions in the corpus verbatim: {c['train_captions_in_corpus']}.",
        "",
        f"Fingerprint: `{info['fingerprint']}`",
        "",
    ])


def build_embedded_scenes(
    out_dir: str | os.PathLike,
    num_train: int = DEFAULTS["num_train"],
    num_test: int = DEFAULTS["num_test"],
    image_size: int = DEFAULTS["image_size"],
    seed: int = DEFAULTS["seed"],
    corpus_size: int = DEFAULTS["corpus_size"],
    force: bool = False,
) -> dict[str, Path]:
    """Write the scenes dataset into ``out_dir`` (images under ``out_dir/images``) and return ``{name: path}``.

    Keys as ``build_embedded_easy_vqa``: pairs_train, pairs_test, vqa_train, vqa_test, caption_corpus, readme,
    build_info. Idempotent (a build with the same parameters is returned as is unless ``force``), locked (a file
    lock beside ``out_dir`` serialises concurrent builders) and atomic (written to a temporary sibling folder that
    is renamed into place, so a reader never sees a half-written build).
    """
    for name, v, lo in (("num_train", num_train, 1), ("num_test", num_test, 1), ("image_size", image_size, 48),
                        ("corpus_size", corpus_size, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    out_dir = Path(out_dir).absolute()
    params = {"num_train": num_train, "num_test": num_test, "image_size": image_size, "seed": seed,
              "corpus_size": corpus_size}
    fingerprint = params_fingerprint(BUILDER_VERSION, params)

    def write(tmp: Path) -> None:
        space = caption_space()
        keys = {split: _sample_keys(space, n, seed, split) for split, n in (("train", num_train), ("test", num_test))}
        test_keys = set(keys["test"])
        corpus = build_scene_corpus(test_keys, corpus_size, seed)
        train_caps = {caption_of(k) for k in keys["train"]}
        test_caps = [caption_of(k) for k in keys["test"]]
        corpus_set = set(corpus)
        assert not corpus_set & set(test_caps)

        pairs, vqa = {}, {}
        for split in SPLITS:
            pairs[split], vqa[split] = _split_records(split, keys[split], image_size, seed, out_dir, tmp)
        for r in pairs["test"]:
            r["seen_in_train"] = "yes" if r["caption"] in train_caps else "no"
        seen = sum(c in train_caps for c in test_caps)
        info = {
            "builder_version": BUILDER_VERSION,
            "fingerprint": fingerprint,
            "params": params,
            "counts": {
                "pairs_train": num_train, "pairs_test": num_test,
                "vqa_train": len(vqa["train"]), "vqa_test": len(vqa["test"]),
                "caption_corpus": len(corpus), "caption_space": len(space),
                "distinct_captions_train": len(train_caps), "distinct_captions_test": len(set(test_caps)),
                "test_pairs_seen_in_train": seen,
                "train_captions_in_corpus": len(train_caps & corpus_set),
            },
            "test_seen_fraction": seen / num_test,
        }
        write_split_files(tmp, pairs, vqa, corpus, _readme(info), info)

    return build_once(out_dir, FILES, BUILDER_VERSION, fingerprint, force, write)
