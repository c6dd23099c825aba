"""Tests of the offline metric modules in vl_align/metrics (hand-checked values).

No test may touch the network: an autouse fixture makes every socket connection attempt fail. Tests that need
Java (PTB tokenizer, METEOR) are skipped when `java` is not on PATH.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from vl_align.metrics import (
    AVAILABLE_METRICS,
    JavaNotFoundError,
    compute_caption_metrics,
    load_metric,
    metric_path,
    normalize_answer,
    ptb_tokenize,
    retrieval_recall,
    vqa_accuracy,
    vqa_score,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java (PTB tokenizer / METEOR)")

_coco_mod = importlib.import_module("vl_align.metrics.caption")
_rr_mod = importlib.import_module("vl_align.metrics.recall")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail loudly on any attempt to open a network connection (subprocesses such as Java are not affected)."""

    def blocked(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.setattr(socket.socket, "connect_ex", blocked)
    monkeypatch.setattr(socket, "create_connection", blocked)
    monkeypatch.setattr(socket, "getaddrinfo", blocked)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


# ----------------------------------------------------------------------------------------------------------------
# loader
# ----------------------------------------------------------------------------------------------------------------


def test_metric_scripts_exist_with_evaluate_layout():
    for name in AVAILABLE_METRICS:
        assert metric_path(name).name == f"{name}.py"


def test_load_metric_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="coco_caption.*vqa_accuracy.*retrieval_recall"):
        load_metric("bleu")


def test_package_import_does_not_import_evaluate():
    code = "import sys, vl_align.metrics; assert 'evaluate' not in sys.modules, 'evaluate imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_load_metric_is_offline_and_restores_environment():
    import huggingface_hub.constants

    env_before = {k: os.environ.get(k) for k in ("HF_EVALUATE_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    hub_offline_before = huggingface_hub.constants.HF_HUB_OFFLINE
    metric = load_metric("vqa_accuracy", keep_in_memory=True)  # sockets are blocked by the autouse fixture
    assert type(metric).__name__ == "VqaAccuracy"
    # the offline switches are only set while loading
    assert {k: os.environ.get(k) for k in env_before} == env_before
    assert huggingface_hub.constants.HF_HUB_OFFLINE == hub_offline_before


def test_evaluate_load_of_each_script_folder_wraps_the_package_functions():
    """The scripts are thin: evaluate.load on a folder (the script copied into evaluate's cache) scores with the
    same plain functions that vl_align.metrics exports."""
    import evaluate

    from vl_align.metrics import METRICS_DIR, _hub_offline

    for name, plain in (("coco_caption", compute_caption_metrics), ("vqa_accuracy", vqa_accuracy),
                        ("retrieval_recall", retrieval_recall)):
        script = importlib.import_module(f"vl_align.metrics.{name}.{name}")
        assert getattr(script, plain.__name__) is plain
        with _hub_offline():
            metric = evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)
        assert type(metric).__name__ == "".join(part.title() for part in name.split("_"))
    assert metric.compute(predictions=_SIMS.T, references=_T2I) == pytest.approx(_EXPECTED)


# ----------------------------------------------------------------------------------------------------------------
# coco_caption: BLEU / ROUGE-L / CIDEr without Java (inputs already tokenised), then the Java path
# ----------------------------------------------------------------------------------------------------------------


def _caption_scores(predictions, references):
    return compute_caption_metrics(predictions, references, meteor=False, tokenize=False)


def test_bleu_identical_is_one():
    s = _caption_scores(["a man rides a brown horse on the beach"], [["a man rides a brown horse on the beach"]])
    for n in range(1, 5):
        assert s[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)


def test_bleu_hand_computed():
    # hyp "the cat sat on a mat" vs ref "the cat sat on the mat" (both 6 tokens -> brevity penalty 1)
    # clipped n-gram precisions: 1-gram 5/6 (the cat sat on mat), 2-gram 3/5 (the cat, cat sat, sat on),
    # 3-gram 2/4 (the cat sat, cat sat on), 4-gram 1/3 (the cat sat on)
    # BLEU-n = geometric mean of the first n precisions.
    s = _caption_scores(["the cat sat on a mat"], [["the cat sat on the mat"]])
    p = [5 / 6, 3 / 5, 2 / 4, 1 / 3]
    for n in range(1, 5):
        assert s[f"Bleu_{n}"] == pytest.approx(math.prod(p[:n]) ** (1 / n), rel=1e-6)
    assert s["Bleu_1"] == pytest.approx(5 / 6, rel=1e-6)
    assert s["Bleu_4"] == pytest.approx((1 / 12) ** 0.25, rel=1e-6)


def test_bleu_brevity_penalty_uses_closest_reference():
    # hyp "the cat" (2 tokens), refs of 6 and 3 tokens: closest length is 3 -> BP = exp(1 - 3/2);
    # 1-gram precision 2/2, 2-gram precision 1/1 -> BLEU-1 = BLEU-2 = exp(-0.5)
    s = _caption_scores(["the cat"], [["the cat sat on the mat", "a cat sleeps"]])
    assert s["Bleu_1"] == pytest.approx(math.exp(-0.5), rel=1e-6)
    assert s["Bleu_2"] == pytest.approx(math.exp(-0.5), rel=1e-6)


def test_rouge_l_hand_computed():
    # cand "the cat was on the mat" (6), ref "the cat sat on the big mat" (7): LCS "the cat on the mat" = 5
    # P = 5/6, R = 5/7, beta = 1.2: F = (1 + b^2) P R / (R + b^2 P) = (61/42) / (67/35) = 305/402
    s = _caption_scores(["the cat was on the mat"], [["the cat sat on the big mat"]])
    assert s["ROUGE_L"] == pytest.approx(305 / 402, rel=1e-12)


def test_rouge_l_takes_best_precision_and_recall_over_references():
    # cand "a b c d" vs refs "a b" (LCS 2: P 2/4, R 2/2) and "a b c x y z" (LCS 3: P 3/4, R 3/6)
    # P_max = 3/4, R_max = 1 -> F = 2.44 * 0.75 / (1 + 1.44 * 0.75) = 1.83 / 2.08
    s = _caption_scores(["a b c d"], [["a b", "a b c x y z"]])
    assert s["ROUGE_L"] == pytest.approx(1.83 / 2.08, rel=1e-12)


def test_cider_prefers_the_better_caption():
    refs = [
        ["a man riding a horse on a beach", "a person rides a horse along the shore"],
        ["a plate of food with broccoli and rice", "a dish of rice and vegetables"],
        ["two dogs playing in the snow", "dogs running through snow"],
    ]
    rest = ["a plate of rice and broccoli", "two dogs run in the snow"]
    good = _caption_scores(["a man rides a horse on the beach", *rest], refs)["CIDEr"]
    bad = _caption_scores(["a plate of food on a table", *rest], refs)["CIDEr"]
    assert good > bad > 0


def test_cider_idf_comes_from_the_evaluated_set():
    # With a single image every reference n-gram has document frequency 1 = number of images: IDF log(1/1) = 0.
    s = _caption_scores(["a dog on grass"], [["a dog on grass", "a dog outside"]])
    assert s["CIDEr"] == 0.0


def test_caption_input_validation():
    with pytest.raises(ValueError, match="predictions"):
        _caption_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no reference"):
        _caption_scores(["a"], [[]])


def test_missing_java_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(_coco_mod, "java_available", lambda: False)
    with pytest.raises(JavaNotFoundError, match="METEOR and the PTB tokenizer.*apt-get install default-jre-headless"):
        compute_caption_metrics(["a dog"], [["a dog"]])
    with pytest.raises(JavaNotFoundError, match="PTB tokenizer"):
        compute_caption_metrics(["a dog"], [["a dog"]], meteor=False)
    # the Java-free configuration still works
    assert "METEOR" not in compute_caption_metrics(["a dog"], [["a dog"]], meteor=False, tokenize=False)


def test_spice_request_fails_clearly_offline():
    import pycocoevalcap.spice.get_stanford_models as gsm

    lib = os.path.join(os.path.dirname(gsm.__file__), gsm.SPICELIB)
    if os.path.isfile(os.path.join(lib, f"{gsm.JAR}.jar")):
        pytest.skip("Stanford CoreNLP for SPICE is installed here; SPICE would really run")
    with pytest.raises(RuntimeError, match="SPICE"):
        compute_caption_metrics(["a dog"], [["a dog"]], meteor=False, tokenize=False, spice=True)


@needs_java
def test_ptb_tokenizer_matches_coco_toolkit_and_keeps_alignment():
    out = ptb_tokenize(["A Dog, running.", "", "It's 3.5 m\r\nhigh!", "..."])
    assert out == ["a dog running", "", "it 's 3.5 m high", ""]


@needs_java
def test_coco_caption_metric_through_evaluate_with_java():
    # One image; the PTB tokenizer lower-cases and drops "." so the hand BLEU values of
    # test_bleu_hand_computed apply unchanged. METEOR runs (Java).
    metric = load_metric("coco_caption", keep_in_memory=True)
    s = metric.compute(predictions=["The cat sat on a mat."], references=[["the cat sat on the mat"]])
    assert set(s) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert s["Bleu_1"] == pytest.approx(5 / 6, rel=1e-6)
    assert s["Bleu_4"] == pytest.approx((1 / 12) ** 0.25, rel=1e-6)
    assert s["ROUGE_L"] == pytest.approx(5 / 6, rel=1e-12)  # LCS 5, P = R = 5/6
    assert 0.0 < s["METEOR"] < 1.0


# ----------------------------------------------------------------------------------------------------------------
# vqa_accuracy
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),  # number word -> digit (after lower-casing)
        ("ten", "10"),
        ("none", "0"),
        ("a dog.", "dog"),  # article dropped, trailing period deleted
        ("The  Cat ", "cat"),
        ("yes!", "yes"),  # "!" not next to a space -> replaced by a space, then stripped by the split
        ("it's", "it's"),  # the apostrophe is not punctuation here; "it's" is kept as is
        ("its", "its"),
        ("dont", "don't"),  # contraction map adds the apostrophe
        ("isnt", "isn't"),
        ("3.5", "3.5"),  # period followed by a digit is kept
        ("1,000", "1000"),  # digit,digit -> punctuation deleted
        ("red, white", "red white"),  # ", " -> deleted
        ("black-and-white", "black and white"),  # "-" not next to a space -> space
        ("left\tside\n", "left side"),
    ],
)
def test_vqa_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_ten_annotator_formula_hand_computed():
    # Prediction given by 2 of the 10 humans. Leave-one-out over the 10 annotators:
    #   leaving out one of the 2 matching humans (2 subsets): 1 match left -> min(1/3, 1) = 1/3
    #   leaving out one of the 8 others (8 subsets):         2 matches   -> min(2/3, 1) = 2/3
    #   mean = (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10 = 0.6
    refs = ["dog"] * 2 + ["cat"] * 8
    assert vqa_score("dog", refs) == pytest.approx(0.6)
    # 1 of 10: (1 * 0 + 9 * 1/3) / 10 = 0.3 ; 3 of 10: (3 * 2/3 + 7 * 1) / 10 = 0.9 ; 4 of 10: 1.0
    assert vqa_score("dog", ["dog"] + ["cat"] * 9) == pytest.approx(0.3)
    assert vqa_score("dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_score("dog", ["dog"] * 4 + ["cat"] * 6) == pytest.approx(1.0)
    assert vqa_score("bird", ["dog"] * 4 + ["cat"] * 6) == 0.0
    # the prediction is normalised: "Two dogs." -> "2 dogs"
    assert vqa_score("Two dogs.", ["2 dogs"] * 2 + ["3 dogs"] * 8) == pytest.approx(0.6)


def test_vqa_reference_normalisation_modes():
    # Official: unanimous references are compared verbatim (the annotation files are pre-normalised) ...
    assert vqa_score("two", ["Two"] * 10) == 0.0
    # ... while "full" normalises every reference.
    assert vqa_score("two", ["Two"] * 10, reference_normalization="full") == 1.0
    # Official, non-unanimous: references get the punctuation step only ("red, white" -> "red white") ...
    assert vqa_score("red white", ["red, white"] * 4 + ["red"] * 6) == 1.0
    # ... which is not the full normalisation: "yes!" -> "yes " (the "!" becomes a space that is never stripped),
    # so such raw references need "full".
    assert vqa_score("yes", ["yes!"] * 4 + ["no"] * 6) == 0.0
    assert vqa_score("yes", ["yes!"] * 4 + ["no"] * 6, reference_normalization="full") == 1.0
    with pytest.raises(ValueError, match="reference_normalization"):
        vqa_score("yes", ["yes"], reference_normalization="loose")


def test_vqa_fewer_than_three_references_is_exact_match_after_normalisation():
    assert vqa_score("Two.", ["2"]) == 1.0  # easy-VQA style: one answer per question
    assert vqa_score("a circle", "circle") == 1.0
    assert vqa_score("square", ["circle"]) == 0.0
    assert vqa_score("no", ["yes", "no"]) == 1.0  # any of the (< 3) references
    assert vqa_accuracy(["Two", "red", "yes"], [["2"], ["blue"], ["yes"]]) == {"accuracy": pytest.approx(2 / 3)}
    with pytest.raises(ValueError):
        vqa_accuracy(["a"], [[]])
    with pytest.raises(ValueError):
        vqa_accuracy(["a", "b"], [["a"]])


def test_vqa_metric_through_evaluate():
    metric = load_metric("vqa_accuracy", keep_in_memory=True)
    refs10 = ["dog"] * 2 + ["cat"] * 8
    out = metric.compute(predictions=["dog", "Two.", "dog"], references=[refs10, "2", ["a dog"]])
    assert out == {"accuracy": pytest.approx((0.6 + 1.0 + 1.0) / 3)}


# ----------------------------------------------------------------------------------------------------------------
# retrieval_recall
# ----------------------------------------------------------------------------------------------------------------

# 3 images, 6 texts; texts (0, 1) -> image 0, (2, 3) -> image 1, (4, 5) -> image 2
_SIMS = np.array(
    [
        [0.90, 0.10, 0.80, 0.20, 0.30, 0.40],
        [0.85, 0.80, 0.10, 0.50, 0.70, 0.60],
        [0.10, 0.20, 0.30, 0.40, 0.50, 0.05],
    ]
)
_T2I = [0, 0, 1, 1, 2, 2]
# image->text rank = wrong texts scoring >= the image's best own text:
#   img0: best own 0.90 (t0), none above -> 0;  img1: best own 0.50 (t3), above: t0 .85 t1 .80 t4 .70 t5 .60 -> 4
#   img2: best own 0.50 (t4), none above -> 0   => R@1 = 2/3, R@4 = 2/3, R@5 = R@10 = 1
# text->image rank = wrong images scoring >= the text's own image (column of _SIMS):
#   t0 [.9 .85 .1] own img0 -> 0 ; t1 [.1 .8 .2] own img0 -> 2 ; t2 [.8 .1 .3] own img1 -> 2
#   t3 [.2 .5 .4] own img1 -> 0 ; t4 [.3 .7 .5] own img2 -> 1 ; t5 [.4 .6 .05] own img2 -> 2
#   => R@1 = 2/6, R@2 = 3/6, R@5 = R@10 = 1
_EXPECTED = {
    "i2t_r1": 2 / 3, "i2t_r5": 1.0, "i2t_r10": 1.0,
    "t2i_r1": 1 / 3, "t2i_r5": 1.0, "t2i_r10": 1.0,
    "i2t_mean": 8 / 9, "t2i_mean": 7 / 9, "r_mean": 5 / 6,
}


def test_retrieval_recall_hand_constructed():
    out = retrieval_recall(_SIMS, _T2I)
    assert out == pytest.approx(_EXPECTED)
    small = retrieval_recall(_SIMS, _T2I, ks=(1, 2, 4))
    assert small["i2t_r2"] == pytest.approx(2 / 3)
    assert small["i2t_r4"] == pytest.approx(2 / 3)  # img1's rank 4 is not < 4
    assert small["t2i_r2"] == pytest.approx(1 / 2)


def test_retrieval_recall_known_ranking_r1_r5_r10():
    # 12 images, text t belongs to image t; sims[i, t] = sign(t - i): for text t exactly the t images i < t
    # score above its own image (score 0) -> t2i ranks 0..11; for image i exactly the 11 - i texts t > i score
    # above its own text -> i2t ranks 11..0. So R@1 = 1/12, R@5 = 5/12, R@10 = 10/12 both ways.
    n = 12
    idx = np.arange(n)
    sims = np.sign(idx[None, :] - idx[:, None]).astype(np.float32)
    out = retrieval_recall(sims, idx)
    for d in ("i2t", "t2i"):
        assert out[f"{d}_r1"] == pytest.approx(1 / 12)
        assert out[f"{d}_r5"] == pytest.approx(5 / 12)
        assert out[f"{d}_r10"] == pytest.approx(10 / 12)


def test_retrieval_ties_count_against_the_model():
    out = retrieval_recall(np.zeros((5, 5)), range(5))
    assert out["i2t_r1"] == 0.0 and out["t2i_r1"] == 0.0
    assert out["i2t_r5"] == 1.0 and out["t2i_r5"] == 1.0  # rank 4 < 5


def test_retrieval_image_without_text_is_only_a_distractor():
    # image 2 owns no text: left out of image->text, but it outranks both texts' own images in text->image
    sims = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    out = retrieval_recall(sims, [0, 1], ks=(1, 5))
    assert out["i2t_r1"] == 1.0
    assert out["t2i_r1"] == 0.0 and out["t2i_r5"] == 1.0


def test_retrieval_block_processing_and_torch_input(monkeypatch):
    rng = np.random.RandomState(0)
    sims = rng.randn(30, 70)
    t2i = rng.randint(0, 30, size=70)
    full = retrieval_recall(sims, t2i)
    monkeypatch.setattr(_rr_mod, "_BLOCK_ELEMS", 100)  # one or two image rows per block
    assert retrieval_recall(sims, t2i) == full
    torch = pytest.importorskip("torch")
    assert retrieval_recall(torch.from_numpy(sims), torch.from_numpy(t2i)) == full


def test_retrieval_input_validation():
    with pytest.raises(ValueError, match="one image index per text"):
        retrieval_recall(_SIMS, [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_recall(_SIMS, [0, 0, 1, 1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(np.full((2, 2), np.nan), [0, 1])
    with pytest.raises(ValueError, match="positive"):
        retrieval_recall(_SIMS, _T2I, ks=(0,))


def test_retrieval_metric_through_evaluate():
    metric = load_metric("retrieval_recall", keep_in_memory=True)
    out = metric.compute(predictions=_SIMS.T, references=_T2I)  # one example per text
    assert out == pytest.approx(_EXPECTED)
