"""Tests for vl_align.checkpoints: published BLIP-2 checkpoints (a transformers Blip2ForConditionalGeneration folder,
a LAVIS .pth) load into our front + tower + LLM and compute what the original model computes.

LAVIS's CLIP ViT-L tower (vit_model="clip_L") is checked against our own small re-implementation of LAVIS's
clip_vit.py forward, alone and inside the same tiny BLIP-2 (its vision model replaced).

The reference is a tiny random transformers BLIP-2 (ViT, Q-Former with cross-attention every 2nd layer and a
separate query FFN, OPT LLM whose tokenizer adds BOS, as OPT's does). The LAVIS file is written here from the same
weights under LAVIS's key names (visual_encoder.* as EVA ViT-g, ln_vision, Qformer.bert.*, opt_proj), so the same
transformers model, with its post_layernorm at LAVIS's ln_vision eps, is the LAVIS model's function.
"""
from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessorPil,
    OPTConfig,
)

from dvlp_common.config import ConfigError
from vl_align.checkpoints import (
    LAVIS_LN_VISION_EPS,
    Blip2CheckpointConfig,
    CheckpointError,
    load_blip2,
    load_hf_blip2,
    load_lavis_blip2,
)
from vl_align.data import CLIP_MEAN, CLIP_STD
from vl_align.generative import generate

Q = 4  # queries
SIZE = 16  # pixels; 4-px patches: 16 patches + CLS
QFORMER_LAYERS = 3  # cross-attention in layers 0 and 2
NEW_TOKENS = 8
PROMPT = "Question: what colour is it? Short answer:"


def _perturb(module: nn.Module, seed: int, scale: float = 0.3) -> None:
    """Random offsets on every parameter, so no LayerNorm is 1, no bias 0, and a wrong map shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _images() -> list[Image.Image]:
    """Non-square images of different content (the squash resize matters)."""
    out = []
    for i, colour in enumerate([(200, 30, 30), (20, 40, 220), (30, 180, 60)]):
        im = Image.new("RGB", (24 + 4 * i, 20), (255, 255, 255))
        for x in range(4 + i, 16 + i):
            for y in range(3, 15):
                im.putpixel((x, y), colour)
        out.append(im)
    return out


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    """A tiny random Blip2ForConditionalGeneration (OPT LLM), saved with its processor."""
    from dvlp_common import zoo

    tokenizer = zoo.load_tokenizer("smollm2-135m")
    tokenizer.add_bos_token = True  # OPT's tokenizer puts BOS first; so BLIP-2's layout is [queries][BOS][prompt]
    tokenizer.update_post_processor()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=24, ffn_dim=48, num_hidden_layers=2,
                     num_attention_heads=4, word_embed_proj_dim=24, max_position_embeddings=96,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, dropout=0.0, attention_dropout=0.0)
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "image_size": SIZE, "patch_size": 4, "qkv_bias": True, "layer_norm_eps": 1e-6},
        qformer_config={"hidden_size": 32, "num_hidden_layers": QFORMER_LAYERS, "num_attention_heads": 4,
                            "intermediate_size": 40, "vocab_size": 64, "max_position_embeddings": 32,
                            "cross_attention_frequency": 2, "encoder_hidden_size": 32},
        text_config=text.to_dict(), num_query_tokens=Q, image_token_index=image_token)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    _perturb(model, seed=1)
    with torch.no_grad():  # EVA ViT-g (and BLIP-2's converted ViT) has no k bias; LAVIS's file cannot hold one
        for layer in model.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[32:64] = 0
    folder = tmp_path_factory.mktemp("blip2") / "hf"
    model.save_pretrained(folder)
    image_processor = BlipImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=list(CLIP_MEAN),
                                            image_std=list(CLIP_STD))
    Blip2Processor(image_processor, tokenizer, num_query_tokens=Q).save_pretrained(folder)
    processor = Blip2Processor.from_pretrained(folder)
    assert processor.tokenizer("a").input_ids[0] == tokenizer.bos_token_id  # the saved tokenizer still adds BOS
    return SimpleNamespace(model=model, folder=folder, processor=processor, image_token=image_token)


def _lavis_state(model) -> dict[str, torch.Tensor]:
    """The transformers model's weights under LAVIS Blip2OPT's key names, written out by hand."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {"query_tokens": sd["query_tokens"]}
    for key, value in sd.items():
        if key.startswith("qformer."):
            rest = key[len("qformer."):]
            if rest.startswith("layernorm."):
                out["Qformer.bert.embeddings.LayerNorm." + rest.split(".")[-1]] = value
            else:
                rest = rest.replace(".attention.attention.", ".attention.self.")
                out["Qformer.bert." + rest.replace(".crossattention.attention.", ".crossattention.self.")] = value
        elif key.startswith("language_projection."):
            out["opt_proj." + key.split(".")[-1]] = value
    vision = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
    out["ln_vision.weight"], out["ln_vision.bias"] = vision.pop("post_layernorm.weight"), vision.pop("post_layernorm.bias")
    v = "visual_encoder."
    out[v + "cls_token"] = vision.pop("embeddings.class_embedding")
    out[v + "pos_embed"] = vision.pop("embeddings.position_embedding")
    out[v + "patch_embed.proj.weight"] = vision.pop("embeddings.patch_embedding.weight")
    out[v + "patch_embed.proj.bias"] = vision.pop("embeddings.patch_embedding.bias")
    names = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv.weight": "attn.qkv.weight",
             "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for key in list(vision):
        i, rest = key.split(".")[2], ".".join(key.split(".")[3:])
        if rest == "self_attn.qkv.bias":
            q, k, vb = vision.pop(key).chunk(3)
            assert k.abs().max() == 0
            out[f"{v}blocks.{i}.attn.q_bias"], out[f"{v}blocks.{i}.attn.v_bias"] = q, vb
            continue
        for hf, lavis in names.items():
            if rest.startswith(hf):
                out[f"{v}blocks.{i}.{lavis}{rest[len(hf):]}"] = vision.pop(key)
                break
    assert not vision, f"unmapped: {sorted(vision)}"
    return out


@pytest.fixture(scope="module")
def lavis(tmp_path_factory, tiny_blip2):
    """The tiny model as a LAVIS Blip2OPT checkpoint (as LAVIS's runner saves it: model, config, epoch), the LLM
    saved on its own (LAVIS loads it by name), and the LAVIS model's function (ln_vision eps 1e-5)."""
    root = tmp_path_factory.mktemp("lavis")
    state = _lavis_state(tiny_blip2.model)
    assert "Qformer.bert.encoder.layer.2.crossattention.self.query.weight" in state
    assert "Qformer.bert.encoder.layer.1.intermediate_query.dense.weight" in state
    assert "Qformer.bert.encoder.layer.1.crossattention.self.query.weight" not in state
    torch.save({"model": state, "config": {"model": {"arch": "blip2_opt", "num_query_token": Q}}, "epoch": 3},
               root / "checkpoint_best.pth")
    llm_dir = root / "opt"
    tiny_blip2.model.language_model.save_pretrained(llm_dir)
    tiny_blip2.processor.tokenizer.save_pretrained(llm_dir)
    reference = copy.deepcopy(tiny_blip2.model)
    reference.vision_model.post_layernorm.eps = LAVIS_LN_VISION_EPS
    return SimpleNamespace(path=root / "checkpoint_best.pth", state=state, llm=str(llm_dir), reference=reference,
                           root=root)


# ---------------------------------------------------------------------------------------------------------------
# what must agree: logits and greedy captions on the same pixels
# ---------------------------------------------------------------------------------------------------------------
def _hf_inputs(reference, processor, pixels: torch.Tensor, prompt: str) -> dict:
    """BLIP-2's own input: the image placeholders, then the prompt with the tokenizer's specials."""
    ids = [processor.tokenizer.convert_tokens_to_ids("<image>")] * Q + processor.tokenizer(prompt).input_ids
    input_ids = torch.tensor([ids] * pixels.shape[0])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}


@torch.no_grad()
def _assert_same_model(imported, reference, processor, pixels: torch.Tensor) -> None:
    front, tower, llm = imported.front, imported.tower, imported.llm
    feats = tower(pixels)  # [B, 17, 32]
    # the tower's features are ln_vision(ViT(x)), what the Q-Former cross-attends to
    ref_feats = reference.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(feats, ref_feats, atol=1e-5, rtol=1e-5)
    prefix = front("queries", image_embeds=feats)["prompt_pred"]  # [B, Q, 24]

    # logits of the prompt tokens after the queries: our prefix LM against BLIP-2's forward
    inputs = _hf_inputs(reference, processor, pixels, PROMPT)
    ref_logits = reference(**inputs).logits  # [B, Q + T, V]
    target = llm.tokenizer([PROMPT] * pixels.shape[0], return_tensors="pt").input_ids  # [B, T], BOS first
    assert target[0, 0] == llm.tokenizer.bos_token_id
    ours = llm.prefix_lm(prefix, target, torch.ones_like(target)).logits  # predicts target t from position Q+t-1
    torch.testing.assert_close(ours, ref_logits[:, Q - 1:-1], atol=1e-4, rtol=1e-4)

    # greedy generation, captioning ("") and VQA prompts
    for prompt in ("", PROMPT):
        texts = generate(front, llm, image_embeds=feats, prompts=[prompt] * pixels.shape[0],
                         max_new_tokens=NEW_TOKENS)
        inputs = _hf_inputs(reference, processor, pixels, prompt)
        out = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
                                 eos_token_id=llm.stop_token_ids(), pad_token_id=llm.tokenizer.pad_token_id)
        theirs = [t.strip() for t in llm.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                                skip_special_tokens=True)]
        assert texts == theirs
        assert any(texts)  # something was generated, so equality means something


def test_transformers_folder_loads_and_matches(tiny_blip2):
    imported = load_hf_blip2(tiny_blip2.folder)
    images = _images()
    pixels = imported.tower.preprocess(images)
    # BLIP-2's processor: a square resize without crop, CLIP's mean/std
    theirs = tiny_blip2.processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, theirs, atol=1e-5, rtol=0)
    assert imported.tower.resize == "squash" and imported.llm.lead_token_id is None
    assert not imported.report.notes  # the settings came from the folder's processor, not from defaults
    _assert_same_model(imported, tiny_blip2.model, tiny_blip2.processor, pixels)
    report = imported.report
    # a stage-2 checkpoint has no Q-Former text side and no ITC/ITM heads: listed, not silently random
    assert "qformer.embeddings.word_embeddings.weight" in report.not_in_checkpoint
    assert "itm_head.weight" in report.not_in_checkpoint
    assert not any(k.startswith(("qformer.encoder.layer.0.crossattention", "qformer.query_tokens", "llm_proj"))
                   for k in report.not_in_checkpoint)
    assert imported.front.config.cross_attention_frequency == 2 and imported.front.config.num_query_tokens == Q


def test_lavis_checkpoint_loads_and_matches(tiny_blip2, lavis):
    imported = load_lavis_blip2(lavis.path, llm=lavis.llm, vision_heads=4, qformer_heads=4)
    assert imported.tower.model.post_layernorm.eps == LAVIS_LN_VISION_EPS
    assert imported.tower.model.encoder.layers[0].layer_norm1.eps == 1e-6
    pixels = imported.tower.preprocess(_images())
    _assert_same_model(imported, lavis.reference, tiny_blip2.processor, pixels)
    assert imported.report.loaded["opt_proj"] == 2 and not imported.report.skipped


def test_lavis_checkpoint_without_vision_weights_takes_them_from_vision(tiny_blip2, lavis, tmp_path):
    """LAVIS's trainer saves no frozen weights: the ViT comes from eva_vit_g.pth or a transformers folder."""
    state = {k: v for k, v in lavis.state.items() if not k.startswith("visual_encoder.")}
    path = tmp_path / "no_vit.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ConfigError, match="vision.*no visual_encoder"):
        load_lavis_blip2(path, llm=lavis.llm, qformer_heads=4)
    # an HF folder's vision model, its post_layernorm replaced by the checkpoint's ln_vision
    imported = load_lavis_blip2(path, llm=lavis.llm, vision=str(tiny_blip2.folder), qformer_heads=4)
    assert "post_layernorm.weight" in " ".join(imported.report.skipped)
    _assert_same_model(imported, lavis.reference, tiny_blip2.processor, imported.tower.preprocess(_images()))
    # eva_vit_g.pth as LAVIS downloads it (plain EVA keys), with one block more than LAVIS builds
    eva = {k[len("visual_encoder."):]: v for k, v in lavis.state.items() if k.startswith("visual_encoder.")}
    eva.update({k.replace("blocks.1.", "blocks.2."): v + 1 for k, v in eva.items() if k.startswith("blocks.1.")})
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    imported = load_lavis_blip2(path, llm=lavis.llm, vision=str(tmp_path / "eva_vit_g.pth"), vision_layers=2,
                                vision_heads=4, qformer_heads=4)
    assert sorted(imported.report.skipped) == sorted(f"{tmp_path / 'eva_vit_g.pth'}:blocks.2.{k[len('blocks.1.'):]}"
                                                     for k in eva if k.startswith("blocks.1."))
    _assert_same_model(imported, lavis.reference, tiny_blip2.processor, imported.tower.preprocess(_images()))


# ---------------------------------------------------------------------------------------------------------------
# errors name the key
# ---------------------------------------------------------------------------------------------------------------
def _save_lavis(tmp_path, state) -> str:
    path = tmp_path / "edited.pth"
    torch.save({"model": state}, path)
    return path


@pytest.mark.parametrize("drop", ["Qformer.bert.encoder.layer.2.crossattention.self.key.weight",
                                  "Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias",
                                  "query_tokens", "opt_proj.bias", "ln_vision.weight",
                                  "visual_encoder.blocks.1.attn.v_bias"])
def test_lavis_missing_key_is_an_error_naming_it(lavis, tmp_path, drop):
    state = {k: v for k, v in lavis.state.items() if k != drop}
    with pytest.raises((CheckpointError, ConfigError), match=re.escape(drop)):
        load_lavis_blip2(_save_lavis(tmp_path, state), llm=lavis.llm, vision_heads=4, qformer_heads=4)


@pytest.mark.parametrize("extra", ["text_decoder.weight", "Qformer.bert.encoder.layer.0.attention.self.rope.weight",
                                   "visual_encoder.blocks.0.gamma_1", "opt_model.model.decoder.extra.weight"])
def test_lavis_unexpected_key_is_an_error_naming_it(lavis, tmp_path, extra):
    state = {**lavis.state, extra: torch.zeros(3)}
    with pytest.raises(CheckpointError, match=re.escape(extra)):
        load_lavis_blip2(_save_lavis(tmp_path, state), llm=lavis.llm, vision_heads=4, qformer_heads=4)


def test_lavis_llm_weights_in_the_file_override_the_named_llm(tiny_blip2, lavis, tmp_path):
    bias = tiny_blip2.model.language_model.model.decoder.final_layer_norm.bias
    state = {**lavis.state, "opt_model.model.decoder.final_layer_norm.bias": bias + 1.0}
    imported = load_lavis_blip2(_save_lavis(tmp_path, state), llm=lavis.llm, vision_heads=4, qformer_heads=4)
    torch.testing.assert_close(imported.llm.model.model.decoder.final_layer_norm.bias, bias + 1.0)
    assert imported.report.loaded["opt_model"] == 1


def test_lavis_sizes_the_tensors_cannot_tell_are_errors_without_the_setting(lavis):
    with pytest.raises(CheckpointError, match="vision_heads"):  # 32 wide: EVA's width // 88 rule does not fit
        load_lavis_blip2(lavis.path, llm=lavis.llm, qformer_heads=4)
    with pytest.raises(CheckpointError, match="qformer_heads"):
        load_lavis_blip2(lavis.path, llm=lavis.llm, vision_heads=4)


def test_lavis_t5_projection_needs_an_encoder_decoder_llm(lavis, tmp_path):
    state = {(k.replace("opt_proj.", "t5_proj.")): v for k, v in lavis.state.items()}
    with pytest.raises(CheckpointError, match="t5_proj feeds a T5 LLM"):
        load_lavis_blip2(_save_lavis(tmp_path, state), llm=lavis.llm, vision_heads=4, qformer_heads=4)


def test_transformers_folder_with_missing_or_unknown_weights_is_an_error(tiny_blip2, tmp_path):
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(tiny_blip2.folder, folder)
    (weights,) = folder.glob("*.safetensors")
    state = load_file(weights)
    gone = "qformer.encoder.layer.2.crossattention.attention.key.weight"
    del state[gone]
    state["qformer.encoder.layer.0.surprise.weight"] = torch.zeros(2)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_hf_blip2(folder)
    assert gone in str(err.value) and "qformer.encoder.layer.0.surprise.weight" in str(err.value)


def test_transformers_folder_of_another_architecture_is_refused(tiny_blip2, tmp_path):
    import shutil

    folder = tmp_path / "retrieval"
    shutil.copytree(tiny_blip2.folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["Blip2ForImageTextRetrieval"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="only Blip2ForConditionalGeneration"):
        load_hf_blip2(folder)


# ---------------------------------------------------------------------------------------------------------------
# config and `dvlp evaluate`
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, key", [
    ({"hf": "a", "lavis": "b.pth", "llm": "x"}, "lavis"),
    ({"lavis": "b.pth"}, "llm"),
    ({"hf": "a", "llm": "x"}, "llm"),
    ({"hf": "a", "vision_heads": 4}, "vision_heads"),
    ({"lavis": "b.pth", "llm": "x", "qformer_heads": 0}, "qformer_heads"),
])
def test_config_validation_names_the_key(values, key):
    with pytest.raises(ConfigError) as err:
        Blip2CheckpointConfig(**values)
    assert err.value.key == key


def test_load_blip2_names_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="lavis"):
        load_blip2(Blip2CheckpointConfig(lavis=str(tmp_path / "none.pth"), llm="x"))
    with pytest.raises(ConfigError, match="hf"):
        load_blip2(Blip2CheckpointConfig(hf=str(tmp_path / "none")))


def test_dvlp_evaluate_runs_a_transformers_checkpoint(tiny_blip2, tmp_path, monkeypatch):
    from dvlp_common.config import load_config
    from pipelines.evaluate import EvaluateConfig, run_evaluate

    monkeypatch.setenv("DVLP_CACHE", str(tmp_path / "cache"))
    cfg = load_config(EvaluateConfig, None, [f"blip2.hf={tiny_blip2.folder}", f"output_dir={tmp_path / 'out'}",
                                             "eval.max_images=3", "eval.max_questions=2", "eval.meteor=false",
                                             "eval.max_new_tokens=4", "precision=fp32"])
    result = run_evaluate(cfg)
    assert result["captioning"]["num_images"] == 3 and result["vqa"]["num_questions"] == 2
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(predictions["captions"]) == 3


def test_our_export_loads_back_with_the_layout_it_was_trained_with(tmp_path, tiny_vit_dir, tiny_llm_dir,
                                                                   tiny_bert_dir):
    """``dvlp export-hf`` and this importer are inverses: the folder loads back (lead token, prompts without
    special tokens, shortest-edge + crop preprocessing) and captions as the front it came from."""
    from pformer.llm import FrozenLLM
    from vl_align.export import export_blip2
    from vl_align.fronts import FrontConfig, QFormerFront
    from vl_align.vision import VisionTower, VisionTowerConfig

    tower = VisionTower.build(VisionTowerConfig(model=tiny_vit_dir, image_size=SIZE))
    llm = FrozenLLM.load(tiny_llm_dir)
    torch.manual_seed(0)
    front = QFormerFront(FrontConfig(init_from=tiny_bert_dir, num_query_tokens=Q), tower.hidden_size,
                         llm.hidden_size).eval()
    _perturb(front, seed=2)
    folder = export_blip2(front, tower, llm, tmp_path / "export")
    imported = load_hf_blip2(folder)
    assert imported.tower.resize == "crop" and imported.llm.lead_token_id == llm.lead_token_id is not None
    assert not imported.llm.prompt_special_tokens
    images = _images()
    pixels = tower.preprocess(images)
    torch.testing.assert_close(imported.tower.preprocess(images), pixels)
    for prompt in ("", "a photo of"):
        ours = generate(front, llm, image_embeds=tower(pixels), prompts=[prompt] * 3, max_new_tokens=NEW_TOKENS)
        back = generate(imported.front, imported.llm, image_embeds=imported.tower(pixels), prompts=[prompt] * 3,
                        max_new_tokens=NEW_TOKENS)
        assert back == ours and any(ours)


def test_image_settings_of_transformers_4_and_5_folders(tmp_path):
    from vl_align.checkpoints import _image_settings

    blip = {"size": {"height": 224, "width": 224}, "resample": 3, "image_mean": [0.1, 0.2, 0.3],
            "image_std": [0.5, 0.5, 0.5], "image_processor_type": "BlipImageProcessor"}
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {**blip, "size": {
        "shortest_edge": 32}, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}}}))
    assert _image_settings(tmp_path, 16)[:2] == (32, "crop")  # transformers 5: inside processor_config.json
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(blip))  # the hub's BLIP-2 folders
    assert _image_settings(tmp_path, 16) == (224, "squash", (0.1, 0.2, 0.3), (0.5, 0.5, 0.5), "")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**blip, "resample": 2}))
    with pytest.raises(CheckpointError, match="resample=2"):
        _image_settings(tmp_path, 16)


# ---------------------------------------------------------------------------------------------------------------
# LAVIS's CLIP ViT-L tower (vit_model="clip_L", pretrain_flant5xl_vitL)
# ---------------------------------------------------------------------------------------------------------------
# The reference is our own small re-implementation of LAVIS's clip_vit.py forward (its module and parameter names,
# so its state_dict is LAVIS's key layout): nn.MultiheadAttention with the fused in_proj, QuickGELU, ln_pre, no
# ln_post, LayerNorms computed in float32 at torch's default eps, sequence-first blocks.
class _LavisLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _LavisBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        from collections import OrderedDict

        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = _LavisLayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", _QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = _LavisLayerNorm(width)

    def forward(self, x):  # [L, N, D]
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _LavisTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[_LavisBlock(width, heads) for _ in range(layers)])


class _LavisClipViT(nn.Module):
    def __init__(self, resolution: int, patch: int, width: int, layers: int, heads: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn((resolution // patch) ** 2 + 1, width) * width ** -0.5)
        self.ln_pre = _LavisLayerNorm(width)
        self.transformer = _LavisTransformer(width, layers, heads)

    def forward(self, x):  # [N, 3, S, S] -> [N, 1 + g*g, D]
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        return self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)


def _lavis_interpolate_pos_embed(model: _LavisClipViT, state: dict) -> None:
    """clip_vit.interpolate_pos_embed: the loaded grid resized to the built model's (bicubic, align_corners)."""
    old = state["positional_embedding"]
    grid = round((model.positional_embedding.shape[0] - 1) ** 0.5)
    if grid * grid + 1 == old.shape[0]:
        return
    old_grid = int((old.shape[0] - 1) ** 0.5)
    img = old[1:].reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    img = torch.nn.functional.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=True)
    state["positional_embedding"] = torch.cat([old[:1], img.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def _clip_file_state(width: int, heads: int, blocks: int, seed: int) -> dict[str, torch.Tensor]:
    """A clip_vit_L.pth-like state dict: LAVIS's key names, one block more than LAVIS builds, OpenAI's head."""
    torch.manual_seed(seed)
    full = _LavisClipViT(SIZE, 4, width, blocks, heads)
    _perturb(full, seed=seed + 1)
    state = {k: v.detach().clone() for k, v in full.state_dict().items()}
    state["ln_post.weight"], state["ln_post.bias"] = torch.randn(width), torch.randn(width)
    state["proj"] = torch.randn(width, 8)
    return state


def _lavis_clip_reference(state: dict, ln: dict, width: int, heads: int, layers: int, size: int = SIZE) -> nn.Module:
    """create_clip_vit_L's flow at small size: build ``layers`` blocks at ``size`` px, interpolate, load strict=False
    (the extra block and the head drop out); then ln_vision."""
    vit = _LavisClipViT(size, 4, width, layers, heads)
    state = dict(state)
    _lavis_interpolate_pos_embed(vit, state)
    result = vit.load_state_dict(state, strict=False)
    assert not result.missing_keys
    ln_vision = _LavisLayerNorm(width)
    ln_vision.load_state_dict(ln)
    return nn.Sequential(vit, ln_vision).eval()


def test_clip_vit_conversion_is_lavis_clip_forward():
    """2 of 3 blocks, 64 wide, 4 heads: our CLIPVisionModel + ln_vision equals LAVIS's forward (1e-5), at the
    weights' 16 px and at 24 px (LAVIS's load-time position interpolation)."""
    from vl_align.checkpoints import _clip_vision_model, convert_clip_vit

    state = _clip_file_state(64, 4, 3, seed=5)
    ln = {"weight": torch.randn(64) + 1, "bias": torch.randn(64)}
    for size in (SIZE, 24):
        config, ours, skipped = convert_clip_vit(state, heads=4, layers=2, image_size=size, key_prefix="")
        assert config["num_hidden_layers"] == 2 and config["hidden_act"] == "quick_gelu"
        assert sorted(skipped) == sorted(["ln_post.weight", "ln_post.bias", "proj"]
                                         + [k for k in state if k.startswith("transformer.resblocks.2.")])
        model = _clip_vision_model(config, ours, ln, torch.float32)
        reference = _lavis_clip_reference(state, ln, 64, 4, 2, size)
        pixels = torch.randn(2, 3, size, size)
        with torch.no_grad():
            feats = model(pixel_values=pixels).last_hidden_state  # [2, 1 + (size/4)^2, 64]
            torch.testing.assert_close(feats, reference(pixels), atol=1e-5, rtol=1e-5)
            assert feats.shape == (2, 1 + (size // 4) ** 2, 64)
            # the dropped block matters: all 3 blocks give another function
            every = _clip_vision_model(convert_clip_vit(state, heads=4, layers=3, image_size=size)[0],
                                       convert_clip_vit(state, heads=4, layers=3, image_size=size)[1], ln,
                                       torch.float32)
            assert not torch.allclose(every(pixel_values=pixels).last_hidden_state, feats, atol=1e-3)


@pytest.fixture(scope="module")
def lavis_clip(tmp_path_factory, lavis):
    """The tiny Blip2OPT with a CLIP ViT tower (32 wide, as the Q-Former cross-attends to): a LAVIS training
    checkpoint without visual_encoder.*, a clip_vit_L.pth-like file with 3 blocks (LAVIS builds 2 here), and the
    reference: the transformers BLIP-2 with its vision model replaced by LAVIS's CLIP forward + ln_vision."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    root = tmp_path_factory.mktemp("lavis_clip")
    clip = _clip_file_state(32, 4, 3, seed=7)
    torch.save(clip, root / "clip_vit_L.pth")
    g = torch.Generator().manual_seed(9)
    ln = {"weight": torch.randn(32, generator=g) + 1, "bias": torch.randn(32, generator=g)}
    state = {k: v for k, v in lavis.state.items() if not k.startswith(("visual_encoder.", "ln_vision."))}
    state.update({"ln_vision.weight": ln["weight"], "ln_vision.bias": ln["bias"]})
    torch.save({"model": state, "config": {"model": {"arch": "blip2_opt", "vit_model": "clip_L"}}, "epoch": 1},
               root / "checkpoint.pth")
    vision = _lavis_clip_reference(clip, ln, 32, 4, 2)

    class LavisVision(nn.Module):  # what Blip2ForConditionalGeneration calls as its vision_model
        def forward(self, pixel_values, interpolate_pos_encoding=False, return_dict=True, **kwargs):
            feats = vision(pixel_values)
            return BaseModelOutputWithPooling(last_hidden_state=feats, pooler_output=feats[:, 0])

    reference = copy.deepcopy(lavis.reference)
    reference.vision_model = LavisVision()
    return SimpleNamespace(path=root / "checkpoint.pth", clip_path=root / "clip_vit_L.pth", state=state, clip=clip,
                           reference=reference, root=root)


def test_lavis_clip_checkpoint_loads_and_captions(tiny_blip2, lavis, lavis_clip):
    imported = load_lavis_blip2(lavis_clip.path, llm=lavis.llm, vision=str(lavis_clip.clip_path), vision_layers=2,
                                vision_heads=4, qformer_heads=4)
    assert type(imported.tower.model).__name__ == "LavisClipVision"
    assert imported.tower.model.ln_vision.eps == LAVIS_LN_VISION_EPS and imported.tower.num_tokens == 17
    pixels = imported.tower.preprocess(_images())
    _assert_same_model(imported, lavis_clip.reference, tiny_blip2.processor, pixels)
    prefix = f"{lavis_clip.clip_path}:"
    assert sorted(imported.report.skipped) == sorted(
        [prefix + k for k in ("ln_post.weight", "ln_post.bias", "proj")]
        + [prefix + k for k in lavis_clip.clip if k.startswith("transformer.resblocks.2.")])
    assert any("clip_L" in n for n in imported.report.notes)
    # the feature cache tells the towers apart: another number of kept blocks is another fingerprint
    three = load_lavis_blip2(lavis_clip.path, llm=lavis.llm, vision=str(lavis_clip.clip_path), vision_layers=3,
                             vision_heads=4, qformer_heads=4)
    assert three.tower.fingerprint() != imported.tower.fingerprint()


def test_lavis_clip_tower_in_the_checkpoint_itself(tiny_blip2, lavis, lavis_clip, tmp_path):
    """A full LAVIS state dict holds the blocks LAVIS built (2 here): all are kept without vision_layers."""
    vit = {f"visual_encoder.{k}": v for k, v in lavis_clip.clip.items()
           if not k.startswith(("transformer.resblocks.2.", "ln_post.", "proj"))}
    imported = load_lavis_blip2(_save_lavis(tmp_path, {**lavis_clip.state, **vit}), llm=lavis.llm, vision_heads=4,
                                qformer_heads=4)
    assert not imported.report.skipped
    _assert_same_model(imported, lavis_clip.reference, tiny_blip2.processor, imported.tower.preprocess(_images()))


def test_lavis_clip_vision_file_defaults_to_lavis_23_blocks(lavis, lavis_clip):
    with pytest.raises(CheckpointError, match="vision_layers=23.*3 blocks"):
        load_lavis_blip2(lavis_clip.path, llm=lavis.llm, vision=str(lavis_clip.clip_path), vision_heads=4,
                         qformer_heads=4)
    with pytest.raises(CheckpointError, match="vision_heads"):  # 32 wide: create_clip_vit_L's width // 64 rule
        load_lavis_blip2(lavis_clip.path, llm=lavis.llm, vision=str(lavis_clip.clip_path), vision_layers=2,
                         qformer_heads=4)


@pytest.mark.parametrize("drop", ["transformer.resblocks.1.attn.in_proj_bias", "ln_pre.weight", "conv1.weight",
                                  "transformer.resblocks.0.mlp.c_proj.weight"])
def test_lavis_clip_missing_key_is_an_error_naming_it(lavis, lavis_clip, tmp_path, drop):
    clip = {k: v for k, v in lavis_clip.clip.items() if k != drop}
    torch.save(clip, tmp_path / "clip.pth")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'clip.pth'}:{drop}")):
        load_lavis_blip2(lavis_clip.path, llm=lavis.llm, vision=str(tmp_path / "clip.pth"), vision_layers=2,
                         vision_heads=4, qformer_heads=4)


@pytest.mark.parametrize("extra", ["conv1.bias", "transformer.resblocks.0.attn.bias_k", "ln_final.weight"])
def test_lavis_clip_unexpected_key_is_an_error_naming_it(lavis, lavis_clip, tmp_path, extra):
    vit = {f"visual_encoder.{k}": v for k, v in lavis_clip.clip.items() if not k.startswith("transformer.resblocks.2.")}
    state = {**lavis_clip.state, **vit, f"visual_encoder.{extra}": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=re.escape(f"visual_encoder.{extra}")):
        load_lavis_blip2(_save_lavis(tmp_path, state), llm=lavis.llm, vision_heads=4, qformer_heads=4)


def test_eva_conversion_points_clip_keys_to_the_clip_converter(lavis_clip):
    from vl_align.checkpoints import convert_eva_vit

    with pytest.raises(CheckpointError, match="convert_clip_vit"):
        convert_eva_vit(lavis_clip.clip)
