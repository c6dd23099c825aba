"""VQAv2 accuracy with the official answer normalisation, as plain functions.

:func:`normalize_answer`, :func:`vqa_score` and :func:`vqa_accuracy` need no ``evaluate`` (``vl_align.metrics``
re-exports them); ``vl_align.metrics.load_metric("vqa_accuracy")`` loads the local `evaluate` metric that wraps
:func:`vqa_accuracy` (the script ``vqa_accuracy/vqa_accuracy.py``; ``evaluate.load``, never the Hub).

The answer normalisation and the scoring follow the official VQA evaluation code
(GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``):

* newlines and tabs become spaces, and the answer is stripped;
* punctuation (``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``) is deleted where it touches a space or where the
  answer contains a digit-comma-digit group such as ``1,000``, and replaced by a space otherwise; periods not
  followed by a digit are deleted (``"dog."`` -> ``"dog"``, ``"3.5"`` unchanged);
* the answer is lower-cased and split on whitespace; number words ``none``/``zero`` .. ``ten`` become digits
  (``"two"`` -> ``"2"``); the articles ``a``, ``an``, ``the`` are dropped; apostrophe-less contractions are
  mapped to their apostrophe form (``"dont"`` -> ``"don't"``, ``"isnt"`` -> ``"isn't"``). The apostrophe is not
  punctuation here, so ``"it's"`` stays ``"it's"`` and ``"its"`` stays ``"its"``.

Scoring of one question with ``n >= 3`` human answers (VQAv2 has ``n = 10``): for each of the ``n`` leave-one-out
subsets of ``n - 1`` answers, ``acc = min(#answers in the subset equal to the prediction / 3, 1)``; the question's
accuracy is the mean over the ``n`` subsets. With 10 answers of which ``m`` equal the prediction this gives
``(m * min((m-1)/3, 1) + (10-m) * min(m/3, 1)) / 10``: 0.3 for ``m = 1``, 0.6 for ``m = 2``, 0.9 for ``m = 3``,
1.0 for ``m >= 4``.

Fewer than 3 references (e.g. easy-VQA, one answer per question): the ``/3`` formula would cap a correct answer
below 1, so the question instead scores 1.0 if the normalised prediction equals any normalised reference and 0.0
otherwise (exact match after :func:`normalize_answer`, applied to both sides).

How the references are normalised when there are ``>= 3`` of them (``reference_normalization``):

* ``"official"`` (default): exactly as the official script, which assumes the references are the answers of the
  VQA annotation files (already normalised when they were collected): the references are used as given, except
  that when they are not all identical each gets the punctuation step only. The prediction always gets the full
  normalisation. This reproduces the evaluation server's numbers.
* ``"full"``: every reference gets the full :func:`normalize_answer`. Use it for references that are raw
  (un-normalised) text; on the official annotations it changes almost nothing.

Accuracies are fractions in [0, 1] (the VQA server reports them x100).
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = [
    "normalize_answer",
    "process_punctuation",
    "process_digit_article",
    "vqa_score",
    "vqa_accuracy",
]

# --- official normalisation tables (GT-Vision-Lab/VQA, vqaEval.py) ---------------------------------------------
# Keys such as "Im" or "Id've" contain capitals and can never match (words are lower-cased first); kept verbatim.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# The official pattern, verbatim: "(?!<=" is a (buggy) negative *lookahead*, so in effect this deletes every
# period that is not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

_REFERENCE_NORMALIZATIONS = ("official", "full")


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation`` step (see the module docstring)."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        # Conditions are tested on the *input* text, as in the official code.
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official code passes re.UNICODE (== 32) as `count`, i.e. at most 32 periods are removed; no real answer
    # has more, so all are removed here.
    return _PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle`` step: lower-case, number words -> digits, drop articles, contractions."""
    words = []
    for word in text.lower().split():
        word = _MANUAL_MAP.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """Full official VQA normalisation of one answer.

    >>> normalize_answer("Two")
    '2'
    >>> normalize_answer("a dog.")
    'dog'
    >>> normalize_answer("yes!")
    'yes'
    """
    if not isinstance(answer, str):
        raise TypeError(f"answers must be strings, got {type(answer).__name__}: {answer!r}")
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def _prepare_official_reference(ref: str) -> str:
    return ref.replace("\n", " ").replace("\t", " ").strip()


def vqa_score(prediction: str, references: Sequence[str] | str, reference_normalization: str = "official") -> float:
    """Accuracy of one predicted answer against the human answers of one question (see the module docstring)."""
    if reference_normalization not in _REFERENCE_NORMALIZATIONS:
        raise ValueError(
            f"reference_normalization must be one of {_REFERENCE_NORMALIZATIONS}, got {reference_normalization!r}"
        )
    if isinstance(references, str):
        references = [references]
    references = list(references)
    if not references:
        raise ValueError("every question needs at least one reference answer")
    for ref in references:
        if not isinstance(ref, str):
            raise TypeError(f"reference answers must be strings, got {type(ref).__name__}: {ref!r}")
    pred = normalize_answer(prediction)

    if len(references) < 3:
        # Too few answers for the min(#matches / 3, 1) formula: exact match after full normalisation.
        return 1.0 if any(normalize_answer(ref) == pred for ref in references) else 0.0

    if reference_normalization == "full":
        refs = [normalize_answer(ref) for ref in references]
    else:
        refs = [_prepare_official_reference(ref) for ref in references]
        if len(set(refs)) > 1:
            refs = [process_punctuation(ref) for ref in refs]
    matches = [ref == pred for ref in refs]
    total = sum(matches)
    # Leave-one-out over the n annotators: the left-out answer's own match is removed from the count.
    accs = [min(1.0, (total - int(m)) / 3.0) for m in matches]
    return sum(accs) / len(accs)


def vqa_accuracy(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    reference_normalization: str = "official",
) -> dict[str, float]:
    """Mean :func:`vqa_score` over questions: ``{"accuracy": float in [0, 1]}``."""
    predictions = list(predictions)
    references = list(references)
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    scores = [vqa_score(p, r, reference_normalization) for p, r in zip(predictions, references)]
    return {"accuracy": float(sum(scores) / len(scores))}

