"""COCO captioning metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; SPICE optional) as plain functions.

Call :func:`compute_caption_metrics` (re-exported by ``vl_align.metrics``), or load the local `evaluate` metric
that wraps it, ``vl_align.metrics.load_metric("coco_caption")`` (the script ``coco_caption/coco_caption.py``).

The numbers are computed the way the captioning literature reports them, i.e. as the COCO caption toolkit
(``pycocoevalcap.eval.COCOEvalCap``) does:

* every prediction and reference is tokenised with the Stanford PTB tokenizer that ships with pycocoevalcap
  (``-preserveLines -lowerCase``, then the toolkit's punctuation tokens are dropped);
* ``Bleu_1`` .. ``Bleu_4``: corpus-level BLEU of pycocoevalcap's ``Bleu(4)`` (``closest`` reference length for
  the brevity penalty);
* ``METEOR``: METEOR 1.5 (``pycocoevalcap.meteor``; a Java process);
* ``ROUGE_L``: pycocoevalcap's ``Rouge`` (LCS F-measure with beta = 1.2, best precision / recall over the
  references), averaged over images;
* ``CIDEr``: CIDEr-D as pycocoevalcap's ``Cider`` computes it (n = 1..4, sigma = 6, clipped counts, x10). NOTE:
  its document frequencies (IDF) are computed over the references of the evaluated set itself, as in the COCO
  toolkit, so a score depends on which other images are evaluated with it; a set of one image always scores 0
  (every n-gram then has IDF log(1/1) = 0). Compare CIDEr only between runs on the same set (e.g. the Karpathy
  test split);
* ``SPICE`` (only with ``spice=True``): pycocoevalcap's ``Spice``. It needs the Stanford CoreNLP 3.6.0 jars,
  which pycocoevalcap downloads from nlp.stanford.edu on first use; offline that fails, so unless the jars are
  already in ``pycocoevalcap/spice/lib`` a clear error is raised instead (nothing is downloaded).

The PTB tokenizer and METEOR (and SPICE) need Java (``apt-get install default-jre-headless``); without it a
:class:`JavaNotFoundError` says so. ``tokenize=False`` (inputs already tokenised: only whitespace is normalised)
together with ``meteor=False`` runs without Java, but those numbers are not comparable with published ones.

Scores are fractions as the toolkit prints them (CIDEr is unbounded, ~1 for good models); papers print them x100.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tempfile
from typing import Sequence

__all__ = ["compute_caption_metrics", "ptb_tokenize", "java_available", "JavaNotFoundError"]

_JAVA_HINT = "install a Java runtime, e.g. `apt-get install default-jre-headless`"
_METRIC_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


class JavaNotFoundError(RuntimeError):
    """Raised when a scorer that needs Java (PTB tokenizer, METEOR, SPICE) is requested but `java` is not on PATH."""


def java_available() -> bool:
    """Whether a `java` executable is on PATH (needed by the PTB tokenizer, METEOR and SPICE)."""
    return shutil.which("java") is not None


def _require_java(what: str) -> None:
    if not java_available():
        raise JavaNotFoundError(
            f"{what} needs Java, but no `java` executable is on PATH. METEOR and the PTB tokenizer of the COCO "
            f"caption toolkit (pycocoevalcap) run in Java: {_JAVA_HINT}. "
            "(Without Java, only tokenize=False, meteor=False, spice=False works, and its numbers are not comparable "
            "with published ones.)"
        )


def _one_line(text: str) -> str:
    # The tokenizer reads one caption per line; any line break inside a caption (\r, \u2028, ...) would shift all
    # later captions, so they become spaces (pycocoevalcap replaces only "\n").
    return " ".join(text.splitlines())


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """Tokenise captions exactly as pycocoevalcap's ``PTBTokenizer`` does (same jar, flags and punctuation filter).

    Unlike pycocoevalcap's wrapper, the temporary file goes to the system temp dir (not into site-packages) and a
    failing or misaligned Java run raises instead of silently mis-assigning captions.
    """
    _require_java("The PTB tokenizer")
    from pycocoevalcap.tokenizer import ptbtokenizer as _ptb

    sentences = list(sentences)
    if not sentences:
        return []
    jar = os.path.join(os.path.dirname(os.path.abspath(_ptb.__file__)), _ptb.STANFORD_CORENLP_3_4_1_JAR)
    if not os.path.isfile(jar):
        raise FileNotFoundError(f"pycocoevalcap's Stanford CoreNLP jar is missing: {jar}")
    fd, path = tempfile.mkstemp(prefix="ptb_tokenize_", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for s in sentences:
                f.write(_one_line(s) + "\n")
        cmd = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    finally:
        os.remove(path)
    if proc.returncode != 0:
        raise RuntimeError(
            f"the PTB tokenizer (Java) failed with exit code {proc.returncode}: "
            f"{proc.stderr.decode('utf-8', 'replace').strip()[-2000:]}"
        )
    lines = proc.stdout.decode("utf-8", "replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(sentences):
        raise RuntimeError(
            f"the PTB tokenizer returned {len(lines)} lines for {len(sentences)} captions; refusing to guess which "
            "caption is which"
        )
    punct = set(_ptb.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punct) for line in lines]


def _check_inputs(predictions, references) -> tuple[list[str], list[list[str]]]:
    predictions = list(predictions)
    references = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    for i, (p, refs) in enumerate(zip(predictions, references)):
        if not isinstance(p, str):
            raise TypeError(f"prediction {i} is not a string: {p!r}")
        if not refs:
            raise ValueError(f"image {i} has no reference caption")
        for r in refs:
            if not isinstance(r, str):
                raise TypeError(f"a reference of image {i} is not a string: {r!r}")
    return predictions, references


def _meteor(gts: dict, res: dict) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    # "|||" separates fields in METEOR's stdin protocol; pycocoevalcap strips it from hypotheses only.
    gts = {k: [r.replace("|||", " ") for r in v] for k, v in gts.items()}
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
        return float(score)
    except (ValueError, OSError) as e:  # the Java process died: empty / broken reply
        scorer.meteor_p.kill()
        err = scorer.meteor_p.stderr.read().decode("utf-8", "replace").strip()[-2000:]
        raise RuntimeError(f"METEOR (Java, meteor-1.5.jar) failed: {e!r}. Java stderr: {err}") from e
    finally:
        # pycocoevalcap's Meteor.__del__ takes a lock that compute_score leaves held if it fails; release it so
        # garbage collection cannot deadlock, and stop the Java process now rather than at collection time.
        if scorer.lock.locked():
            scorer.lock.release()
        with contextlib.suppress(Exception):
            scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        for stream in (scorer.meteor_p.stdout, scorer.meteor_p.stderr):
            with contextlib.suppress(Exception):
                stream.close()


def _check_spice_ready() -> None:
    """Raise a clear error unless SPICE can run offline (Java plus the CoreNLP 3.6.0 jars already in place)."""
    _require_java("SPICE")
    import pycocoevalcap.spice.get_stanford_models as _gsm

    lib = os.path.join(os.path.dirname(os.path.abspath(_gsm.__file__)), _gsm.SPICELIB)
    needed = [os.path.join(lib, f"{_gsm.JAR}{suffix}.jar") for suffix in ("", "-models")]
    missing = [p for p in needed if not os.path.isfile(p)]
    if missing:
        raise RuntimeError(
            "SPICE was requested but cannot run: it needs the Stanford CoreNLP 3.6.0 jars "
            f"({', '.join(os.path.basename(p) for p in needed)}) in {lib}, which pycocoevalcap downloads from "
            "nlp.stanford.edu on first use, and this environment is offline. Copy them there from "
            "stanford-corenlp-full-2015-12-09.zip obtained elsewhere, or compute without spice=True."
        )


def _spice(gts: dict, res: dict) -> float:
    _check_spice_ready()  # never let pycocoevalcap try its download
    from pycocoevalcap.spice.spice import Spice

    try:
        score, _ = Spice().compute_score(gts, res)
    except Exception as e:
        raise RuntimeError(f"SPICE (Java, spice-1.0.jar) failed: {e!r}") from e
    return float(score)


def compute_caption_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    *,
    meteor: bool = True,
    spice: bool = False,
    tokenize: bool = True,
) -> dict[str, float]:
    """COCO caption metrics of ``predictions`` (one per image) against ``references`` (several per image).

    Returns ``Bleu_1``..``Bleu_4``, ``ROUGE_L``, ``CIDEr``, plus ``METEOR`` (if ``meteor``) and ``SPICE`` (if
    ``spice``). See the module docstring for how each is computed.
    """
    predictions, references = _check_inputs(predictions, references)
    if meteor:
        _require_java("METEOR")
    if spice:
        _check_spice_ready()

    if tokenize:
        flat = list(predictions) + [r for refs in references for r in refs]
        tokens = ptb_tokenize(flat)
        pred_tok, pos = tokens[: len(predictions)], len(predictions)
        refs_tok = []
        for refs in references:
            refs_tok.append(tokens[pos : pos + len(refs)])
            pos += len(refs)
    else:
        pred_tok = [" ".join(_one_line(p).split()) for p in predictions]
        refs_tok = [[" ".join(_one_line(r).split()) for r in refs] for refs in references]

    gts = {i: refs for i, refs in enumerate(refs_tok)}
    res = {i: [p] for i, p in enumerate(pred_tok)}

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their internals
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, start=1):
        out[f"Bleu_{n}"] = float(b)
    if meteor:
        out["METEOR"] = _meteor(gts, res)
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        out["SPICE"] = _spice(gts, res)
    return {k: out[k] for k in (*_METRIC_KEYS, "SPICE") if k in out}

