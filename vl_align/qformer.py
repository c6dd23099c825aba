"""The BLIP-2 Querying Transformer (Q-Former) as a library module.

The Q-Former is a BERT-sized encoder that runs two streams through one stack of layers:

* ``Q`` learned **query tokens** that self-attend among themselves and, every
  ``cross_attention_frequency``-th layer, cross-attend to frozen image features;
* an optional **text** part (BERT word + position embeddings) concatenated *after* the queries, that shares
  the self-attention layers with the queries but never cross-attends to the image and has its own
  feed-forward block.

This module builds on the layers of ``transformers.models.blip_2.modeling_blip_2`` rather than on a forked BERT:
``Blip2QFormerEncoder`` / ``Blip2QFormerLayer`` already implement exactly the BLIP-2 (LAVIS) layer, namely a joint
self-attention over ``[queries; text]``, cross-attention for the first ``query_length`` positions only, and
separate FFNs for queries (``intermediate_query``/``output_query``) and text (``intermediate``/``output``, present
when ``use_qformer_text_input=True``). Text embeddings reuse ``Blip2TextEmbeddings`` (word + position) followed by
one LayerNorm + dropout over the concatenated sequence, as in LAVIS' ``BertEmbeddings`` (whose LayerNorm is
``Blip2QFormerModel.layernorm`` in transformers). The LM head for image-grounded text generation reuses BERT's
``BertPredictionHeadTransform`` and a decoder tied to the word embeddings (LAVIS' ``BertLMHeadModel.cls``).

What this module does *not* do: tokenisation (LAVIS replaces the first token by a ``[DEC]`` BOS token for ITG, and
uses ``[CLS]`` for ITC/ITM), projections/heads for ITC/ITM, and losses. Those live with the training objectives;
here we only return features and logits.

The four entry points map onto BLIP-2's three stage-1 objectives::

    forward_queries     image -> queries             ITC image side, and the "soft prompt" for stage 2
    forward_text        text only, bidirectional     ITC text side
    forward_multimodal  queries + text, bidirectional, queries cross-attend     ITM
    forward_generation  queries + text under the multimodal causal mask -> LM logits    ITG
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Blip2QFormerConfig
from transformers.activations import ACT2FN
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerEncoder, Blip2TextEmbeddings

from dvlp_common.config import Config, ConfigError

__all__ = [
    "BertInitReport",
    "QFormer",
    "QFormerConfig",
    "QFormerLMHead",
    "build_attention_mask",
]

logger = logging.getLogger(__name__)

# BERT-base defaults, used for the sizes left as None when ``init_from`` is None.
_BERT_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02,
}
# Keys that define the architecture: with ``init_from`` they come from the checkpoint's config, and a value given
# here must agree with it.
_ARCH_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "pad_token_id",
)
# Keys that may be overridden freely on top of a checkpoint (regularisation / init only).
_FREE_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range")
_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(kw_only=True)
class QFormerConfig(Config):
    """Configuration of :class:`QFormer`.

    ``vision_width`` is the hidden size of the (frozen) image encoder whose features the queries cross-attend to.

    With ``init_from=None`` the model is randomly initialised with the sizes given here (``None`` means the
    BERT-base value). With ``init_from`` set to a BERT-like checkpoint folder (``config.json`` + weights, e.g. a
    BERT or MiniLM folder), the architecture keys (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``intermediate_size``, ``vocab_size``, ``max_position_embeddings``, ``hidden_act``, ``layer_norm_eps``,
    ``pad_token_id``) are read from the checkpoint's config; any such key given here must match it. Dropouts and
    ``initializer_range`` may be overridden freely.
    """

    vision_width: int
    init_from: str | Path | None = None
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    hidden_act: str | None = None
    layer_norm_eps: float | None = None
    pad_token_id: int | None = None
    hidden_dropout_prob: float | None = None
    attention_probs_dropout_prob: float | None = None
    initializer_range: float | None = None
    attn_implementation: str = "sdpa"

    def check(self) -> None:
        if not _is_int(self.vision_width) or self.vision_width <= 0:
            raise ConfigError("vision_width", f"must be a positive int, got {self.vision_width!r}")
        if self.init_from is not None:
            self.init_from = os.fspath(self.init_from)
            if not os.path.isfile(os.path.join(self.init_from, "config.json")):
                raise ConfigError("init_from", f"must be a checkpoint folder containing config.json, got "
                                               f"{self.init_from!r}")
        for key in ("num_query_tokens", "cross_attention_frequency"):
            value = getattr(self, key)
            if not _is_int(value) or value <= 0:
                raise ConfigError(key, f"must be a positive int, got {value!r}")
        for key in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
        ):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ConfigError(key, f"must be a positive int or None, got {value!r}")
        if self.pad_token_id is not None and (not _is_int(self.pad_token_id) or self.pad_token_id < 0):
            raise ConfigError("pad_token_id", f"must be a non-negative int or None, got {self.pad_token_id!r}")
        if self.hidden_act is not None and (not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN):
            raise ConfigError("hidden_act", f"must be one of transformers' ACT2FN names, got {self.hidden_act!r}")
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, key)
            if value is not None and (not _is_real(value) or not 0.0 <= value < 1.0):
                raise ConfigError(key, f"must be a float in [0, 1) or None, got {value!r}")
        for key in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, key)
            if value is not None and (not _is_real(value) or value <= 0):
                raise ConfigError(key, f"must be a positive float or None, got {value!r}")
        if self.attn_implementation not in _ATTN_IMPLEMENTATIONS:
            raise ConfigError("attn_implementation", f"must be one of {_ATTN_IMPLEMENTATIONS}, got "
                                                     f"{self.attn_implementation!r}")
        if self.hidden_size is not None and self.num_attention_heads is not None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError("hidden_size", f"({self.hidden_size}) must be divisible by num_attention_heads "
                                                 f"({self.num_attention_heads})")
        if self.num_hidden_layers is not None and self.cross_attention_frequency > self.num_hidden_layers:
            # layer 0 always has cross-attention, so this is legal, but almost certainly a typo
            logger.warning(
                "cross_attention_frequency=%d > num_hidden_layers=%d: only layer 0 cross-attends",
                self.cross_attention_frequency,
                self.num_hidden_layers,
            )

    # ------------------------------------------------------------------ conversions
    def resolved_sizes(self) -> dict[str, object]:
        """The effective architecture/regularisation values (checkpoint config, then this config, then BERT-base)."""
        values: dict[str, object] = {}
        if self.init_from is not None:
            from transformers import AutoConfig

            ckpt = AutoConfig.from_pretrained(self.init_from, local_files_only=True)
            for key in _ARCH_KEYS:
                if not hasattr(ckpt, key):
                    raise ValueError(
                        f"init_from: checkpoint config at {self.init_from!r} has no {key!r}; "
                        "only BERT-like configs are supported"
                    )
                ckpt_value = getattr(ckpt, key)
                mine = getattr(self, key)
                if mine is not None and mine != ckpt_value:
                    raise ValueError(
                        f"{key}={mine!r} disagrees with the init_from checkpoint ({ckpt_value!r}); "
                        "leave it as None to take the checkpoint's value"
                    )
                values[key] = ckpt_value
            if getattr(ckpt, "position_embedding_type", "absolute") != "absolute":
                raise ValueError("init_from: only absolute position embeddings are supported")
            for key in _FREE_KEYS:
                mine = getattr(self, key)
                values[key] = mine if mine is not None else getattr(ckpt, key, _BERT_BASE[key])
        else:
            for key in (*_ARCH_KEYS, *_FREE_KEYS):
                mine = getattr(self, key)
                values[key] = mine if mine is not None else _BERT_BASE[key]
        if values["pad_token_id"] is None:
            values["pad_token_id"] = 0
        if values["hidden_size"] % values["num_attention_heads"]:
            raise ValueError(
                f"hidden_size ({values['hidden_size']}) must be divisible by num_attention_heads "
                f"({values['num_attention_heads']})"
            )
        return values

    def to_hf_config(self) -> Blip2QFormerConfig:
        """The ``Blip2QFormerConfig`` the transformers layers are built from (text FFNs enabled)."""
        cfg = Blip2QFormerConfig(
            **self.resolved_sizes(),
            cross_attention_frequency=self.cross_attention_frequency,
            encoder_hidden_size=self.vision_width,
            use_qformer_text_input=True,
        )
        cfg._attn_implementation = self.attn_implementation
        return cfg

    @classmethod
    def from_hf_config(
        cls,
        hf_config: Blip2QFormerConfig,
        *,
        num_query_tokens: int = 32,
        attn_implementation: str = "sdpa",
    ) -> QFormerConfig:
        """Build from a ``transformers.Blip2QFormerConfig`` (e.g. ``Blip2Config.qformer_config``)."""
        return cls(
            vision_width=hf_config.encoder_hidden_size,
            num_query_tokens=num_query_tokens,
            cross_attention_frequency=hf_config.cross_attention_frequency,
            **{key: getattr(hf_config, key) for key in (*_ARCH_KEYS, *_FREE_KEYS)},
            attn_implementation=attn_implementation,
        )


# ---------------------------------------------------------------------------------------------- attention masks
MaskMode = Literal["queries", "text", "bidirectional", "multimodal_causal"]


def build_attention_mask(
    mode: MaskMode,
    num_queries: int,
    text_mask: torch.Tensor | None,
    *,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Additive self-attention mask ``[B, 1, Lq, Lk]`` (0 = attend, ``finfo.min`` = blocked) or ``None``.

    ``text_mask`` is the ``[B, T]`` 0/1 padding mask of the text part (``None`` = no text for ``"queries"``, or no
    padding otherwise). Modes (``Q`` queries followed by ``T`` text tokens):

    * ``"queries"``: queries only, all visible to each other -> ``None``;
    * ``"text"``: text only, bidirectional, padding keys blocked;
    * ``"bidirectional"``: queries + text, every position sees every non-padding position (ITM);
    * ``"multimodal_causal"``: the ITG mask (UniLM style). Queries see all queries and no text; a text token sees
      all queries and the text up to and including itself. E.g. ``Q = 3``, ``T = 4`` (rows attend to columns)::

                    keys:  q0 q1 q2 | t0 t1 t2 t3
            query  q0       1  1  1 |  0  0  0  0
                   q1       1  1  1 |  0  0  0  0
                   q2       1  1  1 |  0  0  0  0
                   ---------------------------------
            text   t0       1  1  1 |  1  0  0  0
                   t1       1  1  1 |  1  1  0  0
                   t2       1  1  1 |  1  1  1  0
                   t3       1  1  1 |  1  1  1  1

      and, as in every mode, text columns that are padding are blocked too. Because query rows never see text,
      the query states are identical to :meth:`QFormer.forward_queries`, which is what LAVIS obtains by caching the
      query keys/values (``past_key_values``) and running the text afterwards.

    Blocked scores use ``finfo(dtype).min`` rather than ``-inf`` so that a fully padded row stays finite.
    """
    if mode == "queries":
        if text_mask is not None:
            raise ValueError("mode='queries' takes no text_mask")
        return None
    neg = torch.finfo(dtype).min
    if text_mask is None:
        raise ValueError(f"mode={mode!r} needs text_mask (use torch.ones for unpadded text)")
    if text_mask.dim() != 2 or text_mask.shape[0] != batch_size:
        raise ValueError(f"text_mask must be [B={batch_size}, T], got {tuple(text_mask.shape)}")
    text_keep = text_mask.to(device=device).bool()
    if mode == "text":
        keys = text_keep
    else:
        keys = torch.cat([torch.ones(batch_size, num_queries, dtype=torch.bool, device=device), text_keep], dim=1)
    if mode in ("text", "bidirectional"):
        allowed = keys[:, None, None, :]  # [B, 1, 1, L]
    elif mode == "multimodal_causal":
        length = keys.shape[1]
        idx = torch.arange(length, device=device)
        row, col = idx[:, None], idx[None, :]
        is_query_row = row < num_queries
        is_query_col = col < num_queries
        # queries: only queries; text: all queries + causal over text
        pattern = torch.where(is_query_row, is_query_col, is_query_col | (col <= row))  # [L, L]
        allowed = pattern[None, None, :, :] & keys[:, None, None, :]  # [B, 1, L, L]
    else:
        raise ValueError(f"unknown mask mode {mode!r}")
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.full((), neg, dtype=dtype, device=device))


def _key_padding_mask(mask: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """``[B, N]`` 0/1 -> additive ``[B, 1, 1, N]`` (``None`` stays ``None``)."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"image_atts must be [B, Nv], got {tuple(mask.shape)}")
    keep = mask.to(device=device).bool()[:, None, None, :]
    return torch.where(
        keep, torch.zeros((), dtype=dtype, device=device), torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    )


# ---------------------------------------------------------------------------------------------- LM head
class QFormerLMHead(nn.Module):
    """BERT's MLM/LM head: ``transform`` (dense + act + LayerNorm, transformers' ``BertPredictionHeadTransform``),
    then a decoder whose weight *is* the word-embedding matrix (passed in at call time, so the tie cannot break and
    the state dict holds no duplicate), plus an output-only bias. LAVIS: ``Qformer.cls.predictions``."""

    def __init__(self, config: Blip2QFormerConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden_states), word_embeddings, self.bias)


# ---------------------------------------------------------------------------------------------- reports
@dataclass
class BertInitReport:
    """What :meth:`QFormer.init_from_bert` did.

    ``copied`` maps each Q-Former key that received a checkpoint tensor to its source key (the query FFN keys map
    to the text FFN they were copied from); ``initialised`` lists Q-Former keys with no counterpart in the
    checkpoint, which keep their random (BERT-style) initialisation: all cross-attention layers and the query
    tokens, and the LM head unless the checkpoint has an MLM head; ``skipped`` lists checkpoint keys with no
    Q-Former counterpart (token-type embeddings, pooler, ...).
    """

    source: str
    copied: dict[str, str] = field(default_factory=dict)
    initialised: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"init_from_bert({self.source}): copied {len(self.copied)} tensors, "
            f"newly initialised {len(self.initialised)}, skipped {len(self.skipped)} checkpoint keys "
            f"({', '.join(self.skipped) if self.skipped else 'none'})"
        )


# ---------------------------------------------------------------------------------------------- the model
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


class QFormer(nn.Module):
    """BLIP-2 Q-Former: learned queries + BERT text embeddings + transformers' ``Blip2QFormerEncoder``.

    Parameters (names follow transformers' ``Blip2ForImageTextRetrieval`` so that HF checkpoints map 1:1)::

        query_tokens                      [1, Q, H]
        embeddings.word_embeddings        [V, H]        (Blip2TextEmbeddings)
        embeddings.position_embeddings    [P, H]
        layernorm                         LayerNorm(H)  over [queries; text] (LAVIS: bert.embeddings.LayerNorm)
        encoder.layer.{i}.attention.*     self-attention (Blip2QFormerAttention)
        encoder.layer.{i}.crossattention.*  only where i % cross_attention_frequency == 0; kv width = vision_width
        encoder.layer.{i}.intermediate/output              text FFN
        encoder.layer.{i}.intermediate_query/output_query  query FFN
        lm_head.transform.*, lm_head.bias  ITG head; decoder tied to embeddings.word_embeddings

    If ``config.init_from`` is set, the constructor calls :meth:`init_from_bert` and keeps its report in
    ``self.init_report``.
    """

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        if not isinstance(config, QFormerConfig):
            raise TypeError(
                f"config must be a QFormerConfig (use QFormerConfig.from_hf_config for a Blip2QFormerConfig), "
                f"got {type(config).__name__}"
            )
        self.config = config
        self.hf_config = hf = config.to_hf_config()
        self.num_query_tokens = config.num_query_tokens
        self.hidden_size = hf.hidden_size

        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, hf.hidden_size))
        self.embeddings = Blip2TextEmbeddings(hf)
        self.layernorm = nn.LayerNorm(hf.hidden_size, eps=hf.layer_norm_eps)
        self.dropout = nn.Dropout(hf.hidden_dropout_prob)
        self.encoder = Blip2QFormerEncoder(hf)
        self.lm_head = QFormerLMHead(hf)

        self.apply(self._init_weights)
        nn.init.normal_(self.query_tokens, mean=0.0, std=hf.initializer_range)

        self.init_report: BertInitReport | None = None
        if config.init_from is not None:
            self.init_report = self.init_from_bert(config.init_from)
            logger.info(self.init_report.summary())

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BERT initialisation (normal(0, initializer_range) weights, zero biases, unit LayerNorm)."""
        std = self.hf_config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, QFormerLMHead):
            module.bias.zero_()

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each encoder layer in backward (transformers' ``GradientCheckpointingLayer`` hook)."""
        for layer in self.encoder.layer:
            layer.gradient_checkpointing = enabled
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.query_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    def _text_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
        max_len = self.hf_config.max_position_embeddings
        if input_ids.shape[1] > max_len:
            raise ValueError(f"text length {input_ids.shape[1]} exceeds max_position_embeddings={max_len}")
        # positions start at 0 for the text whether or not queries precede it (as in LAVIS)
        return self.embeddings(input_ids=input_ids.to(self.device))

    def _queries(self, batch_size: int) -> torch.Tensor:
        return self.query_tokens.expand(batch_size, -1, -1)

    def _check_image(self, image_embeds: torch.Tensor, image_atts: torch.Tensor | None) -> None:
        if image_embeds.dim() != 3 or image_embeds.shape[-1] != self.hf_config.encoder_hidden_size:
            raise ValueError(
                f"image_embeds must be [B, Nv, vision_width={self.hf_config.encoder_hidden_size}], "
                f"got {tuple(image_embeds.shape)}"
            )
        if image_atts is not None and tuple(image_atts.shape) != tuple(image_embeds.shape[:2]):
            raise ValueError(f"image_atts must be [B, Nv]={tuple(image_embeds.shape[:2])}, got {tuple(image_atts.shape)}")

    def _check_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(input_ids.shape, dtype=torch.long, device=self.device)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        return attention_mask

    def _encode(
        self,
        embeds: torch.Tensor,
        self_mask: torch.Tensor | None,
        query_length: int,
        image_embeds: torch.Tensor | None = None,
        image_atts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.dropout(self.layernorm(embeds))
        if image_embeds is not None:
            image_embeds = image_embeds.to(device=hidden.device, dtype=hidden.dtype)
        out = self.encoder(
            hidden,
            attention_mask=self_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=_key_padding_mask(image_atts, hidden.dtype, hidden.device),
            query_length=query_length,
        )
        return out.last_hidden_state

    # ------------------------------------------------------------------ public forwards
    def forward_queries(self, image_embeds: torch.Tensor, image_atts: torch.Tensor | None = None) -> torch.Tensor:
        """Queries only, cross-attending to the image: ``[B, Nv, Dv]`` (+ ``[B, Nv]`` 0/1 mask) -> ``[B, Q, H]``."""
        self._check_image(image_embeds, image_atts)
        queries = self._queries(image_embeds.shape[0])
        return self._encode(queries, None, self.num_query_tokens, image_embeds, image_atts)

    def forward(self, image_embeds: torch.Tensor, image_atts: torch.Tensor | None = None) -> torch.Tensor:
        """Alias of :meth:`forward_queries` (the module's main use: image -> query features)."""
        return self.forward_queries(image_embeds, image_atts)

    def forward_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text only (BLIP-2's ITC text encoder): bidirectional self-attention, text FFN, no image. ``[B, T, H]``."""
        attention_mask = self._check_text(input_ids, attention_mask)
        embeds = self._text_embeds(input_ids)
        mask = build_attention_mask(
            "text", 0, attention_mask, batch_size=input_ids.shape[0], dtype=embeds.dtype, device=embeds.device
        )
        return self._encode(embeds, mask, query_length=0)

    def forward_multimodal(
        self,
        image_embeds: torch.Tensor,
        image_atts: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Queries + text with full bidirectional self-attention, queries cross-attending to the image (ITM).

        Returns ``[B, Q + T, H]``; BLIP-2's ITM head reads the first ``Q`` positions.
        """
        hidden = self._joint(image_embeds, image_atts, input_ids, attention_mask, mode="bidirectional")
        return hidden

    def forward_generation(
        self,
        image_embeds: torch.Tensor,
        image_atts: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Image-grounded text generation (ITG): LM logits ``[B, T, V]`` for the text under the multimodal causal
        mask (see :func:`build_attention_mask`): text tokens see all queries and earlier text, queries see only
        queries (and the image). Logits at position ``t`` predict token ``t + 1``; shifting and the loss are the
        caller's job (LAVIS puts ``[DEC]`` at position 0).

        This takes the image, not ``forward_queries``' output: text attends to the query states of *every* layer,
        which the last-layer output alone cannot provide. One joint pass computes queries and text together (LAVIS
        instead reuses the ITC pass's cached query keys/values; the results agree, except that dropout samples
        differ in training). With ``return_hidden=True`` returns ``(logits, hidden [B, Q + T, H])``.
        """
        hidden = self._joint(image_embeds, image_atts, input_ids, attention_mask, mode="multimodal_causal")
        text_hidden = hidden[:, self.num_query_tokens :]
        logits = self.lm_head(text_hidden, self.embeddings.word_embeddings.weight)
        return (logits, hidden) if return_hidden else logits

    def _joint(
        self,
        image_embeds: torch.Tensor,
        image_atts: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        mode: MaskMode,
    ) -> torch.Tensor:
        self._check_image(image_embeds, image_atts)
        attention_mask = self._check_text(input_ids, attention_mask)
        batch = image_embeds.shape[0]
        if input_ids.shape[0] != batch:
            raise ValueError(f"batch mismatch: image_embeds has {batch}, input_ids has {input_ids.shape[0]}")
        text = self._text_embeds(input_ids)
        embeds = torch.cat([self._queries(batch).to(text.dtype), text], dim=1)
        mask = build_attention_mask(
            mode, self.num_query_tokens, attention_mask, batch_size=batch, dtype=embeds.dtype, device=embeds.device
        )
        return self._encode(embeds, mask, self.num_query_tokens, image_embeds, image_atts)

    # ------------------------------------------------------------------ initialisation from BERT
    @torch.no_grad()
    def init_from_bert(self, path: str | os.PathLike, *, fold_token_type_embeddings: bool = False) -> BertInitReport:
        """Copy a BERT-like checkpoint's embeddings and layers into the Q-Former, as LAVIS' ``init_Qformer`` does.

        * word/position embeddings and the embedding LayerNorm -> ``embeddings.*`` / ``layernorm``;
        * each layer's self-attention and FFN -> ``attention.*`` and the text FFN ``intermediate``/``output``;
        * the query FFN ``intermediate_query``/``output_query`` is initialised from the same BERT FFN (LAVIS copies
          every ``*_query`` parameter from its text twin);
        * cross-attention layers and query tokens stay randomly initialised;
        * the LM head transform/bias are copied when the folder's safetensors hold a BERT MLM head
          (``cls.predictions.*``), otherwise they stay random; the decoder is tied to the word embeddings.

        LAVIS' Q-Former has no token-type embeddings, so BERT's are dropped (reported in ``skipped``). With
        ``fold_token_type_embeddings=True`` row 0 is added to the position embeddings instead, which makes
        :meth:`forward_text` reproduce BERT's output for single-segment input exactly.

        Weights are read with ``transformers.AutoModel`` (local files only) plus ``safetensors`` for the MLM head.
        """
        from transformers import AutoModel

        path = os.fspath(path)
        bert = AutoModel.from_pretrained(path, local_files_only=True)
        src = {k: v.detach() for k, v in bert.state_dict().items()}
        del bert
        head = _read_mlm_head(path)
        report = BertInitReport(source=path)
        params = dict(self.named_parameters())
        used: set[str] = set()

        def put(target: str, source_key: str, tensor: torch.Tensor) -> None:
            _copy_checked(params[target], tensor, f"init_from_bert: shape mismatch for {target} <- {source_key}",
                          f"; build the QFormerConfig with init_from={path!r} to match sizes")
            report.copied[target] = source_key

        for key, tensor in src.items():
            target = _bert_to_ours(key)
            if target is None or target not in params:
                continue
            if key == "embeddings.position_embeddings.weight" and fold_token_type_embeddings:
                tt = src.get("embeddings.token_type_embeddings.weight")
                if tt is not None:
                    tensor = tensor + tt[0]
                    used.add("embeddings.token_type_embeddings.weight")
            put(target, key, tensor)
            used.add(key)
            twin = _query_ffn_twin(target)
            if twin is not None:
                put(twin, key, tensor)
        for key, tensor in head.items():
            target = "lm_head." + key
            if target in params:
                put(target, "cls.predictions." + key, tensor)
        report.skipped = sorted(k for k in src if k not in used)
        report.initialised = sorted(k for k in params if k not in report.copied)
        return report

    # ------------------------------------------------------------------ loading BLIP-2 checkpoints
    @torch.no_grad()
    def load_blip2_checkpoint(
        self, state_dict: Mapping[str, torch.Tensor], source: Literal["hf", "lavis"] = "hf"
    ) -> tuple[list[str], list[str]]:
        """Load the Q-Former (and query tokens) of a full BLIP-2 state dict by key mapping.

        ``source="hf"``: a transformers ``Blip2*`` state dict: ``query_tokens``, ``qformer.*`` (``layernorm`` and
        ``encoder``, names identical to ours) and, for ``Blip2ForImageTextRetrieval``/``Blip2TextModelWithProjection``,
        the text ``embeddings.*``. ``source="lavis"``: a LAVIS BLIP-2 checkpoint: ``query_tokens``,
        ``Qformer.bert.*`` (``embeddings.LayerNorm`` -> ``layernorm``, ``*.self.`` -> ``*.attention.``) and
        ``Qformer.cls.predictions.*`` -> ``lm_head.*`` (``decoder.weight``/``decoder.bias`` are tied and skipped).

        Keys outside the Q-Former namespace (vision encoder, LLM, projections, ITM head, ``temp``...) are ignored.
        Returns ``(missing, unexpected)``: our parameters that received nothing (e.g. the text embeddings/FFNs and
        LM head, absent from ``Blip2ForConditionalGeneration``/stage-2 checkpoints) and Q-Former-namespace keys of the
        state dict that map to nothing. Shape mismatches raise ``ValueError``.
        """
        if source not in ("hf", "lavis"):
            raise ValueError(f"source must be 'hf' or 'lavis', got {source!r}")
        mapper = _hf_to_ours if source == "hf" else _lavis_to_ours
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unexpected: list[str] = []
        for key, tensor in state_dict.items():
            target = mapper(key)
            if target is None:  # not a Q-Former key
                continue
            if target == "":  # a Q-Former key we know and deliberately skip (tied weights, buffers)
                continue
            if target not in params:
                unexpected.append(key)
                continue
            _copy_checked(params[target], tensor, f"load_blip2_checkpoint: shape mismatch for {key} -> {target}")
            loaded.add(target)
        missing = sorted(k for k in params if k not in loaded)
        return missing, sorted(unexpected)


# ---------------------------------------------------------------------------------------------- key mapping
def _copy_checked(param: torch.Tensor, tensor: torch.Tensor, what: str, hint: str = "") -> None:
    """Copy a checkpoint tensor into a parameter, refusing a shape mismatch (``what`` names the two keys)."""
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"{what}: parameter {tuple(param.shape)}, checkpoint {tuple(tensor.shape)}{hint}")
    param.copy_(tensor.to(dtype=param.dtype, device=param.device))


def _bert_to_ours(key: str) -> str | None:
    """A ``BertModel`` state-dict key -> ours (None = no counterpart)."""
    if key.startswith("bert."):
        key = key[len("bert.") :]
    if key in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
        return key
    if key.startswith("embeddings.LayerNorm."):
        return "layernorm." + key[len("embeddings.LayerNorm.") :]
    m = _LAYER_RE.match(key)
    if m:
        rest = m.group(2)
        if rest.startswith("attention.self."):
            rest = "attention.attention." + rest[len("attention.self.") :]
        elif not rest.startswith(("attention.output.", "intermediate.", "output.")):
            return None
        return f"encoder.layer.{m.group(1)}.{rest}"
    return None


def _query_ffn_twin(target: str) -> str | None:
    """``encoder.layer.i.intermediate.X`` -> ``encoder.layer.i.intermediate_query.X`` (same for ``output``)."""
    m = _LAYER_RE.match(target)
    if m is None:
        return None
    for name in ("intermediate", "output"):
        if m.group(2).startswith(name + "."):
            return f"encoder.layer.{m.group(1)}.{name}_query." + m.group(2)[len(name) + 1 :]
    return None


def _hf_to_ours(key: str) -> str | None:
    """transformers Blip2 key -> ours; None = outside the Q-Former."""
    if key == "query_tokens":
        return key
    if key.startswith("qformer."):
        return key[len("qformer.") :]
    if key.startswith("embeddings."):  # Blip2ForImageTextRetrieval / Blip2TextModelWithProjection
        if key == "embeddings.position_ids":
            return ""
        return key
    return None


def _lavis_to_ours(key: str) -> str | None:
    """LAVIS BLIP-2 key -> ours; None = outside the Q-Former, "" = known and skipped."""
    if key == "query_tokens":
        return key
    if key.startswith("Qformer.bert."):
        rest = key[len("Qformer.bert.") :]
        if rest == "embeddings.position_ids":
            return ""
        if rest.startswith("embeddings.LayerNorm."):
            return "layernorm." + rest[len("embeddings.LayerNorm.") :]
        if rest.startswith("embeddings."):
            return rest
        m = _LAYER_RE.match(rest)
        if m:
            sub = m.group(2)
            for name in ("attention", "crossattention"):
                if sub.startswith(name + ".self."):
                    sub = f"{name}.attention." + sub[len(name) + len(".self.") :]
                    break
            return f"encoder.layer.{m.group(1)}.{sub}"
        return "Qformer.bert." + rest  # unknown -> reported as unexpected (not one of our params)
    if key.startswith("Qformer.cls.predictions."):
        rest = key[len("Qformer.cls.predictions.") :]
        if rest in ("decoder.weight", "decoder.bias"):
            return ""  # tied to word embeddings / lm_head.bias
        return "lm_head." + rest
    if key.startswith("Qformer."):
        return key  # unknown Q-Former key -> unexpected
    return None


def _read_mlm_head(path: str) -> dict[str, torch.Tensor]:
    """BERT MLM head tensors (``transform.*``, ``bias``) from the folder's safetensors, if any."""
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - safetensors is a transformers dependency
        return {}
    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(path, name), framework="pt") as fh:
            for key in fh.keys():
                idx = key.find("cls.predictions.")
                if idx < 0:
                    continue
                rest = key[idx + len("cls.predictions.") :]
                rest = rest.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
                if rest.startswith("transform.") or rest == "bias":
                    out[rest] = fh.get_tensor(key)
    return out

