"""Stage-2 objectives: how a front's features and the losses combine into one training loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dvlp_common.config import Config, param
from dvlp_common.seeding import step_seed

from .alignment import AlignmentConfig, AlignmentStats, alignment_diagnostics, alignment_loss
from .losses import Gather, MeanOverRanks, identity, itc_loss, itg_loss, itm_loss, sample_hard_negatives


@dataclass
class RepresentationWeights(Config):
    itc: float = param(1.0, ge=0.0, help="image-text contrastive")
    itm: float = param(1.0, ge=0.0, help="image-text matching with hard negatives")
    itg: float = param(1.0, ge=0.0, help="image-grounded text generation")
    label_smoothing: float = param(0.1, ge=0.0, lt=1.0, help="label smoothing of ITC and ITG")


@dataclass
class RepresentationBatch:
    record_ids: list[str]
    input_ids: torch.Tensor  # [B, T] Q-Former tokens, [CLS] first
    attention_mask: torch.Tensor  # [B, T]
    decoder_input_ids: torch.Tensor  # [B, T] the same with [DEC] first (ITG)
    caption_ids: torch.Tensor  # [B] an id per distinct caption: equal captions are positives for ITC
    image_embeds: torch.Tensor | None = None  # [B, N, D] cached frozen features
    pixel_values: torch.Tensor | None = None  # [B, 3, S, S] when the tower runs live (ELIP)
    pixel_values_videos: torch.Tensor | None = None  # [B, T, 3, S, S] for a video front
    frozen_hidden_videos: torch.Tensor | None = None  # [B, T, N, C] a video front's frozen blocks, cached
    targets: torch.Tensor | None = None  # [B, n, d_llm] the alignment's target: P(y), or the control's corpus mean
    caption_prompts: torch.Tensor | None = None  # [B, n, d_llm] the captions' P(y), for the diagnostics
    noise_seed: int = 0  # seeds the hard-negative draws of this global batch (the same on every rank)


def _pad_right(x: torch.Tensor, length: int) -> torch.Tensor:
    """[B, T] -> [B, length] with zeros appended (token id 0 under attention mask 0: ignored)."""
    return torch.nn.functional.pad(x, (0, length - x.shape[1]))


def representation_loss(front: Callable[..., dict], batch: RepresentationBatch, weights: RepresentationWeights,
                        align: AlignmentConfig, stats: AlignmentStats | None = None, gather: Gather = identity,
                        gather_nograd: Gather = identity, rank: int = 0,
                        mean_count_over_ranks: MeanOverRanks = identity) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BLIP-2 stage-1 losses (ITC + ITM + ITG) plus ω·alignment(W·Z, P(y)). ``front`` is the module or its engine.

    ``gather``, ``gather_nograd`` and ``rank`` serve the global-batch losses; ``mean_count_over_ranks`` (the mean of a
    tensor over the ranks) makes ITG a mean over the global batch's tokens. Identity in one process."""
    text = front("text", input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    queries = front("queries", image_embeds=batch.image_embeds, pixel_values=batch.pixel_values,
                    text_cls=text["text_cls"].detach(), **video_kwargs(batch))
    image_embeds = queries["image_embeds"]
    b = image_embeds.shape[0]
    parts: dict[str, torch.Tensor] = {}
    zero = queries["query_output"].new_zeros(())

    # ITC over the global batch; captions that are equal count as positives
    all_caption_ids = gather_nograd(batch.caption_ids)
    positives = batch.caption_ids[:, None] == all_caption_ids[None, :]
    itc, sim_i2t, sim_t2i = itc_loss(queries["image_feats"], text["text_feat"], queries["temperature"], gather, rank,
                                     weights.label_smoothing, positives)
    parts["itc"] = itc

    if weights.itm:
        # one draw per sample of the global batch, taken by global position: independent of the rank layout
        draws = torch.rand(all_caption_ids.shape[0], 2, generator=torch.Generator().manual_seed(batch.noise_seed))
        neg_text, neg_image = sample_hard_negatives(sim_i2t.detach(), sim_t2i.detach(), rank, positives,
                                                    draws[rank * b:(rank + 1) * b].to(sim_i2t.device))
        all_images = gather_nograd(image_embeds.detach())
        # each rank pads its captions to its own longest: pad to the global longest before gathering
        length = int(gather_nograd(torch.tensor([batch.input_ids.shape[1]], device=batch.input_ids.device)).max())
        local_ids, local_mask = _pad_right(batch.input_ids, length), _pad_right(batch.attention_mask, length)
        all_ids, all_mask = gather_nograd(local_ids), gather_nograd(local_mask)
        images = torch.cat([image_embeds, all_images[neg_image], image_embeds])
        ids = torch.cat([local_ids, local_ids, all_ids[neg_text]])
        mask = torch.cat([local_mask, local_mask, all_mask[neg_text]])
        logits = front("match", image_embeds=images, input_ids=ids, attention_mask=mask)["itm_logits"]
        parts["itm"] = itm_loss(logits, num_positive=b)
    else:
        parts["itm"] = zero
    if weights.itg:
        lm_logits = front("caption", image_embeds=image_embeds, input_ids=batch.decoder_input_ids,
                          attention_mask=batch.attention_mask)["lm_logits"]
        parts["itg"] = itg_loss(lm_logits, batch.decoder_input_ids, batch.attention_mask, weights.label_smoothing,
                                mean_count_over_ranks)
    else:
        parts["itg"] = zero
    if align.weight and batch.targets is not None:
        parts["align"] = alignment_loss(queries["prompt_pred"], batch.targets, align.kind,
                                        stats.center if stats else None, stats.scale if stats else None,
                                        gather, rank)
    else:
        parts["align"] = zero
    primary = weights.itc * parts["itc"] + weights.itm * parts["itm"] + weights.itg * parts["itg"]
    if batch.targets is not None:  # diagnostics, the baseline's (ω = 0) included
        parts.update(alignment_diagnostics(queries["prompt_pred"], diagnostic_prompts(batch),
                                           stats.center if stats else None))
        parts["align_share"] = (align.weight * parts["align"] / primary.clamp_min(1e-12)).detach()
    return primary + align.weight * parts["align"], parts


def diagnostic_prompts(batch) -> torch.Tensor:
    """What the alignment diagnostics compare W·Z with: the captions' P(y) (a batch built by hand with ``targets``
    alone is taken to align to its captions)."""
    return batch.caption_prompts if batch.caption_prompts is not None else batch.targets


def video_kwargs(batch) -> dict:
    """``pixel_values_videos`` (or the cached ``frozen_hidden_videos``) for the front when the batch has clips;
    nothing otherwise (fronts built elsewhere, e.g. from a published checkpoint, take no such argument)."""
    return {k: v for k in ("pixel_values_videos", "frozen_hidden_videos")
            if (v := getattr(batch, k, None)) is not None}


def decoder_start_id(tokenizer) -> int:
    """BLIP-2's [DEC] token for ITG: the tokenizer's BOS, else BERT's spare [unused0], else [CLS]."""
    for token in (tokenizer.bos_token, "[unused0]"):
        if token is not None and token in tokenizer.get_vocab():
            return tokenizer.convert_tokens_to_ids(token)
    return tokenizer.cls_token_id


class RepresentationCollator:
    """The sample ids of a micro-step -> a ``RepresentationBatch``: the captions as the Q-Former tokenizes them,
    the same with [DEC] first for ITG, caption ids, the images (``images(list_of_images, device)``, e.g. an
    ``ImageInputs``) and the P(y) targets (``targets(captions, device)`` or None)."""

    def __init__(self, pairs, tokenizer, max_text_length: int, caption_index: dict[str, int], images,
                 targets=None, seed: int = 0, device="cpu"):
        self.pairs, self.tokenizer, self.max_text_length = pairs, tokenizer, max_text_length
        self.caption_index, self.images, self.targets = caption_index, images, targets
        self.seed, self.device = seed, device
        self.dec_id = decoder_start_id(tokenizer)

    def __call__(self, ids: list[int], step: int) -> RepresentationBatch:
        return self.batch([self.pairs[i] for i in ids], step)

    def batch(self, pairs: list, step: int) -> RepresentationBatch:
        """The batch of these records (a streamed source gives records, not ids)."""
        captions = [r.caption for r in pairs]
        tok = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_text_length,
                             return_tensors="pt")
        dec = tok.input_ids.clone()
        dec[:, 0] = self.dec_id
        return RepresentationBatch(
            record_ids=[r.image_id for r in pairs], input_ids=tok.input_ids.to(self.device),
            attention_mask=tok.attention_mask.to(self.device), decoder_input_ids=dec.to(self.device),
            caption_ids=torch.tensor([self.caption_index[c] for c in captions], device=self.device),
            # the same on every rank: hard negatives are drawn by global position
            noise_seed=step_seed(self.seed, step, 0),
            **(self.targets.batch_fields(captions, self.device) if self.targets is not None else {}),
            **self.images([r.image for r in pairs], self.device))


__all__ = ["RepresentationWeights", "RepresentationBatch", "representation_loss", "decoder_start_id", "video_kwargs",
           "RepresentationCollator"]
