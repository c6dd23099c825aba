"""BLIP-2's representation losses: ITC, ITM (hard negatives from the contrastive similarities) and ITG. The
P-Former alignment loss is in ``vl_align.alignment``.

Losses over the global batch receive ``gather`` (differentiable all-gather along dim 0; identity in one process),
``gather_nograd`` (for hard-negative mining) and ``rank``; the token-averaged ITG receives ``mean_count_over_ranks``
(the mean of a tensor over the ranks; identity in one process). Nothing here imports torch.distributed.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from pformer.losses import MeanOverRanks, over_global_tokens

Gather = Callable[[torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy against a target distribution [B, C] (rows sum to 1), with label smoothing."""
    targets = targets * (1.0 - label_smoothing) + label_smoothing / logits.shape[1]
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def itc_loss(image_feats: torch.Tensor, text_feat: torch.Tensor, temperature: torch.Tensor, gather: Gather = identity,
             rank: int = 0, label_smoothing: float = 0.1, positives: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image-text contrastive loss with BLIP-2's max over queries.

    image_feats [B, Q, E] and text_feat [B, E] are L2-normalised. ``positives`` [B, W·B] (bool, optional) marks every
    pair that counts as matching (e.g. the same caption on another image, frequent in small caption spaces); the
    target is then spread evenly over them, as ALBEF/BLIP do with image ids. Without it the positive is the diagonal.
    Returns (loss, sim_i2t [B, W·B], sim_t2i [B, W·B]), similarities already divided by the temperature.
    """
    b = image_feats.shape[0]
    image_all, text_all = gather(image_feats), gather(text_feat)  # [W·B, Q, E], [W·B, E]
    # image b vs text j: the best of b's queries; text b vs image j: the best of j's queries
    sim_i2t = torch.einsum("bqe,je->bqj", image_feats.float(), text_all.float()).amax(1) / temperature
    sim_t2i = torch.einsum("be,jqe->bqj", text_feat.float(), image_all.float()).amax(1) / temperature
    if positives is None:
        positives = torch.zeros_like(sim_i2t, dtype=torch.bool)
        positives[torch.arange(b), torch.arange(b) + rank * b] = True
    targets = positives.float() / positives.float().sum(1, keepdim=True)
    loss = 0.5 * (_soft_cross_entropy(sim_i2t, targets, label_smoothing)
                  + _soft_cross_entropy(sim_t2i, targets, label_smoothing))
    return loss, sim_i2t, sim_t2i


@torch.no_grad()
def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, rank: int,
                          positives: torch.Tensor | None = None, uniforms: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each local image a negative text index, for each local text a negative image index (global indices).

    ``uniforms`` [B, 2] in [0, 1) drive the draws by inverse CDF; the caller derives them from the samples' global
    positions, so the negatives do not depend on how the global batch is split across ranks.

    Negatives are drawn with probability softmax(similarity) over the global batch with every positive excluded,
    as in BLIP-2. A row with no candidate left (every pair of the batch positive) falls back to a uniform draw among
    the other samples.
    """
    b = sim_i2t.shape[0]
    own = torch.arange(b, device=sim_i2t.device) + rank * b
    if positives is None:
        positives = torch.zeros_like(sim_i2t, dtype=torch.bool)
        positives[torch.arange(b), own] = True
    weights_i2t = F.softmax(sim_i2t.float(), dim=1).masked_fill(positives, 0.0)
    weights_t2i = F.softmax(sim_t2i.float(), dim=1).masked_fill(positives, 0.0)
    for w in (weights_i2t, weights_t2i):
        w.nan_to_num_(0.0)
        empty = w.sum(1) <= 0
        if empty.any():
            w[empty] = 1.0
            w[empty, own[empty]] = 0.0
    if uniforms is None:
        uniforms = torch.rand(b, 2, device=sim_i2t.device)

    def draw(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        cdf = w.cumsum(1) / w.sum(1, keepdim=True)  # [B, W·B]
        return torch.searchsorted(cdf.contiguous(), u[:, None].to(cdf).contiguous()).squeeze(1).clamp(max=w.shape[1] - 1)

    return draw(weights_i2t, uniforms[:, 0]), draw(weights_t2i, uniforms[:, 1])


def itm_loss(itm_logits: torch.Tensor, num_positive: int) -> torch.Tensor:
    """itm_logits [P + N, 2] for P positive pairs first, then N negatives."""
    labels = torch.zeros(itm_logits.shape[0], dtype=torch.long, device=itm_logits.device)
    labels[:num_positive] = 1
    return F.cross_entropy(itm_logits.float(), labels)


def itg_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             label_smoothing: float = 0.1, mean_count_over_ranks: MeanOverRanks = identity) -> torch.Tensor:
    """Causal LM loss of the Q-Former's text decoder: logits [B, T, V] at t predict token t+1.

    A mean over the global batch's tokens (label smoothing per token): this rank's summed token loss over (global
    token count / world size), with ``mean_count_over_ranks`` the mean of a tensor over the ranks; so the mean over
    ranks of the losses (DeepSpeed averages gradients over ranks) does not depend on how the captions' lengths fall
    on the ranks. In one process: the plain token mean.
    """
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)
    return over_global_tokens(loss, (labels != -100).sum(), mean_count_over_ranks)


__all__ = ["Gather", "identity", "itc_loss", "sample_hard_negatives", "itm_loss", "itg_loss"]
