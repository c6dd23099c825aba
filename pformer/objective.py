"""Stage-1 batches and objective: L = w_lm·L_lm + w_vq·L_vq + w_c·L_c.

Each sentence is encoded twice with independent 25% [MASK] corruption (two views); view A's prompts go to the LLM
(L_lm, L_vq), and the two views' [CLS] embeddings are the positive pair of L_c (SimCSE-style, masking being the
augmentation). The masking of a sentence is seeded by (seed, sample id, step), so it does not depend on how
the batch is split across ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .llm import FrozenLLM
from .losses import Gather, MeanOverRanks, Stage1LossWeights, contrastive_loss, identity_gather, vq_loss
from .model import mask_tokens


@dataclass
class TextBatch:
    sample_ids: list[int]
    input_ids: torch.Tensor  # [2B, T] view A rows then view B rows
    attention_mask: torch.Tensor  # [2B, T]
    target_ids: torch.Tensor  # [B, T'] LLM tokens of the sentence + suffix
    target_mask: torch.Tensor  # [B, T']


class Stage1Collator:
    def __init__(self, tokenizer, llm: FrozenLLM, max_length: int, mask_prob: float, seed: int):
        self.tokenizer, self.llm = tokenizer, llm
        self.max_length, self.mask_prob, self.seed = max_length, mask_prob, seed

    def _masked(self, ids: torch.Tensor, mask: torch.Tensor, sample_ids: list[int], view: int,
                step_key: int) -> torch.Tensor:
        rows = []
        for row_ids, row_mask, sid in zip(ids, mask, sample_ids):
            gen = torch.Generator().manual_seed(hash((self.seed, sid, view, step_key)) % 2 ** 63)
            rows.append(mask_tokens(row_ids[None], row_mask[None], self.tokenizer.mask_token_id,
                                    self.tokenizer.cls_token_id, self.mask_prob, gen)[0])
        return torch.stack(rows)

    def __call__(self, texts: list[str], sample_ids: list[int], step_key: int = 0, device="cpu") -> TextBatch:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        view_a = self._masked(enc.input_ids, enc.attention_mask, sample_ids, 0, step_key)
        view_b = self._masked(enc.input_ids, enc.attention_mask, sample_ids, 1, step_key)
        target_ids, target_mask = self.llm.tokenize_targets(texts, self.max_length)
        return TextBatch(sample_ids=list(sample_ids), input_ids=torch.cat([view_a, view_b]).to(device),
                         attention_mask=torch.cat([enc.attention_mask, enc.attention_mask]).to(device),
                         target_ids=target_ids.to(device), target_mask=target_mask.to(device))


def stage1_loss(pformer: Callable[..., dict[str, torch.Tensor]], llm: FrozenLLM, batch: TextBatch,
                weights: Stage1LossWeights, label_smoothing: float, gather: Gather = identity_gather,
                rank: int = 0, mean_count_over_ranks: MeanOverRanks = identity_gather
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``pformer`` is the module or the DeepSpeed engine wrapping it (its forward returns features).

    ``gather`` and ``rank`` serve L_c over the global batch; ``mean_count_over_ranks`` (the mean of a tensor over the
    ranks) makes L_lm a mean over the global batch's tokens (see ``FrozenLLM.prefix_lm``). Identity in one process.
    """
    out = pformer(batch.input_ids, batch.attention_mask)
    b = batch.target_ids.shape[0]
    prompts = out["prompts"][:b]  # view A
    parts: dict[str, torch.Tensor] = {}
    zero = prompts.new_zeros(())
    parts["lm"] = (llm.prefix_lm(prompts, batch.target_ids, batch.target_mask,
                                 mean_count_over_ranks=mean_count_over_ranks).loss if weights.lm else zero)
    parts["vq"] = vq_loss(prompts, llm.embedding_table) if weights.vq else zero
    if weights.contrastive:
        emb = out["embedding"]
        parts["contrastive"] = contrastive_loss(emb[:b], emb[b:], out["temperature"], gather, rank, label_smoothing)
    else:
        parts["contrastive"] = zero
    total = weights.lm * parts["lm"] + weights.vq * parts["vq"] + weights.contrastive * parts["contrastive"]
    return total, parts


__all__ = ["TextBatch", "Stage1Collator", "stage1_loss"]
