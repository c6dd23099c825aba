"""Evaluation metrics shipped as local Hugging Face `evaluate` modules (no Hub access).

``evaluate.load("bleu")`` fetches the metric script from the Hub by name and fails offline. Our metrics are local
`evaluate` scripts in this folder, one per sub-folder (``<name>/<name>.py``), loaded by path::

    from vl_align.metrics import load_metric
    coco = load_metric("coco_caption")          # BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (SPICE optional)
    vqa = load_metric("vqa_accuracy")           # VQAv2 accuracy, official normalisation
    rr = load_metric("retrieval_recall")        # image<->text R@1/5/10

The scores are computed by plain functions, one module per metric: :mod:`.caption`
(:func:`compute_caption_metrics`, :func:`ptb_tokenize`), :mod:`.vqa` (:func:`normalize_answer`, :func:`vqa_score`,
:func:`vqa_accuracy`) and :mod:`.recall` (:func:`retrieval_recall`); each script is a thin `evaluate` wrapper
around one of them, built by :mod:`.evaluate_module`. The functions are re-exported here for use without
`evaluate` (importing this package does not import `evaluate`, which takes seconds).

Note: the re-exported functions ``vqa_accuracy`` and ``retrieval_recall`` shadow the sub-folders of the same name
as attributes of this package; import the scripts themselves by their full module path
(``vl_align.metrics.retrieval_recall.retrieval_recall``) when needed. They are imported below through the scripts
(which re-export them) so that the sub-folders are bound first and the functions win.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .coco_caption.coco_caption import JavaNotFoundError, compute_caption_metrics, java_available, ptb_tokenize
from .retrieval_recall.retrieval_recall import retrieval_recall
from .vqa_accuracy.vqa_accuracy import normalize_answer, vqa_accuracy, vqa_score

if TYPE_CHECKING:
    import evaluate

__all__ = [
    "AVAILABLE_METRICS",
    "METRICS_DIR",
    "JavaNotFoundError",
    "compute_caption_metrics",
    "java_available",
    "load_metric",
    "metric_path",
    "normalize_answer",
    "ptb_tokenize",
    "retrieval_recall",
    "vqa_accuracy",
    "vqa_score",
]

METRICS_DIR = Path(__file__).resolve().parent
AVAILABLE_METRICS = ("coco_caption", "vqa_accuracy", "retrieval_recall")

# Offline switches of evaluate / datasets / huggingface_hub. All three libraries read them once, at import time,
# into module constants; `_hub_offline` sets the variables and patches those constants for the duration of a load.
_OFFLINE_ENV = {"HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
_OFFLINE_CONSTANTS = (
    ("evaluate.config", "HF_EVALUATE_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
)


def metric_path(name: str) -> Path:
    """Path of the local `evaluate` script of metric ``name`` (one of :data:`AVAILABLE_METRICS`)."""
    if name not in AVAILABLE_METRICS:
        raise ValueError(f"unknown metric {name!r}; valid names: {', '.join(AVAILABLE_METRICS)}")
    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"the script of metric {name!r} is missing at {path}; if vl_align is installed from a wheel, its "
            "package-data must include metrics/*/*.py"
        )
    return path


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make evaluate / datasets / huggingface_hub offline while the block runs, then restore the caller's state.

    `evaluate` is imported first so that the libraries' import-time settings come from the caller's real
    environment (setting HF_HUB_OFFLINE before the first import of huggingface_hub would make the whole process
    offline for good).
    """
    import evaluate  # noqa: F401  (also imports datasets and huggingface_hub)

    saved_env = {key: os.environ.get(key) for key in _OFFLINE_ENV}
    saved_constants = []
    os.environ.update(_OFFLINE_ENV)
    try:
        for module_name, attr in _OFFLINE_CONSTANTS:
            module = sys.modules.get(module_name)
            if module is not None and hasattr(module, attr):
                saved_constants.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
        yield
    finally:
        for module, attr, value in reversed(saved_constants):
            setattr(module, attr, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_metric(name: str, **load_kwargs: Any) -> "evaluate.EvaluationModule":
    """``evaluate.load`` of our local metric script ``name``, with the Hub switched off.

    ``name`` is one of ``"coco_caption"``, ``"vqa_accuracy"``, ``"retrieval_recall"``. ``load_kwargs`` go to
    ``evaluate.load`` (e.g. ``keep_in_memory=True``, ``experiment_id=...``, ``num_process``/``process_id`` for
    distributed evaluation).
    """
    if not isinstance(name, str):
        raise TypeError(f"metric name must be a string, got {type(name).__name__}")
    path = metric_path(name)
    for forbidden in ("path", "revision", "download_config"):
        if forbidden in load_kwargs:
            raise TypeError(f"load_metric() does not accept {forbidden!r}: metrics are loaded from {METRICS_DIR}")
    with _hub_offline():
        import evaluate

        # A path ending in "<name>.py" makes evaluate use its LocalEvaluationModuleFactory: the script is copied
        # into the dynamic-modules cache and imported from there; the Hub is never consulted.
        return evaluate.load(str(path), **load_kwargs)
