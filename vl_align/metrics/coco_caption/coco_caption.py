"""COCO captioning metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; SPICE optional) as a local `evaluate` metric.

Load it with ``vl_align.metrics.load_metric("coco_caption")`` (``evaluate.load`` on this file, no Hub access). The
metric computes :func:`vl_align.metrics.caption.compute_caption_metrics`, whose module says how each score is
computed (as the COCO caption toolkit does, PTB tokenizer and METEOR in Java).
"""

from __future__ import annotations

from vl_align.metrics.caption import JavaNotFoundError, compute_caption_metrics, java_available, ptb_tokenize
from vl_align.metrics.evaluate_module import define_metric

__all__ = ["compute_caption_metrics", "ptb_tokenize", "java_available", "JavaNotFoundError"]

_CITATION = """\
@article{chen2015microsoft,
  title={Microsoft {COCO} Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and
          Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""

_DESCRIPTION = """\
COCO caption evaluation (pycocoevalcap): BLEU-1..4, METEOR, ROUGE-L and CIDEr-D after PTB tokenisation, SPICE on
request. CIDEr's IDF is computed over the evaluated set, as in the COCO toolkit. METEOR and the PTB tokenizer need
Java.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one generated caption per image.
    references (`list[list[str]]` or `list[str]`): the reference captions of each image (several per image; a plain
        string is one reference).
    meteor (`bool`, default True): compute METEOR (Java).
    spice (`bool`, default False): compute SPICE (Java + Stanford CoreNLP 3.6.0 jars; cannot download offline).
    tokenize (`bool`, default True): PTB-tokenise (Java) as the COCO toolkit does. With False the captions are
        used as given, split on whitespace.
Returns:
    Bleu_1, Bleu_2, Bleu_3, Bleu_4, METEOR, ROUGE_L, CIDEr (and SPICE) (`float`).
Examples:
    >>> from vl_align.metrics import load_metric
    >>> coco = load_metric("coco_caption")
    >>> coco.compute(predictions=["a dog runs on grass"], references=[["a dog runs on the grass", "a dog outside"]])
"""

define_metric(
    globals(),
    "CocoCaption",
    compute_caption_metrics,
    description=_DESCRIPTION,
    citation=_CITATION,
    inputs_description=_KWARGS_DESCRIPTION,
    codebase_urls=["https://github.com/salaniz/pycocoevalcap"],
    reference_urls=["https://arxiv.org/abs/1504.00325"],
)
