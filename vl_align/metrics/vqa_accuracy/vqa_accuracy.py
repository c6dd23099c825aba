"""VQAv2 accuracy with the official answer normalisation, as a local `evaluate` metric.

Load it with ``vl_align.metrics.load_metric("vqa_accuracy")`` (which calls ``evaluate.load`` on this file and
never contacts the Hub). The metric computes :func:`vl_align.metrics.vqa.vqa_accuracy`, whose module gives the
normalisation and the scoring rules.
"""

from __future__ import annotations

from vl_align.metrics.evaluate_module import define_metric
from vl_align.metrics.vqa import (
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_score,
)

__all__ = ["normalize_answer", "process_punctuation", "process_digit_article", "vqa_score", "vqa_accuracy"]

_CITATION = """\
@inproceedings{goyal2017making,
  title={Making the {V} in {VQA} Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR},
  year={2017}
}
"""

_DESCRIPTION = """\
VQAv2 accuracy: min(#humans that gave the answer / 3, 1), averaged over the 10 leave-one-out subsets of the 10
human answers, after the official answer normalisation. With fewer than 3 references per question the score is
exact match after normalisation.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one predicted answer per question.
    references (`list[list[str]]` or `list[str]`): the human answers of each question (10 for VQAv2, one for
        easy-VQA); a plain string is one reference.
    reference_normalization (`str`, default "official"): "official" or "full"; how references are normalised
        when a question has >= 3 of them (see the module docstring).
Returns:
    accuracy (`float`): mean per-question accuracy in [0, 1].
Examples:
    >>> from vl_align.metrics import load_metric
    >>> vqa = load_metric("vqa_accuracy")
    >>> vqa.compute(predictions=["Two."], references=[["2"]])
    {'accuracy': 1.0}
"""

define_metric(
    globals(),
    "VqaAccuracy",
    vqa_accuracy,
    description=_DESCRIPTION,
    citation=_CITATION,
    inputs_description=_KWARGS_DESCRIPTION,
    reference_urls=["https://visualqa.org/evaluation.html", "https://github.com/GT-Vision-Lab/VQA"],
)
