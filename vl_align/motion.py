"""The embedded "motion" video dataset: one coloured shape that moves, grows, fades, blinks or changes colour, drawn
with PIL; resolved as ``embedded:motion`` (``vl_align.sources``).

It tests what a video model can tell from its frames, so the clips come in two families of captions:

* **order family**: the caption depends on the order of the frames. Categories (``CATEGORIES``): moves left / right,
  moves up / down, grows / shrinks, appears / disappears (a linear fade: alpha ``i / (n - 1)``), and turns blue /
  turns red (red in the first half of the frames, blue in the second). Built as **pairs**: a clip and its time
  reversal with the opposite caption, so both hold exactly the same frames (a model blind to order is at chance).
* **set family**: the caption does not depend on the order but one frame is not enough. Positives: moves around
  (the shape jumps between positions that differ pairwise in x *and* y, so no subset looks like a straight left /
  right / up / down move), blinks (visible in all frames of one half but one, hidden in all frames of the other
  half but one, so every head-tail or uniform sample of >= 4 frames holds both), changes colour (a different
  colour in every frame, never red or blue, so no subset looks like a red/blue turn). Each positive is paired with
  a **still** clip made of one of its own frames (the shape placed where the moving shape passes, the blinking
  shape always visible, one of the changing colours held): "stays still" is the one negative caption of the
  family, since a static clip cannot say which of the three contrasts it stands for.

The frame *set* of every category differs from every other category's (fades have partial opacities, blinks do
not; straight moves keep one coordinate, jumps change both; a turn shows red and blue only, a change shows other
colours), also for any head-tail or uniform sample of >= 4 of the 8 frames: a model that sees the frames without
their order has what it needs for the set family and only chance (50%) on the order family.

Captions (``caption_of``): ``a {colour} {shape} moves left``, ``a red {shape} turns blue``, ``a {shape} changes
colour``, ``a {colour} {shape} stays still``... over 10 colours and 6 shapes (``vl_align.scenes`` palette and
shapes, exact RGB without anti-aliasing, except for the fades). Each record carries its ``family``, ``category``,
the ``keywords`` a correct caption must contain and the ``contrast_keywords`` it must not (the other side of its
contrast); :func:`keyword_accuracy` scores generated captions with them.

Frames: one PNG filmstrip per clip (``frames_per_clip`` square frames side by side, ``image_size`` px each), read
back by ``vl_align.video_data.read_frames``. Everything is drawn from ``seed``: the categories of a split from
``default_rng([seed, split])``, pair ``j`` from ``default_rng([seed, split, j])``; same seed -> byte-identical files.

Files (``build_embedded_motion``): ``pairs_{train,test}.jsonl`` (video_path absolute, caption, video_id
``{split}/{n}``, pair_id, family, category, keywords, contrast_keywords; test rows also ``seen_in_train``),
``caption_corpus.txt`` (text-only stage-1 corpus: canonical captions of non-test keys and paraphrases; no test
caption verbatim, asserted), ``README.md`` and ``BUILD_INFO.json``.
"""
from __future__ import annotations

import functools
import itertools
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vl_align.embedded import _norm
from vl_align.embedded_build import build_once, params_fingerprint, write_build_files
from vl_align.scenes import (
    BACKGROUND_MIN,
    COLOURS,
    MARGIN,
    SHAPES,
    TEXTURE_BLOCK,
    _draw_shape,
)

__all__ = [
    "BUILDER_VERSION",
    "CATEGORIES",
    "FAMILIES",
    "FILES",
    "Category",
    "MotionKey",
    "build_embedded_motion",
    "build_motion_corpus",
    "caption_keywords_ok",
    "caption_of",
    "caption_space",
    "keyword_accuracy",
    "render_pair",
]

BUILDER_VERSION = "1"
SPLITS = ("train", "test")
FAMILIES = ("order", "set")
FILES = {
    "pairs_train": "pairs_train.jsonl",
    "pairs_test": "pairs_test.jsonl",
    "caption_corpus": "caption_corpus.txt",
    "readme": "README.md",
    "build_info": "BUILD_INFO.json",
}
DEFAULTS = {"num_train": 4000, "num_test": 500, "image_size": 112, "frames_per_clip": 8, "seed": 0,
            "corpus_size": 12000}
TURN_COLOURS = ("red", "blue")  # the order family's colour turn; the set family's colour changes avoid both
CHANGE_COLOURS = tuple(c for c in COLOURS if c not in TURN_COLOURS)  # 8: at most 8 frames per clip


@dataclass(frozen=True)
class Category:
    name: str
    family: str
    template: str  # {c} colour, {s} shape
    keywords: tuple[str, ...]  # a correct caption contains each (whole words, in order within a phrase)
    contrast: tuple[str, ...]  # category names on the other side of the contrast: their keywords make a caption wrong


# order family: the pair partner is the time reversal (``contrast``: the reversed category)
# set family: the pair partner is a still clip made of one of the positive's frames
_CATS = (
    Category("left", "order", "a {c} {s} moves left", ("left",), ("right",)),
    Category("right", "order", "a {c} {s} moves right", ("right",), ("left",)),
    Category("up", "order", "a {c} {s} moves up", ("up",), ("down",)),
    Category("down", "order", "a {c} {s} moves down", ("down",), ("up",)),
    Category("grows", "order", "a {c} {s} grows", ("grows",), ("shrinks",)),
    Category("shrinks", "order", "a {c} {s} shrinks", ("shrinks",), ("grows",)),
    # word matching: "appears" is not found inside "disappears"
    Category("appears", "order", "a {c} {s} appears", ("appears",), ("disappears",)),
    Category("disappears", "order", "a {c} {s} disappears", ("disappears",), ("appears",)),
    Category("turns_blue", "order", "a red {s} turns blue", ("turns blue",), ("turns_red",)),
    Category("turns_red", "order", "a blue {s} turns red", ("turns red",), ("turns_blue",)),
    Category("around", "set", "a {c} {s} moves around", ("around",), ("still",)),
    Category("blinks", "set", "a {c} {s} blinks", ("blinks",), ("still",)),
    Category("changes_colour", "set", "a {s} changes colour", ("changes",), ("still",)),
    Category("still", "set", "a {c} {s} stays still", ("still",), ("around", "blinks", "changes_colour")),
)
CATEGORIES: dict[str, Category] = {c.name: c for c in _CATS}
# what a pair is built from: order pairs (forward category, reversed category), set pairs (positive, "still")
ORDER_PAIRS = (("left", "right"), ("up", "down"), ("grows", "shrinks"), ("appears", "disappears"),
               ("turns_blue", "turns_red"))
SET_POSITIVES = ("around", "blinks", "changes_colour")
PAIR_KINDS = tuple(f"order:{a}" for a, _ in ORDER_PAIRS) + tuple(f"set:{p}" for p in SET_POSITIVES)
# geometry, as fractions of the image side
MOVE_EXTENT = (0.18, 0.26)  # shapes that move, blink or change colour
GROW_EXTENT = ((0.12, 0.18), (0.38, 0.46))  # smallest and largest extent of a growing shape
MIN_TRAVEL = 0.45  # a straight move covers at least this fraction of the free range
AROUND_GAP = 0.06  # positions of a "moves around" clip differ pairwise by at least this much in x and in y


def _contrast_keywords(cat: Category) -> tuple[str, ...]:
    return tuple(k for c in cat.contrast for k in CATEGORIES[c].keywords)


@dataclass(frozen=True)
class MotionKey:
    """What a caption says: the category, the shape and its colour (None where the caption names none)."""
    category: str
    shape: str
    colour: str | None


def caption_of(key: MotionKey) -> str:
    return CATEGORIES[key.category].template.format(c=key.colour, s=key.shape)


def _key_colours(category: str) -> tuple[str | None, ...]:
    if category == "changes_colour":
        return (None,)
    if category == "turns_blue":
        return ("red",)
    if category == "turns_red":
        return ("blue",)
    return tuple(COLOURS)


@functools.lru_cache(maxsize=1)
def caption_space() -> tuple[MotionKey, ...]:
    """Every (category, shape, colour) a caption can name: 11 x 60 + 3 x 6 = 678 captions."""
    return tuple(MotionKey(cat, s, c) for cat in CATEGORIES for s in SHAPES for c in _key_colours(cat))


# ----------------------------------------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------------------------------------
@functools.cache
def _shape_mask(shape: str, extent: int) -> np.ndarray:
    """The ``extent x extent`` boolean mask of ``shape`` (drawn once per shape and size, pasted at any position)."""
    m = Image.new("L", (extent, extent), 0)
    _draw_shape(ImageDraw.Draw(m), shape, 0, 0, extent)
    return np.asarray(m) > 0


@dataclass(frozen=True)
class _Sprite:
    """The shape as drawn in one frame: top-left corner, extent, colour and opacity (0: absent)."""
    x: int
    y: int
    extent: int
    colour: str
    alpha: float = 1.0


def _background(image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A light, slightly tinted background with a 4 px texture; every channel >= BACKGROUND_MIN, so a palette
    colour (one channel <= 210) is recovered exactly by a colour mask. One background per clip."""
    base = int(rng.integers(222, 250))
    tint = rng.integers(-6, 7, size=3)
    cells = -(-image_size // TEXTURE_BLOCK)
    noise = rng.integers(-5, 6, size=(cells, cells, 1)).repeat(TEXTURE_BLOCK, 0).repeat(TEXTURE_BLOCK, 1)
    return np.clip(base + tint + noise[:image_size, :image_size], BACKGROUND_MIN, 255).astype(np.uint8)


def _render(background: np.ndarray, shape: str, sprites: Sequence[_Sprite]) -> np.ndarray:
    """Frames ``[n, S, S, 3]`` uint8: the background with the shape drawn as each sprite says."""
    out = np.repeat(background[None], len(sprites), axis=0)
    for frame, sp in zip(out, sprites):
        if sp.alpha <= 0:
            continue
        m = _shape_mask(shape, sp.extent)
        region = frame[sp.y:sp.y + sp.extent, sp.x:sp.x + sp.extent]
        colour = np.asarray(COLOURS[sp.colour], dtype=np.float64)
        if sp.alpha >= 1:
            region[m] = COLOURS[sp.colour]
        else:  # a fade: blended over the background (rounded, so the bytes are deterministic)
            region[m] = np.rint((1 - sp.alpha) * region[m] + sp.alpha * colour).astype(np.uint8)
    return out


def _free(image_size: int, extent: int) -> tuple[int, int]:
    """Range of top-left coordinates that keep a shape of ``extent`` inside the margins (inclusive)."""
    lo, hi = MARGIN, image_size - MARGIN - extent
    if hi - lo < 8:
        raise ValueError(f"image_size {image_size} is too small for a shape of {extent} px")
    return lo, hi


def _extent(bounds: tuple[float, float], s: int, rng: np.random.Generator) -> int:
    return int(rng.integers(round(bounds[0] * s), round(bounds[1] * s) + 1))


def _spaced(lo: int, hi: int, n: int, gap: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` integers in [lo, hi] pairwise at least ``gap`` apart, in a random order."""
    slack = (hi - lo) - gap * (n - 1)
    if slack < 0:
        raise ValueError(f"cannot place {n} positions {gap} px apart in [{lo}, {hi}]")
    base = np.sort(rng.integers(0, slack + 1, size=n)) + gap * np.arange(n) + lo
    return rng.permutation(base)


def _straight(n: int, s: int, rng: np.random.Generator, axis: str) -> tuple[int, list[tuple[int, int]]]:
    """(extent, top-left corners) of a straight move along ``axis`` ("x": increasing x, "y": increasing y)."""
    e = _extent(MOVE_EXTENT, s, rng)
    lo, hi = _free(s, e)
    travel = int(rng.integers(max(n - 1, round(MIN_TRAVEL * (hi - lo))), hi - lo + 1))
    start = int(rng.integers(lo, hi - travel + 1))
    along = [start + round(i * travel / (n - 1)) for i in range(n)]
    across = int(rng.integers(lo, hi + 1))
    return e, [(a, across) if axis == "x" else (across, a) for a in along]


def _forward_sprites(kind: str, n: int, s: int, rng: np.random.Generator) -> tuple[str, str, list[_Sprite]]:
    """(category, shape, sprites) of the first clip of an order pair; its reversal is the second clip."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    if kind in ("left", "up"):
        e, corners = _straight(n, s, rng, "x" if kind == "left" else "y")
        # drawn increasing, so the first clip is "right" / "down" half the time: which one comes first is random
        if rng.random() < 0.5:
            corners = corners[::-1]
        increasing = corners[-1] > corners[0]
        cat = {("left", True): "right", ("left", False): "left", ("up", True): "down", ("up", False): "up"}[
            (kind, increasing)]
        return cat, shape, [_Sprite(x, y, e, colour) for x, y in corners]
    if kind == "grows":
        e0, e1 = _extent(GROW_EXTENT[0], s, rng), _extent(GROW_EXTENT[1], s, rng)
        lo, hi = _free(s, e1)
        # a fixed centre: the largest shape inside the margins, every smaller one centred on it
        cx, cy = (int(rng.integers(lo, hi + 1)) + e1 / 2 for _ in range(2))
        sizes = [round(e0 + i * (e1 - e0) / (n - 1)) for i in range(n)]
        sprites = [_Sprite(round(cx - e / 2), round(cy - e / 2), e, colour) for e in sizes]
        return ("grows", shape, sprites) if rng.random() < 0.5 else ("shrinks", shape, sprites[::-1])
    e = _extent(MOVE_EXTENT, s, rng)
    lo, hi = _free(s, e)
    x, y = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    if kind == "appears":
        sprites = [_Sprite(x, y, e, colour, alpha=i / (n - 1)) for i in range(n)]
        return ("appears", shape, sprites) if rng.random() < 0.5 else ("disappears", shape, sprites[::-1])
    if kind == "turns_blue":
        # a switch at the middle: every head-tail or uniform sample has the first colour before the second
        sprites = [_Sprite(x, y, e, "red" if i < n // 2 else "blue") for i in range(n)]
        return ("turns_blue", shape, sprites) if rng.random() < 0.5 else ("turns_red", shape, sprites[::-1])
    raise ValueError(f"unknown order pair kind {kind!r}")


def _set_sprites(kind: str, n: int, s: int, rng: np.random.Generator) -> tuple[str, list[_Sprite], list[_Sprite]]:
    """(shape, positive sprites, still sprites) of a set pair: the still clip repeats one of the positive's frames
    (blinking: a visible one)."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    e = _extent(MOVE_EXTENT, s, rng)
    lo, hi = _free(s, e)
    if kind == "around":
        gap = max(2, round(AROUND_GAP * s))
        xs, ys = _spaced(lo, hi, n, gap, rng), _spaced(lo, hi, n, gap, rng)
        pos = [_Sprite(int(x), int(y), e, colour) for x, y in zip(xs, ys)]
        held = pos[int(rng.integers(n))]
    elif kind == "blinks":
        x, y = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        half = n // 2
        # one half visible but one frame, the other hidden but one (which half is which: random)
        visible = np.zeros(n, dtype=bool)
        visible[:half] = True
        visible[int(rng.integers(half))] = False
        visible[half + int(rng.integers(n - half))] = True
        if rng.random() < 0.5:
            visible = ~visible
        pos = [_Sprite(x, y, e, colour, alpha=float(v)) for v in visible]
        held = _Sprite(x, y, e, colour)
    elif kind == "changes_colour":
        x, y = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        colours = [CHANGE_COLOURS[int(i)] for i in rng.permutation(len(CHANGE_COLOURS))[:n]]
        pos = [_Sprite(x, y, e, c) for c in colours]
        held = pos[int(rng.integers(n))]
    else:
        raise ValueError(f"unknown set pair kind {kind!r}")
    return shape, pos, [held] * n


def render_pair(kind: str, frames_per_clip: int, image_size: int, rng: np.random.Generator) -> list[dict]:
    """The two clips of a pair of ``kind`` (``PAIR_KINDS``): ``[{"category", "shape", "colour", "frames"}]`` with
    frames ``[n, S, S, 3]`` uint8 on one shared background."""
    family, name = kind.split(":")
    n, s = frames_per_clip, image_size
    bg = _background(s, rng)
    if family == "order":
        cat, shape, sprites = _forward_sprites(name, n, s, rng)
        frames = _render(bg, shape, sprites)
        reverse = dict(ORDER_PAIRS) | {b: a for a, b in ORDER_PAIRS}
        # the colour a caption names: the first frame's (a colour turn: the colour it starts with)
        return [{"category": cat, "shape": shape, "colour": sprites[0].colour, "frames": frames},
                {"category": reverse[cat], "shape": shape, "colour": sprites[-1].colour,
                 "frames": frames[::-1].copy()}]
    shape, pos, still = _set_sprites(name, n, s, rng)
    return [{"category": name, "shape": shape, "colour": None if name == "changes_colour" else pos[0].colour,
             "frames": _render(bg, shape, pos)},
            {"category": "still", "shape": shape, "colour": still[0].colour, "frames": _render(bg, shape, still)}]


def _key(clip: dict) -> MotionKey:
    return MotionKey(clip["category"], clip["shape"], clip["colour"])


# ----------------------------------------------------------------------------------------------------------
# the key-word metric
# ----------------------------------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> str:
    return " " + " ".join(_WORD.findall(text.lower())) + " "


def caption_keywords_ok(caption: str, keywords: Iterable[str], contrast_keywords: Iterable[str] = ()) -> bool:
    """True when ``caption`` contains every key word (whole words; a phrase as consecutive words, case and
    punctuation ignored) and no contrast key word ("moves left and right" is not an answer)."""
    text = _words(caption)
    return (all(_words(k) in text for k in keywords)
            and not any(_words(k) in text for k in contrast_keywords))


def keyword_accuracy(predictions: Sequence[str] | Mapping[str, str], records: Sequence[Mapping],
                     by: str = "family") -> dict[str, float]:
    """Share of generated captions that say what the clip shows, per ``by`` (``family`` or ``category``) and
    ``"all"``.

    ``predictions``: one caption per record (same order), or ``{video_id: caption}``. ``records``: rows of
    ``pairs_*.jsonl`` (``family``, ``category``, ``keywords``, ``contrast_keywords``, ``video_id``). Chance on the
    order family is 0.5 for a model that answers with one side of the contrast.
    """
    if by not in ("family", "category"):
        raise ValueError(f"by must be 'family' or 'category', got {by!r}")
    if isinstance(predictions, Mapping):
        missing = [r["video_id"] for r in records if r["video_id"] not in predictions]
        if missing:
            raise KeyError(f"no prediction for {len(missing)} record(s), e.g. {missing[:3]}")
        preds = [predictions[r["video_id"]] for r in records]
    else:
        preds = list(predictions)
        if len(preds) != len(records):
            raise ValueError(f"{len(preds)} predictions for {len(records)} records")
    hits: dict[str, list[int]] = {}
    for p, r in zip(preds, records):
        ok = int(caption_keywords_ok(p, r["keywords"], r.get("contrast_keywords", ())))
        for group in (r[by], "all"):
            hits.setdefault(group, []).append(ok)
    return {g: sum(v) / len(v) for g, v in sorted(hits.items())}


# ----------------------------------------------------------------------------------------------------------
# the text-only corpus
# ----------------------------------------------------------------------------------------------------------
SUBJECTS = ("a {c} {s}", "the {c} {s}", "one {c} {s}", "a single {c} {s}", "a {s} coloured {c}", "the {s} in {c}",
            "a small {c} {s}", "a big {c} {s}")
COLOURLESS_SUBJECTS = ("a {s}", "the {s}", "one {s}", "a single {s}", "a small {s}", "a big {s}")
PREDICATES = {
    "left": ("moves left", "moves to the left", "slides left", "goes to the left", "travels from right to left",
             "is moving to the left", "drifts left"),
    "right": ("moves right", "moves to the right", "slides right", "goes to the right", "travels from left to right",
              "is moving to the right", "drifts right"),
    "up": ("moves up", "moves upwards", "slides up", "goes up", "travels from bottom to top", "rises",
           "is moving up"),
    "down": ("moves down", "moves downwards", "slides down", "goes down", "travels from top to bottom", "falls",
             "is moving down"),
    "grows": ("grows", "gets bigger", "grows larger", "becomes larger", "expands", "is growing"),
    "shrinks": ("shrinks", "gets smaller", "becomes smaller", "contracts", "is shrinking", "shrinks away"),
    "appears": ("appears", "fades in", "slowly appears", "comes into view", "gradually becomes visible"),
    "disappears": ("disappears", "fades out", "slowly disappears", "vanishes", "gradually fades away"),
    "turns_blue": ("turns blue", "changes from red to blue", "becomes blue", "turns from red to blue"),
    "turns_red": ("turns red", "changes from blue to red", "becomes red", "turns from blue to red"),
    "around": ("moves around", "jumps around", "moves all over the place", "keeps changing place",
               "hops from place to place"),
    "blinks": ("blinks", "flickers on and off", "keeps blinking", "flashes on and off", "blinks on and off"),
    "changes_colour": ("changes colour", "changes color", "keeps changing colour", "changes colour in every frame",
                       "cycles through colours"),
    "still": ("stays still", "does not move", "stays in place", "stands still", "remains still", "stays put"),
}


def _paraphrases(key: MotionKey) -> list[str]:
    subjects = COLOURLESS_SUBJECTS if key.colour is None else SUBJECTS
    return [f"{sub.format(c=key.colour, s=key.shape)} {pred}"
            for sub, pred in itertools.product(subjects, PREDICATES[key.category])]


def build_motion_corpus(test_captions: set[str], size: int, seed: int) -> list[str]:
    """``size`` distinct sentences in a seeded order: the canonical captions of the keys no test clip has, then
    paraphrases (any key; a paraphrase equal to a test caption is left out). No sentence is a test caption
    (asserted, case and whitespace ignored)."""
    rng = random.Random(f"motion-corpus-{seed}")
    banned = {_norm(c) for c in test_captions}
    canonical = [caption_of(k) for k in caption_space() if _norm(caption_of(k)) not in banned]
    pool = sorted({p for k in caption_space() for p in _paraphrases(k)} - set(canonical))
    pool = [p for p in pool if _norm(p) not in banned]
    if size > len(canonical) + len(pool):
        raise ValueError(f"corpus_size {size} is more distinct sentences than the templates give "
                         f"({len(canonical) + len(pool)})")
    out = canonical[:size] + rng.sample(pool, max(0, size - len(canonical)))
    rng.shuffle(out)
    leaked = banned & {_norm(s) for s in out}
    assert not leaked, f"motion caption corpus contains test captions: {sorted(leaked)[:5]}"
    return out


# ----------------------------------------------------------------------------------------------------------
# building the files
# ----------------------------------------------------------------------------------------------------------
def _pair_kinds(n_pairs: int, seed: int, split: str) -> list[str]:
    """Half order pairs, half set pairs, each family's kinds balanced, in a seeded order."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    kinds = []
    for i in range(n_pairs):
        fam = [k for k in PAIR_KINDS if k.startswith("order:" if i % 2 == 0 else "set:")]
        kinds.append(fam[(i // 2) % len(fam)])
    return [kinds[int(i)] for i in rng.permutation(n_pairs)]


def _split_records(split: str, n_clips: int, p: dict, final_dir: Path, tmp_dir: Path) -> list[dict]:
    (tmp_dir / "clips" / split).mkdir(parents=True)
    records = []
    for j, kind in enumerate(_pair_kinds(-(-n_clips // 2), p["seed"], split)):
        rng = np.random.default_rng([p["seed"], SPLITS.index(split), j])
        for clip in render_pair(kind, p["frames_per_clip"], p["image_size"], rng):
            n = len(records)
            if n >= n_clips:  # an odd count: the last pair's second clip is left out
                break
            rel = Path("clips") / split / f"{n:05d}.png"
            strip = np.concatenate(list(clip["frames"]), axis=1)  # [S, n*S, 3]: frames side by side
            # compress_level fixed so the bytes do not depend on a changed PIL default
            Image.fromarray(strip, "RGB").save(tmp_dir / rel, format="PNG", compress_level=6)
            cat = CATEGORIES[clip["category"]]
            records.append({
                "video_path": str(final_dir / rel), "caption": caption_of(_key(clip)), "video_id": f"{split}/{n}",
                "pair_id": f"{split}/{j}", "family": cat.family, "category": cat.name, "shape": clip["shape"],
                "colour": clip["colour"], "num_frames": p["frames_per_clip"], "keywords": list(cat.keywords),
                "contrast_keywords": list(_contrast_keywords(cat)),
            })
    return records


def _readme(info: dict) -> str:
    c, p = info["counts"], info["params"]
    cats = "\n".join(f"| {cat.family} | `{cat.name}` | `{cat.template}` | {', '.join(cat.keywords)} | "
                     f"{', '.join(_contrast_keywords(cat))} | {c['categories_train'].get(cat.name, 0)} | "
                     f"{c['categories_test'].get(cat.name, 0)} |" for cat in _CATS)
    return "\n".join([
        "# Embedded motion video data (built by `vl_align.motion.build_embedded_motion`)",
        "",
        (f"Builder version {info['builder_version']}; seed {p['seed']}, {p['image_size']} px, {p['frames_per_clip']} "
        "frames per clip. One coloured shape on a light background, drawn with PIL; rebuilding with the same "
        "parameters gives the same files. See the docstring of `vl_align/motion.py` for the design rules."),
        "",
        ("Each clip is one PNG filmstrip under `clips/<split>/` (the frames side by side, read back by "
        "`vl_align.video_data.read_frames`). Order-family pairs are a clip and its time reversal (the same frames, "
        "the opposite caption); set-family pairs are a positive and a still clip made of one of its frames."),
        "",
        "| family | category | caption | key words | contrast key words | train clips | test clips |",
        "|---|---|---|---|---|---|---|",
        cats,
        "",
        "| file | rows | what |",
        "|---|---|---|",
        (f"| `pairs_train.jsonl` | {c['pairs_train']} | video_path, caption, video_id, pair_id, family, category, shape, "
        "colour, num_frames, keywords, contrast_keywords |"),
        f"| `pairs_test.jsonl` | {c['pairs_test']} | the same, plus `seen_in_train` |",
        f"| `caption_corpus.txt` | {c['caption_corpus']} | text-only stage-1 corpus; no test caption verbatim |",
        "",
        (f"Caption space: {c['caption_space']} captions. Distinct captions: {c['distinct_captions_train']} (train), "
        f"{c['distinct_captions_test']} (test); test clips whose caption is a train caption: "
        f"{c['test_pairs_seen_in_train']}. Train captions in the corpus verbatim: {c['train_captions_in_corpus']}. "
        f"Disk: {info['bytes']['clips'] / 2**20:.1f} MiB of PNG filmstrips."),
        "",
        "Score generated captions with `vl_align.motion.keyword_accuracy(predictions, records)`.",
        "",
        f"Fingerprint: `{info['fingerprint']}`",
        "",
    ])


def build_embedded_motion(
    out_dir: str | os.PathLike,
    num_train: int = DEFAULTS["num_train"],
    num_test: int = DEFAULTS["num_test"],
    image_size: int = DEFAULTS["image_size"],
    frames_per_clip: int = DEFAULTS["frames_per_clip"],
    seed: int = DEFAULTS["seed"],
    corpus_size: int = DEFAULTS["corpus_size"],
    force: bool = False,
) -> dict[str, Path]:
    """Write the motion dataset into ``out_dir`` (filmstrips under ``out_dir/clips``) and return ``{name: path}``
    (pairs_train, pairs_test, caption_corpus, readme, build_info).

    Idempotent (a build with the same parameters is returned as is unless ``force``), locked (a file lock beside
    ``out_dir`` serialises concurrent builders) and atomic (written to a temporary sibling folder that is renamed
    into place). ``frames_per_clip`` is even (the colour turn and the blinks are split at the middle) and at most
    8 (the changing-colour clips show a different colour in every frame).
    """
    for name, v, lo in (("num_train", num_train, 2), ("num_test", num_test, 2), ("image_size", image_size, 48),
                        ("corpus_size", corpus_size, 1), ("frames_per_clip", frames_per_clip, 4)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if frames_per_clip % 2 or frames_per_clip > len(CHANGE_COLOURS):
        raise ValueError(f"frames_per_clip must be even and at most {len(CHANGE_COLOURS)}, got {frames_per_clip}")
    out_dir = Path(out_dir).absolute()
    params = {"num_train": num_train, "num_test": num_test, "image_size": image_size,
              "frames_per_clip": frames_per_clip, "seed": seed, "corpus_size": corpus_size}
    fingerprint = params_fingerprint(BUILDER_VERSION, params)

    def write(tmp: Path) -> None:
        pairs = {split: _split_records(split, n, params, out_dir, tmp)
                 for split, n in (("train", num_train), ("test", num_test))}
        train_caps = {r["caption"] for r in pairs["train"]}
        test_caps = {r["caption"] for r in pairs["test"]}
        corpus = build_motion_corpus(test_caps, corpus_size, seed)
        assert not {_norm(s) for s in corpus} & {_norm(c) for c in test_caps}
        for r in pairs["test"]:
            r["seen_in_train"] = "yes" if r["caption"] in train_caps else "no"
        clip_bytes = sum(f.stat().st_size for f in (tmp / "clips").rglob("*.png"))
        info = {
            "builder_version": BUILDER_VERSION,
            "fingerprint": fingerprint,
            "params": params,
            "counts": {
                "pairs_train": len(pairs["train"]), "pairs_test": len(pairs["test"]),
                "caption_corpus": len(corpus), "caption_space": len(caption_space()),
                "distinct_captions_train": len(train_caps), "distinct_captions_test": len(test_caps),
                "test_pairs_seen_in_train": sum(r["seen_in_train"] == "yes" for r in pairs["test"]),
                "train_captions_in_corpus": len(train_caps & set(corpus)),
                **{f"categories_{s}": dict(sorted(_count(pairs[s], "category").items())) for s in SPLITS},
                **{f"families_{s}": dict(sorted(_count(pairs[s], "family").items())) for s in SPLITS},
            },
            "bytes": {"clips": clip_bytes},
        }
        write_build_files(tmp, FILES, {f"pairs_{s}": pairs[s] for s in SPLITS}, corpus, _readme(info), info)

    return build_once(out_dir, FILES, BUILDER_VERSION, fingerprint, force, write)


def _count(records: list[dict], field: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[r[field]] = out.get(r[field], 0) + 1
    return out
