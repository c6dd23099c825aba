"""Video: SimVLG's soft attentive temporal token merging inside the vision tower, and the tower that runs it.

What SimVLG's code does (EVLGen ``eva_vit_g.py``, read and re-written here): a :class:`TemporalTokenMerge` sits in
every ViT block between the spatial attention (with its residual add) and the MLP. Its input ``(B·T, N, C)``, the
frames of each video contiguous, is viewed as ``(B·N, T, C)``: every token position attends only to the same
position in the video's other frames (the [CLS] too). Query and key are ``Linear(C, 256)`` each, 8 heads of 32; the
value is the input itself (no projection) split into 8 heads; the logits are scaled by ``256 ** -0.5`` (the whole
hidden width, not the head width); softmax over the frames; no output projection, no norm, no position signal. The
output is ``x + α·attn(x)`` with ``α`` a scalar initialised to 0, so at step 0 the model is the image model run on
each frame. Q/K weights are truncated-normal (std 0.02), biases zero. After the tower the frames are averaged.

Consequences that the tests pin down: at ``α = 0`` the video features are the mean of the per-frame image features;
at step 0 ``α`` has a gradient and Q/K have exactly none (they only act through ``α``); and the module is blind to
frame order (permuting the frames permutes the per-frame outputs and leaves their mean unchanged).

Our extension, off by default: ``max_frames`` adds a learned per-frame position embedding (zero-initialised, so
step 0 is unchanged) to the input of Q and K -- V stays the frame's own tokens -- which makes the attention, and so
the averaged features, depend on frame order.

:class:`VideoVisionTower` inserts the modules from the outside: the Hugging Face tower is left as it is, and each
chosen block is run by a :class:`TemporalBlock`, our wrapper holding the original block, which calls the block's
attention half, the temporal module, then its MLP half (the model adapters are shared with ELIP:
``vl_align.elip.vit_*``). ``pixel_values_videos`` ``(B, T, 3, H, W)`` (transformers' video convention) ->
``(B, N, C)``, the mean over T of the tower's features. Only the temporal modules train, so the tower cannot be
served by the vision-feature cache (the features change as they train); the embeddings and the blocks below the
first temporal module are frozen and run without gradient, and their output may be passed in instead
(``frozen_hidden``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvlp_common.config import Config, ConfigError, param

from .elip import vit_blocks, vit_embed, vit_final, vit_kind

__all__ = ["SUPPORTED_BLOCKS", "TemporalBlock", "TemporalTokenMerge", "VideoConfig", "VideoVisionTower"]


@dataclass
class VideoConfig(Config):
    """The video front: a ``tome`` or ``qformer`` front whose tower carries SimVLG's temporal modules."""

    enabled: bool = param(False, help="video front: pixel_values_videos [B, T, 3, H, W] -> tower with temporal "
                                      "modules -> mean over T -> the tome / qformer connector")
    num_frames: int = param(4, ge=1, help="frames sampled per clip (SimVLG: 4); the front takes any T up to "
                                          "max_frames")
    hidden_dim: int = param(256, ge=1, help="width of the temporal attention's query/key (SimVLG: 256)")
    num_heads: int = param(8, ge=1, help="temporal attention heads (SimVLG: 8); must divide hidden_dim and the "
                                         "tower width (the value is the input split into heads)")
    max_frames: int | None = param(None, ge=1, help="extension, null = SimVLG: a learned per-frame position "
                                                    "embedding (zero-init) for clips of up to this many frames, added "
                                                    "to the query/key input; makes the module order-aware")
    blocks: list[int] | None = param(  # noqa: RUF009 (a None default; ruff does not see through the union)
        None, help="0-based tower blocks given a temporal module; null = every block the features pass (SimVLG); "
                   "[] = none (plain mean pooling)")

    def check(self) -> None:
        if self.hidden_dim % self.num_heads:
            raise ConfigError("hidden_dim", f"{self.hidden_dim} is not a multiple of num_heads={self.num_heads}")
        if self.max_frames is not None and self.max_frames < self.num_frames:
            raise ConfigError("max_frames", f"{self.max_frames} < num_frames={self.num_frames}: the position "
                                            "embedding must cover every sampled frame")
        if self.blocks is not None:
            if any(b < 0 for b in self.blocks):
                raise ConfigError("blocks", f"must be 0-based block indices (>= 0), got {self.blocks}")
            if len(set(self.blocks)) != len(self.blocks):
                raise ConfigError("blocks", f"has repeated blocks: {self.blocks}")


class TemporalTokenMerge(nn.Module):
    """SimVLG's temporal module: ``forward(x (B·T, N, C), num_frames) -> x + α·attn(x)``, same shape.

    Each of the B·N token positions attends over its T frames; Q/K ``Linear(dim, hidden_dim)`` in ``num_heads``
    heads, V = ``x`` split into ``num_heads`` heads (so ``dim`` must be divisible by ``num_heads``), scale
    ``hidden_dim ** -0.5``. ``max_frames`` (extension) adds ``frame_pos[t]`` to the Q/K input of frame ``t``.
    """

    def __init__(self, dim: int, hidden_dim: int = 256, num_heads: int = 8, max_frames: int | None = None):
        super().__init__()
        if dim < 1 or hidden_dim < 1 or num_heads < 1:
            raise ValueError(f"TemporalTokenMerge: dim={dim}, hidden_dim={hidden_dim} and num_heads={num_heads} "
                             "must be positive")
        if hidden_dim % num_heads:
            raise ValueError(f"TemporalTokenMerge: hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}")
        if dim % num_heads:
            raise ValueError(f"TemporalTokenMerge: the value is the input split into heads, so the token width "
                             f"dim={dim} must be divisible by num_heads={num_heads}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"TemporalTokenMerge: max_frames must be >= 1 or None, got {max_frames}")
        self.dim, self.hidden_dim, self.num_heads, self.max_frames = dim, hidden_dim, num_heads, max_frames
        self.scale = hidden_dim ** -0.5  # the full Q/K width, as SimVLG's code (not the head width)
        self.query = nn.Linear(dim, hidden_dim)
        self.key = nn.Linear(dim, hidden_dim)
        self.alpha = nn.Parameter(torch.zeros(1))  # [1], not 0-d: DeepSpeed broadcasts parameters as bytes
        self.frame_pos = nn.Parameter(torch.zeros(max_frames, dim)) if max_frames is not None else None
        for lin in (self.query, self.key):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_heads={self.num_heads}, "
                f"max_frames={self.max_frames}")

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"TemporalTokenMerge: x must be (B·T, N, {self.dim}), got {tuple(x.shape)}")
        bt, n, c = x.shape
        t = int(num_frames)
        if t < 1 or bt % t:
            raise ValueError(f"TemporalTokenMerge: {bt} frames is not a whole number of videos of {t} frames")
        if self.frame_pos is not None and t > self.max_frames:
            raise ValueError(f"TemporalTokenMerge: {t} frames but the position embedding covers max_frames="
                             f"{self.max_frames}")
        b, h = bt // t, self.num_heads
        v = x.view(b, t, n, c).transpose(1, 2).reshape(b * n, t, c)  # (B·N, T, C): one row per token position
        qk_in = v if self.frame_pos is None else v + self.frame_pos[:t].to(v.dtype)
        q = self.query(qk_in).view(b * n, t, h, -1).transpose(1, 2)  # (B·N, H, T, hidden/H)
        k = self.key(qk_in).view(b * n, t, h, -1).transpose(1, 2)
        attn = torch.matmul(q * self.scale, k.transpose(-1, -2))  # (B·N, H, T, T)
        attn = F.softmax(attn.float(), dim=-1).to(v.dtype)
        out = torch.matmul(attn, v.view(b * n, t, h, c // h).transpose(1, 2))  # (B·N, H, T, C/H)
        out = out.transpose(1, 2).reshape(b, n, t, c).transpose(1, 2).reshape(bt, n, c)  # back to (B·T, N, C)
        return x + self.alpha.to(x.dtype) * out


# The blocks' halves, per layout (transformers 5): (attention half, MLP half), each with its residual add.
def _dinov2_halves(blk):
    def attention(x):
        return blk.drop_path(blk.layer_scale1(blk.attention(blk.norm1(x), attention_mask=None)[0])) + x

    def mlp(x):
        return blk.drop_path(blk.layer_scale2(blk.mlp(blk.norm2(x)))) + x

    return attention, mlp


def _vit_halves(blk):
    def attention(x):
        return blk.dropout(blk.attention(blk.layernorm_before(x), None)[0]) + x

    def mlp(x):
        return blk.dropout(blk.mlp(blk.layernorm_after(x))) + x

    return attention, mlp


def _clip_halves(blk):
    def attention(x):
        return x + blk.self_attn(hidden_states=blk.layer_norm1(x), attention_mask=None)[0]

    def mlp(x):
        return x + blk.mlp(blk.layer_norm2(x))

    return attention, mlp


# layout -> (block class, submodules the halves use, halves)
SUPPORTED_BLOCKS = {
    "dinov2": (("Dinov2Layer", "Dinov2WithRegistersLayer"),
               ("norm1", "attention", "layer_scale1", "drop_path", "norm2", "mlp", "layer_scale2"), _dinov2_halves),
    "vit": (("ViTLayer",), ("layernorm_before", "attention", "dropout", "layernorm_after", "mlp"), _vit_halves),
    "clip": (("CLIPEncoderLayer",), ("layer_norm1", "self_attn", "layer_norm2", "mlp"), _clip_halves),
}


class TemporalBlock(nn.Module):
    """One tower block with a temporal module between its halves: attention (+ residual), ``temporal``, MLP
    (+ residual), as SimVLG's ``Block.forward``. Holds the original block; the block class is checked here, and an
    unknown one is a TypeError naming it (its halves cannot be run from the outside)."""

    def __init__(self, block: nn.Module, kind: str, temporal: TemporalTokenMerge):
        super().__init__()
        names, parts, halves = SUPPORTED_BLOCKS[kind]
        if type(block).__name__ not in names or any(not hasattr(block, p) for p in parts):
            raise TypeError(f"cannot insert a temporal module into {type(block).__name__}: the video tower runs "
                            f"{', '.join(n for v in SUPPORTED_BLOCKS.values() for n in v[0])} blocks (with "
                            f"{', '.join(parts)} for a {kind} tower)")
        self.block = block
        self.temporal = temporal
        self._attention, self._mlp = halves(block)

    def forward(self, hidden: Tensor, num_frames: int) -> Tensor:
        return self._mlp(self.temporal(self._attention(hidden), num_frames))


class VideoVisionTower(nn.Module):
    """``forward(pixel_values_videos (B, T, 3, H, W)) -> (B, N, C)``: the frozen ``tower`` (a ``VisionTower``) run on
    the B·T frames with a temporal module in each chosen block, then the mean over T.

    ``tower.config.feature_layer`` is honoured: -1 runs every block and the final norm (``last_hidden_state``);
    ``k`` runs the first ``k`` blocks (``hidden_states[k]``, no norm). Parameters: ``tower.*`` (frozen, not saved
    with the front) and ``temporal.<block>.*`` (trained). The block wrappers hold references to both and are not
    registered themselves, so each parameter has one name.
    """

    def __init__(self, tower: nn.Module, config: VideoConfig):
        super().__init__()
        self.tower = tower
        self.config = config
        model = tower.model
        self._kind = vit_kind(model, "the video tower (temporal modules)")
        blocks = vit_blocks(model, self._kind)
        layer = tower.config.feature_layer
        self.depth = len(blocks) if layer == -1 else layer % (len(blocks) + 1)  # blocks the features pass
        chosen = list(range(self.depth)) if config.blocks is None else sorted(config.blocks)
        if any(i >= self.depth for i in chosen):
            raise ConfigError("front.video.blocks", f"{config.blocks} reaches past the {self.depth} blocks the "
                                                    f"features pass (vision.feature_layer={layer}, "
                                                    f"{len(blocks)} blocks)")
        width = int(model.config.hidden_size)
        if width % config.num_heads:
            raise ConfigError("front.video.num_heads", f"the tower width {width} is not divisible by "
                                                       f"{config.num_heads} (the value is the tokens split into heads)")
        self.temporal = nn.ModuleDict({str(i): TemporalTokenMerge(width, config.hidden_dim, config.num_heads,
                                                                  config.max_frames) for i in chosen})
        # plain tuple: the wrappers are not registered (their block and module already are)
        self._runs = tuple(TemporalBlock(blocks[i], self._kind, self.temporal[str(i)]) if str(i) in self.temporal
                           else blocks[i] for i in range(self.depth))
        self.frozen_depth = chosen[0] if chosen else self.depth  # blocks below the first temporal module

    @property
    def hidden_size(self) -> int:
        return int(self.tower.model.config.hidden_size)

    def frozen_features(self, frames: Tensor) -> Tensor:
        """``(F, 3, H, W)`` frames -> ``(F, N, C)``: the frozen part's output (the input of block ``frozen_depth``),
        without gradient; this is what may be cached per frame."""
        model = self.tower.model
        param = next(model.parameters())
        with torch.no_grad():
            hidden = vit_embed(model, self._kind, frames.to(param.device, param.dtype))
            for blk in self._runs[:self.frozen_depth]:
                hidden = blk(hidden, None)
        return hidden

    def forward(self, pixel_values_videos: Tensor | None = None, *, frozen_hidden: Tensor | None = None) -> Tensor:
        """``pixel_values_videos`` ``(B, T, 3, H, W)``, or ``frozen_hidden`` ``(B, T, N, C)`` (``frozen_features`` of
        each frame) -> ``(B, N, C)``."""
        if frozen_hidden is not None:
            if frozen_hidden.dim() != 4:
                raise ValueError(f"frozen_hidden must be (B, T, N, C), got {tuple(frozen_hidden.shape)}")
            b, t = frozen_hidden.shape[:2]
            hidden = frozen_hidden.flatten(0, 1)
        elif pixel_values_videos is None:
            raise ValueError("the video front runs its tower live (its temporal modules train inside the tower's "
                             "blocks, so cached image features cannot serve it): pass pixel_values_videos "
                             "(B, T, 3, H, W)")
        else:
            if pixel_values_videos.dim() != 5 or pixel_values_videos.shape[2] != 3:
                raise ValueError(f"pixel_values_videos must be (B, T, 3, H, W), got "
                                 f"{tuple(pixel_values_videos.shape)}")
            b, t = pixel_values_videos.shape[:2]
            hidden = self.frozen_features(pixel_values_videos.flatten(0, 1))  # (B·T, N, C), a video's frames together
        for blk in self._runs[self.frozen_depth:]:
            hidden = blk(hidden, t) if isinstance(blk, TemporalBlock) else blk(hidden, None)
        if self.tower.config.feature_layer == -1:
            hidden = vit_final(self.tower.model, self._kind, hidden)
        return hidden.view(b, t, *hidden.shape[1:]).mean(dim=1)
