"""Image<->text retrieval recall (R@1/5/10 both ways and their mean), as a local `evaluate` metric.

Load it with ``vl_align.metrics.load_metric("retrieval_recall")`` (``evaluate.load`` on this file, no Hub access),
or call the plain function :func:`retrieval_recall` (re-exported by ``vl_align.metrics``; it needs only numpy).

Inputs: a similarity matrix ``sims`` of shape ``[num_images, num_texts]`` (higher = more similar) and
``text_to_image``, the index of each text's image (an image may own several texts, e.g. 5 COCO captions).

* image->text (``i2t_r{k}``, "text retrieval"): an image is a hit at ``k`` if ANY of its texts is among the ``k``
  texts that score highest for it. Images that own no text have no correct answer and are left out of the
  image->text average (they still act as distractors for text->image).
* text->image (``t2i_r{k}``, "image retrieval"): a text is a hit at ``k`` if its image is among the ``k`` images
  that score highest for it.
* ``i2t_mean`` / ``t2i_mean``: mean over the ``ks`` of each direction; ``r_mean``: mean of the two (the "RSUM/6"
  that ALBEF/BLIP report as ``r_mean``).

The rank of the correct answer is the number of *wrong* candidates scoring >= the best correct one, i.e. ties are
broken against the model. With continuous similarities ties do not occur and this equals the usual argsort
ranking; with degenerate (e.g. constant) similarities it keeps the score at 0 instead of reporting a perfect R@1.

Results are fractions in [0, 1] (papers usually print them x100).

Through ``evaluate`` the matrix is given one text per example: ``predictions`` = the rows of ``sims.T`` (each
text's similarities to every image), ``references`` = ``text_to_image``; e.g.
``metric.compute(predictions=sims.T, references=text_to_image)``. ``evaluate`` stores every value in Arrow
before computing, so for large matrices (e.g. 5k x 25k) prefer the plain function.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["retrieval_recall"]

_CITATION = """\
@inproceedings{karpathy2015deep,
  title={Deep Visual-Semantic Alignments for Generating Image Descriptions},
  author={Karpathy, Andrej and Fei-Fei, Li},
  booktitle={CVPR},
  year={2015}
}
"""

_DESCRIPTION = """\
Recall@K for image->text and text->image retrieval from an image-text similarity matrix, with several texts per
image allowed (image->text counts a hit if any of the image's texts is in the top K).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]`, shape [num_texts, num_images]): for each text, its similarity to every image
        (the transpose of the [num_images, num_texts] similarity matrix).
    references (`list[int]`): for each text, the index of its image.
    ks (`tuple[int, ...]`, default (1, 5, 10)): the cut-offs K.
Returns:
    i2t_r{K}, t2i_r{K} (`float`): recall at K in [0, 1] for image->text and text->image;
    i2t_mean, t2i_mean (`float`): mean over the Ks of each direction; r_mean (`float`): mean of the two.
Examples:
    >>> import numpy as np
    >>> from vl_align.metrics import load_metric
    >>> metric = load_metric("retrieval_recall")
    >>> sims = np.eye(3)  # [num_images, num_texts]
    >>> metric.compute(predictions=sims.T, references=[0, 1, 2], ks=(1,))["t2i_r1"]
    1.0
"""

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


def retrieval_recall(sims: Any, text_to_image: Sequence[int], ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways from ``sims`` [num_images, num_texts] and each text's image index.

    Accepts numpy arrays, nested lists or torch tensors. Returns ``i2t_r{k}``, ``t2i_r{k}`` for each ``k`` in ``ks``,
    ``i2t_mean``, ``t2i_mean`` and ``r_mean`` as fractions in [0, 1]; see the module docstring for the rules.
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

    t2i = _to_numpy(text_to_image)
    if t2i.ndim != 1 or t2i.shape[0] != num_texts:
        raise ValueError(
            f"text_to_image must give one image index per text ({num_texts} texts = sims.shape[1]), "
            f"got shape {t2i.shape}"
        )
    if t2i.dtype.kind not in "iu":
        if t2i.dtype.kind == "f" and np.all(t2i == np.round(t2i)):
            t2i = t2i.astype(np.int64)
        else:
            raise ValueError(f"text_to_image must hold integer image indices, got dtype {t2i.dtype}")
    t2i = t2i.astype(np.int64)
    if t2i.min() < 0 or t2i.max() >= num_images:
        raise ValueError(f"text_to_image values must be in [0, {num_images}), got [{t2i.min()}, {t2i.max()}]")

    text_idx = np.arange(num_texts)
    gold_score_of_text = sims[t2i, text_idx]  # similarity of each text to its own image
    i2t_rank = np.empty(num_images, dtype=np.int64)
    t2i_rank = np.zeros(num_texts, dtype=np.int64)
    block = max(1, _BLOCK_ELEMS // num_texts)
    for start in range(0, num_images, block):
        stop = min(start + block, num_images)
        rows = sims[start:stop]  # [b, T]
        gold = t2i[None, :] == np.arange(start, stop)[:, None]  # [b, T]: text belongs to this image
        # image -> text: wrong texts scoring >= the image's best correct text
        best_gold = np.where(gold, rows, -np.inf).max(axis=1)
        i2t_rank[start:stop] = ((rows >= best_gold[:, None]) & ~gold).sum(axis=1)
        # text -> image: wrong images (in this block) scoring >= the text's own image
        t2i_rank += ((rows >= gold_score_of_text[None, :]) & ~gold).sum(axis=0)

    has_text = np.bincount(t2i, minlength=num_images) > 0
    i2t_rank = i2t_rank[has_text]

    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean(i2t_rank < k))
    for k in ks:
        out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k))
    out["i2t_mean"] = float(np.mean([out[f"i2t_r{k}"] for k in ks]))
    out["t2i_mean"] = float(np.mean([out[f"t2i_r{k}"] for k in ks]))
    out["r_mean"] = (out["i2t_mean"] + out["t2i_mean"]) / 2.0
    return out


# --- evaluate Metric --------------------------------------------------------------------------------------------
# `import evaluate` takes seconds (it imports transformers), and the plain function above must stay cheap to
# import, so the Metric class is only built when `evaluate` is already imported (always the case under
# `evaluate.load`, which looks for the EvaluationModule subclass among this module's globals) or when
# `RetrievalRecall` is asked for by name (module __getattr__ below).
def _build_metric_class():
    import datasets
    import evaluate

    @evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
    class RetrievalRecall(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(
                description=_DESCRIPTION,
                citation=_CITATION,
                inputs_description=_KWARGS_DESCRIPTION,
                features=datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("float64")),
                        "references": datasets.Value("int64"),
                    }
                ),
            )

        def _compute(self, predictions, references, ks=(1, 5, 10)):
            lengths = {len(row) for row in predictions}
            if len(lengths) > 1:
                raise ValueError(f"every text needs one similarity per image; got rows of lengths {sorted(lengths)}")
            sims_t = np.asarray(predictions, dtype=np.float64)  # [num_texts, num_images]
            return retrieval_recall(sims_t.T, np.asarray(references), ks=ks)

    RetrievalRecall.__qualname__ = "RetrievalRecall"
    RetrievalRecall.__module__ = __name__
    return RetrievalRecall


if "evaluate" in sys.modules:
    RetrievalRecall = _build_metric_class()


def __getattr__(name: str):
    if name == "RetrievalRecall":
        cls = _build_metric_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
