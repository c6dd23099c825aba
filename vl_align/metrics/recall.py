"""Image<->text retrieval recall (R@1/5/10 both ways and their mean) as a plain function.

Call :func:`retrieval_recall` (re-exported by ``vl_align.metrics``; it needs only numpy), or load the local
`evaluate` metric that wraps it, ``vl_align.metrics.load_metric("retrieval_recall")`` (the script
``retrieval_recall/retrieval_recall.py``; ``evaluate.load``, no Hub access).

Inputs: a similarity matrix ``sims`` of shape ``[num_images, num_texts]`` (higher = more similar) and the ground
truth, either ``text_to_image``, the index of each text's image (an image may own several texts, e.g. 5 COCO
captions), or, where a text is correct for several images, ``text_to_image`` as one list of image indices per text
or ``gold``, a boolean ``[num_images, num_texts]`` matrix of the correct pairs. Several correct images per text
arise in small caption spaces: an easy-VQA caption such as "a red circle" describes every image of a red circle.

* image->text (``i2t_r{k}``, "text retrieval"): an image is a hit at ``k`` if ANY of its texts is among the ``k``
  texts that score highest for it. Images that own no text have no correct answer and are left out of the
  image->text average (they still act as distractors for text->image).
* text->image (``t2i_r{k}``, "image retrieval"): a text is a hit at ``k`` if ANY of its images is among the ``k``
  images that score highest for it. Texts with no correct image are likewise left out of its average.
* ``i2t_mean`` / ``t2i_mean``: mean over the ``ks`` of each direction; ``r_mean``: mean of the two (the "RSUM/6"
  that ALBEF/BLIP report as ``r_mean``).

The rank of the correct answer is the number of *wrong* candidates scoring >= the best correct one, i.e. ties are
broken against the model. With continuous similarities ties do not occur and this equals the usual argsort
ranking; with degenerate (e.g. constant) similarities it keeps the score at 0 instead of reporting a perfect R@1.

Results are fractions in [0, 1] (papers usually print them x100).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["retrieval_recall"]

# Rows of the similarity matrix handled at once (bounds the temporary boolean masks to ~_BLOCK_ELEMS elements).
_BLOCK_ELEMS = 1 << 22


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, handled without importing torch
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.dtype.itemsize < 4:  # float16 / bfloat16 have no exact numpy twin
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    if isinstance(ks, (int, np.integer)):
        ks = (ks,)
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ks must be positive integers, got {k!r}")
        out.append(int(k))
    if not out:
        raise ValueError("ks must not be empty")
    return tuple(sorted(set(out)))


def _int_indices(values: np.ndarray, what: str) -> np.ndarray:
    if values.size and values.dtype.kind not in "iu":
        if values.dtype.kind == "f" and np.all(values == np.round(values)):
            return values.astype(np.int64)
        raise ValueError(f"{what} must hold integer image indices, got dtype {values.dtype}")
    return values.astype(np.int64)


def _gold_pairs(text_to_image: Any, gold: Any, num_images: int, num_texts: int) -> tuple[np.ndarray, np.ndarray]:
    """The correct (image, text) pairs as two index arrays [P], from ``text_to_image`` or the ``gold`` mask."""
    if (text_to_image is None) == (gold is None):
        raise ValueError("give exactly one of text_to_image and gold")
    if gold is not None:
        gold = _to_numpy(gold)
        if gold.shape != (num_images, num_texts):
            raise ValueError(f"gold must be a [num_images, num_texts] = [{num_images}, {num_texts}] mask, "
                             f"got shape {gold.shape}")
        img, txt = np.nonzero(gold.astype(bool))
        return img.astype(np.int64), txt.astype(np.int64)
    if hasattr(text_to_image, "detach") or isinstance(text_to_image, np.ndarray):
        flat = _to_numpy(text_to_image)
        ragged = None
    else:
        entries = list(text_to_image)
        ragged = any(np.ndim(_to_numpy(e)) > 0 for e in entries)
        flat = None if ragged else _to_numpy(np.asarray([_to_numpy(e) for e in entries]))
    if not ragged:  # one image per text
        if flat.ndim != 1 or flat.shape[0] != num_texts:
            raise ValueError(f"text_to_image must give one image index per text ({num_texts} texts = "
                             f"sims.shape[1]), got shape {flat.shape}")
        img, txt = _int_indices(flat, "text_to_image"), np.arange(num_texts)
    else:  # a list of images per text
        if len(entries) != num_texts:
            raise ValueError(f"text_to_image must give one image index (or list) per text ({num_texts} texts = "
                             f"sims.shape[1]), got {len(entries)} entries")
        lists = [np.atleast_1d(_to_numpy(e)) for e in entries]
        if any(ids.ndim != 1 for ids in lists):
            raise ValueError("each entry of text_to_image must be an image index or a flat list of them")
        img = _int_indices(np.concatenate(lists), "text_to_image")
        txt = np.repeat(np.arange(num_texts), [ids.size for ids in lists])
    if img.size and (img.min() < 0 or img.max() >= num_images):
        raise ValueError(f"text_to_image values must be in [0, {num_images}), got [{img.min()}, {img.max()}]")
    return img, txt


def retrieval_recall(sims: Any, text_to_image: Sequence[int] | Sequence[Sequence[int]] | None = None,
                     ks: Iterable[int] = (1, 5, 10), *, gold: Any = None) -> dict[str, float]:
    """Recall@K both ways from ``sims`` [num_images, num_texts] and the ground truth.

    The ground truth is ``text_to_image`` (each text's image index, or a list of image indices per text) or ``gold``
    (a boolean [num_images, num_texts] mask of correct pairs). Accepts numpy arrays, nested lists or torch tensors.
    Returns ``i2t_r{k}``, ``t2i_r{k}`` for each ``k`` in ``ks``, ``i2t_mean``, ``t2i_mean`` and ``r_mean`` as
    fractions in [0, 1]; see the module docstring for the rules.
    """
    ks = _check_ks(ks)
    sims = _to_numpy(sims)
    if sims.ndim != 2:
        raise ValueError(f"sims must be a 2-D [num_images, num_texts] matrix, got shape {sims.shape}")
    if not np.issubdtype(sims.dtype, np.floating):
        sims = sims.astype(np.float64)
    elif sims.dtype == np.float16:
        sims = sims.astype(np.float32)
    num_images, num_texts = sims.shape
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"sims is empty (shape {sims.shape})")
    if np.isnan(sims).any():
        raise ValueError("sims contains NaN")
    pair_img, pair_txt = _gold_pairs(text_to_image, gold, num_images, num_texts)

    # the best-scoring correct answer of every query (-inf where a query has none)
    pair_score = sims[pair_img, pair_txt]
    best_text_of_image = np.full(num_images, -np.inf, dtype=sims.dtype)
    best_image_of_text = np.full(num_texts, -np.inf, dtype=sims.dtype)
    np.maximum.at(best_text_of_image, pair_img, pair_score)
    np.maximum.at(best_image_of_text, pair_txt, pair_score)

    i2t_rank = np.empty(num_images, dtype=np.int64)
    t2i_rank = np.zeros(num_texts, dtype=np.int64)
    block = max(1, _BLOCK_ELEMS // num_texts)
    order = np.argsort(pair_img, kind="stable")
    pair_img, pair_txt = pair_img[order], pair_txt[order]
    for start in range(0, num_images, block):
        stop = min(start + block, num_images)
        rows = sims[start:stop]  # [b, T]
        lo, hi = np.searchsorted(pair_img, [start, stop])
        gold_block = np.zeros(rows.shape, dtype=bool)  # [b, T]: the pair is correct
        gold_block[pair_img[lo:hi] - start, pair_txt[lo:hi]] = True
        # image -> text: wrong texts scoring >= the image's best correct text
        i2t_rank[start:stop] = ((rows >= best_text_of_image[start:stop, None]) & ~gold_block).sum(axis=1)
        # text -> image: wrong images (in this block) scoring >= the text's best correct image
        t2i_rank += ((rows >= best_image_of_text[None, :]) & ~gold_block).sum(axis=0)

    has_text = np.bincount(pair_img, minlength=num_images) > 0
    has_image = np.bincount(pair_txt, minlength=num_texts) > 0
    if not has_text.any() or not has_image.any():
        raise ValueError("the ground truth is empty: no correct (image, text) pair")
    i2t_rank, t2i_rank = i2t_rank[has_text], t2i_rank[has_image]

    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean(i2t_rank < k))
    for k in ks:
        out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k))
    out["i2t_mean"] = float(np.mean([out[f"i2t_r{k}"] for k in ks]))
    out["t2i_mean"] = float(np.mean([out[f"t2i_r{k}"] for k in ks]))
    out["r_mean"] = (out["i2t_mean"] + out["t2i_mean"]) / 2.0
    return out

