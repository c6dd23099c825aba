"""Export a trained Q-Former front as a transformers ``Blip2ForConditionalGeneration`` folder.

The folder loads with plain ``Blip2ForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained``
(no custom code) and generates the same tokens as :func:`vl_align.generative.generate` does with the front, the
frozen tower and the frozen LLM it was made from. What goes where::

    ours                                   Blip2ForConditionalGeneration
    VisionTower (DINOv2, at image_size)    vision_model        (Blip2VisionModel, a CLIP-like ViT; converted)
    front.qformer  (query side)            query_tokens, qformer.*   (names already HF's, see ``_hf_to_ours``)
    front.llm_proj (W)                     language_projection
    FrozenLLM.model                        language_model      (+ one embedding row for the image token)
    FrozenLLM.tokenizer, tower preprocess  Blip2Processor: tokenizer (+ "<image>"), CLIPImageProcessor (PIL)

DINOv2 -> Blip2VisionModel, exactly:

* LayerScale ``x * lambda`` after the attention output and after fc2 is folded into those projections
  (``W' = diag(lambda) W``, ``b' = lambda * b``).
* q/k/v become Blip2's fused ``qkv``. Blip2's design has a q and a v bias but no k bias; a k bias adds
  ``q . b_k``, one constant per query row, to all of that row's logits, which softmax ignores, so it is dropped
  (the k third of ``qkv.bias`` is stored as zeros).
* Blip2 generates without interpolating position embeddings, so DINOv2's embeddings are interpolated here by
  ``Dinov2Embeddings.interpolate_pos_encoding`` itself at the tower's ``image_size`` and stored at that size.
* Patch embedding, CLS token, LayerNorms (same eps) and the final LayerNorm (``post_layernorm``) copy over.
  Only ``feature_layer = -1`` (``last_hidden_state``) is expressible. Register tokens, SwiGLU FFNs, non-RGB
  input or any parameter the conversion does not know raise :class:`ExportError`.

Prompting (what makes the captions equal). Our ``FrozenLLM.generate`` feeds ``[pad..., lead, prefix, prompt]``
(``lead``: the BOS of ``bos_before_prefix``, absent when off), the prompt tokenised without special tokens, and
stops at EOS or the text suffix ("\\n"). ``Blip2Processor`` cannot write a token before the image tokens, so
:func:`with_lead_token` (and the exported README) puts it into ``input_ids``. In BLIP-2 (v5) the
prefix enters at ``num_query_tokens`` image placeholder tokens of ``input_ids``; ``Blip2Processor`` puts them
before the tokenised text, which gives the same sequence when the tokenizer adds no special tokens (checked, and
switched off where the tokenizer allows). Batches are left-padded (``[image tokens, pad..., prompt]``); decoder-only
models derive positions from the attention mask, so the padding's place does not matter (but an empty prompt
among non-empty ones would end its row in padding: do not mix them). Caveats, also in the folder's README: call
the processor with ``text`` (``""`` for plain captioning), because without input ids
``Blip2ForConditionalGeneration.generate`` appends a BOS that our model never saw; and pass
``generation_config=model.generation_config`` (``generate`` otherwise uses the inner LLM's defaults: our stop
tokens come along through ``text_config.eos_token_id``, the length limit and token suppression do not).

The image token needs an id inside the LLM's vocabulary: when the tokenizer already fills it, the embedding table
(and an untied output head) grows by zero rows. With tied weights a zero row gives the new token logit 0, which
could in principle win a greedy step, so ``generation_config.suppress_tokens`` masks it.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dvlp_common.io import building_folder
from pformer.llm import FrozenLLM

from .qformer import _ARCH_KEYS, _FREE_KEYS, _hf_to_ours
from .vision import VisionTower

__all__ = ["ExportError", "Blip2Export", "IMAGE_TOKEN", "convert_dinov2_tower", "tower_image_processor",
           "build_blip2", "export_blip2", "verify_export", "hf_generate", "with_lead_token"]

IMAGE_TOKEN = "<image>"  # Blip2Processor's placeholder token (it adds this one when the tokenizer has none)
_DEFAULT_MAX_NEW_TOKENS = 30  # FrozenLLM.generate's default


class ExportError(ValueError):
    """The model has a part that a plain ``Blip2ForConditionalGeneration`` cannot express."""


# ---------------------------------------------------------------------------------------------------------------
# vision tower: DINOv2 -> Blip2VisionModel
# ---------------------------------------------------------------------------------------------------------------
def convert_dinov2_tower(tower: VisionTower) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(Blip2VisionConfig kwargs, Blip2VisionModel state dict)`` computing ``tower``'s features at its
    ``image_size``. Raises :class:`ExportError` for anything that is not a plain DINOv2 read at the last layer."""
    from transformers.models.dinov2.modeling_dinov2 import Dinov2MLP, Dinov2Model

    model, cfg = tower.model, tower.model.config
    kind = getattr(cfg, "model_type", type(model).__name__)
    if kind == "dinov2_with_registers":
        raise ExportError("vision tower: DINOv2 with register tokens cannot be exported; Blip2VisionModel has a "
                          "class token and patches only")
    if kind != "dinov2" or not isinstance(model, Dinov2Model):
        raise ExportError(f"vision tower: only DINOv2 (Dinov2Model) towers can be exported to Blip2VisionModel, "
                          f"got model_type {kind!r} ({type(model).__name__})")
    if tower.config.feature_layer != -1:
        raise ExportError(f"vision tower: feature_layer={tower.config.feature_layer} is not expressible; "
                          "Blip2VisionModel returns the last block's output after its final LayerNorm "
                          "(feature_layer=-1)")
    if getattr(cfg, "use_swiglu_ffn", False):
        raise ExportError("vision tower: DINOv2 with a SwiGLU FFN (use_swiglu_ffn) cannot be exported; "
                          "Blip2's MLP is fc1 -> activation -> fc2")
    if int(cfg.num_channels) != 3:
        raise ExportError(f"vision tower: {cfg.num_channels} input channels; Blip2's patch embedding takes RGB")

    emb, layers = model.embeddings, model.encoder.layer
    hidden, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    size, patch = tower.image_size, tower.patch_size
    first = layers[0]
    if first.attention.head_dim * heads != hidden:
        raise ExportError(f"vision tower: head_dim {first.attention.head_dim} x {heads} heads != hidden size "
                          f"{hidden}; Blip2 splits the hidden size evenly over the heads")
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise ExportError(f"vision tower: LayerNorms with different eps {sorted(eps)}; Blip2 uses one")
    qkv_bias = first.attention.q_proj.bias is not None

    vision_config = dict(hidden_size=hidden, intermediate_size=first.mlp.fc1.out_features,
                         num_hidden_layers=len(layers), num_attention_heads=heads, image_size=size,
                         patch_size=patch, hidden_act=cfg.hidden_act, layer_norm_eps=eps.pop(),
                         attention_dropout=0.0, qkv_bias=qkv_bias)

    used: set[int] = set()

    def take(p: torch.Tensor) -> torch.Tensor:
        used.add(id(p))
        return p.detach().clone()

    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        state["embeddings.class_embedding"] = take(emb.cls_token)  # [1, 1, D]
        state["embeddings.patch_embedding.weight"] = take(emb.patch_embeddings.projection.weight)  # [D, 3, p, p]
        state["embeddings.patch_embedding.bias"] = take(emb.patch_embeddings.projection.bias)
        # Dinov2Model interpolates on every call; Blip2 reads its table as stored, so store the interpolation
        # that Dinov2Model computes at this size: [1, 1 + (size/patch)^2, D]
        n = (size // patch) ** 2
        dummy = torch.zeros(1, n + 1, hidden, dtype=emb.position_embeddings.dtype)
        used.add(id(emb.position_embeddings))
        state["embeddings.position_embedding"] = emb.interpolate_pos_encoding(dummy, size, size).detach().clone()
        for i, layer in enumerate(layers):
            if not isinstance(layer.mlp, Dinov2MLP):
                raise ExportError(f"vision tower: layer {i} has a {type(layer.mlp).__name__} FFN; only Dinov2MLP")
            att, mlp, pre = layer.attention, layer.mlp, f"encoder.layers.{i}."
            lam1, lam2 = take(layer.layer_scale1.lambda1), take(layer.layer_scale2.lambda1)  # [D]
            state[pre + "self_attn.qkv.weight"] = torch.cat(
                [take(att.q_proj.weight), take(att.k_proj.weight), take(att.v_proj.weight)])  # [3D, D]
            if qkv_bias:
                take(att.k_proj.bias)  # dropped: a per-query constant in the logits (see module docstring)
                state[pre + "self_attn.qkv.bias"] = torch.cat(
                    [take(att.q_proj.bias), torch.zeros_like(att.k_proj.bias), take(att.v_proj.bias)])
            # LayerScale folded into the projections in front of it
            state[pre + "self_attn.projection.weight"] = lam1[:, None] * take(att.o_proj.weight)
            state[pre + "self_attn.projection.bias"] = lam1 * take(att.o_proj.bias)
            state[pre + "mlp.fc1.weight"], state[pre + "mlp.fc1.bias"] = take(mlp.fc1.weight), take(mlp.fc1.bias)
            state[pre + "mlp.fc2.weight"] = lam2[:, None] * take(mlp.fc2.weight)
            state[pre + "mlp.fc2.bias"] = lam2 * take(mlp.fc2.bias)
            for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
                norm = getattr(layer, ours)
                state[pre + theirs + ".weight"], state[pre + theirs + ".bias"] = take(norm.weight), take(norm.bias)
        state["post_layernorm.weight"], state["post_layernorm.bias"] = take(model.layernorm.weight), \
            take(model.layernorm.bias)
    # a parameter we did not read would be silently lost: refuse unknown variants
    left = [name for name, p in model.named_parameters() if id(p) not in used and name != "embeddings.mask_token"]
    if left:
        raise ExportError(f"vision tower: parameters the DINOv2 -> Blip2 conversion does not know: {left[:5]}")
    return vision_config, state


def tower_image_processor(tower: VisionTower):
    """A PIL-backend ``CLIPImageProcessor`` reproducing ``VisionTower.preprocess``: shorter side to
    ``image_size`` (bicubic), centre crop, /255, normalise with the tower's mean/std."""
    from transformers import CLIPImageProcessorPil
    from transformers.image_utils import PILImageResampling

    size = tower.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 resample=PILImageResampling.BICUBIC, do_center_crop=True, do_rescale=True,
                                 rescale_factor=1 / 255, do_normalize=True, image_mean=list(tower.mean),
                                 image_std=list(tower.std), do_convert_rgb=True)


# ---------------------------------------------------------------------------------------------------------------
# the whole model
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Blip2Export:
    """What :func:`build_blip2` produced: the model, its processor and the facts about the conversion."""
    model: Any  # Blip2ForConditionalGeneration (eval)
    processor: Any  # Blip2Processor
    image_token_id: int
    stop_token_ids: list[int]
    added_vocab_rows: int  # zero rows appended to the LLM's embedding table for the image token
    vision_check_max_abs: float  # converted vision model vs our tower on random pixels (float32)
    notes: list[str] = field(default_factory=list)
    lead_token_id: int | None = None  # the token our LLM saw before the image tokens (FrozenLLM.lead_token_id)


def _front_parts(front: nn.Module) -> tuple[nn.Module, nn.Linear]:
    kind = getattr(getattr(front, "config", None), "kind", None)
    qformer, proj = getattr(front, "qformer", None), getattr(front, "llm_proj", None)
    if kind == "tome" or qformer is None or proj is None:
        raise ExportError(f"front kind {kind!r} ({type(front).__name__}) cannot be exported: BLIP-2 needs a "
                          "Q-Former with learned queries and a projection to the LLM (the 'qformer' front; an "
                          "'elip' front too, whose pruning only runs in pre-training)")
    return qformer, proj


def _tokenizer_without_specials(tokenizer) -> list[str]:
    """Make ``tokenizer(text)`` add no special tokens (our prompts are tokenised without them), where the
    tokenizer lets us; returns notes about what could not be switched off."""
    probe = "a photo of"

    def adds() -> bool:
        return tokenizer(probe).input_ids != tokenizer(probe, add_special_tokens=False).input_ids

    if not adds():
        return []
    for name in ("add_bos_token", "add_eos_token"):
        if hasattr(tokenizer, name):
            with contextlib.suppress(Exception):
                setattr(tokenizer, name, False)
    if hasattr(tokenizer, "update_post_processor"):
        with contextlib.suppress(Exception):
            tokenizer.update_post_processor()
    if adds():
        return ["the tokenizer adds special tokens (e.g. BOS) that our prompts never had; pass "
                "add_special_tokens=False to the processor to reproduce our model"]
    return []


def build_blip2(front: nn.Module, tower: VisionTower, llm: FrozenLLM, *,
                max_new_tokens: int = _DEFAULT_MAX_NEW_TOKENS, check_tol: float = 1e-4) -> Blip2Export:
    """Assemble a float32 ``Blip2ForConditionalGeneration`` (eval mode) and its ``Blip2Processor`` from our parts.

    ``front`` is a ``QFormerFront`` (``front.vision``, if any, is ignored: ``tower`` is what gets converted);
    ``tower`` the frozen ``VisionTower``; ``llm`` the ``FrozenLLM`` (decoder-only or T5-like encoder-decoder).
    The converted vision model is checked against ``tower`` on random pixels (``check_tol``, relative to the
    largest feature) and an :class:`ExportError` is raised when they differ.
    """
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig

    qformer, proj = _front_parts(front)
    vision_config, vision_state = convert_dinov2_tower(tower)
    if qformer.hf_config.encoder_hidden_size != vision_config["hidden_size"]:
        raise ExportError(f"the Q-Former cross-attends to width {qformer.hf_config.encoder_hidden_size} but the "
                          f"tower's width is {vision_config['hidden_size']}")
    lm = llm.model
    if proj.out_features != llm.hidden_size:
        raise ExportError(f"the front projects to {proj.out_features}, the LLM's width is {llm.hidden_size}")
    num_query = qformer.num_query_tokens

    # tokenizer + processor: Blip2Processor adds "<image>" when the tokenizer has no image token
    tokenizer = copy.deepcopy(llm.tokenizer)
    # [image tokens, pad..., prompt]: generation continues every row at its end. save_pretrained writes the
    # init kwargs, so the side goes there too; load-time flags (local_files_only...) do not belong in the folder
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    for key in ("local_files_only", "is_local", "name_or_path"):
        tokenizer.init_kwargs.pop(key, None)
    notes = _tokenizer_without_specials(tokenizer)
    processor = Blip2Processor(tower_image_processor(tower), tokenizer, num_query_tokens=num_query)
    image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    vocab = lm.get_input_embeddings().num_embeddings
    new_vocab = max(vocab, image_token_id + 1)
    stops = llm.stop_token_ids()

    # the saved dtype is the export's (set by model.to), not the LLM's
    text_config = {k: v for k, v in lm.config.to_dict().items() if k not in ("_name_or_path", "dtype", "torch_dtype")}
    text_config.update(vocab_size=new_vocab, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=stops if len(stops) > 1 else stops[0])  # the LLM stops where ours does
    qformer_config = Blip2QFormerConfig(**{k: getattr(qformer.hf_config, k) for k in (*_ARCH_KEYS, *_FREE_KEYS)},
                                        cross_attention_frequency=qformer.hf_config.cross_attention_frequency,
                                        encoder_hidden_size=qformer.hf_config.encoder_hidden_size,
                                        use_qformer_text_input=False)  # generation uses the query side only
    config = Blip2Config(vision_config=vision_config, qformer_config=qformer_config.to_dict(),
                         text_config=text_config, num_query_tokens=num_query, image_token_index=image_token_id)

    init_off = contextlib.nullcontext()
    with contextlib.suppress(ImportError):
        from transformers.initialization import no_init_weights

        init_off = no_init_weights()  # every weight is loaded below (strict), so skip the random init
    with init_off:
        model = Blip2ForConditionalGeneration(config)

    state: dict[str, torch.Tensor] = {f"vision_model.{k}": v for k, v in vision_state.items()}
    ours = qformer.state_dict()
    target_keys = list(model.state_dict())
    for key in target_keys:  # HF Q-Former keys -> ours through the checkpoint loader's own key map
        mapped = _hf_to_ours(key) if (key == "query_tokens" or key.startswith("qformer.")) else None
        if mapped is None:
            continue
        if mapped not in ours:
            raise ExportError(f"Q-Former: {key} has no counterpart ({mapped}) in our Q-Former")
        state[key] = ours[mapped]
    state["language_projection.weight"], state["language_projection.bias"] = proj.weight, proj.bias
    lm_state = lm.state_dict()
    for key, target in model.language_model.state_dict().items():
        src = lm_state[key]
        if src.shape != target.shape:  # the embedding table / output head grown for the image token
            if src.shape[0] != vocab or target.shape[0] != new_vocab or src.shape[1:] != target.shape[1:]:
                raise ExportError(f"LLM: {key} is {tuple(src.shape)} but Blip2's language model expects "
                                  f"{tuple(target.shape)}")
            src = torch.cat([src, src.new_zeros(new_vocab - vocab, *src.shape[1:])])
        state["language_model." + key] = src
    missing = sorted(set(target_keys) - set(state))
    if missing:
        raise ExportError(f"nothing to fill Blip2 weights {missing[:5]} with")
    model.load_state_dict({k: v.detach().float() for k, v in state.items()}, strict=True)
    model.eval()

    # generation as FrozenLLM.generate does it: its explicit arguments over the LLM's own generation config
    gen = copy.deepcopy(lm.generation_config)
    gen.update(max_new_tokens=max_new_tokens, num_beams=1, do_sample=False, top_p=None, temperature=None,
               eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
               suppress_tokens=sorted({image_token_id, *range(vocab, new_vocab)}))
    gen.max_length = None
    gen._from_model_config = False  # a config of its own: generate must not rebuild it from the model config
    model.generation_config = gen
    model.language_model.generation_config = copy.deepcopy(gen)  # in memory only; saved at the top level

    # the vision conversion is exact up to rounding: prove it on random pixels before anyone uses the folder
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, tower.image_size, tower.image_size, generator=g)
    with torch.no_grad():
        ref = tower(pixels).float().cpu()
        got = model.vision_model(pixel_values=pixels).last_hidden_state
    err = (got - ref).abs().max().item()
    tol = check_tol if tower.dtype == torch.float32 else 5e-2  # a half-precision tower rounds its own features
    if err > tol * max(1.0, ref.abs().max().item()):
        raise ExportError(f"the converted vision model differs from the tower by {err:.3e} (max abs)")
    return Blip2Export(model=model, processor=processor, image_token_id=image_token_id, stop_token_ids=stops,
                       added_vocab_rows=new_vocab - vocab, vision_check_max_abs=err, notes=notes,
                       lead_token_id=llm.lead_token_id)


_README = """# {name}

A BLIP-2 model (`Blip2ForConditionalGeneration`) exported by `dvlp export-hf` from a trained Q-Former front.

- vision: {vision} converted to `Blip2VisionModel` at {size} px ({tokens} tokens)
- Q-Former: {num_query} queries; LLM: {llm}
- image placeholder `{image_token}` = id {image_token_id} ({added} row(s) added to the LLM's embeddings)

```python
import torch
from transformers import AutoProcessor, Blip2ForConditionalGeneration

model = Blip2ForConditionalGeneration.from_pretrained(PATH).eval()
processor = AutoProcessor.from_pretrained(PATH)
# always pass text ("" for captioning): without input ids BLIP-2 appends a BOS this model was not trained with
inputs = processor(images=images, text=[""] * len(images), return_tensors="pt", padding=True)
{lead}out = model.generate(**inputs, generation_config=model.generation_config)
{decode}
```

Notes
- `generation_config=model.generation_config` carries the stop tokens {stops}, `max_new_tokens` and the
  suppression of the image token; without it the inner LLM's defaults apply.
- Batches: the processor pads the text between the image tokens and the prompt (left padding), so do not mix
  empty and non-empty prompts in one batch (the empty prompt's row would end in padding).
- Pixel values equal the training preprocessing with the PIL image processor (the default without torchvision;
  otherwise load with `AutoProcessor.from_pretrained(PATH, backend="pil")`). The training preprocessing rounds the
  resized longer side where transformers truncates, and drops alpha where transformers composites it on white:
  non-square or transparent images may differ slightly.
{extra}"""


def export_blip2(front: nn.Module, tower: VisionTower, llm: FrozenLLM, out_dir: str | os.PathLike, *,
                 max_new_tokens: int = _DEFAULT_MAX_NEW_TOKENS, dtype: torch.dtype = torch.float32,
                 overwrite: bool = False, provenance: dict | None = None,
                 verify: Callable[[Path], None] | None = None) -> Path:
    """Write the ``Blip2ForConditionalGeneration`` folder (weights in ``dtype``, config, generation config,
    processor with tokenizer and image processor, a README and ``dvlp_export.json``) to ``out_dir``.

    Written to a temporary folder beside ``out_dir`` and renamed into place, so ``out_dir`` is either absent,
    the old export, or complete. ``verify(temp_folder)`` runs before the rename; if it raises, nothing is moved.
    An existing ``out_dir`` is an error unless ``overwrite``.
    """
    import transformers

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    exp = build_blip2(front, tower, llm, max_new_tokens=max_new_tokens)
    with building_folder(out) as tmp:
        exp.model.to(dtype).save_pretrained(tmp)
        exp.processor.save_pretrained(tmp)
        decoder_only = not exp.model.config.text_config.is_encoder_decoder
        decode = ("captions = processor.batch_decode(out[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)"
                  if decoder_only else "captions = processor.batch_decode(out, skip_special_tokens=True)")
        extra = "".join(f"- {note}\n" for note in exp.notes)
        if not decoder_only:
            extra += ("- encoder-decoder LLM: prompts of different lengths in one batch put padding between the "
                      "image tokens and the prompt, which moves T5's relative positions; batch equal prompts\n")
        (tmp / "README.md").write_text(_README.format(
            name=out.name, vision=getattr(tower.config, "model", "?"), size=tower.image_size,
            tokens=tower.num_tokens, num_query=exp.model.config.num_query_tokens, llm=type(llm.model).__name__,
            image_token=IMAGE_TOKEN, image_token_id=exp.image_token_id, added=exp.added_vocab_rows,
            decode=decode, stops=exp.stop_token_ids, extra=extra, lead=_lead_code(exp.lead_token_id)))
        meta = {"format": "dvlp-blip2-export/1", "transformers": transformers.__version__, "dtype": str(dtype),
                "image_token_id": exp.image_token_id, "stop_token_ids": exp.stop_token_ids,
                "added_vocab_rows": exp.added_vocab_rows, "vision_check_max_abs": exp.vision_check_max_abs,
                "lead_token_id": exp.lead_token_id,
                "notes": exp.notes, "source": provenance or {}}
        (tmp / "dvlp_export.json").write_text(json.dumps(meta, indent=2))
        if verify is not None:
            verify(tmp)
    return out


# ---------------------------------------------------------------------------------------------------------------
# using and checking an export
# ---------------------------------------------------------------------------------------------------------------
def _lead_code(lead_token_id: int | None) -> str:
    if lead_token_id is None:
        return ""
    return ("# trained with BOS before the image tokens, which Blip2Processor cannot write: put it there\n"
            f"lead = torch.full((len(images), 1), {lead_token_id})\n"
            "inputs[\"input_ids\"] = torch.cat([lead, inputs[\"input_ids\"]], 1)\n"
            "inputs[\"attention_mask\"] = torch.cat([torch.ones_like(lead), inputs[\"attention_mask\"]], 1)\n")


def with_lead_token(inputs, lead_token_id: int | None):
    """Put ``lead_token_id`` before the image tokens of a processor's output (the layout of a model trained with
    ``bos_before_prefix``; ``dvlp_export.json`` names the id). BLIP-2 finds the image tokens wherever they are."""
    if lead_token_id is None:
        return inputs
    ids = inputs["input_ids"]
    lead = torch.full((ids.shape[0], 1), lead_token_id, dtype=ids.dtype)
    inputs["input_ids"] = torch.cat([lead, ids], 1)
    inputs["attention_mask"] = torch.cat([torch.ones_like(lead), inputs["attention_mask"]], 1)
    return inputs


@torch.no_grad()
def hf_generate(model, processor, images: Sequence[Any], prompts: Sequence[str] | None = None,
                lead_token_id: int | None = None, **generate_kwargs) -> tuple[list[str], torch.Tensor]:
    """Captions with the exported model the way its README says: ``(texts, generated ids [B, T])`` (decoder-only:
    the new tokens; encoder-decoder: the decoder's output, starting with its start token). ``prompts`` default to
    ``""``; do not mix empty and non-empty prompts (``Blip2Processor`` pads between image tokens and text).
    ``lead_token_id``: the export's (``dvlp_export.json``), put before the image tokens."""
    prompts = list(prompts) if prompts is not None else [""] * len(images)
    inputs = with_lead_token(processor(images=list(images), text=prompts, return_tensors="pt", padding=True),
                             lead_token_id)
    gen = copy.deepcopy(model.generation_config)
    gen.update(**generate_kwargs)  # (generation_config plus loose arguments is deprecated in transformers 5)
    out = model.generate(**inputs, generation_config=gen)
    if not model.config.text_config.is_encoder_decoder:
        out = out[:, inputs["input_ids"].shape[1]:]  # with input ids, decoder-only generate returns them too
    return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)], out


@torch.no_grad()
def verify_export(out_dir: str | os.PathLike, front: nn.Module, tower: VisionTower, llm: FrozenLLM,
                  images: Sequence[Any], prompts: Sequence[str] | None = None,
                  max_new_tokens: int = _DEFAULT_MAX_NEW_TOKENS) -> dict:
    """Load the folder with plain transformers and measure it against ours on ``images`` (paths or PIL):
    pixel values, vision features, LLM prefix (max abs differences) and greedy captions (equal count)."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from .generative import generate

    model = Blip2ForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out_dir)
    pil = [_as_pil(im) for im in images]
    ours_pixels = tower.preprocess(pil)
    theirs_pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
    feats = tower(ours_pixels).float().cpu()
    hf_feats = model.vision_model(pixel_values=ours_pixels).last_hidden_state
    kw = _front_inputs(front, tower, ours_pixels)
    prefix = front("queries", **kw)["prompt_pred"].float().cpu()
    hf_prefix = model.get_image_features(pixel_values=ours_pixels).pooler_output
    ours = generate(front, llm, prompts=list(prompts) if prompts else None, max_new_tokens=max_new_tokens, **kw)
    theirs, _ = hf_generate(model, processor, pil, prompts, lead_token_id=llm.lead_token_id,
                            max_new_tokens=max_new_tokens)
    return {"images": len(pil),
            "pixel_max_abs": (theirs_pixels - ours_pixels).abs().max().item(),
            "vision_max_abs": (hf_feats - feats).abs().max().item(),
            "prefix_max_abs": (hf_prefix - prefix).abs().max().item(),
            "captions_equal": sum(a == b for a, b in zip(ours, theirs)),
            "ours": ours, "theirs": theirs}


def _front_inputs(front: nn.Module, tower: VisionTower, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The front runs the tower itself when it holds one (ELIP, uncached features); else it takes features."""
    if getattr(front, "vision", None) is not None:
        return {"pixel_values": pixels}
    return {"image_embeds": tower(pixels)}


def _as_pil(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else os.fspath(image)) as im:
        im.load()
        return im.copy()
