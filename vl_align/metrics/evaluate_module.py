"""What the local `evaluate` metric scripts (``<name>/<name>.py``) share: their ``evaluate.Metric`` class, built by
:func:`define_metric` around a plain scoring function.

`import evaluate` takes seconds (it imports transformers) and the scripts must stay cheap to import, so the class is
only built when `evaluate` is already imported (always the case under ``evaluate.load``, which looks for the
EvaluationModule subclass among the script's globals) or when it is asked for by name (module ``__getattr__``).

The scripts import this module by absolute import (``from vl_align.metrics.evaluate_module import ...``):
``evaluate.load`` copies a script into its module cache, where relative imports would not resolve.
"""

from __future__ import annotations

import sys
from typing import Any, Callable


def as_reference_lists(references):
    """Wrap each plain-string reference into a one-element list (evaluate wants one feature type per column)."""
    if references is None or isinstance(references, str):
        return references
    return [[r] if isinstance(r, str) else r for r in references]


def _text_features():
    """One string prediction and a list of string references per example."""
    import datasets

    return datasets.Features(
        {
            "predictions": datasets.Value("string"),
            "references": datasets.Sequence(datasets.Value("string")),
        }
    )


def _add_batch(self, *, predictions=None, references=None, **kwargs):
    """Add a batch; a plain-string reference counts as a one-element reference list."""
    import evaluate

    return evaluate.Metric.add_batch(self, predictions=predictions, references=as_reference_lists(references), **kwargs)


def _add(self, *, prediction=None, reference=None, **kwargs):
    """Add one example; a plain-string reference counts as a one-element reference list."""
    import evaluate

    reference = [reference] if isinstance(reference, str) else reference
    return evaluate.Metric.add(self, prediction=prediction, reference=reference, **kwargs)


def _metric_class(module: str, class_name: str, compute: Callable[..., dict], features: Callable[[], Any] | None,
                  description: str, citation: str, inputs_description: str, info: dict[str, Any]) -> type:
    import evaluate

    def _info(self):
        return evaluate.MetricInfo(description=description, citation=citation, inputs_description=inputs_description,
                                   features=(features or _text_features)(), **info)

    body = {"_info": _info, "_compute": staticmethod(compute)}
    if features is None:
        # One feature set; plain-string references are wrapped into one-element lists in add/add_batch (evaluate
        # picks a feature set from the first example only, so a mixed batch would otherwise silently turn a string
        # into a list of characters).
        body.update(add_batch=_add_batch, add=_add)
    cls = type(class_name, (evaluate.Metric,), body)
    cls.__module__ = module
    return evaluate.utils.file_utils.add_start_docstrings(description, inputs_description)(cls)


def define_metric(namespace: dict[str, Any], class_name: str, compute: Callable[..., dict], *, description: str,
                  citation: str, inputs_description: str, features: Callable[[], Any] | None = None,
                  **info: Any) -> None:
    """Give the metric script whose globals are ``namespace`` its ``evaluate.Metric`` subclass ``class_name``.

    Its ``_compute`` is ``compute(predictions, references, **options)`` (the options are those of ``compute``'s
    signature). ``features``: a function returning the ``datasets.Features`` (or a list of them); ``None`` means one
    string prediction and a list of string references per example, a plain-string reference counting as a list of
    one. ``info``: further ``evaluate.MetricInfo`` fields (``reference_urls``, ``codebase_urls``, ...).
    """
    module = namespace["__name__"]

    def build() -> type:
        return _metric_class(module, class_name, compute, features, description, citation, inputs_description, info)

    if "evaluate" in sys.modules:
        namespace[class_name] = build()

    def __getattr__(name: str):
        if name == class_name:
            cls = build()
            namespace[name] = cls
            return cls
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    namespace["__getattr__"] = __getattr__
