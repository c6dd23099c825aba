"""ELIP: text-guided pruning and fusion of vision tokens inside a ViT.

Implements the vision-token reduction of *ELIP: Efficient Language-Image Pre-training with Fewer
Vision Tokens* (arXiv 2309.16738) as a parameter-free wrapper around a Hugging Face ViT-like model.

Schedule (defaults, paper setting for a 12-layer ViT-B/16):

* pruning points after blocks ``prune_after_layers = (2, 4, 10)`` (1-based: after the 2nd, 4th and
  10th block),
* look-ahead depths ``lookahead_depths = (2, 6, 2)``,
* keep ratios ``keep_ratios = (0.90, 0.65, 0.40)`` of the ORIGINAL patch count, i.e. at every point
  ``K = round(keep_ratio * num_patches)`` candidate tokens are kept (round half up, at least 1).

At each pruning point, under ``torch.no_grad()``:

1. the current sequence is copied; in the copy the image [CLS] is replaced by
   ``text_weight * text_cls + (1 - text_weight) * image_cls`` (``0.2 / 0.8``). ``text_cls`` is a
   ``[B, D]`` text embedding of the image width ``D`` supplied by the caller (e.g. a projected text
   [CLS]). With ``text_cls=None`` the image [CLS] is used unchanged: pure image-guided pruning.
2. the next ``depth - 1`` blocks are run on the copy; of the ``depth``-th (last look-ahead) block only
   the attention probabilities are needed, so that block is not run in full: its [CLS]->token
   attention is computed directly from the block's own first LayerNorm and q/k projections
   (``softmax(q_cls . k^T * scaling)`` over ALL keys of the sequence, exactly as the block's eager
   attention does, then averaged over heads). See :meth:`ElipVisionTower.cls_attention`; the tests
   check it against the eager attention probabilities returned with ``output_attentions=True``.
   The look-ahead runs with the blocks temporarily in eval mode (no dropout / drop-path), so the
   scoring is deterministic; their train/eval mode is restored afterwards.
3. the top-K candidate tokens by that attention are kept in their ORIGINAL order, and all remaining
   candidates are fused into ONE token: their sum weighted by their attention renormalised over the
   pruned set (:func:`prune_and_fuse`).

The real (not copied) sequence then continues as ``[special tokens, kept tokens, fused token]``.
Gradients flow through the real tokens normally (gather + weighted sum with constant weights); only
the scoring is ``no_grad`` (so ``text_cls`` receives no gradient from the vision tower).

Design decisions (documented choices):

* **Fused-token persistence**: the fused token of an earlier point is treated like an ordinary patch
  at later points: it is a candidate, it is kept if its attention is in the top-K, and otherwise it
  is fused (with its attention weight) into the new fused token. So there is always exactly one
  fused token after the first pruning point, and the sequence length after a point is
  ``num_special + K + 1``. ``stats.kept_patch_indices`` reports the original patch indices of the
  kept tokens at each point, with ``-1`` marking an earlier fused token that was kept.
* **Special tokens**: the first ``num_special_tokens`` positions are never pruned, fused or counted
  as patches. By default ``num_special_tokens = 1 + config.num_register_tokens`` (0 register tokens
  if the config has no such field), matching the HF layouts ``[CLS, registers..., patches...]``
  (``Dinov2WithRegistersModel``); it can be given explicitly to the constructor. Position 0 must be
  the image [CLS] (the one mixed with the text [CLS] and used as the attention query).
* **When pruning runs**: only when ``enabled`` and the module is in training mode (pre-training).
  ``eval()`` or ``enabled=False`` runs the full, unmodified ViT; ``forward(..., prune=True/False)``
  overrides the rule per call. No parameters are added.
* If ``K`` is not smaller than the current number of candidate tokens (e.g. a keep ratio of 1.0 at
  the first point) the point is skipped (nothing to fuse) and the sequence is left unchanged.
* The look-ahead of one point ignores later pruning points (it runs on the unpruned copy).

Supported models: ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``ViTModel`` and
``CLIPVisionModel`` of transformers 5 (embeddings -> blocks -> final norm as in each model's own
``forward``; the returned ``last_hidden_state`` matches the model's ``last_hidden_state``: after the
final LayerNorm for DINOv2/ViT, before ``post_layernorm`` for CLIP, which only norms the pooled token).

Measured token count (12 layers, 196 patches + [CLS], default schedule): the blocks see
``[197, 197, 178, 178, 129 x 6, 80, 80]`` tokens, 140.33 on average vs 197 unpruned, i.e. 28.8 %
fewer tokens (the paper reports about 29 %). :func:`token_schedule` computes it without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from dvlp_common.config import Config, ConfigError, param

__all__ = ["ElipConfig", "ElipStats", "ElipVisionTower", "num_kept", "prune_and_fuse", "token_schedule", "vit_blocks",
           "vit_embed", "vit_final", "vit_kind"]


@dataclass
class ElipConfig(Config):
    """Pruning schedule of ELIP (defaults: the paper's). The three lists are indexed by pruning point."""

    prune_after_layers: tuple[int, ...] = param((2, 4, 10), help="ViT layers (1-based) after which to prune")
    lookahead_depths: tuple[int, ...] = param((2, 6, 2), help="blocks run ahead on a copy to score the patches")
    keep_ratios: tuple[float, ...] = param((0.90, 0.65, 0.40), help="kept share of the ORIGINAL patch count at "
                                                                     "each point (non-increasing, in (0, 1])")
    text_weight: float = param(0.2, ge=0.0, le=1.0, help="[CLS] used for scoring = w·text_CLS + (1-w)·image_CLS")

    def check(self) -> None:
        n = len(self.prune_after_layers)
        if len(self.lookahead_depths) != n or len(self.keep_ratios) != n:
            raise ConfigError("prune_after_layers", "lookahead_depths and keep_ratios must have the same length as "
                                                    f"prune_after_layers, got {len(self.prune_after_layers)}, "
                                                    f"{len(self.lookahead_depths)} and {len(self.keep_ratios)}")
        if any(layer < 1 for layer in self.prune_after_layers):
            raise ConfigError("prune_after_layers", f"must be positive (1-based) layers, got {self.prune_after_layers}")
        if any(b <= a for a, b in zip(self.prune_after_layers, self.prune_after_layers[1:])):
            raise ConfigError("prune_after_layers", f"must be strictly increasing, got {self.prune_after_layers}")
        if any(depth < 1 for depth in self.lookahead_depths):
            raise ConfigError("lookahead_depths", f"must be >= 1, got {self.lookahead_depths}")
        if not all(0.0 < ratio <= 1.0 for ratio in self.keep_ratios):
            raise ConfigError("keep_ratios", f"must lie in (0, 1], got {self.keep_ratios}")
        if any(b > a for a, b in zip(self.keep_ratios, self.keep_ratios[1:])):
            raise ConfigError("keep_ratios", f"must be non-increasing, got {self.keep_ratios}")

    def check_num_layers(self, num_layers: int) -> None:
        """Wrapping-time check: every look-ahead must end inside the model (layer + depth <= num_layers)."""
        for layer, depth in zip(self.prune_after_layers, self.lookahead_depths):
            if layer + depth > num_layers:
                raise ValueError(
                    f"ElipConfig: prune_after_layers={layer} with lookahead_depths={depth} needs blocks "
                    f"{layer + 1}..{layer + depth}, but the model has only {num_layers} layers "
                    "(prune_after_layers + lookahead_depths must not exceed the number of layers)"
                )


def num_kept(keep_ratio: float, num_patches: int) -> int:
    """K = round(keep_ratio * num_patches) (round half up), at least 1."""
    return max(1, int(math.floor(keep_ratio * num_patches + 0.5)))


def token_schedule(config: ElipConfig, num_layers: int, num_patches: int, num_special: int = 1) -> list[int]:
    """Sequence length seen by each of the ``num_layers`` blocks under ``config`` (no model needed)."""
    config.check_num_layers(num_layers)
    points = dict(zip(config.prune_after_layers, config.keep_ratios))
    seq, n_cand, out = num_special + num_patches, num_patches, []
    for layer in range(1, num_layers + 1):
        out.append(seq)
        if layer in points:
            k = num_kept(points[layer], num_patches)
            if k < n_cand:
                n_cand = k + 1
                seq = num_special + n_cand
    return out


def prune_and_fuse(
    tokens: torch.Tensor, cls_attn: torch.Tensor, keep: int, num_special: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the top-``keep`` candidate tokens (original order) and fuse the rest into one token.

    Args:
        tokens: ``[B, N, D]``; the first ``num_special`` tokens ([CLS], registers) are passed through.
        cls_attn: ``[B, N - num_special]`` [CLS] attention to each candidate token (non-negative).
        keep: number of candidates to keep, ``1 <= keep < N - num_special``.
        num_special: number of leading special tokens.

    Returns:
        ``(new_tokens [B, num_special + keep + 1, D], kept_index [B, keep])``. ``kept_index`` holds
        candidate positions (0-based, relative to ``tokens[:, num_special:]``) in increasing order. The
        last token is ``sum_j w_j x_j`` over the pruned candidates with ``w = a_j / sum(a_pruned)``
        (uniform weights if the pruned attention sums to 0). The weights are treated as given; gradients
        flow into ``tokens`` through the gather and the weighted sum.
    """
    if tokens.dim() != 3:
        raise ValueError(f"prune_and_fuse: tokens must be [B, N, D], got {tuple(tokens.shape)}")
    b, n, d = tokens.shape
    n_cand = n - num_special
    if num_special < 0 or n_cand < 1:
        raise ValueError(f"prune_and_fuse: num_special={num_special} leaves no candidates in N={n}")
    if tuple(cls_attn.shape) != (b, n_cand):
        raise ValueError(f"prune_and_fuse: cls_attn must be [B, N - num_special] = {(b, n_cand)}, got {tuple(cls_attn.shape)}")
    if not (1 <= keep < n_cand):
        raise ValueError(f"prune_and_fuse: keep must satisfy 1 <= keep < {n_cand} (candidates), got {keep}")

    special, cand = tokens[:, :num_special], tokens[:, num_special:]
    top = torch.topk(cls_attn, keep, dim=1).indices
    kept_index, _ = torch.sort(top, dim=1)
    kept = torch.gather(cand, 1, kept_index.unsqueeze(-1).expand(-1, -1, d))

    pruned = torch.ones(b, n_cand, dtype=torch.bool, device=tokens.device)
    pruned.scatter_(1, kept_index, False)
    w = cls_attn.to(torch.float32).masked_fill(~pruned, 0.0)
    denom = w.sum(dim=1, keepdim=True)
    uniform = pruned.to(torch.float32) / pruned.sum(dim=1, keepdim=True).to(torch.float32)
    w = torch.where(denom > 0, w / denom.clamp_min(torch.finfo(torch.float32).tiny), uniform)
    fused = torch.einsum("bn,bnd->bd", w.to(tokens.dtype), cand).unsqueeze(1)
    return torch.cat([special, kept, fused], dim=1), kept_index


# ---------------------------------------------------------------------------------------------------------------
# model adapters: run a HF ViT-like tower piecewise from the outside (embeddings, blocks, final norm); shared with
# the video tower (vl_align.video), which inserts temporal modules between the blocks' halves
_VIT_CLASSES = (("dinov2", "Dinov2Model"), ("dinov2", "Dinov2WithRegistersModel"), ("vit", "ViTModel"),
                ("clip", "CLIPVisionModel"))


def vit_kind(model: nn.Module, user: str) -> str:
    """``dinov2`` / ``vit`` / ``clip``: the layout of ``model``; any other class is a TypeError naming it."""
    import transformers as tf

    for kind, name in _VIT_CLASSES:
        cls = getattr(tf, name, None)
        if cls is not None and isinstance(model, cls):
            return kind
    raise TypeError(f"{user} supports {', '.join(name for _, name in _VIT_CLASSES)}, got {type(model).__name__}")


def vit_blocks(model: nn.Module, kind: str) -> nn.ModuleList:
    if kind == "dinov2":
        return model.encoder.layer
    if kind == "vit":
        return model.layers if hasattr(model, "layers") else model.encoder.layer
    return model.encoder.layers  # clip


def vit_embed(model: nn.Module, kind: str, pixel_values: torch.Tensor) -> torch.Tensor:
    """The tokens entering the first block, ``[B, N, D]``. Position embeddings are interpolated as
    ``VisionTower`` does (a no-op at the model's own resolution; DINOv2 always interpolates)."""
    if kind == "dinov2":
        return model.embeddings(pixel_values)
    if kind == "vit":
        pixel_values = pixel_values.to(model.embeddings.patch_embeddings.projection.weight.dtype)
        return model.embeddings(pixel_values, interpolate_pos_encoding=True)
    return model.pre_layrnorm(model.embeddings(pixel_values, interpolate_pos_encoding=True))


def vit_final(model: nn.Module, kind: str, hidden: torch.Tensor) -> torch.Tensor:
    """``last_hidden_state`` from the last block's output."""
    if kind in ("dinov2", "vit"):
        return model.layernorm(hidden)
    return hidden  # CLIPVisionModel.last_hidden_state is not normed (post_layernorm is on the pooled token)


@dataclass
class ElipStats:
    """What :meth:`ElipVisionTower.forward` did.

    tokens_per_layer: sequence length (special + patch/fused tokens) seen by each block.
    avg_tokens: mean of ``tokens_per_layer``.
    unpruned_tokens: sequence length of the full ViT (what every block sees without pruning).
    token_reduction: ``1 - avg_tokens / unpruned_tokens``.
    kept_patch_indices: per applied pruning point, ``[B, K]`` ORIGINAL patch indices of the kept tokens
        (``-1`` = an earlier fused token that was kept).
    pruned_after_layers: the 1-based layers after which pruning was applied.
    """

    tokens_per_layer: list[int]
    avg_tokens: float
    unpruned_tokens: int
    token_reduction: float
    pruning: bool
    kept_patch_indices: list[torch.Tensor] = field(default_factory=list)
    pruned_after_layers: list[int] = field(default_factory=list)


class ElipVisionTower(nn.Module):
    """Wraps a HF ViT-like vision model and applies ELIP token pruning/fusion in its forward.

    Args:
        model: ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``ViTModel`` or ``CLIPVisionModel``.
        config: pruning schedule (default: paper setting). Checked against the model depth here.
        enabled: master switch; pruning runs only when ``enabled`` and ``self.training``.
        num_special_tokens: leading tokens never pruned; default ``1 + config.num_register_tokens``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: ElipConfig | None = None,
        *,
        enabled: bool = True,
        num_special_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.elip_config = config if config is not None else ElipConfig()
        self.enabled = enabled
        self._kind = self._detect_kind(model)
        blocks = self.blocks
        self.elip_config.check_num_layers(len(blocks))
        if num_special_tokens is None:
            num_special_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        if num_special_tokens < 1:
            raise ValueError("num_special_tokens must be >= 1 (position 0 is the image [CLS])")
        self.num_special_tokens = int(num_special_tokens)

    # ------------------------------------------------------------------ model adapters
    @staticmethod
    def _detect_kind(model: nn.Module) -> str:
        return vit_kind(model, "ElipVisionTower")

    @property
    def blocks(self) -> nn.ModuleList:
        return vit_blocks(self.model, self._kind)

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return vit_embed(self.model, self._kind, pixel_values)

    def _final(self, hidden: torch.Tensor) -> torch.Tensor:
        return vit_final(self.model, self._kind, hidden)

    def _attn_parts(self, block: nn.Module):
        if self._kind == "dinov2":
            attn = block.attention
            return block.norm1, attn.q_proj, attn.k_proj, attn.num_attention_heads, attn.head_dim, attn.scaling
        if self._kind == "vit":
            attn = block.attention
            return block.layernorm_before, attn.q_proj, attn.k_proj, attn.num_attention_heads, attn.head_dim, attn.scaling
        attn = block.self_attn
        return block.layer_norm1, attn.q_proj, attn.k_proj, attn.num_heads, attn.head_dim, attn.scale

    # ------------------------------------------------------------------ scoring
    def cls_attention(self, block_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention probabilities of the [CLS] query (position 0) of block
        ``block_index`` (0-based) over all ``N`` keys of ``hidden`` ``[B, N, D]`` (its input) -> ``[B, N]``.

        Computed from the block's first LayerNorm and q/k projections, identical to the
        eager attention's ``softmax(q k^T * scaling)[:, :, 0, :].mean(heads)`` (float32 softmax).
        """
        norm, q_proj, k_proj, heads, head_dim, scaling = self._attn_parts(self.blocks[block_index])
        x = norm(hidden)
        b, n, _ = x.shape
        q = q_proj(x[:, :1]).view(b, 1, heads, head_dim).transpose(1, 2)  # [B, H, 1, hd]
        k = k_proj(x).view(b, n, heads, head_dim).transpose(1, 2)  # [B, H, N, hd]
        logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, H, 1, N]
        probs = torch.softmax(logits.to(torch.float32), dim=-1)
        return probs[:, :, 0, :].mean(dim=1)

    def _lookahead_scores(self, hidden: torch.Tensor, layer: int, depth: int, text_cls: torch.Tensor | None):
        """[CLS]->candidate attention of block ``layer + depth`` (1-based) on a text-guided copy."""
        blocks = self.blocks
        used = [blocks[j] for j in range(layer, layer + depth)]
        modes = [blk.training for blk in used]
        try:
            for blk in used:
                blk.train(False)
            with torch.no_grad():
                x = hidden.detach().clone()
                if text_cls is not None:
                    w = self.elip_config.text_weight
                    x[:, 0] = w * text_cls.to(x.dtype) + (1.0 - w) * x[:, 0]
                for j in range(layer, layer + depth - 1):
                    x = blocks[j](x, None)
                attn = self.cls_attention(layer + depth - 1, x)
        finally:
            for blk, mode in zip(used, modes):
                blk.train(mode)
        return attn[:, self.num_special_tokens :]

    # ------------------------------------------------------------------ forward
    def _check_text_cls(self, text_cls: torch.Tensor, batch: int, dim: int) -> torch.Tensor:
        if text_cls.dim() == 3 and text_cls.shape[1] == 1:
            text_cls = text_cls[:, 0]
        if text_cls.dim() == 1:
            text_cls = text_cls.unsqueeze(0)
        if text_cls.dim() != 2 or text_cls.shape[-1] != dim or text_cls.shape[0] not in (1, batch):
            raise ValueError(
                f"text_cls must be [B, D] = [{batch}, {dim}] (or [D]) in the image width, got {tuple(text_cls.shape)}"
            )
        return text_cls.expand(batch, dim)

    def forward(
        self, pixel_values: torch.Tensor, text_cls: torch.Tensor | None = None, *, prune: bool | None = None
    ) -> tuple[torch.Tensor, ElipStats]:
        """Run the ViT with ELIP pruning. Returns ``(last_hidden_state [B, N_final, D], stats)``.

        ``prune=None`` prunes iff ``self.enabled and self.training``; True/False forces it.
        """
        do_prune = (self.enabled and self.training) if prune is None else bool(prune)
        hidden = self._embed(pixel_values)
        b, n0, d = hidden.shape
        ns = self.num_special_tokens
        n_patches = n0 - ns
        if n_patches < 1:
            raise ValueError(f"sequence of {n0} tokens has no patches after {ns} special tokens")
        if text_cls is not None:
            text_cls = self._check_text_cls(text_cls, b, d)

        cfg = self.elip_config
        points = (
            {l: (dep, r) for l, dep, r in zip(cfg.prune_after_layers, cfg.lookahead_depths, cfg.keep_ratios)}
            if do_prune
            else {}
        )
        orig_idx = torch.arange(n_patches, device=hidden.device).unsqueeze(0).expand(b, -1)
        tokens_per_layer: list[int] = []
        kept_indices: list[torch.Tensor] = []
        applied: list[int] = []

        for i, block in enumerate(self.blocks):
            tokens_per_layer.append(hidden.shape[1])
            hidden = block(hidden, None)
            layer = i + 1
            if layer not in points:
                continue
            depth, ratio = points[layer]
            k = num_kept(ratio, n_patches)
            if k >= hidden.shape[1] - ns:
                continue  # nothing to fuse at this point
            scores = self._lookahead_scores(hidden, layer, depth, text_cls)
            hidden, kept_index = prune_and_fuse(hidden, scores, k, ns)
            kept_orig = torch.gather(orig_idx, 1, kept_index)
            orig_idx = torch.cat([kept_orig, kept_orig.new_full((b, 1), -1)], dim=1)
            kept_indices.append(kept_orig)
            applied.append(layer)

        out = self._final(hidden)
        avg = sum(tokens_per_layer) / len(tokens_per_layer)
        stats = ElipStats(
            tokens_per_layer=tokens_per_layer,
            avg_tokens=avg,
            unpruned_tokens=n0,
            token_reduction=1.0 - avg / n0,
            pruning=do_prune,
            kept_patch_indices=kept_indices,
            pruned_after_layers=applied,
        )
        return out, stats
