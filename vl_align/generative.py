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

from .alignment import AlignmentConfig, AlignmentStats, alignment_loss
from .losses import Gather, identity


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
    qformer_ids: torch.Tensor | None = None  # ELIP's text guidance needs the Q-Former's text pass
    qformer_mask: torch.Tensor | None = None
    targets: torch.Tensor | None = None  # P(y) [B, n, d_llm]
    prompt_ids: torch.Tensor | None = None  # [B, Tp] training prompt
    prompt_mask: torch.Tensor | None = None


def generative_loss(front, llm: FrozenLLM, batch: GenerativeBatch, weights: GenerativeWeights,
                    align: AlignmentConfig, stats: AlignmentStats | None = None, gather: Gather = identity,
                    rank: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    text_cls = None
    if batch.pixel_values is not None and batch.qformer_ids is not None:
        text_cls = front("text", input_ids=batch.qformer_ids, attention_mask=batch.qformer_mask)["text_cls"].detach()
    out = front("queries", image_embeds=batch.image_embeds, pixel_values=batch.pixel_values, text_cls=text_cls)
    prefix = out["prompt_pred"]  # [B, P, d_llm]
    parts: dict[str, torch.Tensor] = {}
    zero = prefix.new_zeros(())
    if weights.lm:
        prompt_embeds = llm.embed(batch.prompt_ids) if batch.prompt_ids is not None else None
        parts["lm"] = llm.prefix_lm(prefix, batch.target_ids, batch.target_mask, prompt_embeds=prompt_embeds,
                                    prompt_mask=batch.prompt_mask).loss
    else:
        parts["lm"] = zero
    if align.weight and batch.targets is not None:
        if prefix.shape[1:] != batch.targets.shape[1:]:
            raise ConfigError("align.weight", f"the prefix is {list(prefix.shape[1:])} but P(y) is "
                                              f"{list(batch.targets.shape[1:])}; alignment needs equal shapes")
        parts["align"] = alignment_loss(prefix, batch.targets, align.kind, stats.center if stats else None,
                                        stats.scale if stats else None, gather, rank)
    else:
        parts["align"] = zero
    return weights.lm * parts["lm"] + align.weight * parts["align"], parts


@torch.no_grad()
def generate(front, llm: FrozenLLM, image_embeds: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
             prompts: list[str] | None = None, **generate_kwargs) -> list[str]:
    """Captions or answers for a batch of images (greedy, beam or nucleus through ``generate_kwargs``)."""
    out = front("queries", image_embeds=image_embeds, pixel_values=pixel_values)
    return llm.generate(out["prompt_pred"], prompts=prompts, **generate_kwargs)


__all__ = ["GenerativeWeights", "GenerativeBatch", "generative_loss", "generate"]
