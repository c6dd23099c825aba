"""SimVLG (Jian et al. 2023, arXiv 2310.03291): the token-merging connector and the front built on it.

SimVLG replaces BLIP-2's Q-Former by a plain BERT-like encoder run over *all* vision tokens (projected to the
encoder width): no learned queries and no cross-attention. To keep the cost and the number of soft-prompt tokens
down, every layer merges ``r`` tokens with ToMe's bipartite soft matching (Bolya et al. 2022), e.g. the authors'
``r = 19`` per layer turns ViT-g's 257 tokens into ``257 - 12 * 19 = 29`` over 12 layers.

Pipeline::

    vision_embeds [B, N, Dv] -> input_proj (Linear Dv->H) -> LayerNorm -> dropout -> x [B, N, H], size = 1
    for each layer l (a transformers ``BertLayer``, reused as is, not forked):
        a       = layer.attention(x, attention_mask=bias)[0]       # self-attn + dense + dropout + residual + LN
        metric  = mean over heads of layer.attention.self.key(x)  # [B, N_l, head_dim]; same input the attention saw
        merge,_ = bipartite_soft_matching(metric, r_l, class_token)
        a, size = merge_wavg(merge, a, size)   (size_weighted)  |  a = merge(a, "mean"), size = merge(size, "sum")
        x       = layer.output(layer.intermediate(a), a)           # MLP + dropout + residual + LN (post-LN)
    -> tokens [B, N_final, H], size [B, N_final, 1]

Where the merge sits. BERT is post-LN: ``BertAttention`` returns ``LayerNorm(x + dropout(dense(attn(x))))``, i.e. the
residual *and* the first LayerNorm are already applied. ToMe (pre-LN ViT) merges the residual stream right after
``x = x + attn(norm1(x))`` and before the MLP; the post-LN equivalent is the attention *output* (the stream after
the residual add and its LayerNorm), which is what is merged here. The MLP then runs on the merged tokens, and
``BertOutput`` adds the merged tokens back as its residual before the second LayerNorm. Consequently, with ``r = 0``
each block is exactly ``BertLayer.forward`` (without ``chunk_size_feed_forward``, which only saves memory).

Matching metric. As in ToMe, the keys of the layer's self-attention averaged over heads:
``layer.attention.self.key(x)`` viewed as ``[B, N, heads, head_dim]`` and averaged over ``heads`` -> ``[B, N,
head_dim]``, computed from the same ``x`` the attention consumed (one extra ``key`` projection, without gradient;
the matching itself is not differentiable). ``bipartite_soft_matching`` L2-normalises it.

Options the SimVLG code leaves out and ToMe has (kept here, off or on by config):

* ``size_weighted`` (default True, ToMe): merged tokens are the size-weighted average of their group; False is the
  plain mean of the group, as in SimVLG's code. Sizes are tracked either way (returned, and used by
  proportional attention).
* ``proportional_attention`` (default False, as SimVLG): adds ``log(size)`` to the attention logits of every key
  (``proportional_attention_bias``, an additive float ``[B, 1, 1, N]`` mask that both the eager and the SDPA
  attention of transformers 5 add to the logits). Until the first merge all sizes are 1 and no bias is passed.

The merge schedule is fixed by the number of input tokens and layers: ``merge_schedule(num_layers, N, r,
class_token)``, which clamps each layer's ``r`` to what the matching can merge.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor, nn

from dvlp_common.config import Config, ConfigError, param
from vl_align.tome import (
    bipartite_soft_matching,
    merge_schedule,
    merge_wavg,
    proportional_attention_bias,
)

__all__ = ["TomeConnectorConfig", "TomeConnector", "TomeFront", "tome_bert_block"]


@dataclasses.dataclass
class TomeConnectorConfig(Config):
    """SimVLG connector: BERT-like layers over all projected vision tokens, ToMe merging in every layer."""

    init_from: str | None = param(
        "minilm-l6",
        help="BERT-like checkpoint (zoo preset, folder or hub name) whose encoder layers are reused; "
        "null = random BERT layers from the size fields below")
    num_layers: int | None = param(
        None, ge=1, help="use the first k encoder layers of the checkpoint; null = all of them "
        "(with init_from null: num_hidden_layers)")
    r: int | str | list[int] = param(
        8, help="tokens merged per layer: an int (every layer), 'decreasing:R' (R at the first layer down to 0 "
        "at the last), or a list with one int per layer; clamped per layer by merge_schedule")
    class_token: bool = param(True, help="token 0 of the vision sequence (the ViT [CLS]) never merges")
    size_weighted: bool = param(
        True, help="merge with the size-weighted average (ToMe); false = plain mean of each group (SimVLG code)")
    proportional_attention: bool = param(
        False, help="add log(token size) to the attention logits (ToMe); SimVLG does not")
    dropout: float | None = param(
        None, ge=0.0, le=1.0, help="override the hidden and attention dropout of the layers and the input "
        "projection; null = the checkpoint's (random init: hidden_dropout_prob below)")
    attn_implementation: Literal["eager", "sdpa"] | None = param(
        None, help="attention kernel of the BERT layers; null = the transformers default (sdpa)")
    # Sizes of the random BERT (init_from null only).
    hidden_size: int = param(768, ge=1, help="random init only: width of the layers")
    num_attention_heads: int = param(12, ge=1, help="random init only: attention heads")
    intermediate_size: int = param(3072, ge=1, help="random init only: MLP width")
    num_hidden_layers: int = param(12, ge=1, help="random init only: number of layers")
    hidden_dropout_prob: float = param(0.1, ge=0.0, le=1.0, help="random init only: BERT dropout")

    def check(self) -> None:
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError("init_from", "must be a model reference or null")
        if self.init_from is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError("hidden_size", f"{self.hidden_size} is not a multiple of num_attention_heads="
                                                 f"{self.num_attention_heads}")
            if self.num_layers is not None and self.num_layers > self.num_hidden_layers:
                raise ConfigError("num_layers", f"{self.num_layers} > num_hidden_layers={self.num_hidden_layers}")
        # Validate the form of r now; the length of a list is checked against the layer count when it is known.
        known = self.known_num_layers()
        layers = known if known is not None else (len(self.r) if isinstance(self.r, list) else 1)
        try:
            merge_schedule(layers, 1 << 20, self.r, self.class_token)
        except ValueError as err:
            raise ConfigError("r", str(err)) from None

    def known_num_layers(self) -> int | None:
        """The number of layers if the config alone determines it (else the checkpoint does)."""
        if self.num_layers is not None:
            return self.num_layers
        if self.init_from is None:
            return self.num_hidden_layers
        return None


def _head_mean_keys(layer: nn.Module, hidden: Tensor) -> Tensor:
    """ToMe metric: the layer's self-attention keys of ``hidden`` averaged over heads, ``[B, N, head_dim]``."""
    sa = layer.attention.self
    with torch.no_grad():
        keys = sa.key(hidden)
        return keys.view(*hidden.shape[:-1], -1, sa.attention_head_size).mean(dim=-2)


def tome_bert_block(
    layer: nn.Module,
    hidden: Tensor,
    size: Tensor | None,
    r: int,
    *,
    class_token: bool = True,
    size_weighted: bool = True,
    proportional_attention: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One BERT layer with a ToMe merge between the attention and the MLP, built from the layer's submodules.

    Args:
        layer: a transformers ``BertLayer`` (or one with the same submodules: ``attention`` (``.self.key``),
            ``intermediate``, ``output``), not a decoder.
        hidden: ``[B, N, H]`` input tokens.
        size: ``[B, N, 1]`` float token sizes, or None for all ones (then no proportional-attention bias is
            passed, so the attention runs exactly as in ``BertLayer``).
        r: tokens to merge in this layer (clamped by ``bipartite_soft_matching``; 0 = plain ``BertLayer``).

    Returns:
        ``(hidden [B, N - r, H], size)`` where ``size`` is ``[B, N - r, 1]`` float32 whatever the dtype of
        ``hidden``, or None if it was None and ``r == 0`` (nothing merged yet).
    """
    bias = None
    if proportional_attention and size is not None:
        bias = proportional_attention_bias(size).to(hidden.dtype)
    # Self-attention incl. BertSelfOutput: LayerNorm(hidden + dropout(dense(attn))) -- post-LN, residual included.
    attn_out = layer.attention(hidden, attention_mask=bias)[0]
    if r > 0:
        if size is None:
            size = hidden.new_ones(*hidden.shape[:-1], 1, dtype=torch.float32)
        metric = _head_mean_keys(layer, hidden)  # same input the attention used
        merge, _ = bipartite_soft_matching(metric, r, class_token)
        if size_weighted:
            merged, size = merge_wavg(merge, attn_out.float(), size)
            attn_out = merged.to(hidden.dtype)
        else:
            attn_out = merge(attn_out, mode="mean")
            size = merge(size, mode="sum")
    # MLP incl. BertOutput: LayerNorm(attn_out + dropout(dense(act(dense(attn_out))))).
    out = layer.output(layer.intermediate(attn_out), attn_out)
    return out, size


class TomeConnector(nn.Module):
    """SimVLG connector: ``vision_embeds [B, N, Dv] -> dict(tokens [B, N_final, H], size, tokens_per_layer)``."""

    def __init__(self, cfg: TomeConnectorConfig, vision_width: int, layers: nn.ModuleList, bert_config):
        super().__init__()
        self.cfg = cfg
        self.vision_width = int(vision_width)
        self.bert_config = bert_config
        self.hidden_size = int(bert_config.hidden_size)
        dropout = cfg.dropout if cfg.dropout is not None else float(bert_config.hidden_dropout_prob)
        self.input_proj = nn.Linear(self.vision_width, self.hidden_size)
        self.input_norm = nn.LayerNorm(self.hidden_size, eps=float(getattr(bert_config, "layer_norm_eps", 1e-12)))
        self.input_dropout = nn.Dropout(dropout)
        self.layers = layers

    @classmethod
    def build(cls, cfg: TomeConnectorConfig, vision_width: int) -> "TomeConnector":
        if vision_width < 1:
            raise ValueError(f"vision_width must be >= 1, got {vision_width}")
        if cfg.init_from is None:
            from transformers import BertConfig, BertModel

            bert_config = BertConfig(
                vocab_size=2, max_position_embeddings=2, type_vocab_size=1,  # embeddings are discarded
                hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                hidden_dropout_prob=cfg.hidden_dropout_prob, attention_probs_dropout_prob=cfg.hidden_dropout_prob)
            model = BertModel(bert_config, add_pooling_layer=False)
        else:
            from dvlp_common import zoo

            model = zoo.load_encoder(cfg.init_from)
        if cfg.attn_implementation is not None:
            model.set_attn_implementation(cfg.attn_implementation)
        bert_config = model.config
        all_layers = getattr(getattr(model, "encoder", None), "layer", None)
        if not isinstance(all_layers, nn.ModuleList) or not all(
                hasattr(l, "attention") and hasattr(l.attention, "self") and hasattr(l, "intermediate")
                and hasattr(l, "output") for l in all_layers):
            raise ConfigError("init_from", f"{cfg.init_from!r} ({type(model).__name__}) is not a BERT-like encoder "
                                           "(expected .encoder.layer[i].attention/.intermediate/.output)")
        if getattr(bert_config, "is_decoder", False):
            raise ConfigError("init_from", f"{cfg.init_from!r} is a decoder (causal self-attention); the connector "
                                           "needs a bidirectional encoder")
        k = cfg.num_layers if cfg.num_layers is not None else len(all_layers)
        if k > len(all_layers):
            raise ConfigError("num_layers", f"{k} > the {len(all_layers)} layers of {cfg.init_from!r}")
        try:
            merge_schedule(k, 1 << 20, cfg.r, cfg.class_token)
        except ValueError as err:
            raise ConfigError("r", str(err)) from None
        layers = nn.ModuleList(list(all_layers[:k]))
        del model, all_layers  # embeddings, pooler and the unused layers are dropped
        if cfg.dropout is not None:
            for module in layers.modules():
                if isinstance(module, nn.Dropout):
                    module.p = cfg.dropout
        return cls(cfg, vision_width, layers, bert_config)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def schedule(self, num_tokens: int) -> list[int]:
        """Per-layer r actually merged for ``num_tokens`` input tokens."""
        return merge_schedule(self.num_layers, num_tokens, self.cfg.r, self.cfg.class_token)

    def output_tokens(self, num_tokens: int) -> int:
        """Number of tokens the connector returns for ``num_tokens`` input tokens."""
        return num_tokens - sum(self.schedule(num_tokens))

    def forward(self, vision_embeds: Tensor) -> dict:
        """Run the connector.

        Args:
            vision_embeds: ``[B, N, Dv]`` all vision tokens (with ``class_token``, token 0 is the ViT [CLS]).

        Returns:
            dict with ``tokens`` ``[B, N_final, H]``; ``size`` ``[B, N_final, 1]`` float32, the number of input
            tokens each output token holds (sums to ``N`` per sample); ``tokens_per_layer`` ``list[int]`` of
            length ``num_layers``, the token count leaving each layer (after its merge), the last being
            ``N_final``; and ``schedule``, the per-layer r.
        """
        if vision_embeds.dim() != 3 or vision_embeds.shape[-1] != self.vision_width:
            raise ValueError(f"vision_embeds must be [B, N, {self.vision_width}], got {tuple(vision_embeds.shape)}")
        n_tok = vision_embeds.shape[1]
        schedule = self.schedule(n_tok)
        x = self.input_dropout(self.input_norm(self.input_proj(vision_embeds)))
        size = None
        tokens_per_layer = []
        for layer, r_l in zip(self.layers, schedule):
            x, size = tome_bert_block(
                layer, x, size, r_l, class_token=self.cfg.class_token, size_weighted=self.cfg.size_weighted,
                proportional_attention=self.cfg.proportional_attention)
            tokens_per_layer.append(x.shape[1])
        if size is None:  # nothing merged (no layers, or r = 0 everywhere)
            size = x.new_ones(*x.shape[:-1], 1, dtype=torch.float32)
        return {"tokens": x, "size": size, "tokens_per_layer": tokens_per_layer, "schedule": schedule}


class TomeFront(nn.Module):
    """SimVLG's front: the token-merging connector over all vision tokens, then W to the LLM width. Its only mode,
    ``queries``, returns the prefix ``prompt_pred`` [B, N_final, d_llm] and the merged tokens' sizes. ``vision`` is
    the frozen tower when it runs inside the front (features not cached), else None."""

    def __init__(self, connector: nn.Module, hidden_size: int, llm_hidden_size: int, vision: nn.Module | None = None):
        super().__init__()
        self.connector = connector
        self.llm_proj = nn.Linear(hidden_size, llm_hidden_size)
        self.vision = vision

    def forward(self, mode: str, image_embeds: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, frozen_hidden_videos: torch.Tensor | None = None,
                **_unused) -> dict:
        if mode != "queries":
            raise ValueError(f"the tome front only has the 'queries' mode, got '{mode}'")
        if frozen_hidden_videos is not None:  # a video tower from its frozen blocks' cached output [B, T, N, D]
            image_embeds = self.vision(frozen_hidden=frozen_hidden_videos)
        elif self.vision is not None:  # a video tower (vl_align.video) takes the clips, a plain one the images
            image_embeds = self.vision(pixel_values_videos if pixel_values_videos is not None else pixel_values)
        out = self.connector(image_embeds)
        return {"prompt_pred": self.llm_proj(out["tokens"]), "image_embeds": image_embeds,
                "token_size": out["size"], "tokens_per_layer": out["tokens_per_layer"]}
