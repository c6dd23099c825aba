"""Visual fronts: what sits between the frozen vision tower and the frozen LLM.

* ``qformer``: BLIP-2's Q-Former with its representation-stage heads (ITC projections, ITM head, temperature) and
  the projection W (d_qformer -> d_llm) whose output is aligned to P(y) and, in the generative stage, prefixes the LLM.
* ``elip``: the same Q-Former fed by a vision tower that prunes and fuses patches under text guidance (ELIP).
* ``tome``: SimVLG's connector, a BERT-like encoder over all vision tokens that merges tokens in every layer.

``video.enabled`` turns a ``tome`` or ``qformer`` front into a video front: its tower (``vl_align.video``) carries
SimVLG's temporal modules, runs live on ``pixel_values_videos`` [B, T, 3, H, W] (or from the blocks above the frozen
ones on ``frozen_hidden_videos`` [B, T, N, D], ``vl_align.video_cache``) and averages the frames into the [B, N, D]
tokens the connector takes.

This module is their one entry point: ``build_front`` for every kind, ``needs_live_tower`` (does the tower run inside
the front, or do its features come from the cache), ``save_front`` / ``load_front``. The ideas themselves live in
``qformer.py`` (Q-Former), ``elip.py`` (ELIP's pruning) and ``simvlg.py`` (SimVLG's connector and front).

Every front's ``forward(mode, **inputs)`` returns a dict of features; the losses live in ``vl_align.losses`` and
``vl_align.alignment``, the objectives that combine them in ``vl_align.objectives``. One ``forward`` with a ``mode``
(instead of several methods) keeps each call inside the module's forward, which DeepSpeed ZeRO-3 needs to gather
parameters.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dvlp_common import zoo
from dvlp_common.config import Config, ConfigError, build, param, to_dict
from dvlp_common.io import building_folder
from pformer.llm import FrozenLLM

from .elip import ElipConfig, ElipVisionTower
from .qformer import QFormer, QFormerConfig
from .simvlg import TomeConnector, TomeConnectorConfig, TomeFront
from .video import VideoConfig, VideoVisionTower
from .vision import VisionTower, VisionTowerConfig


@dataclass
class FrontConfig(Config):
    kind: Literal["qformer", "tome", "elip"] = param("qformer", help="visual front")
    init_from: str = param("minilm-l6", help="BERT-like checkpoint initialising the Q-Former / connector")
    num_query_tokens: int = param(8, ge=1, help="Q-Former queries (= P-Former prompts when aligning)")
    cross_attention_frequency: int = param(2, ge=1, help="a cross-attention layer every k layers (BLIP-2: 2)")
    embed_dim: int = param(256, ge=1, help="width of the ITC projections")
    temperature_init: float = param(0.07, gt=0.0, help="initial ITC temperature (learnable)")
    max_text_length: int = param(32, ge=4, help="token limit of the Q-Former's text input")
    elip: ElipConfig = field(default_factory=ElipConfig)
    tome: TomeConnectorConfig = field(default_factory=TomeConnectorConfig)
    video: VideoConfig = field(default_factory=VideoConfig)

    def check(self) -> None:
        if self.video.enabled and self.kind == "elip":
            raise ConfigError("video.enabled", "the video front runs on the 'tome' or 'qformer' connector; ELIP's "
                                               "text-guided pruning has no video form here")


class QFormerFront(nn.Module):
    """Q-Former + BLIP-2 heads + the LLM projection W. Modes:

    ``queries``  (image_embeds, image_atts) -> query_output [B,Q,H], image_feats [B,Q,E], prompt_pred [B,Q,d_llm]
    ``text``     (input_ids, attention_mask) -> text_feat [B,E]
    ``match``    (image_embeds, image_atts, input_ids, attention_mask) -> itm_logits [B,2]
    ``caption``  (image_embeds, image_atts, input_ids, attention_mask) -> lm_logits [B,T,V]
    Every output also carries ``temperature``.
    """

    def __init__(self, config: FrontConfig, vision_width: int, llm_hidden_size: int, vision: nn.Module | None = None,
                 qformer: QFormer | None = None):
        super().__init__()
        self.config = config
        if qformer is None:
            init = zoo.resolve(config.init_from) if config.init_from else None
            qformer = QFormer(QFormerConfig(vision_width=vision_width, init_from=init,
                                            num_query_tokens=config.num_query_tokens,
                                            cross_attention_frequency=config.cross_attention_frequency))
        else:  # built elsewhere with a checkpoint's sizes (vl_align.checkpoints): it must be what config says
            built = (qformer.num_query_tokens, qformer.config.cross_attention_frequency, qformer.config.vision_width)
            wanted = (config.num_query_tokens, config.cross_attention_frequency, vision_width)
            if built != wanted:
                raise ValueError(f"the given Q-Former has (queries, cross-attention frequency, vision width) {built}, "
                                 f"the front config {wanted}")
        self.qformer = qformer
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

    def _image(self, image_embeds=None, pixel_values=None, text_cls=None, pixel_values_videos=None,
               frozen_hidden_videos=None):
        if self.vision is None:
            return image_embeds
        if self.config.kind == "elip":
            return self.vision(pixel_values, text_cls=text_cls)[0]  # (tokens, pruning stats)
        if isinstance(self.vision, VideoVisionTower):
            # [B, N, D]: the mean over the frames; from the cached frozen blocks' output [B, T, N, D] when given
            return self.vision(pixel_values_videos, frozen_hidden=frozen_hidden_videos)
        return self.vision(pixel_values)

    def forward(self, mode: str, image_embeds: torch.Tensor | None = None, image_atts: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, text_cls: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None,
                frozen_hidden_videos: torch.Tensor | None = None) -> dict:
        q = self.qformer
        out: dict[str, torch.Tensor] = {"temperature": self._temperature()}
        if mode == "queries":
            image = self._image(image_embeds, pixel_values, text_cls, pixel_values_videos, frozen_hidden_videos)
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


def needs_live_tower(front: FrontConfig, vision: VisionTowerConfig) -> bool:
    """Whether the frozen tower runs inside the front at every step (pixels in) instead of serving features from the
    vision-feature cache: ELIP prunes inside the tower under the text's guidance, a video front's temporal modules
    train inside the tower's blocks (cached features would not follow them), and a tower whose features are not
    cached (``vision.cache_features=false``) has nothing to serve them from."""
    return front.kind == "elip" or front.video.enabled or not vision.cache_features


def build_front(config: FrontConfig, vision_width: int, llm_hidden_size: int, vision_tower=None) -> nn.Module:
    """The front of ``config.kind``; ``vision_tower`` is given when the tower runs inside it (``needs_live_tower``)."""
    if config.video.enabled:
        if vision_tower is None:
            raise ConfigError("front.video.enabled", "the video front's temporal modules train inside the vision "
                                                     "tower's blocks, so the vision-feature cache cannot serve it; "
                                                     "build it with the live tower (needs_live_tower is true)")
        vision_tower = VideoVisionTower(vision_tower, config.video)
    if config.kind == "tome":
        connector = TomeConnector.build(config.tome, vision_width)
        return TomeFront(connector, connector.hidden_size, llm_hidden_size, vision=vision_tower)
    if config.kind == "qformer":
        return QFormerFront(config, vision_width, llm_hidden_size, vision=vision_tower)
    if vision_tower is None:
        raise ConfigError("front.kind", "'elip' prunes inside the vision tower and needs the live tower")
    elip = ElipVisionTower(vision_tower.model, config.elip)
    elip.requires_grad_(False)  # the tower stays frozen; only pruning changes
    front = QFormerFront(config, vision_width, llm_hidden_size, vision=elip)
    if front.qformer.hidden_size != vision_width:
        raise ConfigError("front.kind", f"ELIP mixes the Q-Former's text [CLS] (width {front.qformer.hidden_size}) "
                                        f"into the image [CLS] (width {vision_width}); the widths must match")
    return front


# ---------------------------------------------------------------------------------------------------------------
# saving and loading: ``front/`` = model.safetensors (the trained weights; a tower inside the front is frozen and
# not saved, except a video tower's temporal modules) + front_config.json (the configs that rebuild it, the LLM and
# the input layout W was trained for)
WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "front_config.json"
TRAINED_IN_TOWER = "vision.temporal."  # VideoVisionTower.temporal: trained inside the tower, saved with the front


def _frozen_tower_key(key: str) -> bool:
    return key.startswith("vision.") and not key.startswith(TRAINED_IN_TOWER)


def save_front(front: nn.Module, out_dir: str | Path, front_config: FrontConfig, vision_config: VisionTowerConfig,
               llm: str, bos_before_prefix: bool) -> Path:
    """Write ``out_dir`` atomically; ``bos_before_prefix`` is the LLM input layout (``FrozenLLM``) W was trained for."""
    out_dir = Path(out_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in front.state_dict().items() if not _frozen_tower_key(k)}
    with building_folder(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps({"front": to_dict(front_config), "vision": to_dict(vision_config),
                                                   "llm": llm, "bos_before_prefix": bos_before_prefix}, indent=2))
    return out_dir


def load_front_weights(front: nn.Module, folder: str | Path, key: str = "init_front") -> None:
    """Load a saved front's weights into ``front`` (e.g. the generative stage starting from stage 2a's front); a
    front of another shape is a ConfigError naming ``key``."""
    state = load_file(str(Path(folder) / WEIGHTS_NAME))
    missing, unexpected = front.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _frozen_tower_key(k)]  # a live tower's frozen weights are not saved
    if missing or unexpected:
        raise ConfigError(key, f"{folder} does not fit this front: missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_front(front_dir: str | Path):
    """A ``front/`` folder of any kind, with the frozen tower and LLM it was trained with: ``(front in eval mode,
    tower, llm, front_config.json)``. An ELIP front loads as the Q-Former front it is outside pre-training (pruning
    runs only in training), over the tower's features; a video front loads with the tower inside it (it takes
    ``pixel_values_videos``)."""
    folder = Path(front_dir)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found; give the front/ folder of a stage-2a or 2b run")
    meta = json.loads((folder / CONFIG_NAME).read_text())
    front_cfg = build(FrontConfig, meta["front"], "front_config.front")
    tower = VisionTower.build(build(VisionTowerConfig, meta["vision"], "front_config.vision"))
    llm = FrozenLLM.load(meta["llm"], bos_before_prefix=meta.get("bos_before_prefix", True))
    if front_cfg.kind == "elip":  # no tower inside: the Q-Former front over cached features
        front = QFormerFront(front_cfg, tower.hidden_size, llm.hidden_size)
    else:
        front = build_front(front_cfg, tower.hidden_size, llm.hidden_size,
                            vision_tower=tower if front_cfg.video.enabled else None)
    load_front_weights(front, folder, key="front")
    return front.eval(), tower, llm, meta


__all__ = ["FrontConfig", "QFormerFront", "needs_live_tower", "build_front", "save_front", "load_front",
           "load_front_weights"]
