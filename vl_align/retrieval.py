"""Image-text retrieval scores of a representation-stage front: BLIP-2's ITC ranking re-ranked by ITM (pure torch).

The protocol is LAVIS's ``compute_sim_matrix`` (``lavis/models/blip2_models/blip2.py``, used for BLIP-2's COCO and
Flickr retrieval numbers):

1. ITC similarity ``s[i, t] = max_q <image_feats[i, q], text_feat[t]>``: the cosine (both sides L2-normalised) of
   the best of the image's queries, *not* divided by the temperature.
2. Image->text: for every image (row) the ``k`` texts of highest ``s`` are scored by the ITM head; text->image: for
   every text (column) the ``k`` images of highest ``s``. LAVIS's ``k_test`` is 128 on COCO; ours defaults to 16.
3. A re-ranked pair scores ``itm + s``, where ``itm`` is the match head's *positive-class logit* averaged over the
   query positions (LAVIS ``compute_itm``: ``itm_head(query_outputs)[:, :, 1].mean(1)``; our front returns the
   mean over queries of both logits, whose column 1 is the same number). Not the softmax probability.
4. LAVIS sets every pair outside the top ``k`` to -100. We put them below every re-ranked pair but keep their ITC
   order (``s`` shifted down by one constant), which gives the same recall for every K <= k and a meaningful
   ranking beyond k. A pair that is in both an image's and a text's top k is scored once (LAVIS scores it twice).

The image->text and text->image matrices differ after re-ranking (rows vs columns were re-ranked), so both are
returned, each in the ``[num_images, num_texts]`` orientation that ``vl_align.metrics.retrieval_recall`` reads.
The ITM scorer is a callback so that this module knows nothing of the front, the tokenizer or where features live.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .metrics import retrieval_recall

# (image indices [P], text indices [P]) -> ITM score [P] of each pair (higher = better match)
ItmScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# elements of the [b, Q, T] query-text similarity block computed at once
_ITC_BLOCK_ELEMS = 1 << 24


@torch.no_grad()
def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """BLIP-2's ITC similarity: image_feats [I, Q, E] (or [I, E]), text_feats [T, E], both L2-normalised -> [I, T]
    cosine of each text with the image's best query (computed in blocks of images to bound the [b, Q, T] temporary).
    """
    if image_feats.dim() == 2:
        image_feats = image_feats[:, None]
    if image_feats.dim() != 3 or text_feats.dim() != 2 or image_feats.shape[-1] != text_feats.shape[-1]:
        raise ValueError(f"image_feats must be [I, Q, E] and text_feats [T, E]; got {tuple(image_feats.shape)} and "
                         f"{tuple(text_feats.shape)}")
    num_images, num_queries, _ = image_feats.shape
    text = text_feats.float().to(image_feats.device)
    block = max(1, _ITC_BLOCK_ELEMS // max(num_queries * text.shape[0], 1))
    out = [torch.einsum("bqe,te->bqt", image_feats[s:s + block].float(), text).amax(1)
           for s in range(0, num_images, block)]
    return torch.cat(out) if out else text.new_zeros(0, text.shape[0])


@dataclass
class RetrievalScores:
    """Score matrices, all [num_images, num_texts] (higher = ranked first)."""
    itc: torch.Tensor  # ITC similarity s
    i2t: torch.Tensor  # image->text: each row's top k re-scored as itm + s, the rest below in ITC order
    t2i: torch.Tensor  # text->image: each column's top k re-scored likewise
    itm: torch.Tensor  # the ITM score of the scored pairs, NaN elsewhere
    k: int  # candidates re-ranked per query (fewer where the gallery is smaller)

    @property
    def num_itm_pairs(self) -> int:
        return int((~self.itm.isnan()).sum())


def candidate_mask(itc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [I, T] masks of each row's top-k texts and each column's top-k images by ITC score."""
    num_images, num_texts = itc.shape
    rows = torch.zeros_like(itc, dtype=torch.bool)
    rows.scatter_(1, itc.topk(min(k, num_texts), dim=1).indices, True)
    cols = torch.zeros_like(itc, dtype=torch.bool)
    cols.scatter_(0, itc.topk(min(k, num_images), dim=0).indices, True)
    return rows, cols


@torch.no_grad()
def rerank_with_itm(itc: torch.Tensor, itm_scorer: ItmScorer, k: int = 16, batch_size: int = 64,
                    itc_weight: float = 1.0) -> RetrievalScores:
    """Re-rank each row's and each column's top ``k`` of the ITC matrix ``itc`` [I, T] by ``itm_scorer``.

    The union of the candidate pairs is scored once, ``batch_size`` pairs per call of ``itm_scorer``. A re-ranked
    pair scores ``itm + itc_weight * itc`` (LAVIS: weight 1); the others stay below every re-ranked pair in ITC order.
    """
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be positive, got k={k}, batch_size={batch_size}")
    itc = itc.float()
    rows, cols = candidate_mask(itc, k)
    img_idx, txt_idx = torch.nonzero(rows | cols, as_tuple=True)  # [P] each, the union of the candidates
    itm = torch.full_like(itc, float("nan"))
    for start in range(0, img_idx.numel(), batch_size):
        i, t = img_idx[start:start + batch_size], txt_idx[start:start + batch_size]
        score = itm_scorer(i, t).detach().float().reshape(-1).to(itc.device)
        if score.numel() != i.numel():
            raise ValueError(f"itm_scorer returned {score.numel()} scores for {i.numel()} pairs")
        itm[i, t] = score
    if itm[img_idx, txt_idx].isnan().any():
        raise ValueError("itm_scorer returned NaN")
    reranked = itm + itc_weight * itc  # NaN off the candidates
    # the rest: ITC order, shifted so that the best of them is 1 below the worst re-ranked pair
    shift = reranked[img_idx, txt_idx].min() - 1.0 - itc.max()
    rest = itc + shift
    return RetrievalScores(itc=itc, i2t=torch.where(rows, reranked, rest), t2i=torch.where(cols, reranked, rest),
                           itm=itm, k=k)


def recalls(scores: RetrievalScores, gold: torch.Tensor, ks: Iterable[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """R@K both ways of the ITC ranking and of the ITM re-ranking; ``gold`` [I, T] marks the correct pairs.

    Returns ``{"itc": {...}, "itm": {...}}`` with ``i2t_r{k}``, ``t2i_r{k}``, ``i2t_mean``, ``t2i_mean``, ``r_mean``.
    """
    ks = tuple(ks)
    gold = gold.bool().cpu()
    itc = retrieval_recall(scores.itc.cpu(), ks=ks, gold=gold)
    i2t = retrieval_recall(scores.i2t.cpu(), ks=ks, gold=gold)
    t2i = retrieval_recall(scores.t2i.cpu(), ks=ks, gold=gold)
    itm = {**{key: v for key, v in i2t.items() if key.startswith("i2t")},
           **{key: v for key, v in t2i.items() if key.startswith("t2i")}}
    itm["r_mean"] = (itm["i2t_mean"] + itm["t2i_mean"]) / 2.0
    return {"itc": itc, "itm": itm}


def top_k(scores: torch.Tensor, k: int = 5, dim: int = 1) -> list[list[tuple[int, float]]]:
    """(index, score) of the ``k`` best candidates of every row (dim=1, image->text) or column (dim=0, text->image)."""
    mat = scores if dim == 1 else scores.T
    values, indices = mat.float().topk(min(k, mat.shape[1]), dim=1)
    return [list(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]


__all__ = ["ItmScorer", "RetrievalScores", "itc_similarity", "candidate_mask", "rerank_with_itm", "recalls", "top_k"]
