"""Image<->text retrieval recall (R@1/5/10 both ways and their mean), as a local `evaluate` metric.

Load it with ``vl_align.metrics.load_metric("retrieval_recall")`` (``evaluate.load`` on this file, no Hub access).
The metric computes :func:`vl_align.metrics.recall.retrieval_recall`, whose module gives the rules.

Through ``evaluate`` the matrix is given one text per example: ``predictions`` = the rows of ``sims.T`` (each
text's similarities to every image), ``references`` = ``text_to_image`` (an int per text, or a list of image
indices per text; one form for all texts); e.g. ``metric.compute(predictions=sims.T, references=text_to_image)``.
``evaluate`` stores every value in Arrow before computing, so for large matrices (e.g. 5k x 25k) prefer the plain
function.
"""

from __future__ import annotations

import numpy as np

from vl_align.metrics.evaluate_module import define_metric
from vl_align.metrics.recall import retrieval_recall

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
    references (`list[int]` or `list[list[int]]`): for each text, the index of its image, or the indices of all
        the images it is correct for.
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


def _features():
    import datasets

    # one image index per text, or a list of them (texts correct for several images)
    return [
        datasets.Features(
            {
                "predictions": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Value("int64"),
            }
        ),
        datasets.Features(
            {
                "predictions": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Sequence(datasets.Value("int64")),
            }
        ),
    ]


def _compute(predictions, references, ks=(1, 5, 10)):
    lengths = {len(row) for row in predictions}
    if len(lengths) > 1:
        raise ValueError(f"every text needs one similarity per image; got rows of lengths {sorted(lengths)}")
    sims_t = np.asarray(predictions, dtype=np.float64)  # [num_texts, num_images]
    return retrieval_recall(sims_t.T, [r if np.ndim(r) else int(r) for r in references], ks=ks)


define_metric(
    globals(),
    "RetrievalRecall",
    _compute,
    description=_DESCRIPTION,
    citation=_CITATION,
    inputs_description=_KWARGS_DESCRIPTION,
    features=_features,
)
