"""Training-step benchmark: throughput, analytic model FLOPs and utilisation, peak memory, visual tokens.

    python -m benchmarks.bench [--quick] [--out DIR] [--batch B] [--steps N] [--only SUBSTRING]

Writes ``DIR/bench.json`` and ``DIR/bench.md`` (default ``runs/bench``) and per-measurement logs in ``DIR/logs``.

What is measured, each in a fresh subprocess (so that its peak memory is its own):

* the device's matmul peak (fp32 and bf16): large square matmuls, best of several;
* one training step (forward + backward + gradient clipping + AdamW, after warm-up; median of N) of stage 1,
  the representation stage (fronts ``qformer``, ``elip``) and the generative stage (``qformer``, ``tome``, ``elip``),
  built from the pipeline pieces and the shipped configs (``configs/*.yaml``) on embedded easy-VQA data, in the
  compute dtype ``pipelines.precision.compute_dtype`` picks (and bf16 autocast for comparison);
* transformers' ``Blip2ForConditionalGeneration`` with the same vision-tower, Q-Former and LLM sizes, the same batch
  and captions, trained the same way (Q-Former + queries + projection), with its vision tower running and fed the
  precomputed features that our stage reads from its cache;
* scaling of the step with the image size (112 -> 224 -> 448 px, full mode).

Timing-only shortcuts, each stated in the report: the P-Former targets P(y) of the alignment term are a fixed
random tensor (the stage reads them from a cache; the loss is one MSE), the generative fronts start from their
initialisation (no ``init_front``), and every step reuses one batch (token counts and shapes are those of real
captions and images). DeepSpeed's engine and data loading are not in the step: both ours and the reference use
the stage's AdamW (``pipelines.optim.build_optimizer``) and gradient clipping.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "configs"
MAIN_SIZE = 112
SCALING_SIZES = (112, 224, 448)
GENERATIVE_FRONTS = ("qformer", "tome", "elip")
REPRESENTATION_FRONTS = ("qformer", "elip")
LIVE_TOWER_QFORMER = "qformer+tower"  # qformer with the frozen tower run in the step: what ELIP's pruning speeds up
_QUIET_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


# ===============================================================================================================
# worker side: one measurement in this process
def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def _self_peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_peak(spec: dict) -> dict:
    """Best FLOP/s of large square matmuls per dtype (no TF32 on GPUs: the fp32 steps do not use it either)."""
    import torch

    device = torch.device(spec["device"])
    out = {}
    for name in ("float32", "bfloat16"):
        dtype = _torch_dtype(name)
        best, best_n = 0.0, None
        for n in spec["sizes"]:
            a = torch.randn(n, n, dtype=dtype, device=device)
            b = torch.randn(n, n, dtype=dtype, device=device)
            for _ in range(2):  # kernel selection, caches
                a @ b
            _sync(device)
            for _ in range(spec["repeats"]):
                start = time.perf_counter()
                a @ b
                _sync(device)
                rate = 2.0 * n ** 3 / (time.perf_counter() - start)
                if rate > best:
                    best, best_n = rate, n
            del a, b
        out[name] = {"tflops": best / 1e12, "size": best_n}
    return {"peak": out, "threads": torch.get_num_threads()}


def _pairs(data_cfg, seed: int, batch: int):
    """``batch`` image-caption pairs of the stage's data source (cycled when the source is smaller)."""
    from dataclasses import replace

    from vl_align.pairs import load_pairs

    pairs, _ = load_pairs(replace(data_cfg, max_pairs=None, verify_images=False), seed)
    return [pairs[i % len(pairs)] for i in range(batch)]


class _StandInTargets:
    """Random prompts in place of the P-Former's P(y) (``vl_align.inputs.PromptTargets``' interface): the step's cost
    does not depend on their values."""

    def __init__(self, num_prompts: int, width: int):
        self.shape = (num_prompts, width)

    def batch_fields(self, captions, device) -> dict:
        import torch

        prompts = torch.randn(len(captions), *self.shape, device=device)
        return {"targets": prompts, "caption_prompts": prompts}

    def __call__(self, captions, device):
        return self.batch_fields(captions, device)["targets"]


def stage_config(stage: str, front: str | None, overrides: list[str]):
    """A stage's config as every benchmark builds it: the shipped base YAML of the stage (stage 2's ELIP front has its
    own), then ``overrides``. ``stage`` is stage1, representation or generative."""
    from dvlp_common.config import load_config
    from pipelines.generative import GenerativeConfig
    from pipelines.stage1 import Stage1Config
    from pipelines.stage2 import Stage2Config

    if stage == "stage1":
        return load_config(Stage1Config, CONFIG_DIR / "stage1.yaml", overrides)
    if stage == "representation":
        return load_config(Stage2Config, CONFIG_DIR / ("stage2_elip.yaml" if front == "elip" else "stage2.yaml"),
                           overrides)
    if stage == "generative":
        return load_config(GenerativeConfig, CONFIG_DIR / "generative.yaml", overrides)
    raise ValueError(f"unknown stage {stage!r}: expected stage1, representation or generative")


def _setup_stage1(spec, device, dtype):
    from benchmarks import flops as F
    from dvlp_common import zoo
    from pformer.data import load_text_corpus
    from pformer.llm import FrozenLLM
    from pformer.model import PFormer
    from pformer.objective import Stage1Collator, stage1_loss
    from vl_align.sources import resolve_text_source

    cfg = stage_config("stage1", None, spec["overrides"])
    b = spec["batch"]
    llm = FrozenLLM.load(cfg.model.llm, dtype=dtype, text_suffix=cfg.model.text_suffix,
                         bos_before_prefix=cfg.model.bos_before_prefix).to(device)
    tokenizer = zoo.load_tokenizer(cfg.model.text_encoder)
    model = PFormer.build(cfg.model, llm_hidden_size=llm.hidden_size).to(device)
    texts = list(dict.fromkeys(load_text_corpus(resolve_text_source(cfg.data.source))["text"]))
    texts = [texts[i % len(texts)] for i in range(b)]
    collate = Stage1Collator(tokenizer, llm, cfg.model.max_text_length, cfg.model.mask_prob, cfg.seed)
    batch = collate(texts, list(range(b)), step_key=0, device=device)

    def loss_fn():
        return stage1_loss(model, llm, batch, cfg.loss, cfg.model.label_smoothing)

    w = cfg.loss
    ledger = F.stage1_step(b, batch.input_ids.shape[1], batch.target_ids.shape[1],
                           F.EncoderDims.from_config(model.encoder.config), cfg.model.num_prompts,
                           F.LlamaDims.from_config(llm.model.config), cfg.model.contrastive_dim,
                           pooler=getattr(model.encoder, "pooler", None) is not None, lm=bool(w.lm), vq=bool(w.vq),
                           lead=int(llm.lead_token_id is not None),
                           contrastive=bool(w.contrastive))
    tokens = {"prefix_tokens_to_llm": cfg.model.num_prompts, "visual_tokens_to_next_stage": None}
    shapes = {"encoder_text_tokens": batch.input_ids.shape[1], "llm_caption_tokens": batch.target_ids.shape[1]}
    model.train()
    return model, loss_fn, ledger, tokens, shapes, cfg


def _setup_representation(spec, device, dtype):
    from benchmarks import flops as F
    from dvlp_common import zoo
    from vl_align.fronts import build_front, needs_live_tower
    from vl_align.inputs import ImageInputs, llm_width_of
    from vl_align.objectives import RepresentationCollator, representation_loss
    from vl_align.vision import VisionTower

    front_kind, size, b = spec["front"], spec["image_size"], spec["batch"]
    # ELIP's baseline: the same Q-Former with the unpruned frozen tower running inside the step (no feature cache)
    unpruned_tower = front_kind == LIVE_TOWER_QFORMER
    front_kind = "qformer" if unpruned_tower else front_kind
    cfg = stage_config("representation", front_kind,
                       [f"front.kind={front_kind}", f"vision.image_size={size}",
                        *(["vision.cache_features=false"] if unpruned_tower else []), *spec["overrides"]])
    # the stage's own parts: tower, front, image inputs (the feature cache unless the tower runs live), collator
    tower = VisionTower.build(cfg.vision).to(device)
    live = needs_live_tower(cfg.front, cfg.vision)
    llm_width = llm_width_of(cfg.llm)
    front = build_front(cfg.front, tower.hidden_size, llm_width, vision_tower=tower if live else None).to(device)
    tokenizer = zoo.load_tokenizer(cfg.front.init_from)
    pairs = _pairs(cfg.data, cfg.seed, b)
    images = ImageInputs.build(tower, [r.image for r in pairs], live, device, dtype)
    q = cfg.front.num_query_tokens
    collate = RepresentationCollator(pairs, tokenizer, cfg.front.max_text_length,
                                     {c: i for i, c in enumerate(dict.fromkeys(r.caption for r in pairs))}, images,
                                     _StandInTargets(q, llm_width) if cfg.align.weight else None, cfg.seed, device)
    batch = collate(list(range(b)), step=0)

    def loss_fn():
        return representation_loss(front, batch, cfg.losses, cfg.align)

    qf = F.QFormerDims.from_config(front.qformer.hf_config, q)
    elip = (size, F.ViTDims.from_config(tower.model.config), front.vision.elip_config) if front_kind == "elip" else None
    ledger, info = F.representation_step(b, batch.input_ids.shape[1], tower.num_tokens, qf, cfg.front.embed_dim,
                                         llm_width, itm=bool(cfg.losses.itm), itg=bool(cfg.losses.itg),
                                         elip_vision=elip, live_vision=(size, F.ViTDims.from_config(
                                             tower.model.config)) if unpruned_tower else None)
    tokens = {"vision_tokens": tower.num_tokens, "visual_tokens_to_next_stage": q,
              "vision_tokens_into_front": info["vision_tokens_to_front"]}
    if front_kind == "elip":
        tokens.update(_elip_tokens(front, batch.input_ids, batch.attention_mask, batch.pixel_values))
    shapes = {"qformer_text_tokens": batch.input_ids.shape[1]}
    front.train()  # as the training loop's engine.train(); ELIP prunes in training mode only
    return front, loss_fn, ledger, tokens, shapes, cfg


def _elip_tokens(front, ids, mask, pixels) -> dict:
    """Token counts of a real ELIP forward (train mode: pruning on), text-guided as in the step."""
    import torch

    front.train()
    with torch.no_grad():
        text_cls = front("text", input_ids=ids, attention_mask=mask)["text_cls"]
        out, stats = front.vision(pixels, text_cls=text_cls)
    return {"vision_tokens_into_front": out.shape[1], "vit_tokens_per_layer": stats.tokens_per_layer,
            "vit_mean_tokens_per_layer": stats.avg_tokens, "vit_token_reduction": stats.token_reduction}


def _setup_generative(spec, device, dtype):
    import torch

    from benchmarks import flops as F
    from dvlp_common import zoo
    from pformer.llm import FrozenLLM
    from vl_align.fronts import build_front, needs_live_tower
    from vl_align.generative import GenerativeCollator, generative_loss
    from vl_align.inputs import ImageInputs
    from vl_align.objectives import video_kwargs
    from vl_align.video_inputs import VideoSource
    from vl_align.vision import VisionTower

    front_kind, size, b = spec["front"], spec["image_size"], spec["batch"]
    # SimVLG trains on the LM loss alone; its token count differs from the P-Former's prompts
    extra = ["align.weight=0"] if front_kind == "tome" else []
    cfg = stage_config("generative", front_kind, ["init_front=null", f"front.kind={front_kind}",
                                                  f"vision.image_size={size}", *extra, *spec["overrides"]])
    # the stage's own parts: tower, LLM, front, image inputs, collator
    tower = VisionTower.build(cfg.vision).to(device)
    live = needs_live_tower(cfg.front, cfg.vision)
    llm = FrozenLLM.load(cfg.llm, dtype=dtype, bos_before_prefix=cfg.bos_before_prefix).to(device)
    front = build_front(cfg.front, tower.hidden_size, llm.hidden_size, vision_tower=tower if live else None).to(device)
    if cfg.front.video.enabled:  # clips as the stage serves them: the frozen blocks from the frame cache if valid
        source = VideoSource(dataclasses.replace(cfg.data, max_pairs=None), cfg.front.video.num_frames, cfg.seed,
                             video=cfg.front.video)
        records, _ = source.load_pairs()
        pairs = [records[i % len(records)] for i in range(b)]
        images = source.inputs(tower, [r.image for r in pairs], device, dtype)
    else:
        pairs = _pairs(cfg.data, cfg.seed, b)
        images = ImageInputs.build(tower, [r.image for r in pairs], live, device, dtype)
    q = cfg.front.num_query_tokens
    collate = GenerativeCollator(
        pairs, llm, cfg.front.max_text_length, images,
        _StandInTargets(q, llm.hidden_size) if cfg.align.weight and front_kind != "tome" else None,
        qformer_tokenizer=zoo.load_tokenizer(cfg.front.init_from) if front_kind == "elip" else None,
        train_prompt=cfg.weights.train_prompt, device=device)
    batch = collate(list(range(b)), step=0)
    t_text = batch.qformer_ids.shape[1] if batch.qformer_ids is not None else 0
    t_prompt = batch.prompt_ids.shape[1] if batch.prompt_ids is not None else 0

    def loss_fn():
        return generative_loss(front, llm, batch, cfg.weights, cfg.align)

    llm_dims = F.LlamaDims.from_config(llm.model.config)
    nv = tower.num_tokens
    kwargs = {}
    if front_kind == "tome":
        c = front.connector
        kwargs["tome"] = (F.EncoderDims.from_config(c.bert_config), c.schedule(nv), c.vision_width)
    else:
        kwargs["qf"] = F.QFormerDims.from_config(front.qformer.hf_config, q)
    if front_kind == "elip":
        kwargs["elip_vision"] = (size, F.ViTDims.from_config(tower.model.config), front.vision.elip_config)
    ledger, info = F.generative_step(front_kind, b, batch.target_ids.shape[1], nv, llm_dims, t_text=t_text,
                                     t_prompt=t_prompt, lm=bool(cfg.weights.lm), embed_dim=cfg.front.embed_dim,
                                     lead=int(llm.lead_token_id is not None), **kwargs)
    tokens = {"vision_tokens": nv, "visual_tokens_to_next_stage": info["tokens_to_llm"],
              "vision_tokens_into_front": info["vision_tokens_to_front"]}
    if cfg.front.video.enabled:  # the ledger has no live tower blocks or temporal modules: no FLOP count (timing only)
        ledger = None
    if front_kind == "tome":  # the real forward's count, not the schedule's
        front.train()
        with torch.no_grad():
            out = front("queries", image_embeds=batch.image_embeds, pixel_values=batch.pixel_values,
                        **video_kwargs(batch))
        tokens.update(visual_tokens_to_next_stage=out["prompt_pred"].shape[1],
                      connector_tokens_per_layer=list(out["tokens_per_layer"]))
    if front_kind == "elip":
        tokens.update(_elip_tokens(front, batch.qformer_ids, batch.qformer_mask, batch.pixel_values))
    shapes = {"llm_caption_tokens": batch.target_ids.shape[1], "qformer_text_tokens": t_text or None}
    front.train()  # as the training loop's engine.train(); ELIP prunes in training mode only
    return front, loss_fn, ledger, tokens, shapes, cfg


def _precomputed_vision():
    """A stand-in for Blip2's vision model that returns the features it is given as ``pixel_values``."""
    import torch.nn as nn
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    class PrecomputedVision(nn.Module):
        def forward(self, pixel_values, **_unused):
            return BaseModelOutputWithPooling(last_hidden_state=pixel_values, pooler_output=pixel_values[:, 0])

    return PrecomputedVision()


def _init_materialised(module, std: float = 0.02) -> None:
    """Random init of a module materialised from the meta device: LayerNorms 1/0, biases 0, the rest N(0, std)."""
    import torch
    import torch.nn as nn

    with torch.no_grad():
        norm_params = set()
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                    norm_params.update({id(m.weight), id(m.bias)})
        for name, p in module.named_parameters():
            if id(p) in norm_params:
                continue
            p.zero_() if name.endswith("bias") else p.normal_(0.0, std)
    bad = [n for n, buf in module.named_buffers() if buf.is_meta]
    if bad:
        raise RuntimeError(f"buffers left on the meta device: {bad[:5]}")


def build_blip2_reference(cfg, image_size: int, vision_input: str, device, dtype):
    """transformers' Blip2ForConditionalGeneration with our sizes: a Blip2 vision tower of the DINOv2 tower's
    dims (random weights), a Q-Former of the front's dims (random weights), the real frozen LLM. Built on the
    meta device so that no throw-away random LLM inflates the peak memory."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2VisionConfig

    from benchmarks import flops as F
    from dvlp_common import zoo
    from vl_align.qformer import QFormerConfig

    vit = zoo.load_config(cfg.vision.model)
    patch = vit.patch_size[0] if isinstance(vit.patch_size, (list, tuple)) else vit.patch_size
    inter = F.EncoderDims.from_config(vit).intermediate
    vision_config = Blip2VisionConfig(hidden_size=vit.hidden_size, intermediate_size=inter,
                                      num_hidden_layers=vit.num_hidden_layers,
                                      num_attention_heads=vit.num_attention_heads, patch_size=patch,
                                      image_size=image_size, qkv_bias=True)
    q = cfg.front.num_query_tokens
    qformer_config = QFormerConfig(vision_width=vit.hidden_size, init_from=zoo.resolve(cfg.front.init_from),
                                   num_query_tokens=q,
                                   cross_attention_frequency=cfg.front.cross_attention_frequency).to_hf_config()
    qformer_config.use_qformer_text_input = False  # BLIP-2's generative model has no text input to the Q-Former
    text_config = zoo.load_config(cfg.llm)
    image_token_id = text_config.vocab_size - 1
    config = Blip2Config(vision_config=vision_config.to_dict(), qformer_config=qformer_config.to_dict(),
                         text_config=text_config.to_dict(), num_query_tokens=q, image_token_index=image_token_id)
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    model.language_model = zoo.load_language_model(cfg.llm, dtype=dtype)
    if vision_input == "features":
        model.vision_model = _precomputed_vision()
    for name in ("vision_model", "qformer", "language_projection"):
        sub = getattr(model, name)
        if any(p.is_meta for p in sub.parameters()):
            sub.to_empty(device="cpu")
            _init_materialised(sub)
    model.query_tokens = torch.nn.Parameter(torch.randn(1, q, qformer_config.hidden_size) * 0.02)
    model.to(device)
    model.requires_grad_(False)
    for trainable in (model.qformer, model.language_projection):
        trainable.requires_grad_(True)
    model.query_tokens.requires_grad_(True)
    return model, image_token_id


def _setup_reference(spec, device, dtype):
    import torch

    from benchmarks import flops as F
    from dvlp_common import zoo
    from pformer.llm import FrozenLLM
    from vl_align.inputs import ImageInputs
    from vl_align.vision import VisionTower

    size, b, vision_input = spec["image_size"], spec["batch"], spec["vision_input"]
    cfg = stage_config("generative", "qformer",
                       ["init_front=null", "front.kind=qformer", f"vision.image_size={size}", *spec["overrides"]])
    model, image_token_id = build_blip2_reference(cfg, size, vision_input, device, dtype)
    tower = VisionTower.build(cfg.vision).to(device)  # our preprocessing; our features for the cached variant
    pairs = _pairs(cfg.data, cfg.seed, b)
    inputs = ImageInputs.build(tower, [r.image for r in pairs], vision_input != "features", device, dtype)
    (images,) = inputs([r.image for r in pairs], device).values()  # [B, N, D] features or [B, 3, S, S] pixels
    nv = tower.num_tokens
    if vision_input == "features":
        del tower, inputs
    # the same caption tokens as our generative step (FrozenLLM.tokenize_targets)
    llm_view = FrozenLLM(model.language_model, zoo.load_tokenizer(cfg.llm))
    target_ids, target_mask = llm_view.tokenize_targets([r.caption for r in pairs], cfg.front.max_text_length,
                                                        device)
    if (target_ids == image_token_id).any():
        raise RuntimeError(f"image placeholder id {image_token_id} occurs in the captions")
    q = cfg.front.num_query_tokens
    # transformers 5 puts the image where its placeholder tokens are: without them the image is silently ignored
    input_ids = torch.cat([torch.full((b, q), image_token_id, device=device), target_ids], 1)
    attention_mask = torch.cat([torch.ones(b, q, dtype=target_mask.dtype, device=device), target_mask], 1)
    labels = torch.cat([torch.full((b, q), -100, device=device), target_ids.masked_fill(target_mask == 0, -100)], 1)

    def loss_at(x):
        return model(pixel_values=x, input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    def loss_fn():
        return loss_at(images), {}

    model.eval()  # no dropout: a difference can only come from the image
    with torch.no_grad():  # the image must reach the loss: blank images, other loss
        own, other = float(loss_at(images)), float(loss_at(torch.zeros_like(images)))
    if not abs(own - other) > 1e-7 * max(1.0, abs(own)):
        raise RuntimeError(f"the reference's loss does not depend on the image ({own} vs {other})")
    model.train()
    model.vision_model.eval()  # frozen parts stay in eval mode, as our FrozenLLM / VisionTower do
    model.language_model.eval()

    qf = F.QFormerDims.from_config(model.config.qformer_config, q)
    vision = (size, F.ViTDims.from_config(model.config.vision_config)) if vision_input == "pixels" else None
    ledger = F.blip2_reference_step(b, target_ids.shape[1], nv, qf, F.LlamaDims.from_config(model.config.text_config),
                                    vision)
    tokens = {"vision_tokens": nv, "visual_tokens_to_next_stage": q, "vision_tokens_into_front": nv}
    shapes = {"llm_caption_tokens": target_ids.shape[1], "image_placeholder_id": image_token_id,
              "loss_own_images": own, "loss_other_images": other,
              "attn_implementation": {"llm": model.language_model.config._attn_implementation,
                                      "qformer": model.qformer.config._attn_implementation}}
    return model, loss_fn, ledger, tokens, shapes, cfg


_SETUPS = {"stage1": _setup_stage1, "representation": _setup_representation, "generative": _setup_generative,
           "reference": _setup_reference}


def build_step(spec, device, dtype):
    """A measured step's parts, ``(model, loss_fn, ledger, tokens, shapes, optim_cfg, kernels)``, prepared as the
    stages' ``build_engine`` prepares them: the CPU kernels of ``deepspeed.cpu_dropout`` and
    ``deepspeed.cpu_attention_matmul_max_keys`` (``kernels``: the settings, installed here; a process timing two
    steps re-installs each one's with :func:`use_kernels` before it runs). transformers' reference runs with torch's
    own kernels, as transformers ships it."""
    model, loss_fn, ledger, tokens, shapes, cfg = _SETUPS[spec["stage"]](spec, device, dtype)
    ds = cfg.deepspeed
    kernels = ({"matmul_max_keys": 0, "use_bit_dropout": False} if spec["stage"] == "reference" else
               {"matmul_max_keys": ds.cpu_attention_matmul_max_keys, "use_bit_dropout": ds.cpu_dropout == "bits"})
    use_kernels(kernels, model)
    return model, loss_fn, ledger, tokens, shapes, cfg.optim, kernels


def use_kernels(kernels: dict, model=None) -> None:
    """Install a step's CPU kernel settings (process-wide attention dispatch; dropout modules of ``model``)."""
    from dvlp_common.cpu_kernels import install_cpu_attention, use_bit_dropout

    install_cpu_attention(**kernels)
    if model is not None and kernels["use_bit_dropout"]:
        use_bit_dropout(model)


def measure_step(spec: dict) -> dict:
    """Build one stage's step, time it after warm-up, count its FLOPs; returns a JSON-able dict."""
    import torch

    from benchmarks import flops as F
    from dvlp_common import precision
    from pipelines import optim, training

    device, dtype = torch.device(spec["device"]), _torch_dtype(spec["dtype"])
    training.seed_everything(0)
    model, loss_fn, ledger, tokens, shapes, optim_cfg, _kernels = build_step(spec, device, dtype)
    if ledger is None:
        raise ValueError(f"{spec['stage']} with {spec['overrides']}: no FLOP count for a video front's step; time it "
                         "against another step with benchmarks.ab")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optim.build_optimizer(model, optim_cfg)
    if spec.get("compile"):  # as deepspeed.compile=true does in the stages
        optim.compile_forward(model)
    last = {}

    def forward():
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast(device, dtype):
            loss, _parts = loss_fn()
        return loss

    def update(loss):
        if optim_cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, optim_cfg.grad_clip)
        optimizer.step()
        last["loss"] = float(loss.detach())  # the training loop reads the loss every step too

    def step():
        loss = forward()
        loss.backward()
        update(loss)

    rss_setup = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s = []  # the first holds torch.compile's compile time when compiling
    for _ in range(spec["warmup"]):
        start = time.perf_counter()
        step()
        warmup_s.append(time.perf_counter() - start)
    times = []
    for _ in range(spec["steps"]):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    cuda_peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None

    executed = None
    if spec.get("count_executed"):  # one more step under torch's FLOP counter (untimed)
        with F.flop_counter() as fwd_counter:
            loss = forward()
        with F.flop_counter() as bwd_counter:
            loss.backward()
        update(loss)
        b = spec["batch"]
        executed = {"forward": fwd_counter.get_total_flops() / b, "backward": bwd_counter.get_total_flops() / b}
        executed["total"] = executed["forward"] + executed["backward"]

    median = statistics.median(times)
    b = spec["batch"]
    return {
        "step_times_s": times, "step_time_s": median, "samples_per_s": b / median, "warmup_step_times_s": warmup_s,
        "flops_per_sample": ledger.per_sample(b), "executed_flops_per_sample": executed,
        "achieved_tflops": ledger.total / median / 1e12, "tokens": tokens, "shapes": shapes,
        "loss": last.get("loss"), "trainable_params": sum(p.numel() for p in params),
        "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "rss_after_setup_mb": rss_setup, "self_peak_rss_mb": _self_peak_rss_mb(), "cuda_peak_mb": cuda_peak,
        "threads": torch.get_num_threads(),
    }


def run_case(spec: dict) -> dict:
    """One measurement in this process (the subprocess entry point; the tests call it directly)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if spec["kind"] == "peak":
        return measure_peak(spec)
    return measure_step(spec)


# ===============================================================================================================
# parent side: the plan, fresh subprocesses, the report
def machine_info(device: str) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "load_average_start": list(os.getloadavg())}
    return info


def measure_in_subprocess(spec: dict, log_dir: Path, timeout_s: float) -> dict:
    """Run ``spec`` in a fresh interpreter; its peak RSS comes from wait4 (that child's own rusage)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    safe = spec["name"].replace("/", "_").replace("@", "_")
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, **_QUIET_ENV, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        start = time.perf_counter()
        with (log_dir / f"{safe}.log").open("w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench", "--worker", str(spec_path),
                                     "--result", str(result_path)], cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            timer = threading.Timer(timeout_s, proc.kill)
            timer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                timer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        wall = time.perf_counter() - start
        out = {"name": spec["name"], "spec": spec, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}
        if proc.returncode == 0 and result_path.is_file():
            out.update(json.loads(result_path.read_text()))
        else:
            tail = (log_dir / f"{safe}.log").read_text()[-3000:]
            out["error"] = f"exit code {proc.returncode}" + (" (timed out)" if wall >= timeout_s else "")
            out["log_tail"] = tail
    return out


def peak_spec(device: str, repeats: int, name: str = "matmul_peak") -> dict:
    """The matmul-peak measurement: square matmuls of sizes that saturate the device."""
    sizes = [1024, 2048] if device == "cpu" else [4096, 8192]
    return {"name": name, "kind": "peak", "device": device, "sizes": sizes, "repeats": repeats}


def plan(quick: bool, device: str, dtype: str, batch: int | None = None, steps: int | None = None,
         overrides: list[str] | None = None) -> list[dict]:
    """The measurements of a run; ``overrides`` (config ``key=value`` words, e.g. ``optim.implementation=fused``)
    apply to every step; none: the shipped configs."""
    b = batch or (8 if quick else 32)
    n_steps = steps or (2 if quick else 3)
    common = {"kind": "step", "device": device, "warmup": 1, "steps": n_steps, "batch": b,
              "overrides": list(overrides or [])}
    other = "bfloat16" if dtype != "bfloat16" else "float32"

    def step(stage, front=None, size=MAIN_SIZE, dt=dtype, **kw):
        name = stage if front is None else f"{stage}/{front}"
        # the FLOP-counter step is a cross-check (the tests check it on tiny models); quick mode skips it
        spec = {**common, "name": f"{name}@{size}/{dt}/b{kw.get('batch', b)}", "stage": stage, "front": front,
                "image_size": size, "dtype": dt, "count_executed": dt == dtype and not quick, **kw}
        return spec

    cases = [peak_spec(device, repeats=3 if quick else 8)]
    cases.append(step("stage1"))
    cases += [step("representation", f) for f in (*REPRESENTATION_FRONTS, LIVE_TOWER_QFORMER)]
    cases += [step("generative", f) for f in GENERATIVE_FRONTS]
    cases += [step("reference", "blip2_hf_features", vision_input="features"),
              step("reference", "blip2_hf_pixels", vision_input="pixels")]
    # the other dtype, for comparison: one row; every stage on GPUs, where it is cheap (a CPU without AMX runs
    # bf16 several times slower than fp32, measured)
    cases.append(step("generative", "qformer", dt=other))
    if not quick and device != "cpu":
        cases += [step("stage1", dt=other), step("representation", "qformer", dt=other),
                  step("reference", "blip2_hf_features", dt=other, vision_input="features")]
    if not quick:
        scaling_batch = min(b, 4)  # 448 px gives the tome front ~1000 tokens per image in the LLM
        for size in SCALING_SIZES:
            for f in GENERATIVE_FRONTS:
                cases.append(step("generative", f, size=size, batch=scaling_batch, steps=2, count_executed=False,
                                  scaling=True))
            for f in ("elip", LIVE_TOWER_QFORMER):
                cases.append(step("representation", f, size=size, batch=scaling_batch, steps=2,
                                  count_executed=False, scaling=True))
    return cases


def _mfu(row: dict, peak: dict) -> float | None:
    p = peak.get(row["spec"]["dtype"], {}).get("tflops")
    return row["achieved_tflops"] / p if p and "achieved_tflops" in row else None


def _summary_row(row: dict, peak: dict) -> dict:
    spec = row["spec"]
    out = {"name": row["name"], "stage": spec["stage"], "front": spec.get("front"), "image_size": spec["image_size"],
           "batch": spec["batch"], "dtype": spec["dtype"], "device": spec["device"]}
    if "error" in row:
        return {**out, "error": row["error"]}
    fl = row["flops_per_sample"]
    out.update(step_time_s=row["step_time_s"], samples_per_s=row["samples_per_s"],
               gflops_per_sample={"forward": fl["forward"] / 1e9, "backward": fl["backward"] / 1e9,
                                  "total": fl["total"] / 1e9,
                                  "by_component": {k: v / 1e9 for k, v in fl["by_component"].items()}},
               executed_gflops_per_sample=({k: v / 1e9 for k, v in row["executed_flops_per_sample"].items()}
                                           if row.get("executed_flops_per_sample") else None),
               achieved_tflops=row["achieved_tflops"], mfu=_mfu(row, peak), peak_rss_mb=row["peak_rss_mb"],
               rss_after_setup_mb=row["rss_after_setup_mb"], cuda_peak_mb=row["cuda_peak_mb"],
               tokens=row["tokens"], shapes=row["shapes"], loss=row["loss"], step_times_s=row["step_times_s"],
               trainable_params=row["trainable_params"], frozen_params=row["frozen_params"])
    return out


def _find(rows, stage, front=None, size=MAIN_SIZE, dtype=None, scaling=False):
    for r in rows:
        s = r["spec"]
        if (s.get("stage") == stage and s.get("front") == front and s.get("image_size") == size
                and (dtype is None or s["dtype"] == dtype) and bool(s.get("scaling")) == scaling
                and "error" not in r):
            return r
    return None


def _ratio(a, b):
    return a / b if a is not None and b else None


def assemble(results: list[dict], machine: dict, args, dtype: str, dtype_rule: str, wall_s: float) -> dict:
    from benchmarks.flops import CONVENTION

    peak_row = next((r for r in results if r["spec"]["kind"] == "peak"), None)
    peak = peak_row.get("peak", {}) if peak_row and "error" not in peak_row else {}
    steps = [r for r in results if r["spec"]["kind"] == "step"]
    main = [_summary_row(r, peak) for r in steps if not r["spec"].get("scaling")]
    scaling = [_summary_row(r, peak) for r in steps if r["spec"].get("scaling")]
    if not scaling:  # quick mode: the one image size measured
        scaling = [m for m in main if m["dtype"] == dtype and (m["stage"] == "generative" or (
            m["stage"] == "representation" and m.get("front") == "elip"))]

    def sps(r):
        return r["samples_per_s"] if r else None

    ours = _find(steps, "generative", "qformer", dtype=dtype)
    ref_feat = _find(steps, "reference", "blip2_hf_features", dtype=dtype)
    ref_pix = _find(steps, "reference", "blip2_hf_pixels", dtype=dtype)
    comparison = {
        "ours": "generative stage, qformer front (cached vision features), " + dtype,
        "ours_over_reference_features": _ratio(sps(ours), sps(ref_feat)),
        "ours_over_reference_pixels": _ratio(sps(ours), sps(ref_pix)),
        "ratio_used": "ours_over_reference_features: both consume the same precomputed vision features (like for "
                      "like); ours_over_reference_pixels is against what a user of HF's class gets, the vision tower "
                      "running in every step",
        "notes": "The reference computes LLM logits at every position (ours only where a caption token is "
                 "predicted); its vision tower and Q-Former have random weights, its LLM is the same SmolLM2",
    }
    stage2 = {}
    for stage, fronts in (("generative", GENERATIVE_FRONTS),
                          ("representation", (*REPRESENTATION_FRONTS, LIVE_TOWER_QFORMER))):
        stage2[stage] = {}
        for f in fronts:
            r = _find(steps, stage, f, dtype=dtype)
            stage2[stage][f] = None if r is None else {
                "samples_per_s": r["samples_per_s"], "step_time_s": r["step_time_s"],
                "visual_tokens_to_next_stage": r["tokens"]["visual_tokens_to_next_stage"],
                "vision_tokens_into_front": r["tokens"].get("vision_tokens_into_front"),
                "vit_mean_tokens_per_layer": r["tokens"].get("vit_mean_tokens_per_layer"),
                "peak_rss_mb": r["peak_rss_mb"], "cuda_peak_mb": r["cuda_peak_mb"],
                "gflops_per_sample": r["flops_per_sample"]["total"] / 1e9}
    g = stage2["generative"]
    t, q = g.get("tome"), g.get("qformer")
    stage2["ratio_tome_over_qformer"] = None if not (t and q) else {
        "samples_per_s": t["samples_per_s"] / q["samples_per_s"],
        "visual_tokens_to_next_stage": t["visual_tokens_to_next_stage"] / q["visual_tokens_to_next_stage"],
        "peak_rss_mb": t["peak_rss_mb"] / q["peak_rss_mb"],
        "gflops_per_sample": t["gflops_per_sample"] / q["gflops_per_sample"]}
    e, u = _find(steps, "representation", "elip", dtype=dtype), _find(steps, "representation", LIVE_TOWER_QFORMER,
                                                                      dtype=dtype)
    stage2["ratio_elip_over_unpruned_tower"] = None if not (e and u) else {
        "samples_per_s": e["samples_per_s"] / u["samples_per_s"], "peak_rss_mb": e["peak_rss_mb"] / u["peak_rss_mb"],
        "cuda_peak_mb": (e["cuda_peak_mb"] / u["cuda_peak_mb"]) if e.get("cuda_peak_mb") and u.get("cuda_peak_mb")
        else None,
        "gflops_per_sample": e["flops_per_sample"]["total"] / u["flops_per_sample"]["total"],
        "vit_mean_tokens_per_layer": e["tokens"].get("vit_mean_tokens_per_layer"),
        "vit_tokens_unpruned": u["tokens"]["vision_tokens"]}
    stage2["image_size"] = MAIN_SIZE
    stage2["dtype"] = dtype
    machine = {**machine, "load_average_end": list(os.getloadavg())}
    return {
        "mode": "quick" if args.quick else "full", "overrides": args.set, "machine": machine,
        "malloc": getattr(args, "malloc", "reuse"), "compile": bool(getattr(args, "compile", False)),
        "compute_dtype": dtype, "compute_dtype_rule": dtype_rule, "flop_convention": CONVENTION,
        "timing": "median of the timed steps after warm-up; a step = zero_grad + forward (autocast in the compute "
                  "dtype) + backward + grad-norm clipping + AdamW step + reading the loss; one fixed batch; "
                  "memory: peak RSS of the measurement's own process (wait4), CUDA: max_memory_allocated",
        "shortcuts": "P(y) targets are a fixed random tensor (the stage reads them from a cache); generative fronts "
                     "start from their initialisation; DeepSpeed engine and data loading are not in the step",
        "matmul_peak": peak, "steps": main, "reference_comparison": comparison, "stage2": stage2,
        "scaling": scaling, "errors": [{"name": r["name"], "error": r["error"], "log_tail": r.get("log_tail")}
                                       for r in results if "error" in r],
        "wall_s": wall_s, "measurement_wall_s": {r["name"]: r["wall_s"] for r in results},
    }


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _pct(v: float | None) -> str | None:
    return None if v is None else f"{100 * v:.1f}%"


def _mem(r) -> float | None:
    return r.get("cuda_peak_mb") if r.get("device") == "cuda" else r.get("peak_rss_mb")


def write_markdown(report: dict, path: Path) -> None:
    m = report["machine"]
    hw = f"GPU {m['gpu']}" if m.get("gpu") else f"CPU {m['cpu']}"
    mem_label = "CUDA peak MB" if m["device"] == "cuda" else "peak RSS MB"
    parts = [
        f"# Training-step benchmark ({report['mode']} mode"
        + (f"; every step with {', '.join(report['overrides'])}" if report.get("overrides") else "") + ")\n",
        f"Machine: {hw}; {m['usable_cores']} cores, {m['torch_threads']} torch threads; torch {m['torch']}, "
        f"transformers {m['transformers']}, Python {m['python']}. Load average (1/5/15 min) at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_end'])}. Total wall time {report['wall_s']:.0f} s.\n",
        f"Compute dtype: **{report['compute_dtype']}** ({report['compute_dtype_rule']}).\n",
        f"Host allocator: {report.get('malloc', 'reuse')} (reuse: freed memory kept for the next step, as `dvlp` "
        "runs the stages; system: glibc's default).\n",
        "torch.compile: " + ("on (the trained forward; warm-up step times in bench.json hold the compile)"
                             if report.get("compile") else "off") + ".\n",
        f"Timing: {report['timing']}.\n",
        f"Shortcuts: {report['shortcuts']}.\n",
        "## Matmul peak\n",
        _table(["dtype", "GFLOP/s", "matrix size"],
               [[k, v["tflops"] * 1e3, v["size"]] for k, v in report["matmul_peak"].items()]),
        f"## Training steps at {MAIN_SIZE} px\n",
        "Visual tokens to next stage = tokens leaving the front (the LLM prefix; for the representation stage the "
        "query outputs Z); into front = vision tokens the front consumes (ELIP: after pruning); ViT mean = ELIP's "
        "mean tokens per ViT layer.\n",
    ]
    rows = []
    for r in report["steps"]:
        if "error" in r:
            rows.append([r["name"], r["dtype"], r["batch"], "error: " + r["error"]] + [None] * 9)
            continue
        tk, fl = r["tokens"], r["gflops_per_sample"]
        ex = r["executed_gflops_per_sample"]
        rows.append([r["name"], r["dtype"], r["batch"], r["step_time_s"], r["samples_per_s"], fl["forward"],
                     fl["total"], ex["total"] if ex else None, _pct(r["mfu"]), _mem(r),
                     tk.get("visual_tokens_to_next_stage", tk.get("prefix_tokens_to_llm")),
                     tk.get("vision_tokens_into_front"), tk.get("vit_mean_tokens_per_layer")])
    parts.append(_table(["step", "dtype", "batch", "s/step", "samples/s", "GFLOP/sample fwd", "GFLOP/sample total",
                         "executed GFLOP/sample", "MFU", mem_label, "visual tokens to next stage",
                         "into front", "ViT mean tokens/layer"], rows))
    c = report["reference_comparison"]
    parts += ["## Against transformers' Blip2ForConditionalGeneration\n",
              f"Ours ({c['ours']}) / reference, samples/s: **{_fmt(c['ours_over_reference_features'])}x** against "
              f"the reference fed the same precomputed features (the ratio used); "
              f"{_fmt(c['ours_over_reference_pixels'])}x against the reference running its vision tower. "
              f"{c['notes']}.\n"]
    s2 = report["stage2"]
    ratio = s2.get("ratio_tome_over_qformer")
    parts.append(f"## Stage 2 fronts ({s2['image_size']} px, {s2['dtype']})\n")
    rows = []
    for stage in ("generative", "representation"):
        for f, v in s2[stage].items():
            if v:
                rows.append([stage, f, v["samples_per_s"], v["visual_tokens_to_next_stage"],
                             v["vision_tokens_into_front"], v["vit_mean_tokens_per_layer"],
                             v["cuda_peak_mb"] if m["device"] == "cuda" else v["peak_rss_mb"],
                             v["gflops_per_sample"]])
    parts.append(_table(["stage", "front", "samples/s", "visual tokens to next stage", "into front",
                         "ViT mean tokens/layer", mem_label, "GFLOP/sample"], rows))
    if ratio:
        parts.append(f"\ntome / qformer (generative): samples/s {_fmt(ratio['samples_per_s'])}x, visual tokens "
                     f"{_fmt(ratio['visual_tokens_to_next_stage'])}x, peak memory {_fmt(ratio['peak_rss_mb'])}x, "
                     f"FLOPs/sample {_fmt(ratio['gflops_per_sample'])}x.\n")
    er = s2.get("ratio_elip_over_unpruned_tower")
    if er:
        parts.append(f"\nelip / qformer with the unpruned tower in the step (representation): samples/s "
                     f"{_fmt(er['samples_per_s'])}x, peak memory {_fmt(er['peak_rss_mb'])}x (RSS), FLOPs/sample "
                     f"{_fmt(er['gflops_per_sample'])}x; ViT mean tokens per layer "
                     f"{_fmt(er['vit_mean_tokens_per_layer'])} of {er['vit_tokens_unpruned']}.\n")
    parts.append("## Scaling with the image size\n")
    rows = [[r["stage"], r["front"], r["image_size"], r["batch"], r["tokens"].get("vision_tokens"),
             r["tokens"].get("visual_tokens_to_next_stage"), r["tokens"].get("vit_mean_tokens_per_layer"),
             r["step_time_s"], r["samples_per_s"], r["gflops_per_sample"]["total"], _pct(r["mfu"]), _mem(r)]
            for r in report["scaling"] if "error" not in r]
    parts.append(_table(["stage", "front", "image px", "batch", "ViT tokens", "tokens to next stage",
                         "ViT mean tokens/layer", "s/step", "samples/s", "GFLOP/sample", "MFU", mem_label], rows))
    parts.append(f"\n## FLOP counting\n\n{report['flop_convention']}. MFU = analytic FLOPs per step / step time / "
                 f"the measured matmul peak of the step's dtype. 'executed' = FLOPs torch runs (FlopCounterMode, "
                 f"one step), a cross-check: it skips gradients autograd does not need.\n")
    if report["errors"]:
        parts.append("\n## Errors\n\n" + "\n".join(f"- {e['name']}: {e['error']}" for e in report["errors"]) + "\n")
    path.write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 8, 2 timed steps, 112 px only (~2-3 min on 2 cores)")
    p.add_argument("--out", default=str(REPO / "runs" / "bench"), help="folder for bench.json / bench.md / logs")
    p.add_argument("--batch", type=int, default=None, help="samples per step (default: 32, quick: 8)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 3, quick 2)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute dtype rule, as deepspeed.precision of the stages")
    p.add_argument("--only", default=None, help="run only the measurements whose name contains this")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override of every step (repeatable), e.g. --set optim.implementation=fused")
    p.add_argument("--timeout", type=float, default=None, help="seconds per measurement (default 600, full 1200)")
    p.add_argument("--malloc", default="reuse", choices=["reuse", "system"],
                   help="host allocator of the measured steps: reuse freed memory as `dvlp` does "
                        "(dvlp_common.memory) or glibc's default")
    p.add_argument("--compile", action="store_true", help="torch.compile each step's trained forward (as "
                                                             "deepspeed.compile=true); warm-up times hold the compile")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:  # inside a measurement subprocess
        spec = json.loads(Path(args.worker).read_text())
        if spec.get("malloc", "reuse") == "reuse":  # as `dvlp` does for the stages (dvlp_common.memory)
            from dvlp_common.memory import keep_freed_memory

            keep_freed_memory()
        Path(args.result).write_text(json.dumps(run_case(spec)))
        return 0

    import torch

    from dvlp_common import precision

    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = str(precision.compute_dtype(args.precision, torch.device(device))
                ).replace("torch.", "")
    if args.precision == "auto":
        rule = ("precision=auto: bf16 on GPUs that support it, else fp16; on CPU bf16 only where a 768x768 matmul "
                "probe shows it >20% faster than fp32" + (f" (probe here: bf16 {'faster' if dtype == 'bfloat16' else 'not faster'})"
                                                         if device == "cpu" else ""))
    else:
        rule = f"precision={args.precision}"
    machine = machine_info(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = plan(args.quick, device, dtype, args.batch, args.steps, args.set)
    for spec in cases:
        spec["malloc"] = args.malloc
        if args.compile:
            spec.update(compile=True, warmup=max(spec.get("warmup", 1), 2))  # the 2nd warm-up step: recompiles
    if args.only:
        cases = [c for c in cases if args.only in c["name"] or c["kind"] == "peak"]
    timeout = args.timeout or (600 if args.quick else 1200)
    print(f"{len(cases)} measurements on {machine['gpu'] or machine['cpu']} ({device}, compute dtype {dtype})",
          flush=True)
    results = []
    for i, spec in enumerate(cases, 1):
        r = measure_in_subprocess(spec, out / "logs", timeout)
        results.append(r)
        if "error" in r:
            msg = f"ERROR {r['error']} (log: {out / 'logs'})"
        elif spec["kind"] == "peak":
            msg = ", ".join(f"{k} {v['tflops'] * 1e3:.0f} GFLOP/s" for k, v in r["peak"].items())
        else:
            msg = (f"{r['step_time_s']:.3f} s/step, {r['samples_per_s']:.2f} samples/s, "
                   f"{r['flops_per_sample']['total'] / 1e9:.1f} GFLOP/sample, peak RSS {r['peak_rss_mb']:.0f} MB")
        print(f"[{i}/{len(cases)}] {spec['name']}: {msg} ({r['wall_s']:.0f} s)", flush=True)
    report = assemble(results, machine, args, dtype, rule, time.perf_counter() - start)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    write_markdown(report, out / "bench.md")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'} ({report['wall_s']:.0f} s)", flush=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
