"""Image-text retrieval: ITC ranking, ITM re-ranking of the top k (hand-checked), caption-equality ground truth,
and the stage-2a evaluation end to end on tiny models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vl_align.metrics import load_metric, retrieval_recall
from vl_align.retrieval import candidate_mask, itc_similarity, recalls, rerank_with_itm, top_k


def _table_scorer(table: torch.Tensor, calls: list | None = None):
    """An ITM scorer that looks the pair up in ``table`` [I, T] (and records the batch sizes)."""
    def score(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(list(zip(img.tolist(), txt.tolist())))
        return table[img, txt]
    return score


# 3 images, 3 texts, text t belongs to image t. ITC puts the wrong text/image first for images/texts 0 and 1:
#   row 0: t1 .5 > t0 .2 > t2 .1      row 1: t0 .4 > t1 .3 > t2 .0      row 2: t2 .6 > t1 .2 > t0 .1
#   col 0: i1 .4 > i0 .2 > i2 .1      col 1: i0 .5 > i1 .3 > i2 .2      col 2: i2 .6 > i0 .1 > i1 .0
# => ITC R@1 = 1/3 and R@2 = 1 both ways. ITM says +5 for a match and -5 otherwise, so re-ranking the top 2 puts
# every correct answer first (R@1 = 1); re-ranking only the top 1 cannot reach answers ITC ranked second.
_ITC = torch.tensor([[0.2, 0.5, 0.1],
                     [0.4, 0.3, 0.0],
                     [0.1, 0.2, 0.6]])
_ITM = torch.where(torch.eye(3, dtype=torch.bool), 5.0, -5.0)
_GOLD = torch.eye(3, dtype=torch.bool)


def test_itc_similarity_is_max_over_queries():
    image = torch.nn.functional.normalize(torch.randn(5, 4, 8), dim=-1)  # [I, Q, E]
    text = torch.nn.functional.normalize(torch.randn(7, 8), dim=-1)  # [T, E]
    sims = itc_similarity(image, text)
    assert sims.shape == (5, 7)
    ref = torch.stack([torch.stack([(image[i] @ text[t]).max() for t in range(7)]) for i in range(5)])
    torch.testing.assert_close(sims, ref)
    with pytest.raises(ValueError, match=r"\[I, Q, E\]"):
        itc_similarity(image, text[:, :4])


def test_itm_rerank_fixes_the_itc_ranking_by_hand():
    calls: list = []
    scores = rerank_with_itm(_ITC, _table_scorer(_ITM, calls), k=2, batch_size=3)
    # row candidates {(0,1),(0,0),(1,0),(1,1),(2,2),(2,1)} + column 2's second image (0,2): 7 pairs, each once
    pairs = [p for batch in calls for p in batch]
    assert sorted(pairs) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 1), (2, 2)]
    assert [len(b) for b in calls] == [3, 3, 1]
    assert scores.num_itm_pairs == 7
    # a re-ranked pair scores ITM + ITC (LAVIS)
    assert scores.i2t[0, 0] == pytest.approx(5.2) and scores.i2t[0, 1] == pytest.approx(-4.5)
    assert scores.t2i[0, 0] == pytest.approx(5.2) and scores.t2i[1, 0] == pytest.approx(-4.6)
    # (0, 2) is in column 2's top 2 but not in row 0's: image->text keeps it below row 0's re-ranked pairs
    assert scores.i2t[0, 2] < scores.i2t[0, 1]

    out = recalls(scores, _GOLD, ks=(1, 2))
    assert out["itc"] == pytest.approx({"i2t_r1": 1 / 3, "i2t_r2": 1.0, "t2i_r1": 1 / 3, "t2i_r2": 1.0,
                                        "i2t_mean": 2 / 3, "t2i_mean": 2 / 3, "r_mean": 2 / 3})
    assert out["itm"] == pytest.approx({"i2t_r1": 1.0, "i2t_r2": 1.0, "t2i_r1": 1.0, "t2i_r2": 1.0,
                                        "i2t_mean": 1.0, "t2i_mean": 1.0, "r_mean": 1.0})


def test_rerank_cannot_reach_beyond_k_and_keeps_itc_order_below():
    scores = rerank_with_itm(_ITC, _table_scorer(_ITM), k=1, batch_size=64)
    # only the ITC top 1 of each row/column is re-scored: the rest stays in ITC order below it
    for mat, dim in ((scores.i2t, 1), (scores.t2i, 0)):
        assert [[j for j, _ in row] for row in top_k(mat, 3, dim)] == [[j for j, _ in row]
                                                                        for row in top_k(_ITC, 3, dim)]
    out = recalls(scores, _GOLD, ks=(1, 2))
    assert out["itm"]["i2t_r1"] == pytest.approx(1 / 3) and out["itm"]["i2t_r2"] == 1.0
    assert out["itm"]["t2i_r1"] == pytest.approx(1 / 3) and out["itm"]["t2i_r2"] == 1.0


def test_candidate_masks_and_k_larger_than_gallery():
    rows, cols = candidate_mask(_ITC, 2)
    assert rows.sum(1).tolist() == [2, 2, 2] and cols.sum(0).tolist() == [2, 2, 2]
    assert rows[0].tolist() == [True, True, False] and cols[:, 2].tolist() == [True, False, True]
    scores = rerank_with_itm(_ITC, _table_scorer(_ITM), k=50)  # every pair re-scored
    assert scores.num_itm_pairs == 9
    torch.testing.assert_close(scores.i2t, _ITM + _ITC)
    torch.testing.assert_close(scores.t2i, _ITM + _ITC)


def test_scorer_errors_are_clear():
    with pytest.raises(ValueError, match="returned 1 scores for 3 pairs"):
        rerank_with_itm(_ITC, lambda i, t: torch.zeros(1), k=1, batch_size=3)
    with pytest.raises(ValueError, match="positive"):
        rerank_with_itm(_ITC, _table_scorer(_ITM), k=0)


# ----------------------------------------------------------------------------------------------------------------
# several images per caption (easy-VQA: 24 distinct captions)
# ----------------------------------------------------------------------------------------------------------------
# images 0 and 2 both have caption t0 ("a red circle"), image 1 has t1.
#   ITC i2t: i0 -> t1 (.9) first: miss at 1, hit at 2; i1 -> t1 hit; i2 -> t0 hit       => R@1 2/3, R@2 1
#   ITC t2i: t0 column [.1 .2 .7]: i2 is correct and first -> hit although i0 (also correct) is last;
#            t1 column [.9 .8 .3]: i0 (wrong) above i1                                      => R@1 1/2, R@2 1
_DUP_ITC = torch.tensor([[0.1, 0.9],
                         [0.2, 0.8],
                         [0.7, 0.3]])
_DUP_GOLD = torch.tensor([[True, False], [False, True], [True, False]])


def test_duplicate_captions_count_every_image_with_the_caption():
    out = retrieval_recall(_DUP_ITC, ks=(1, 2), gold=_DUP_GOLD)
    assert out == pytest.approx({"i2t_r1": 2 / 3, "i2t_r2": 1.0, "t2i_r1": 0.5, "t2i_r2": 1.0,
                                 "i2t_mean": 5 / 6, "t2i_mean": 0.75, "r_mean": 19 / 24})
    # the same ground truth as a list of images per text
    assert retrieval_recall(_DUP_ITC, [[0, 2], [1]], ks=(1, 2)) == out
    itm = torch.where(_DUP_GOLD, 5.0, -5.0)
    scores = rerank_with_itm(_DUP_ITC, _table_scorer(itm), k=2)
    assert recalls(scores, _DUP_GOLD, ks=(1,))["itm"] == pytest.approx(
        {"i2t_r1": 1.0, "t2i_r1": 1.0, "i2t_mean": 1.0, "t2i_mean": 1.0, "r_mean": 1.0})


def test_gold_forms_agree_with_one_image_per_text():
    rng = np.random.RandomState(0)
    sims = rng.randn(9, 20)
    t2i = rng.randint(0, 9, size=20)
    gold = np.zeros((9, 20), dtype=bool)
    gold[t2i, np.arange(20)] = True
    ref = retrieval_recall(sims, t2i)
    assert retrieval_recall(sims, gold=gold) == ref
    assert retrieval_recall(sims, [[int(i)] for i in t2i]) == ref
    with pytest.raises(ValueError, match="exactly one"):
        retrieval_recall(sims, t2i, gold=gold)
    with pytest.raises(ValueError, match="mask"):
        retrieval_recall(sims, gold=gold[:, :3])


def test_retrieval_metric_through_evaluate_with_image_lists():
    metric = load_metric("retrieval_recall", keep_in_memory=True)
    out = metric.compute(predictions=_DUP_ITC.numpy().T, references=[[0, 2], [1]], ks=(1, 2))
    assert out == pytest.approx(retrieval_recall(_DUP_ITC, ks=(1, 2), gold=_DUP_GOLD))


def test_gallery_dedupes_images_and_captions():
    from vl_align.evaluation import build_gallery

    from vl_align.pairs import ImageTextPair

    pairs = [ImageTextPair(image_id="b", image_path="/b.png", caption="a red circle"),
             ImageTextPair(image_id="a", image_path="/a.png", caption="a red circle "),
             ImageTextPair(image_id="c", image_path="/c.png", caption="a blue square"),
             ImageTextPair(image_id="a", image_path="/a.png", caption="a shape"),
             ImageTextPair(image_id="a", image_path="/a.png", caption="a red circle")]
    g = build_gallery(pairs)
    assert g.image_ids == ["a", "b", "c"] and g.images == ["/a.png", "/b.png", "/c.png"]
    assert g.texts == ["a red circle", "a shape", "a blue square"]
    assert g.captions == [["a red circle", "a shape"], ["a red circle"], ["a blue square"]]
    assert g.gold.tolist() == [[True, True, False], [True, False, False], [False, False, True]]
    assert build_gallery(pairs, max_images=2).texts == ["a red circle", "a shape"]


# ----------------------------------------------------------------------------------------------------------------
# end to end: stage 2a on tiny models, then retrieval on held-out easy-VQA pairs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qformer", "elip"])
def test_stage2_writes_retrieval_report(tmp_path, kind, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir):
    from dvlp_common.config import load_config
    from pipelines.stage2 import Stage2Config, run_stage2

    out = tmp_path / kind
    cfg = load_config(Stage2Config, None, [
        f"vision.model={tiny_vit_dir}", "vision.image_size=16", f"front.init_from={tiny_bert_dir}",
        f"front.kind={kind}", "front.num_query_tokens=4", f"llm={tiny_llm_dir}", "align.weight=0",
        "data.max_pairs=16", "optim.max_steps=2", "optim.warmup_steps=1", "optim.micro_batch_size=4",
        f"logging.output_dir={out}", "logging.tensorboard=false", "logging.progress_bar=false",
        "deepspeed.precision=fp32", "eval.max_images=12", "eval.k=4", "eval.batch_size=5"])
    summary = run_stage2(cfg)
    report = json.loads((out / "retrieval.json").read_text())
    assert summary["retrieval"] == report
    assert report["gallery"]["num_images"] == 12 and report["gallery"]["k"] == 4
    for section in ("itc", "itm_rerank"):
        for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean"):
            assert 0.0 <= report[section][key] <= 1.0, (section, key)
        assert report[section]["i2t_r1"] <= report[section]["i2t_r5"] <= report[section]["i2t_r10"]
    md = (out / "retrieval.md").read_text()
    assert "| ranking |" in md and "ITM re-rank of top 4" in md
    preds = json.loads((out / "retrieval_predictions.json").read_text())
    assert len(preds["image_to_text"]) == 12 and len(preds["text_to_image"]) == report["gallery"]["num_texts"]
    first = preds["image_to_text"][0]
    assert len(first["itm_top5"]) == min(5, report["gallery"]["num_texts"])
    assert {"text", "score", "hit"} == set(first["itm_top5"][0])
    assert all(len(p["itc_top5"]) == 5 for p in preds["text_to_image"])


def test_retrieval_can_be_switched_off(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir):
    from dvlp_common.config import load_config
    from pipelines.stage2 import Stage2Config, run_stage2

    cfg = load_config(Stage2Config, None, [
        f"vision.model={tiny_vit_dir}", "vision.image_size=16", f"front.init_from={tiny_bert_dir}",
        "front.num_query_tokens=4", f"llm={tiny_llm_dir}", "align.weight=0", "data.max_pairs=8",
        "optim.max_steps=1", "optim.warmup_steps=1", "optim.micro_batch_size=4", f"logging.output_dir={tmp_path}",
        "logging.tensorboard=false", "logging.progress_bar=false", "deepspeed.precision=fp32", "eval.enabled=false"])
    summary = run_stage2(cfg)
    assert "retrieval" not in summary and not (tmp_path / "retrieval.json").exists()
