"""Published BLIP-2 checkpoints as our front + frozen tower + frozen LLM, for evaluation.

Two layouts load (the reverse of ``vl_align.export``)::

    transformers folder            LAVIS .pth (its "model" entry)              ours
    vision_model.*                 visual_encoder.* (EVA ViT-g or CLIP ViT-L), ImportedVisionTower over a
                                     or none: then ``vision`` names where it   transformers Blip2VisionModel
                                     is                                        (EVA) or LavisClipVision (CLIP)
    vision_model.post_layernorm    ln_vision                                   the tower's post_layernorm (EVA)
                                                                               or LavisClipVision.ln_vision
    query_tokens, qformer.*        query_tokens, Qformer.bert.*, Qformer.cls.* front.qformer
    language_projection            opt_proj / t5_proj                          front.llm_proj
    -                              vision_proj, text_proj, itm_head, temp      front's ITC/ITM heads, temperature
    language_model.*               not in the file (LAVIS loads the LLM by     FrozenLLM (``llm`` names it;
                                     its hub name)                             opt_model.* / t5_model.* override)

BLIP-2's ``ln_vision`` (a LayerNorm over every ViT token before the Q-Former) has no counterpart in our front; it
needs none: ``Blip2VisionModel`` ends in ``post_layernorm`` over every token, which is where transformers put
``ln_vision`` when it converted BLIP-2, so the tower's features are already ``ln_vision(ViT(x))`` and the feature
cache stores them (the front is unchanged and existing fronts keep their behaviour). LAVIS builds ``ln_vision``
with torch's default eps 1e-5 while its EVA blocks use 1e-6; the tower's ``post_layernorm.eps`` is set to 1e-5
so the function is LAVIS's exactly (transformers' converted folders use one eps for both).

The Q-Former's separate query FFN (``intermediate_query`` / ``output_query``), its cross-attention every
``cross_attention_frequency`` layers and its key names are ``vl_align.qformer``'s (``QFormer.load_blip2_checkpoint``);
a LAVIS file's sizes are read off its tensors, with the two the tensors cannot tell as settings: the Q-Former's
attention heads (LAVIS builds bert-base: width // 64 = 12) and the EVA ViT's (``create_eva_vit_g``: width // 88 =
16). Vision towers: EVA ViT-g (``vit_model="eva_clip_g"``, LAVIS's BLIP-2 default), any transformers
``Blip2VisionModel``, and LAVIS's CLIP ViT-L (``vit_model="clip_L"``, ``clip_vit.py``; see :func:`convert_clip_vit`
and :class:`LavisClipVision`). EVA variants with LayerScale or relative position bias are refused with an error
naming their keys.

LAVIS's ``clip_L`` (``create_clip_vit_L``): OpenAI's ViT-L/14 at 224 px (1024 wide, 16 heads, QuickGELU, LayerNorm
eps 1e-5, a patch convolution without bias, ``ln_pre`` before the blocks), built with 23 blocks: the 24th block of
``clip_vit_L.pth`` and any ``ln_post`` / ``proj`` (OpenAI's head) are dropped by its ``strict=False`` load, so the
Q-Former sees ``ln_vision`` of the 23rd block's output over every token. Here that is a transformers
``CLIPVisionModel`` (same function: the fused ``in_proj`` split into q/k/v, ``c_fc``/``c_proj`` as ``fc1``/``fc2``)
whose ``post_layernorm`` (transformers applies it to the pooled CLS only) is an identity, followed by ``ln_vision``.
Another ``image_size`` interpolates the position embeddings once at load, as LAVIS's ``interpolate_pos_embed`` does
(bicubic, ``align_corners=True``), not transformers' run-time interpolation.

The LLM sees BLIP-2's input layout: the queries first (no lead token), then the prompt tokenised with the
tokenizer's special tokens: OPT ``[queries][</s>][prompt]``, T5's encoder ``[queries][prompt][</s>]``
(``FrozenLLM(bos_before_prefix=False, prompt_special_tokens=True)``). Decoder-only generation stops at "\\n"
(LAVIS's OPT ``eos_token_id``) and at the tokenizer's EOS, which LAVIS does not stop at. A folder written by
``dvlp export-hf`` (it has ``dvlp_export.json``) gets back the layout its front was trained with.

Images: BLIP-2's evaluation processor resizes to ``image_size`` x ``image_size`` (bicubic, no crop, aspect
ratio not kept) and normalises with CLIP's mean/std; :class:`ImportedVisionTower` does the same, or reads the
folder's image processor settings (a shortest-edge resize with a centre crop, as our exports write, is our
usual preprocessing).

Every key of the checkpoint is accounted for: loaded, known and skipped (listed in the report with the reason),
or an error that names it; a weight the evaluation needs that the checkpoint lacks is an error too. Weights the
evaluation does not use and the checkpoint lacks (a stage-2 checkpoint's Q-Former text side and ITC/ITM heads)
keep their initialisation and are listed in ``ImportReport.not_in_checkpoint``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from dvlp_common.cache import file_digest
from dvlp_common.config import Config, ConfigError, param, to_dict
from pformer.llm import FrozenLLM

from .data import CLIP_MEAN, CLIP_STD
from .fronts import FrontConfig, QFormerFront
from .qformer import QFormer, QFormerConfig
from .vision import VisionTower, VisionTowerConfig

__all__ = ["Blip2CheckpointConfig", "CheckpointError", "ImportReport", "ImportedBlip2", "ImportedVisionTower",
           "LavisClipVision", "convert_clip_vit", "convert_eva_vit", "evaluation_parts", "load_blip2",
           "load_hf_blip2", "load_lavis_blip2"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAVIS_LN_VISION_EPS = 1e-5  # blip2.py: LayerNorm(num_features), torch's default eps
EVA_LN_EPS = 1e-6  # eva_vit.py create_eva_vit_g: partial(nn.LayerNorm, eps=1e-6)
EVA_HEAD_DIM = 88  # create_eva_vit_g: num_heads = 1408 // 88
BERT_HEAD_DIM = 64  # LAVIS builds the Q-Former from bert-base-uncased: 768 / 12
CLIP_HEAD_DIM = 64  # clip_vit.py create_clip_vit_L: width 1024, 16 heads
CLIP_L_LAYERS = 23  # create_clip_vit_L builds 23 blocks; clip_vit_L.pth is loaded into them with strict=False
CLIP_LN_EPS = 1e-5  # clip_vit.py LayerNorm(d_model): torch's default eps (ln_pre, ln_1, ln_2)
_BICUBIC = 3  # PIL's BICUBIC, as preprocessor_config.json spells it


class CheckpointError(ValueError):
    """A checkpoint that does not load as it is: unknown or missing keys, an unsupported part."""


def _listing(keys: Sequence[str], limit: int = 12) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


# ---------------------------------------------------------------------------------------------------------------
# config (``dvlp evaluate blip2.hf=... | blip2.lavis=... blip2.llm=...``)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Blip2CheckpointConfig(Config):
    hf: str | None = param(None, help="a transformers Blip2ForConditionalGeneration folder (save_pretrained: "
                                         "config.json, weights, tokenizer, preprocessor_config.json)")
    lavis: str | None = param(None, help="a LAVIS BLIP-2 .pth (Blip2OPT / Blip2T5 / Blip2Qformer; its 'model' "
                                            "entry is the state dict)")
    llm: str | None = param(None, help="LAVIS: the LLM the checkpoint was trained with, which the .pth does not "
                                          "hold (a hub name such as facebook/opt-2.7b or google/flan-t5-xl, or a "
                                          "local folder)")
    vision: str | None = param(None, help="LAVIS, when the .pth has no visual_encoder.* (LAVIS's trainer saves "
                                             "only trained weights): the ViT weights as LAVIS downloads them "
                                             "(eva_vit_g.pth, or clip_vit_L.pth for vit_model=clip_L), or a "
                                             "transformers BLIP-2 folder whose vision_model is taken (its "
                                             "post_layernorm replaced by the .pth's ln_vision)")
    vision_layers: int | None = param(None, help="LAVIS: ViT blocks to keep; later blocks are skipped and listed "
                                                    "(None: EVA, all in the weights (LAVIS builds 39 of "
                                                    "EVA-CLIP-g's); CLIP ViT-L from a vision= file, LAVIS's 23; "
                                                    "CLIP in the .pth itself, all of them)")
    vision_heads: int | None = param(None, help="LAVIS: attention heads of the ViT (None: EVA width // 88, "
                                                   "create_eva_vit_g's rule, 16 for ViT-g; CLIP width // 64, "
                                                   "create_clip_vit_L's 16)")
    qformer_heads: int | None = param(None, help="LAVIS: attention heads of the Q-Former (None: width // 64, "
                                                    "bert-base's 12)")
    image_size: int | None = param(None, help="input side in pixels (None: the checkpoint's; another size "
                                                 "interpolates the position embeddings, as LAVIS does at 364)")
    dtype: Literal["float32", "bfloat16", "float16"] = param("float32", help="dtype of the loaded tower and LLM "
                                                                             "(the front stays float32)")

    @property
    def enabled(self) -> bool:
        return self.hf is not None or self.lavis is not None

    def check(self) -> None:
        if self.hf is not None and self.lavis is not None:
            raise ConfigError("lavis", "give hf or lavis, not both")
        if self.lavis is not None and self.llm is None:
            raise ConfigError("llm", "a LAVIS checkpoint does not hold its LLM (LAVIS loads it by name): name it, "
                                     "e.g. facebook/opt-2.7b or google/flan-t5-xl, or give a local folder")
        if self.lavis is None:
            for key in ("llm", "vision", "vision_layers", "vision_heads", "qformer_heads"):
                if getattr(self, key) is not None:
                    raise ConfigError(key, "only for a LAVIS checkpoint (lavis=...); a transformers folder "
                                           "holds its LLM, its vision model and their sizes")
        for key in ("vision_layers", "vision_heads", "qformer_heads", "image_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(key, f"must be a positive integer or null, got {value}")


# ---------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ImportReport:
    """What a load did with every key: counts of loaded tensors; ``skipped``: checkpoint keys known and not used,
    each with its reason; ``not_in_checkpoint``: our front's parameters the checkpoint lacks, left as initialised
    (the evaluation does not use them); ``notes``: facts about the conversion."""
    source: str
    layout: Literal["transformers", "lavis"]
    loaded: dict[str, int] = field(default_factory=dict)  # part -> tensors loaded
    skipped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why
    not_in_checkpoint: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.layout} BLIP-2 checkpoint {self.source}: loaded "
                 + ", ".join(f"{part} {n}" for part, n in self.loaded.items())]
        if self.skipped:
            reasons: dict[str, list[str]] = {}
            for key, why in self.skipped.items():
                reasons.setdefault(why, []).append(key)
            lines += [f"  skipped ({why}): {_listing(keys, 4)}" for why, keys in reasons.items()]
        if self.not_in_checkpoint:
            lines.append(f"  not in the checkpoint, left as initialised (unused by generation): "
                         f"{_listing(self.not_in_checkpoint, 6)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class ImportedBlip2:
    """The parts ``dvlp evaluate`` runs: the front (eval mode), the frozen tower and the frozen LLM (None for a
    stage-1 ``Blip2Qformer`` checkpoint, which has no LLM projection)."""
    front: QFormerFront
    tower: VisionTower
    llm: FrozenLLM | None
    report: ImportReport


# ---------------------------------------------------------------------------------------------------------------
# the vision tower
# ---------------------------------------------------------------------------------------------------------------
def _squashed(image: Any, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """BLIP-2's evaluation preprocessing: RGB, resize to ``size`` x ``size`` (bicubic, no crop), /255, normalise.
    ``image``: a path, encoded bytes, a PIL image or a ``datasets`` image dict. -> ``[3, size, size]`` float32."""
    from PIL import Image

    if isinstance(image, dict):  # a datasets Image column's {"bytes", "path"}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, Image.Image):
        im = image
    else:
        im = Image.open(io.BytesIO(bytes(image)) if isinstance(image, (bytes, bytearray, memoryview))
                        else os.fspath(image))
    with contextlib.ExitStack() as stack:
        if im is not image:
            stack.enter_context(im)
        rgb = im.convert("RGB").resize((size, size), Image.BICUBIC)
    array = np.asarray(rgb, dtype=np.float32) / 255.0  # [S, S, 3]
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImportedVisionTower(VisionTower):
    """A frozen ``Blip2VisionModel`` (or :class:`LavisClipVision`) made from a checkpoint. Its features are the
    model's ``last_hidden_state`` (after BLIP-2's ``ln_vision``); ``resize`` is BLIP-2's ``"squash"`` (no crop)
    or ``"crop"`` (``VisionTower``'s shortest edge + centre crop); the feature-cache fingerprint covers the
    checkpoint files' sha256 and how the tower was assembled from them."""

    def __init__(self, model: nn.Module, config: VisionTowerConfig, mean: Sequence[float], std: Sequence[float], *,
                 resize: Literal["squash", "crop"], sources: Sequence[str | os.PathLike], assembly: dict):
        super().__init__(model, config, str(sources[0]), mean, std)
        self.resize = resize
        self._sources = [Path(s) for s in sources]
        self._assembly = assembly

    def _weights_identity(self) -> dict:
        files = []
        for source in self._sources:
            files += sorted(source.glob("*.safetensors")) if source.is_dir() else [source]
        return {"checkpoint": {str(f): file_digest(f) for f in files}, "assembly": self._assembly,
                "resize": self.resize}

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        if self.resize == "crop":
            return super().preprocess(images)
        if not len(images):
            raise ValueError("preprocess needs at least one image")
        return torch.stack([_squashed(im, self.image_size, self.mean, self.std) for im in images])


def _no_init():
    """Skip transformers' random init for a model whose every weight is loaded next (strict)."""
    with contextlib.suppress(ImportError):
        from transformers.initialization import no_init_weights

        return no_init_weights()
    return contextlib.nullcontext()


def _vision_model(config_kwargs: dict, state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    from transformers import Blip2VisionConfig, Blip2VisionModel

    with _no_init():
        model = Blip2VisionModel(Blip2VisionConfig(**config_kwargs))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:  # a bug in the conversion, not in the checkpoint (its keys were checked)
        raise CheckpointError(f"vision model: missing {_listing(missing)}, unexpected {_listing(unexpected)}")
    return model.to(dtype).eval()


_EVA_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_EVA_BLOCK_KEYS = {  # LAVIS eva_vit.py Block -> Blip2EncoderLayer (q_bias / v_bias handled apart)
    "norm1.weight": "layer_norm1.weight", "norm1.bias": "layer_norm1.bias",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.proj.weight": "self_attn.projection.weight", "attn.proj.bias": "self_attn.projection.bias",
    "norm2.weight": "layer_norm2.weight", "norm2.bias": "layer_norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_EVA_TOP_KEYS = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                 "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                 "patch_embed.proj.bias": "embeddings.patch_embedding.bias"}


def _depth_and_heads(blocks: dict, layers: int | None, width: int, heads: int | None, head_dim: int,
                     key_prefix: str, tower: str, builder: str, builds: str) -> tuple[int, int]:
    """The blocks kept (all, or ``layers``) and the head count (``heads``, or LAVIS's ``width // head_dim`` rule) of a
    converted ViT; the errors name the setting to give."""
    found = len(blocks)
    if sorted(blocks) != list(range(found)):
        raise CheckpointError(f"{key_prefix}*: blocks {sorted(blocks)} are not numbered 0..{found - 1}")
    use = found if layers is None else layers
    if use > found:
        raise CheckpointError(f"{key_prefix}*: vision_layers={use}{builds} but the weights have {found} blocks; "
                              f"set vision_layers")
    return use, _heads(width, heads, head_dim, f"the {tower}", builder, "vision_heads")


def _heads(width: int, heads: int | None, head_dim: int, module: str, builder: str, setting: str,
           context: str = "") -> int:
    """``heads``, or the builder's rule ``width // head_dim``; errors name ``setting`` (``context``: the checkpoint,
    prefixed to the rule's error)."""
    if heads is None:
        heads = width // head_dim
        if heads < 1 or width % head_dim:
            raise CheckpointError(f"{context + ': ' if context else ''}{module} is {width} wide, which {builder}'s "
                                  f"rule (width // {head_dim} heads) does not fit; set {setting}")
    if width % heads:
        raise CheckpointError(f"{setting}={heads} does not divide {module}'s width {width}")
    return heads


def convert_eva_vit(eva: dict[str, torch.Tensor], *, heads: int | None = None, layers: int | None = None,
                    key_prefix: str = "visual_encoder.") -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """LAVIS's EVA ViT (``eva_vit.py`` ``VisionTransformer``, keys without ``key_prefix``) -> ``(Blip2VisionConfig
    kwargs, Blip2VisionModel state dict without post_layernorm, skipped keys -> why)``.

    EVA's attention has a q and a v bias and no k bias, exactly Blip2's ``qkv.bias = [q_bias, 0, v_bias]``; its
    MLP is fc1 -> GELU -> fc2 and its LayerNorms use eps 1e-6. Blocks from ``layers`` on are skipped (LAVIS builds
    39 blocks and loads EVA-CLIP-g's weights with ``strict=False``). Anything else (LayerScale ``gamma_*``, relative
    position bias, a final norm or head, CLIP ViT-L's keys) is a :class:`CheckpointError` naming the keys.
    """
    if _is_clip(eva):
        raise CheckpointError(f"{key_prefix}*: these are LAVIS's CLIP ViT-L keys (vit_model='clip_L'), which "
                              f"convert_clip_vit converts; only the EVA ViT-g (eva_clip_g) converts to a "
                              f"Blip2VisionModel")
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in eva.items():
        m = _EVA_BLOCK.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
        elif key not in _EVA_TOP_KEYS:
            unknown.append(key)
    for i, block in blocks.items():
        unknown += [f"blocks.{i}.{k}" for k in block if k not in _EVA_BLOCK_KEYS and k not in ("attn.q_bias",
                                                                                               "attn.v_bias")]
    if unknown:
        raise CheckpointError(f"{key_prefix}*: keys the EVA ViT -> Blip2VisionModel conversion does not know (only "
                              f"LAVIS's EVA ViT-g without LayerScale or relative position bias converts): "
                              f"{_listing(sorted(key_prefix + k for k in unknown))}")
    missing_top = [key_prefix + k for k in _EVA_TOP_KEYS if k not in eva]
    if missing_top or not blocks:
        raise CheckpointError(f"{key_prefix}*: missing {_listing(missing_top or [key_prefix + 'blocks.0.*'])}")
    width = int(eva["cls_token"].shape[-1])
    use, heads = _depth_and_heads(blocks, layers, width, heads, EVA_HEAD_DIM, key_prefix, "EVA ViT",
                                  "create_eva_vit_g", "")
    patch = int(eva["patch_embed.proj.weight"].shape[-1])
    positions = int(eva["pos_embed"].shape[1]) - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise CheckpointError(f"{key_prefix}pos_embed has {positions} patch positions, not a square grid")
    with_bias = "attn.q_bias" in blocks[0]
    state = {ours: eva[theirs] for theirs, ours in _EVA_TOP_KEYS.items()}
    for i in range(use):
        block = blocks[i]
        need = list(_EVA_BLOCK_KEYS) + (["attn.q_bias", "attn.v_bias"] if with_bias else [])
        lacking = [f"{key_prefix}blocks.{i}.{k}" for k in need if k not in block]
        if lacking or (not with_bias and ("attn.q_bias" in block or "attn.v_bias" in block)):
            raise CheckpointError(f"{key_prefix}*: block {i} differs from block 0: missing {_listing(lacking)}")
        for theirs, ours in _EVA_BLOCK_KEYS.items():
            state[f"encoder.layers.{i}.{ours}"] = block[theirs]
        if with_bias:  # EVA adds no k bias: the k third of Blip2's fused bias is zero
            q, v = block["attn.q_bias"], block["attn.v_bias"]
            state[f"encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    skipped = {f"{key_prefix}blocks.{i}.{k}": f"block {i} is beyond vision_layers={use}"
               for i in range(use, len(blocks)) for k in blocks[i]}
    config = {"hidden_size": width, "intermediate_size": int(blocks[0]["mlp.fc1.weight"].shape[0]),
              "num_hidden_layers": use, "num_attention_heads": heads, "image_size": grid * patch,
              "patch_size": patch, "hidden_act": "gelu", "layer_norm_eps": EVA_LN_EPS, "attention_dropout": 0.0,
              "qkv_bias": with_bias}
    return config, state, skipped


_CLIP_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_CLIP_BLOCK_KEYS = {  # LAVIS clip_vit.py ResidualAttentionBlock -> CLIPEncoderLayer (in_proj_* split apart)
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_CLIP_IN_PROJ = ("attn.in_proj_weight", "attn.in_proj_bias")  # nn.MultiheadAttention's fused [q; k; v]
_CLIP_TOP_KEYS = {"conv1.weight": "embeddings.patch_embedding.weight",  # no bias: Conv2d(..., bias=False)
                  "class_embedding": "embeddings.class_embedding",
                  "positional_embedding": "embeddings.position_embedding.weight",
                  "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias"}
# OpenAI CLIP's head: LAVIS's VisionTransformer has no ln_post / proj (ln_final is commented out), so its
# strict=False load drops them
_CLIP_HEAD_KEYS = ("ln_post.weight", "ln_post.bias", "proj")


def _is_clip(keys) -> bool:
    return any(k.startswith(("transformer.resblocks.", "conv1.", "ln_pre.")) or k in ("class_embedding",
                                                                                       "positional_embedding")
               for k in keys)


def _lavis_resize_positions(positions: torch.Tensor, grid: int) -> torch.Tensor:
    """LAVIS's ``clip_vit.interpolate_pos_embed`` on ``[1 + g*g, D]``: the class position kept, the patch grid
    resized bicubically with ``align_corners=True`` to ``grid`` x ``grid`` (computed in float32)."""
    old = math.isqrt(positions.shape[0] - 1)
    patches = positions[1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # [1, D, g, g]
    patches = nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=True)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)
    return torch.cat([positions[:1], patches.to(positions.dtype)])


def convert_clip_vit(clip: dict[str, torch.Tensor], *, heads: int | None = None, layers: int | None = None,
                     image_size: int | None = None, key_prefix: str = "visual_encoder."
                     ) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """LAVIS's CLIP ViT (``clip_vit.py`` ``VisionTransformer``, keys without ``key_prefix``) -> ``(CLIPVisionConfig
    kwargs, CLIPVisionModel state dict (keys of the module holding ``embeddings``), skipped keys -> why)``.

    Blocks from ``layers`` on (None: all) and OpenAI's head (``ln_post``, ``proj``) are skipped, as LAVIS's
    ``strict=False`` load skips them; ``heads`` None is create_clip_vit_L's rule (width // 64); ``image_size``
    other than the weights' resizes the position embeddings as LAVIS does. Any other key, or a missing one, is a
    :class:`CheckpointError` naming it.
    """
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    unknown, skipped = [], {}
    for key, tensor in clip.items():
        m = _CLIP_BLOCK.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
        elif key in _CLIP_HEAD_KEYS:
            skipped[key_prefix + key] = "OpenAI CLIP's head: LAVIS's clip_L VisionTransformer has no ln_post / proj"
        elif key not in _CLIP_TOP_KEYS:
            unknown.append(key)
    for i, block in blocks.items():
        unknown += [f"transformer.resblocks.{i}.{k}" for k in block if k not in _CLIP_BLOCK_KEYS
                    and k not in _CLIP_IN_PROJ]
    if unknown:
        raise CheckpointError(f"{key_prefix}*: keys the LAVIS CLIP ViT -> CLIPVisionModel conversion does not know: "
                              f"{_listing(sorted(key_prefix + k for k in unknown))}")
    missing_top = [key_prefix + k for k in _CLIP_TOP_KEYS if k not in clip]
    if missing_top or not blocks:
        raise CheckpointError(f"{key_prefix}*: missing "
                              f"{_listing(missing_top or [key_prefix + 'transformer.resblocks.0.*'])}")
    width = int(clip["class_embedding"].shape[-1])
    use, heads = _depth_and_heads(blocks, layers, width, heads, CLIP_HEAD_DIM, key_prefix, "CLIP ViT",
                                  "create_clip_vit_L", f" (LAVIS's create_clip_vit_L builds {CLIP_L_LAYERS})")
    patch = int(clip["conv1.weight"].shape[-1])
    positions = clip["positional_embedding"]  # [1 + g*g, D]
    grid = math.isqrt(int(positions.shape[0]) - 1)
    if grid * grid != positions.shape[0] - 1:
        raise CheckpointError(f"{key_prefix}positional_embedding has {positions.shape[0] - 1} patch positions, not "
                              f"a square grid")
    state = {ours: clip[theirs] for theirs, ours in _CLIP_TOP_KEYS.items()}
    size = grid * patch if image_size is None else image_size
    if size // patch != grid:  # LAVIS builds the model at img_size and resizes the loaded grid to it
        state["embeddings.position_embedding.weight"] = _lavis_resize_positions(positions, size // patch)
    for i in range(use):
        block = blocks[i]
        lacking = [f"{key_prefix}transformer.resblocks.{i}.{k}" for k in [*_CLIP_BLOCK_KEYS, *_CLIP_IN_PROJ]
                   if k not in block]
        if lacking:
            raise CheckpointError(f"{key_prefix}*: block {i} lacks {_listing(lacking)}")
        for theirs, ours in _CLIP_BLOCK_KEYS.items():
            state[f"encoder.layers.{i}.{ours}"] = block[theirs]
        for kind, fused in zip(("weight", "bias"), (block["attn.in_proj_weight"], block["attn.in_proj_bias"])):
            if fused.shape[0] != 3 * width:
                raise CheckpointError(f"{key_prefix}transformer.resblocks.{i}.attn.in_proj_{kind} is "
                                      f"{tuple(fused.shape)}; nn.MultiheadAttention fuses [q; k; v] of {width}")
            for name, part in zip("qkv", fused.chunk(3)):
                state[f"encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = part
    skipped.update({f"{key_prefix}transformer.resblocks.{i}.{k}": f"block {i} is beyond vision_layers={use}"
                    for i in range(use, len(blocks)) for k in blocks[i]})
    config = {"hidden_size": width, "intermediate_size": int(blocks[0]["mlp.c_fc.weight"].shape[0]),
              "num_hidden_layers": use, "num_attention_heads": heads, "image_size": size, "patch_size": patch,
              "hidden_act": "quick_gelu", "layer_norm_eps": CLIP_LN_EPS, "attention_dropout": 0.0,
              "num_channels": int(clip["conv1.weight"].shape[1])}
    return config, state, skipped


class LavisClipVision(nn.Module):
    """LAVIS's ``clip_L`` tower followed by BLIP-2's ``ln_vision``, as one vision model for :class:`VisionTower`:
    ``last_hidden_state = ln_vision(blocks(ln_pre(patches + class + positions)))`` over every token, i.e. what
    LAVIS's Q-Former cross-attends to. ``clip`` is a transformers ``CLIPVisionModel`` with the kept blocks; its
    ``post_layernorm`` is an identity (LAVIS has no ``ln_post``; transformers applies it to the pooled CLS only).
    The input must be ``config.image_size`` square (no run-time position interpolation: LAVIS resizes at load)."""

    def __init__(self, config_kwargs: dict):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.config = CLIPVisionConfig(**config_kwargs)
        with _no_init():
            self.clip = CLIPVisionModel(self.config)
        self.core.post_layernorm = nn.Identity()
        self.ln_vision = nn.LayerNorm(self.config.hidden_size, eps=LAVIS_LN_VISION_EPS)

    @property
    def core(self) -> nn.Module:
        """The module holding ``embeddings`` / ``pre_layrnorm`` / ``encoder`` (transformers 4 nests it in
        ``vision_model``; 5 does not)."""
        return getattr(self.clip, "vision_model", self.clip)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False, return_dict: bool = True):
        from transformers.modeling_outputs import BaseModelOutput

        out = self.clip(pixel_values=pixel_values, output_hidden_states=output_hidden_states)
        return BaseModelOutput(last_hidden_state=self.ln_vision(out.last_hidden_state),  # [B, 1 + g*g, D]
                               hidden_states=out.hidden_states)


def _clip_vision_model(config_kwargs: dict, state: dict[str, torch.Tensor], ln: dict[str, torch.Tensor],
                       dtype: torch.dtype) -> LavisClipVision:
    model = LavisClipVision(config_kwargs)
    missing, unexpected = model.core.load_state_dict(state, strict=False)
    if missing or unexpected:  # a bug in the conversion, not in the checkpoint (its keys were checked)
        raise CheckpointError(f"CLIP vision model: missing {_listing(missing)}, unexpected {_listing(unexpected)}")
    model.ln_vision.load_state_dict(ln)
    return model.to(dtype).eval()


def _read_safetensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a save_pretrained folder whose key starts with ``prefix`` (prefix removed), without loading
    the others (an LLM's)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights")
    out: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 -- safe_open is not a mapping
                if key.startswith(prefix):
                    out[key[len(prefix):]] = fh.get_tensor(key)
    return out


def _load_pth(path: Path, what: str) -> dict:
    try:  # tensors and plain containers only: a checkpoint is data, never code to run
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable for any reason: one error naming the file
        raise CheckpointError(f"{what} {path}: cannot be read as a torch checkpoint of tensors and plain "
                              f"containers (torch.load weights_only=True): {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path}: holds a {type(obj).__name__}, expected a dict")
    return obj


# ---------------------------------------------------------------------------------------------------------------
# the front
# ---------------------------------------------------------------------------------------------------------------
# the Q-Former parameters generation reads: queries, their LayerNorm, self- and cross-attention, the query FFN
_QUERY_SIDE = re.compile(r"^(query_tokens$|layernorm\.|encoder\.layer\.\d+\.(attention|crossattention|"
                         r"intermediate_query|output_query)\.)")


def _load_qformer(qformer: QFormer, state: dict[str, torch.Tensor], source: Literal["hf", "lavis"],
                  what: str, needs_text: bool) -> tuple[int, list[str]]:
    """Q-Former keys -> ``qformer``; (tensors loaded, our Q-Former parameters the checkpoint lacks)."""
    missing, unexpected = qformer.load_blip2_checkpoint(state, source=source)
    if unexpected:
        raise CheckpointError(f"{what}: Q-Former keys that map to nothing in our Q-Former: {_listing(unexpected)}")
    needed = [_checkpoint_name(k, source) for k in missing if needs_text or _QUERY_SIDE.match(k)]
    if needed:
        raise CheckpointError(f"{what}: the checkpoint lacks Q-Former weights the evaluation needs: "
                              f"{_listing(needed)}")
    return len(dict(qformer.named_parameters())) - len(missing), missing


def _checkpoint_name(ours: str, source: Literal["hf", "lavis"]) -> str:
    """Our Q-Former parameter's name in the checkpoint's layout (the inverse of ``QFormer.load_blip2_checkpoint``'s
    key maps), for error messages."""
    if ours == "query_tokens":
        return ours
    if source == "hf":
        return ours if ours.startswith("embeddings.") else "qformer." + ours
    if ours.startswith("layernorm."):
        return "Qformer.bert.embeddings.LayerNorm." + ours[len("layernorm."):]
    if ours.startswith("lm_head."):
        return "Qformer.cls.predictions." + ours[len("lm_head."):]
    return "Qformer.bert." + re.sub(r"\.(attention|crossattention)\.attention\.", r".\1.self.", ours)


def _front_config(qformer: QFormer, embed_dim: int) -> FrontConfig:
    return FrontConfig(kind="qformer", init_from="", num_query_tokens=qformer.num_query_tokens,
                       cross_attention_frequency=qformer.config.cross_attention_frequency, embed_dim=embed_dim,
                       max_text_length=min(32, int(qformer.hf_config.max_position_embeddings)))


@torch.no_grad()
def _put(module: nn.Module, state: dict[str, torch.Tensor], what: str, prefix: str) -> int:
    """Copy ``state`` (this module's keys, ``prefix`` + key in the checkpoint ``what``) into ``module``, every
    parameter filled and shapes equal."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{what}: missing {_listing([prefix + k for k in missing]) or 'nothing'}, unexpected "
                              f"{_listing([prefix + k for k in unexpected]) or 'nothing'}")
    for key, tensor in state.items():
        if tuple(own[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{what}: {prefix}{key} is {tuple(tensor.shape)}, ours {tuple(own[key].shape)}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return len(state)


# ---------------------------------------------------------------------------------------------------------------
# transformers folder
# ---------------------------------------------------------------------------------------------------------------
def _image_settings(folder: Path, vision_size: int) -> tuple[int, str, tuple, tuple, str]:
    """(image_size, resize, mean, std, note) from the folder's image processor settings: preprocessor_config.json
    (transformers 4), else the "image_processor" entry of processor_config.json (transformers 5)."""
    pre, data = folder / "preprocessor_config.json", None
    if pre.is_file():
        data = json.loads(pre.read_text())
    elif (folder / "processor_config.json").is_file():
        pre = folder / "processor_config.json"
        data = json.loads(pre.read_text()).get("image_processor")
    if data is None:
        note = f"no image processor settings in the folder: BLIP-2's {vision_size} px square resize, CLIP's mean/std"
        return vision_size, "squash", CLIP_MEAN, CLIP_STD, note
    if data.get("resample", _BICUBIC) != _BICUBIC or data.get("do_resize") is False:
        raise CheckpointError(f"{pre}: resample={data.get('resample')}, do_resize={data.get('do_resize')}; only "
                              f"a bicubic resize (resample=3) is reproduced")
    mean, std = tuple(data.get("image_mean", CLIP_MEAN)), tuple(data.get("image_std", CLIP_STD))
    size, crop = data.get("size") or {}, data.get("crop_size") or {}
    if "height" in size and not data.get("do_center_crop"):
        if size["height"] != size.get("width"):
            raise CheckpointError(f"{pre}: non-square size {size}")
        return int(size["height"]), "squash", mean, std, ""
    if "shortest_edge" in size and data.get("do_center_crop") and crop.get("height") == crop.get("width"):
        return int(crop["height"]), "crop", mean, std, ""
    raise CheckpointError(f"{pre}: size={size}, do_center_crop={data.get('do_center_crop')}, crop_size={crop}; "
                          f"reproduced are a square resize without crop (BLIP-2) or a shortest-edge resize with a "
                          f"square centre crop")


def load_hf_blip2(folder: str | os.PathLike, *, image_size: int | None = None,
                  dtype: torch.dtype = torch.float32) -> ImportedBlip2:
    """A transformers ``Blip2ForConditionalGeneration`` folder -> our front, tower and LLM (see module docstring)."""
    from transformers import AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json; give a Blip2ForConditionalGeneration save_pretrained "
                              f"folder")
    config = Blip2Config.from_pretrained(folder)
    architectures = getattr(config, "architectures", None) or []
    if architectures and "Blip2ForConditionalGeneration" not in architectures:
        raise CheckpointError(f"{folder}: a {architectures} checkpoint; only Blip2ForConditionalGeneration (vision "
                              f"model, Q-Former, projection and LLM) loads for evaluation")
    model, info = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    problems = {name: sorted(str(k) for k in info.get(name) or ()) for name in
                ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    if any(problems.values()):
        raise CheckpointError(f"{folder}: the weights do not fit its config: "
                              + "; ".join(f"{name} {_listing(keys)}" for name, keys in problems.items() if keys))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # any tokenizer failure: one error naming the folder
        raise CheckpointError(f"{folder}: no loadable tokenizer ({err}); save the processor with the model") from err
    report = ImportReport(source=str(folder), layout="transformers")

    # tower: the folder's vision model as it is (post_layernorm = BLIP-2's ln_vision)
    vision = model.vision_model.eval()
    size, resize, mean, std, note = _image_settings(folder, int(config.vision_config.image_size))
    if note:
        report.notes.append(note)
    tower = ImportedVisionTower(vision, VisionTowerConfig(model=str(folder), image_size=image_size or size),
                                mean, std, resize=resize, sources=[folder], assembly={"layout": "transformers"})
    report.loaded["vision_model"] = len(vision.state_dict())

    # front: Q-Former (query side) and projection
    qformer = QFormer(QFormerConfig.from_hf_config(config.qformer_config, num_query_tokens=config.num_query_tokens))
    state = {k: v for k, v in model.state_dict().items() if k == "query_tokens" or k.startswith("qformer.")}
    report.loaded["qformer"], q_missing = _load_qformer(qformer, state, "hf", str(folder), needs_text=False)
    llm_width = model.language_model.get_input_embeddings().embedding_dim
    front = QFormerFront(_front_config(qformer, 256), tower.hidden_size, llm_width, qformer=qformer)
    report.loaded["llm_proj"] = _put(front.llm_proj, model.language_projection.state_dict(), str(folder),
                                     "language_projection.")
    report.not_in_checkpoint = [f"qformer.{k}" for k in q_missing] + [
        k for k in front.state_dict() if k.startswith(("vision_proj.", "text_proj.", "itm_head.", "temperature"))]

    # LLM: BLIP-2's layout, or the one a dvlp export was trained with
    decoder_only = not model.config.text_config.is_encoder_decoder
    exported = folder / "dvlp_export.json"
    if exported.is_file():
        lead = json.loads(exported.read_text()).get("lead_token_id")
        llm = FrozenLLM(model.language_model, tokenizer, "\n", bos_before_prefix=lead is not None)
        if llm.lead_token_id != lead:
            raise CheckpointError(f"{exported}: lead token {lead}, but the folder's tokenizer gives "
                                  f"{llm.lead_token_id}")
        report.notes.append("a dvlp export: the LLM layout its front was trained with (lead token "
                            f"{lead}, prompts without special tokens)")
    else:
        llm = FrozenLLM(model.language_model, tokenizer, "\n" if decoder_only else "",
                        bos_before_prefix=False, prompt_special_tokens=True)
    report.loaded["language_model"] = len(model.language_model.state_dict())
    del model
    return ImportedBlip2(front.eval(), tower, llm, report)


# ---------------------------------------------------------------------------------------------------------------
# LAVIS .pth
# ---------------------------------------------------------------------------------------------------------------
_LAVIS_LLM_PREFIX = {"opt_proj.": "opt_model.", "t5_proj.": "t5_model."}
_LAVIS_HEADS = ("vision_proj.", "text_proj.", "itm_head.")
_LAYER_INDEX = re.compile(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.")


def _lavis_qformer_config(state: dict[str, torch.Tensor], heads: int | None, what: str) -> QFormerConfig:
    """The Q-Former's sizes read off a LAVIS state dict (bert-base's act/eps/padding, as LAVIS builds it)."""
    if "query_tokens" not in state:
        raise CheckpointError(f"{what}: no query_tokens; not a BLIP-2 checkpoint")
    queries = state["query_tokens"]  # [1, Q, H]
    hidden = int(queries.shape[-1])
    layers = sorted({int(m.group(1)) for k in state if (m := _LAYER_INDEX.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"{what}: Q-Former layers {layers} are not numbered 0..n-1")
    n = len(layers)
    cross = sorted({int(m.group(1)) for k in state if (m := _LAYER_INDEX.match(k)) and ".crossattention." in k})
    if not cross or cross[0] != 0:
        raise CheckpointError(f"{what}: Q-Former cross-attention in layers {cross}; BLIP-2's starts at layer 0")
    freq = cross[1] - cross[0] if len(cross) > 1 else n
    if cross != list(range(0, n, freq)):
        raise CheckpointError(f"{what}: Q-Former cross-attention in layers {cross} is not every k-th layer")
    heads = _heads(hidden, heads, BERT_HEAD_DIM, "the Q-Former", "bert-base", "qformer_heads", context=what)
    pre = "Qformer.bert."
    key = f"{pre}encoder.layer.0.intermediate_query.dense.weight"
    if key not in state:
        raise CheckpointError(f"{what}: no {key}; the Q-Former's query FFN is missing")
    words = state.get(f"{pre}embeddings.word_embeddings.weight")
    positions = state.get(f"{pre}embeddings.position_embeddings.weight")
    return QFormerConfig(vision_width=int(state[f"{pre}encoder.layer.0.crossattention.self.key.weight"].shape[1]),
                         num_query_tokens=int(queries.shape[1]), cross_attention_frequency=freq,
                         hidden_size=hidden, num_hidden_layers=n, num_attention_heads=heads,
                         intermediate_size=int(state[key].shape[0]),
                         vocab_size=int(words.shape[0]) if words is not None else None,
                         max_position_embeddings=int(positions.shape[0]) if positions is not None else None,
                         hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _lavis_vision(state: dict[str, torch.Tensor], vision: str | None, layers: int | None, heads: int | None,
                  image_size: int | None, what: str, report: ImportReport
                  ) -> tuple[Literal["eva", "clip"], dict, dict[str, torch.Tensor], list[Path]]:
    """(tower kind, vision config kwargs, state dict without ln_vision, extra weight files) for a LAVIS
    checkpoint: a Blip2VisionModel's for EVA ViT-g, a CLIPVisionModel's for CLIP ViT-L (:func:`convert_clip_vit`)."""
    eva = {k[len("visual_encoder."):]: v for k, v in state.items() if k.startswith("visual_encoder.")}
    if eva:
        if vision is not None:
            raise ConfigError("vision", f"{what} holds its own visual_encoder.* weights; leave vision unset")
        if _is_clip(eva):  # the model's own tower: exactly the blocks LAVIS built
            config, vstate, skipped = convert_clip_vit(eva, heads=heads, layers=layers, image_size=image_size)
            report.skipped.update(skipped)
            return "clip", config, vstate, []
        config, vstate, skipped = convert_eva_vit(eva, heads=heads, layers=layers)
        report.skipped.update(skipped)
        return "eva", config, vstate, []
    if vision is None:
        raise ConfigError("vision", f"{what} has no visual_encoder.* weights (LAVIS's trainer saves only trained "
                                    f"weights; LAVIS loads its ViT from eva_vit_g.pth or clip_vit_L.pth): give "
                                    f"vision=<eva_vit_g.pth>, vision=<clip_vit_L.pth> (vit_model=clip_L) or a "
                                    f"transformers BLIP-2 folder with the same ViT (e.g. Salesforce/blip2-opt-2.7b)")
    path = Path(vision).expanduser()
    if path.is_dir():  # a transformers BLIP-2 folder: its vision model, its sizes
        from transformers import Blip2Config

        if layers is not None or heads is not None:
            raise ConfigError("vision_layers" if layers is not None else "vision_heads",
                              f"{path} is a transformers folder, whose config gives the ViT's sizes")
        config = Blip2Config.from_pretrained(path).vision_config.to_dict()
        keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "qkv_bias")
        vstate = _read_safetensors(path, "vision_model.")
        for key in ("post_layernorm.weight", "post_layernorm.bias"):
            if vstate.pop(key, None) is not None:
                report.skipped[f"{path}:vision_model.{key}"] = "replaced by the checkpoint's ln_vision"
        return "eva", {k: config[k] for k in keep}, vstate, [path]
    if path.is_file():
        obj = _load_pth(path, "vision")
        eva = obj.get("model", obj) if isinstance(obj.get("model"), dict) else obj
        prefix = "visual_encoder." if any(k.startswith("visual_encoder.") for k in eva) else ""
        eva = {k[len(prefix):]: v for k, v in eva.items()}
        if _is_clip(eva):  # clip_vit_L.pth: LAVIS builds 23 blocks and loads it with strict=False
            config, vstate, skipped = convert_clip_vit(eva, heads=heads, layers=layers or CLIP_L_LAYERS,
                                                       image_size=image_size, key_prefix=f"{path}:{prefix}")
            report.skipped.update(skipped)
            return "clip", config, vstate, [path]
        config, vstate, skipped = convert_eva_vit(eva, heads=heads, layers=layers, key_prefix=f"{path}:{prefix}")
        report.skipped.update(skipped)
        return "eva", config, vstate, [path]
    raise ConfigError("vision", f"{vision} does not exist")


def load_lavis_blip2(path: str | os.PathLike, *, llm: str | None, vision: str | None = None,
                     vision_layers: int | None = None, vision_heads: int | None = None,
                     qformer_heads: int | None = None, image_size: int | None = None,
                     dtype: torch.dtype = torch.float32) -> ImportedBlip2:
    """A LAVIS BLIP-2 ``.pth`` (``{"model": state_dict, ...}``) -> our front, tower and LLM (module docstring).

    ``llm`` is the LLM the checkpoint was trained with (LAVIS loads it by name; None only for a stage-1
    ``Blip2Qformer`` checkpoint, which has no projection to an LLM)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("lavis", f"{path} does not exist")
    what = str(path)
    ckpt = _load_pth(path, "LAVIS checkpoint")
    state = ckpt.get("model")
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: no 'model' entry (a LAVIS checkpoint is {{'model': state_dict, ...}}); "
                              f"entries: {_listing(sorted(ckpt))}")
    report = ImportReport(source=what, layout="lavis")

    # partition every key; whatever no part claims is an error
    proj_names = sorted({k.split(".")[0] + "." for k in state if k.startswith(tuple(_LAVIS_LLM_PREFIX))})
    if len(proj_names) > 1:
        raise CheckpointError(f"{what}: projections to two LLMs ({proj_names})")
    proj = proj_names[0] if proj_names else None
    llm_prefixes = tuple(_LAVIS_LLM_PREFIX.values())
    claimed = ("Qformer.", "ln_vision.", "visual_encoder.", *_LAVIS_LLM_PREFIX, *_LAVIS_HEADS, *llm_prefixes)
    unknown = sorted(k for k in state if k not in ("query_tokens", "temp") and not k.startswith(claimed))
    if unknown:
        raise CheckpointError(f"{what}: keys outside BLIP-2's parts (vision encoder, ln_vision, Q-Former, "
                              f"projections, ITC/ITM heads, LLM): {_listing(unknown)}")
    if proj is None and llm is not None:
        raise CheckpointError(f"{what}: no opt_proj / t5_proj (a stage-1 Blip2Qformer checkpoint): it has no "
                              f"projection into an LLM, so it cannot caption or answer with llm={llm}")
    if proj is not None and llm is None:
        raise ConfigError("llm", f"{what} projects into an LLM ({proj[:-1]}), which the .pth does not hold: name it")

    # vision tower: EVA ViT-g -> Blip2VisionModel, ln_vision as its post_layernorm; CLIP ViT-L -> LavisClipVision
    ln = {k[len("ln_vision."):]: v for k, v in state.items() if k.startswith("ln_vision.")}
    if sorted(ln) != ["bias", "weight"]:
        raise CheckpointError(f"{what}: ln_vision.weight and ln_vision.bias are needed (found "
                              f"{sorted('ln_vision.' + k for k in ln)})")
    kind, vconfig, vstate, extra = _lavis_vision(state, vision, vision_layers, vision_heads, image_size, what,
                                                 report)
    assembly = {"layout": "lavis", "vision_layers": vision_layers, "vision_heads": vision_heads,
                "ln_vision_eps": LAVIS_LN_VISION_EPS}
    if kind == "clip":
        model = _clip_vision_model(vconfig, vstate, ln, dtype)
        report.loaded["visual_encoder (CLIP ViT-L) + ln_vision"] = len(vstate) + len(ln)
        report.notes.append(f"LAVIS's clip_L: a CLIPVisionModel of {vconfig['num_hidden_layers']} blocks (QuickGELU, "
                            f"eps {CLIP_LN_EPS}, no ln_post) at {vconfig['image_size']} px, then ln_vision (eps "
                            f"{LAVIS_LN_VISION_EPS}) over every token")
        assembly.update(tower="clip_L", layers=vconfig["num_hidden_layers"], image_size=vconfig["image_size"])
    else:
        vstate = {**vstate, "post_layernorm.weight": ln["weight"], "post_layernorm.bias": ln["bias"]}
        model = _vision_model(vconfig, vstate, dtype)
        model.post_layernorm.eps = LAVIS_LN_VISION_EPS  # LAVIS's ln_vision; the blocks keep their own eps
        report.loaded["visual_encoder + ln_vision"] = len(vstate)
        report.notes.append(f"ln_vision is the tower's post_layernorm (eps {LAVIS_LN_VISION_EPS}, the ViT's "
                            f"{vconfig['layer_norm_eps']})")
    size = image_size or int(vconfig["image_size"])
    tower = ImportedVisionTower(model, VisionTowerConfig(model=what, image_size=size), CLIP_MEAN, CLIP_STD,
                                resize="squash", sources=[path, *extra], assembly=assembly)

    # front: Q-Former, heads, projection
    qformer = QFormer(_lavis_qformer_config(state, qformer_heads, what))
    if qformer.config.vision_width != tower.hidden_size:
        raise CheckpointError(f"{what}: the Q-Former cross-attends to width {qformer.config.vision_width}, the "
                              f"vision encoder is {tower.hidden_size} wide")
    qstate = {k: v for k, v in state.items() if k == "query_tokens" or k.startswith("Qformer.")}
    for key in qstate:
        if key == "Qformer.bert.embeddings.position_ids":
            report.skipped[key] = "a buffer (positions are recomputed)"
        elif key.startswith("Qformer.cls.predictions.decoder."):
            report.skipped[key] = "tied to the word embeddings / lm_head.bias"
    report.loaded["Qformer"], q_missing = _load_qformer(qformer, qstate, "lavis", what, needs_text=proj is None)
    heads = {p: {k[len(p):]: v for k, v in state.items() if k.startswith(p)} for p in _LAVIS_HEADS}
    present = [p for p in _LAVIS_HEADS if heads[p]]
    if present and len(present) != len(_LAVIS_HEADS) or (proj is None and "temp" not in state):
        raise CheckpointError(f"{what}: the ITC/ITM heads come together (vision_proj, text_proj, itm_head, temp); "
                              f"found {present + (['temp'] if 'temp' in state else [])}")
    llm_model = None
    if llm is not None:
        decoder_only = proj == "opt_proj."
        llm_model = FrozenLLM.load(llm, dtype=dtype, text_suffix="\n" if decoder_only else "",
                                   bos_before_prefix=False, prompt_special_tokens=True)
        if llm_model.is_encoder_decoder == decoder_only:
            raise CheckpointError(f"{what}: {proj[:-1]} feeds a {'decoder-only' if decoder_only else 'T5'} LLM, but "
                                  f"llm={llm} is {'encoder-decoder' if decoder_only else 'decoder-only'}")
    embed_dim = int(heads["vision_proj."]["weight"].shape[0]) if present else 256
    width = llm_model.hidden_size if llm_model is not None else qformer.hidden_size
    front = QFormerFront(_front_config(qformer, embed_dim), tower.hidden_size, width, qformer=qformer)
    for p in present:
        report.loaded[p[:-1]] = _put(getattr(front, p[:-1]), heads[p], what, p)
    if "temp" in state:
        with torch.no_grad():
            front.temperature.copy_(state["temp"].reshape(1))  # LAVIS: a 0-d parameter, ours [1]
        report.loaded["temp"] = 1
    if proj is not None:
        pstate = {k[len(proj):]: v for k, v in state.items() if k.startswith(proj)}
        report.loaded[proj[:-1]] = _put(front.llm_proj, pstate, what, proj)
    report.not_in_checkpoint = [f"qformer.{k}" for k in q_missing]
    if not present:
        report.not_in_checkpoint += [k for k in front.state_dict()
                                     if k.startswith(("vision_proj.", "text_proj.", "itm_head.", "temperature"))]
    if proj is None:
        report.not_in_checkpoint += ["llm_proj.weight", "llm_proj.bias"]

    # LLM weights saved in the file (a full state dict) override the named LLM's
    if llm_model is not None:
        prefix = _LAVIS_LLM_PREFIX[proj]
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        stray = [f"{p}*" for p in llm_prefixes if p != prefix and any(k.startswith(p) for k in state)]
        if stray:
            raise CheckpointError(f"{what}: holds {stray} next to {proj[:-1]}")
        if own:
            result = llm_model.model.load_state_dict(own, strict=False)
            if result.unexpected_keys:
                raise CheckpointError(f"{what}: {prefix}* keys that {llm} does not have: "
                                      f"{_listing([prefix + k for k in result.unexpected_keys])}")
            report.loaded[prefix[:-1]] = len(own)
            report.notes.append(f"{len(own)} LLM tensors from the checkpoint override {llm}'s")
    return ImportedBlip2(front.eval(), tower, llm_model, report)


# ---------------------------------------------------------------------------------------------------------------
def load_blip2(cfg: Blip2CheckpointConfig) -> ImportedBlip2:
    """The checkpoint ``cfg`` names (``hf`` or ``lavis``), with an LLM (``dvlp evaluate`` captions and answers)."""
    if not cfg.enabled:
        raise ConfigError("hf", "name a transformers folder (hf=...) or a LAVIS checkpoint (lavis=...)")
    dtype = _DTYPES[cfg.dtype]
    if cfg.hf is not None:
        if not Path(cfg.hf).expanduser().is_dir():
            raise ConfigError("hf", f"{cfg.hf} is not a folder")
        return load_hf_blip2(Path(cfg.hf).expanduser(), image_size=cfg.image_size, dtype=dtype)
    return load_lavis_blip2(Path(cfg.lavis).expanduser(), llm=cfg.llm, vision=cfg.vision,
                            vision_layers=cfg.vision_layers, vision_heads=cfg.vision_heads,
                            qformer_heads=cfg.qformer_heads, image_size=cfg.image_size, dtype=dtype)


def evaluation_parts(cfg: Blip2CheckpointConfig, *, retrieval: bool = False):
    """``(front, tower, llm, meta)`` as ``vl_align.fronts.load_front`` returns them, from the checkpoint ``cfg``
    names (``dvlp evaluate blip2.hf=...``); ``meta`` mirrors ``front_config.json`` plus the import report."""
    if retrieval:  # the ITC/ITM heads and text side would be left as initialised: refuse rather than rank by noise
        raise ConfigError("benchmark", "retrieval from a published BLIP-2 checkpoint is not supported: the OPT / T5 "
                                       "checkpoints have no ITC/ITM heads, and LAVIS's Blip2Qformer ones no LLM")
    imported = load_blip2(cfg)
    print(imported.report.summary(), flush=True)
    meta = {"front": to_dict(imported.front.config), "vision": to_dict(imported.tower.config),
            "llm": cfg.llm or cfg.hf, "bos_before_prefix": imported.llm.lead_token_id is not None,
            "checkpoint": {"source": imported.report.source, "layout": imported.report.layout,
                           "loaded": imported.report.loaded, "not_in_checkpoint": imported.report.not_in_checkpoint,
                           "notes": imported.report.notes}}
    return imported.front, imported.tower, imported.llm, meta
