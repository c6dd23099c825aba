"""Stage-1 losses: L_lm (the frozen LLM reproduces the sentence from P(y)), L_vq, L_c.

A loss that needs the global batch receives ``gather`` (a differentiable all-gather along dim 0, identity in one
process) and ``rank``; nothing here knows about torch.distributed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dvlp_common.config import Config, param

Gather = Callable[[torch.Tensor], torch.Tensor]
# the mean of a tensor over the data-parallel ranks, without gradient (identity in one process)
MeanOverRanks = Callable[[torch.Tensor], torch.Tensor]


def identity_gather(x: torch.Tensor) -> torch.Tensor:
    return x


def over_global_tokens(token_mean: torch.Tensor, count: torch.Tensor,
                       mean_count_over_ranks: MeanOverRanks = identity_gather) -> torch.Tensor:
    """A rank's token-mean loss, re-weighted so that the mean over ranks (what DeepSpeed's gradient averaging and
    the logged loss take) is the mean over the tokens of the whole global batch.

    ``token_mean``: this rank's loss averaged over its ``count`` valid tokens (a 0-d tensor); ``mean_count_over_ranks``
    returns the mean of ``count`` over the ranks (global count / world size). The result is
    sum_local / (global_count / world_size), computed as token_mean · (count / mean count) so that in one process it
    is ``token_mean`` bit for bit (the factor is exactly 1). A rank without a valid token contributes 0 (its token
    mean is NaN). With gradient accumulation each micro-step is normalised by its own global count.
    """
    factor = (count / mean_count_over_ranks(count)).to(token_mean.dtype)
    return torch.where(count > 0, token_mean, torch.zeros_like(token_mean)) * factor


@dataclass
class Stage1LossWeights(Config):
    lm: float = param(1.0, ge=0.0, help="weight of L_lm (LLM reconstruction from the prompts)")
    vq: float = param(1.0, ge=0.0, help="weight of L_vq (prompts near the LLM's token embeddings)")
    contrastive: float = param(1.0, ge=0.0, help="weight of L_c (sentence contrastive loss on [CLS])")


@torch.no_grad()
def nearest_embeddings(vectors: torch.Tensor, table: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Row of ``table`` [V, d] nearest (L2) to each vector of ``vectors`` [..., d]; chunked to bound memory."""
    flat = vectors.reshape(-1, vectors.shape[-1]).float()
    table_f = table.float()
    table_sq = table_f.pow(2).sum(-1)  # [V]
    out = torch.empty_like(flat)
    for start in range(0, flat.shape[0], chunk):
        part = flat[start:start + chunk]
        # |p - e|^2 = |p|^2 - 2 p·e + |e|^2; |p|^2 does not change the argmin
        dist = table_sq[None, :] - 2.0 * part @ table_f.T
        out[start:start + chunk] = table_f[dist.argmin(-1)]
    return out.view_as(vectors)


def vq_loss(prompts: torch.Tensor, embedding_table: torch.Tensor) -> torch.Tensor:
    """MSE between the prompts [B, n, d] and their stop-gradient nearest token embeddings."""
    target = nearest_embeddings(prompts.detach(), embedding_table)
    return F.mse_loss(prompts.float(), target)


def contrastive_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: torch.Tensor, gather: Gather = identity_gather,
                     rank: int = 0, label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE between two views of the same sentences over the global batch.

    z_a, z_b: [B, k] L2-normalised embeddings of this rank's sentences (two independent maskings). Each local
    sentence is scored against every sentence of the global batch; its target is its own global index.
    """
    b = z_a.shape[0]
    all_a, all_b = gather(z_a), gather(z_b)  # [W·B, k]
    targets = torch.arange(b, device=z_a.device) + rank * b
    logits_ab = z_a.float() @ all_b.float().T / temperature
    logits_ba = z_b.float() @ all_a.float().T / temperature
    return 0.5 * (F.cross_entropy(logits_ab, targets, label_smoothing=label_smoothing)
                  + F.cross_entropy(logits_ba, targets, label_smoothing=label_smoothing))


__all__ = ["Stage1LossWeights", "nearest_embeddings", "vq_loss", "contrastive_loss", "identity_gather", "Gather",
           "MeanOverRanks", "over_global_tokens"]
