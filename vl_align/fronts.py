"""Visual fronts: what sits between the frozen vision tower and the frozen LLM.

* ``qformer``: BLIP-2's Q-Former with its representation-stage heads (ITC projections, ITM head, temperature) and
  the projection W (d_qformer -> d_llm) whose output is aligned to P(y) and, in the generative stage, prefixes the LLM.
* ``elip``: the same Q-Former fed by a vision tower that prunes and fuses patches under text guidance (ELIP).
* ``tome``: SimVLG's connector, a BERT-like encoder over all vision tokens that merges tokens in every layer.

Every front's ``forward(mode, **inputs)`` returns a dict of features; the losses live in ``vl_align.losses`` and
``vl_align.alignment``, the objectives that combine them in ``vl_align.objectives``. One ``forward`` with a ``mode`` (instead of several
methods) keeps each call inside the module's forward, which DeepSpeed ZeRO-3 needs to gather parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from dvlp_common import zoo
from dvlp_common.config import Config, ConfigError, param

from .simvlg import TomeConnectorConfig
from .qformer import QFormer, QFormerConfig


@dataclass
class ElipFrontConfig(Config):
    prune_after_layers: list[int] = param(default_factory=lambda: [2, 4, 10], help="ViT layers after which to prune")
    lookahead_depths: list[int] = param(default_factory=lambda: [2, 6, 2], help="blocks run ahead to score patches")
    keep_ratios: list[float] = param(default_factory=lambda: [0.90, 0.65, 0.40], help="kept share of the original "
                                                                                        "patches at each point")
    text_weight: float = param(0.2, ge=0.0, le=1.0, help="[CLS] used for scoring = w·text_CLS + (1-w)·image_CLS")


@dataclass
class FrontConfig(Config):
    kind: Literal["qformer", "tome", "elip"] = param("qformer", help="visual front")
    init_from: str = param("minilm-l6", help="BERT-like checkpoint initialising the Q-Former / connector")
    num_query_tokens: int = param(8, ge=1, help="Q-Former queries (= P-Former prompts when aligning)")
    cross_attention_frequency: int = param(2, ge=1, help="a cross-attention layer every k layers (BLIP-2: 2)")
    embed_dim: int = param(256, ge=1, help="width of the ITC projections")
    temperature_init: float = param(0.07, gt=0.0, help="initial ITC temperature (learnable)")
    max_text_length: int = param(32, ge=4, help="token limit of the Q-Former's text input")
    elip: ElipFrontConfig = field(default_factory=ElipFrontConfig)
    tome: TomeConnectorConfig = field(default_factory=TomeConnectorConfig)


class QFormerFront(nn.Module):
    """Q-Former + BLIP-2 heads + the LLM projection W. Modes:

    ``queries``  (image_embeds, image_atts) -> query_output [B,Q,H], image_feats [B,Q,E], prompt_pred [B,Q,d_llm]
    ``text``     (input_ids, attention_mask) -> text_feat [B,E]
    ``match``    (image_embeds, image_atts, input_ids, attention_mask) -> itm_logits [B,2]
    ``caption``  (image_embeds, image_atts, input_ids, attention_mask) -> lm_logits [B,T,V]
    Every output also carries ``temperature``.
    """

    def __init__(self, config: FrontConfig, vision_width: int, llm_hidden_size: int, vision: nn.Module | None = None):
        super().__init__()
        self.config = config
        init = zoo.resolve(config.init_from) if config.init_from else None
        self.qformer = QFormer(QFormerConfig(vision_width=vision_width, init_from=init,
                                             num_query_tokens=config.num_query_tokens,
                                             cross_attention_frequency=config.cross_attention_frequency))
        hidden = self.qformer.hidden_size
        self.vision_proj = nn.Linear(hidden, config.embed_dim)
        self.text_proj = nn.Linear(hidden, config.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.llm_proj = nn.Linear(hidden, llm_hidden_size)  # W: aligned to P(y), then the LLM prefix
        self.temperature = nn.Parameter(torch.tensor([config.temperature_init]))  # [1]: DeepSpeed broadcasts bytes
        # ELIP: a vision tower run inside the front (its scoring needs the text); None for cached features
        self.vision = vision

    def _temperature(self) -> torch.Tensor:
        return self.temperature.clamp(0.001, 0.5)

    def _image(self, image_embeds=None, pixel_values=None, text_cls=None):
        if self.vision is None:
            return image_embeds
        if self.config.kind == "elip":
            return self.vision(pixel_values, text_cls=text_cls)[0]  # (tokens, pruning stats)
        return self.vision(pixel_values)

    def forward(self, mode: str, image_embeds: torch.Tensor | None = None, image_atts: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, text_cls: torch.Tensor | None = None) -> dict:
        q = self.qformer
        out: dict[str, torch.Tensor] = {"temperature": self._temperature()}
        if mode == "queries":
            image = self._image(image_embeds, pixel_values, text_cls)
            z = q.forward_queries(image, image_atts)  # [B, Q, H]
            out.update(query_output=z, image_feats=F.normalize(self.vision_proj(z), dim=-1),
                       prompt_pred=self.llm_proj(z), image_embeds=image)
        elif mode == "text":
            hidden = q.forward_text(input_ids, attention_mask)  # [B, T, H]
            out.update(text_feat=F.normalize(self.text_proj(hidden[:, 0]), dim=-1), text_cls=hidden[:, 0])
        elif mode == "match":
            hidden = q.forward_multimodal(image_embeds, image_atts, input_ids, attention_mask)  # [B, Q+T, H]
            out.update(itm_logits=self.itm_head(hidden[:, :q.num_query_tokens]).mean(1))
        elif mode == "caption":
            out.update(lm_logits=q.forward_generation(image_embeds, image_atts, input_ids, attention_mask))
        else:
            raise ValueError(f"unknown mode '{mode}'; expected queries, text, match or caption")
        return out


def build_front(config: FrontConfig, vision_width: int, llm_hidden_size: int, vision_tower=None) -> nn.Module:
    """``vision_tower`` is given when the tower must run inside the front (ELIP, or features not cached)."""
    if config.kind == "qformer":
        return QFormerFront(config, vision_width, llm_hidden_size, vision=vision_tower)
    if config.kind == "elip":
        from .elip import ElipConfig, ElipVisionTower

        if vision_tower is None:
            raise ConfigError("front.kind", "'elip' prunes inside the vision tower and needs the live tower")
        e = config.elip
        elip = ElipVisionTower(vision_tower.model, ElipConfig(prune_after_layers=tuple(e.prune_after_layers),
                                                              lookahead_depths=tuple(e.lookahead_depths),
                                                              keep_ratios=tuple(e.keep_ratios),
                                                              text_weight=e.text_weight))
        elip.requires_grad_(False)  # the tower stays frozen; only pruning changes
        front = QFormerFront(config, vision_width, llm_hidden_size, vision=elip)
        if front.qformer.hidden_size != vision_width:
            raise ConfigError("front.kind", f"ELIP mixes the Q-Former's text [CLS] (width {front.qformer.hidden_size})"
                                            f" into the image [CLS] (width {vision_width}); the widths must match")
        return front
    raise ConfigError("front.kind", f"'{config.kind}' has no representation stage (SimVLG trains the connector with "
                                    "the LM loss only: use the generative stage)")


__all__ = ["FrontConfig", "ElipFrontConfig", "QFormerFront", "build_front"]
