"""Stage 2b: the front's output, projected to the LLM's width, prefixes the frozen LLM.

    image ──frozen ViT──► front (Q-Former | ELIP-pruned ViT + Q-Former | ToMe connector) ──W──► prefix [B, P, d_llm]
    loss = w_lm · LM(caption | prefix [, prompt]) + ω₂ · align(W·Z, P(y))

For the ``tome`` front P is the number of tokens left after merging; SimVLG trains it with the LM loss alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dvlp_common.config import Config, ConfigError, param
from pformer.llm import FrozenLLM

from .alignment import AlignmentConfig, AlignmentStats, alignment_diagnostics, alignment_loss
from .losses import Gather, MeanOverRanks, identity
from .objectives import diagnostic_prompts, video_kwargs


@dataclass
class GenerativeWeights(Config):
    lm: float = param(1.0, ge=0.0, help="weight of the LLM's caption loss (0 with alignment > 0: the MSE-only "
                                        "variant)")
    train_prompt: str = param("", help="text between the prefix and the caption in training (e.g. 'a photo of ')")


@dataclass
class GenerativeBatch:
    record_ids: list[str]
    target_ids: torch.Tensor  # [B, T] LLM tokens of the caption + suffix
    target_mask: torch.Tensor
    image_embeds: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None  # [B, T, 3, S, S] for a video front
    frozen_hidden_videos: torch.Tensor | None = None  # [B, T, N, C] a video front's frozen blocks, cached
    qformer_ids: torch.Tensor | None = None  # ELIP's text guidance needs the Q-Former's text pass
    qformer_mask: torch.Tensor | None = None
    targets: torch.Tensor | None = None  # [B, n, d_llm] the alignment's target: P(y), or the control's corpus mean
    caption_prompts: torch.Tensor | None = None  # [B, n, d_llm] the captions' P(y), for the diagnostics
    prompt_ids: torch.Tensor | None = None  # [B, Tp] training prompt
    prompt_mask: torch.Tensor | None = None


def generative_loss(front, llm: FrozenLLM, batch: GenerativeBatch, weights: GenerativeWeights,
                    align: AlignmentConfig, stats: AlignmentStats | None = None, gather: Gather = identity,
                    rank: int = 0, mean_count_over_ranks: MeanOverRanks = identity
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``gather`` and ``rank`` serve the alignment over the global batch; ``mean_count_over_ranks`` (the mean of a
    tensor over the ranks) makes the LM loss a mean over the global batch's caption tokens (see
    ``FrozenLLM.prefix_lm``). Identity in one process."""
    text_cls = None
    if batch.pixel_values is not None and batch.qformer_ids is not None:
        text_cls = front("text", input_ids=batch.qformer_ids, attention_mask=batch.qformer_mask)["text_cls"].detach()
    out = front("queries", image_embeds=batch.image_embeds, pixel_values=batch.pixel_values, text_cls=text_cls,
                **video_kwargs(batch))
    prefix = out["prompt_pred"]  # [B, P, d_llm]
    parts: dict[str, torch.Tensor] = {}
    zero = prefix.new_zeros(())
    if weights.lm:
        prompt_embeds = llm.embed(batch.prompt_ids) if batch.prompt_ids is not None else None
        parts["lm"] = llm.prefix_lm(prefix, batch.target_ids, batch.target_mask, prompt_embeds=prompt_embeds,
                                    prompt_mask=batch.prompt_mask, mean_count_over_ranks=mean_count_over_ranks).loss
    else:
        parts["lm"] = zero
    comparable = batch.targets is not None and prefix.shape[1:] == batch.targets.shape[1:]
    if align.weight and batch.targets is not None:
        if not comparable:
            raise ConfigError("align.weight", f"the prefix is {list(prefix.shape[1:])} but P(y) is "
                                              f"{list(batch.targets.shape[1:])}; alignment needs equal shapes")
        parts["align"] = alignment_loss(prefix, batch.targets, align.kind, stats.center if stats else None,
                                        stats.scale if stats else None, gather, rank)
    else:
        parts["align"] = zero
    if comparable:  # diagnostics, the baseline's (ω = 0) included
        parts.update(alignment_diagnostics(prefix, diagnostic_prompts(batch), stats.center if stats else None))
        if weights.lm:
            parts["align_share"] = (align.weight * parts["align"] / parts["lm"].clamp_min(1e-12)).detach()
    return weights.lm * parts["lm"] + align.weight * parts["align"], parts


@torch.no_grad()
def generate(front, llm: FrozenLLM, image_embeds: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
             prompts: list[str] | None = None, pixel_values_videos: torch.Tensor | None = None,
             **generate_kwargs) -> list[str]:
    """Captions or answers for a batch of images or clips (greedy, beam or nucleus through ``generate_kwargs``)."""
    videos = {} if pixel_values_videos is None else {"pixel_values_videos": pixel_values_videos}
    out = front("queries", image_embeds=image_embeds, pixel_values=pixel_values, **videos)
    return llm.generate(out["prompt_pred"], prompts=prompts, **generate_kwargs)


class GenerativeCollator:
    """The sample ids of a micro-step -> a ``GenerativeBatch``: the caption as the LLM's target, the images
    (``images(list_of_images, device)``), the P(y) targets (``targets(captions, device)`` or None), the Q-Former's
    tokens of the caption when ELIP's pruning needs the text (``qformer_tokenizer``), and the training prompt."""

    def __init__(self, pairs, llm: FrozenLLM, max_text_length: int, images, targets=None, qformer_tokenizer=None,
                 train_prompt: str = "", device="cpu"):
        self.pairs, self.llm, self.max_text_length = pairs, llm, max_text_length
        self.images, self.targets, self.qformer_tokenizer = images, targets, qformer_tokenizer
        self.train_prompt, self.device = train_prompt, device

    def __call__(self, ids: list[int], step: int) -> GenerativeBatch:
        return self.batch([self.pairs[i] for i in ids], step)

    def batch(self, pairs: list, step: int) -> GenerativeBatch:
        """The batch of these records (a streamed source gives records, not ids)."""
        captions = [r.caption for r in pairs]
        target_ids, target_mask = self.llm.tokenize_targets(captions, self.max_text_length, self.device)
        batch = GenerativeBatch(record_ids=[r.image_id for r in pairs], target_ids=target_ids,
                                target_mask=target_mask,
                                **(self.targets.batch_fields(captions, self.device) if self.targets is not None
                                   else {}),
                                **self.images([r.image for r in pairs], self.device))
        if self.qformer_tokenizer is not None:
            tok = self.qformer_tokenizer(captions, padding=True, truncation=True, max_length=self.max_text_length,
                                         return_tensors="pt")
            batch.qformer_ids, batch.qformer_mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        if self.train_prompt:
            p = self.llm.tokenizer([self.train_prompt] * len(pairs), add_special_tokens=False, return_tensors="pt")
            batch.prompt_ids, batch.prompt_mask = p.input_ids.to(self.device), p.attention_mask.to(self.device)
        return batch


__all__ = ["GenerativeWeights", "GenerativeBatch", "GenerativeCollator", "generative_loss", "generate"]
