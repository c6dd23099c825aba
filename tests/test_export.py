"""Tests for vl_align.export and ``dvlp export-hf``: the exported Blip2ForConditionalGeneration folder, loaded with
plain transformers, computes our tower's features and our prefix, and generates our tokens."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from transformers import AutoProcessor, Blip2ForConditionalGeneration, Blip2Processor  # noqa: E402

from pformer.llm import FrozenLLM  # noqa: E402
from vl_align.export import (IMAGE_TOKEN, ExportError, build_blip2, convert_dinov2_tower,  # noqa: E402
                             export_blip2, hf_generate, tower_image_processor, with_lead_token)
from vl_align.fronts import FrontConfig, QFormerFront  # noqa: E402
from vl_align.generative import generate  # noqa: E402
from vl_align.vision import VisionTower, VisionTowerConfig  # noqa: E402

Q = 4
SIZE = 24  # the tiny DINOv2 was built for 16 px: its 4x4 position table is interpolated to 6x6
NEW_TOKENS = 12


def _perturb(module: nn.Module, scale: float, seed: int) -> None:
    """Random offsets on every parameter: non-trivial LayerScale, k biases, position table, cross-attention."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _easy_vqa_images(n: int) -> list[Image.Image]:
    from vl_align.embedded import easy_vqa_data_dir

    folder = easy_vqa_data_dir() / "test" / "images"
    out = []
    for i in range(n):
        with Image.open(folder / f"{i}.png") as im:
            out.append(im.convert("RGB"))
    return out


def _front(tower: VisionTower, llm: FrozenLLM, init_from: str, num_query: int, seed: int) -> QFormerFront:
    torch.manual_seed(seed)
    front = QFormerFront(FrontConfig(init_from=init_from, num_query_tokens=num_query), tower.hidden_size,
                         llm.hidden_size).eval()
    _perturb(front, 0.3, seed)
    return front


def _our_generation(front, tower, llm, images, prompts, max_new_tokens=NEW_TOKENS):
    """Our captions and the token ids FrozenLLM.generate got back from the LLM's generate."""
    captured = []
    real = llm.model.generate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        captured.append(out)
        return out

    llm.model.generate = spy  # an instance attribute shadowing the method, removed below
    try:
        texts = generate(front, llm, image_embeds=tower(tower.preprocess(images)), prompts=prompts,
                         max_new_tokens=max_new_tokens)
    finally:
        del llm.model.generate
    return texts, captured[0]


# ---------------------------------------------------------------------------------------------------------------
# fixtures: a tiny random model of every part, exported once
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tower(tiny_vit_dir):
    tower = VisionTower.build(VisionTowerConfig(model=tiny_vit_dir, image_size=SIZE))
    _perturb(tower.model, 0.3, 0)
    return tower


@pytest.fixture(scope="module")
def tiny_llm(tiny_llm_dir):
    return FrozenLLM.load(tiny_llm_dir)


@pytest.fixture(scope="module")
def tiny_front(tiny_tower, tiny_llm, tiny_bert_dir):
    return _front(tiny_tower, tiny_llm, tiny_bert_dir, Q, seed=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_front, tiny_tower, tiny_llm):
    out = export_blip2(tiny_front, tiny_tower, tiny_llm, tmp_path_factory.mktemp("export") / "blip2")
    model = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    lead = json.loads((out / "dvlp_export.json").read_text())["lead_token_id"]  # what a user of the folder reads
    return SimpleNamespace(path=out, model=model, processor=AutoProcessor.from_pretrained(out), lead_token_id=lead)


# ---------------------------------------------------------------------------------------------------------------
# vision tower and image processor
# ---------------------------------------------------------------------------------------------------------------
def test_dinov2_converts_exactly_to_blip2_vision(tiny_tower):
    from transformers import Blip2VisionConfig, Blip2VisionModel

    config, state = convert_dinov2_tower(tiny_tower)
    layer = tiny_tower.model.encoder.layer[0]
    # the things that make this non-trivial are present: LayerScale != 1, a k bias, an interpolated table
    assert (layer.layer_scale1.lambda1 - 1).abs().max() > 0.1 and layer.attention.k_proj.bias.abs().max() > 0.1
    assert tiny_tower.model.embeddings.position_embeddings.shape[1] == 1 + 4 * 4
    assert state["embeddings.position_embedding"].shape == (1, 1 + 6 * 6, 32)
    model = Blip2VisionModel(Blip2VisionConfig(**config)).eval()
    model.load_state_dict(state, strict=True)
    pixels = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_tower(pixels)
        got = model(pixel_values=pixels).last_hidden_state
    err = (got - ref).abs().max().item()
    print(f"vision: max abs diff {err:.2e} (features up to {ref.abs().max().item():.2f})")
    assert got.shape == ref.shape and err < 1e-5

    # a k bias only adds q.b_k to every logit of a query row: keeping it changes nothing under softmax
    kept = dict(state)
    for i, lay in enumerate(tiny_tower.model.encoder.layer):
        bias = kept[f"encoder.layers.{i}.self_attn.qkv.bias"].clone()
        bias[32:64] = lay.attention.k_proj.bias.detach()
        kept[f"encoder.layers.{i}.self_attn.qkv.bias"] = bias
    model.load_state_dict(kept, strict=True)
    with torch.no_grad():
        assert (model(pixel_values=pixels).last_hidden_state - got).abs().max().item() < 1e-5


def test_image_processor_reproduces_tower_preprocess(tiny_tower):
    processor = tower_image_processor(tiny_tower)
    rng = np.random.default_rng(0)
    images = _easy_vqa_images(3)  # 64x64 RGB PNG
    # non-square sizes where the resized longer side is a whole number, or rounds down (transformers truncates
    # it, our preprocess rounds it: a side like 37.6 would differ by one pixel)
    for w, h in [(40, 30), (30, 50), (33, 29)]:
        images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    images.append(Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8), mode="L"))  # grey
    for im in images:
        ours = tiny_tower.preprocess([im])
        theirs = processor(images=[im], return_tensors="pt")["pixel_values"]
        assert theirs.shape == ours.shape == (1, 3, SIZE, SIZE)
        assert (theirs - ours).abs().max().item() < 1e-5, im.size


# ---------------------------------------------------------------------------------------------------------------
# the exported folder
# ---------------------------------------------------------------------------------------------------------------
def test_export_folder_is_a_plain_blip2(exported, tiny_llm):
    files = {"config.json", "generation_config.json", "model.safetensors", "processor_config.json",
             "tokenizer.json", "tokenizer_config.json", "README.md", "dvlp_export.json"}
    assert files <= set(os.listdir(exported.path))
    proc, model = exported.processor, exported.model
    assert isinstance(proc, Blip2Processor) and proc.num_query_tokens == Q
    assert proc.tokenizer.padding_side == "left"
    image_id = proc.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == model.config.image_token_id == len(tiny_llm.tokenizer)  # a new token, one row added
    assert model.language_model.get_input_embeddings().num_embeddings == image_id + 1
    assert model.generation_config.suppress_tokens == [image_id]
    assert model.config.text_config.eos_token_id == tiny_llm.stop_token_ids()
    inputs = proc(images=_easy_vqa_images(2), text=["", ""], return_tensors="pt")
    assert inputs["input_ids"].tolist() == [[image_id] * Q] * 2  # the prefix slots, no BOS
    meta = json.loads((exported.path / "dvlp_export.json").read_text())
    assert meta["image_token_id"] == image_id and meta["vision_check_max_abs"] < 1e-5
    assert meta["lead_token_id"] == tiny_llm.lead_token_id == tiny_llm.tokenizer.bos_token_id  # the default layout


@pytest.mark.parametrize("prompts", [None, ["a photo of", "Question: what shape is it? Short answer:", "x"]],
                         ids=["caption", "prompts"])
def test_exported_model_generates_our_tokens(exported, tiny_front, tiny_tower, tiny_llm, prompts):
    images = _easy_vqa_images(3)
    ours, our_ids = _our_generation(tiny_front, tiny_tower, tiny_llm, images, prompts)
    theirs, their_ids = hf_generate(exported.model, exported.processor, images, prompts,
                                    lead_token_id=exported.lead_token_id, max_new_tokens=NEW_TOKENS)
    print("ours:", ours, "\nexported:", theirs)
    assert torch.equal(their_ids, our_ids)
    assert theirs == ours


def test_exported_logits_match_and_see_the_image(exported, tiny_front, tiny_tower, tiny_llm):
    images = _easy_vqa_images(3)
    prompt, caption = "a photo of", ["a red circle", "a blue square", "a green triangle"]
    proc = exported.processor
    inputs = with_lead_token(proc(images=images, text=[prompt] * 3, return_tensors="pt"), exported.lead_token_id)
    target_ids, target_mask = tiny_llm.tokenize_targets(caption, 16)
    prompt_ids = tiny_llm.tokenizer([prompt] * 3, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        prefix = tiny_front("queries", image_embeds=tiny_tower(tiny_tower.preprocess(images)))["prompt_pred"]
        ours = tiny_llm.prefix_lm(prefix, target_ids, target_mask, prompt_embeds=tiny_llm.embed(prompt_ids),
                                  prompt_mask=torch.ones_like(prompt_ids)).logits  # [B, T, V]
        ids = torch.cat([inputs["input_ids"], target_ids], dim=1)
        mask = torch.cat([inputs["attention_mask"], target_mask], dim=1)
        out = exported.model(pixel_values=inputs["pixel_values"], input_ids=ids, attention_mask=mask)
        t = target_ids.shape[1]
        theirs = out.logits[:, -t - 1:-1, :ours.shape[-1]]  # position p predicts token p + 1
        image_feats = exported.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    keep = target_mask.bool()
    err = (theirs - ours)[keep].abs().max().item()
    print(f"LLM logits: max abs diff {err:.2e}; prefix max abs diff {(image_feats - prefix).abs().max().item():.2e}")
    assert err < 1e-4 and (image_feats - prefix).abs().max().item() < 1e-5
    # the image reaches the logits through the placeholder tokens (the same text, different images)
    assert (theirs[0, 0] - theirs[1, 0]).abs().max().item() > 1e-3


def test_t5_export_generates_our_tokens(tmp_path, tiny_t5_dir, tiny_tower, tiny_bert_dir):
    llm = FrozenLLM.load(tiny_t5_dir)
    front = _front(tiny_tower, llm, tiny_bert_dir, Q, seed=2)
    out = export_blip2(front, tiny_tower, llm, tmp_path / "blip2_t5")
    model = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert not model.config.use_decoder_only_language_model
    images = _easy_vqa_images(2)
    for prompts in (None, ["Question: what colour? Answer:", "Question: what shape? Answer:"]):
        ours, our_ids = _our_generation(front, tiny_tower, llm, images, prompts)
        theirs, their_ids = hf_generate(model, processor, images, prompts, max_new_tokens=NEW_TOKENS)
        assert torch.equal(their_ids, our_ids) and theirs == ours


# ---------------------------------------------------------------------------------------------------------------
# what cannot be exported, and how the folder is written
# ---------------------------------------------------------------------------------------------------------------
def _wrap_tower(model: nn.Module, size: int, **cfg) -> VisionTower:
    return VisionTower(model, VisionTowerConfig(model="in-memory", image_size=size, **cfg), "in-memory",
                       (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_unsupported_parts_raise_clear_errors(tiny_vit_dir, tiny_llm, tiny_tower):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    from transformers import ViTConfig, ViTModel

    from vl_align.simvlg import TomeFront

    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=4,
                 image_size=8)
    with pytest.raises(ExportError, match="feature_layer"):
        convert_dinov2_tower(VisionTower.build(VisionTowerConfig(model=tiny_vit_dir, image_size=16, feature_layer=-2)))
    with pytest.raises(ExportError, match="SwiGLU"):
        convert_dinov2_tower(_wrap_tower(Dinov2Model(Dinov2Config(use_swiglu_ffn=True, **small)), 8))
    with pytest.raises(ExportError, match="register"):
        convert_dinov2_tower(_wrap_tower(Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**small)), 8))
    with pytest.raises(ExportError, match="only DINOv2.*'vit'"):
        convert_dinov2_tower(_wrap_tower(ViTModel(ViTConfig(**small)), 8))
    with pytest.raises(ExportError, match="front kind"):
        build_blip2(TomeFront(nn.Identity(), 16, tiny_llm.hidden_size), tiny_tower, tiny_llm)


def test_export_is_atomic(tmp_path, tiny_front, tiny_tower, tiny_llm):
    out = tmp_path / "blip2"
    export_blip2(tiny_front, tiny_tower, tiny_llm, out)
    with pytest.raises(FileExistsError, match="overwrite"):
        export_blip2(tiny_front, tiny_tower, tiny_llm, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def failing_check(folder):
        assert (folder / "model.safetensors").is_file() and folder != out
        raise RuntimeError("verification failed")

    with pytest.raises(RuntimeError, match="verification failed"):
        export_blip2(tiny_front, tiny_tower, tiny_llm, out, overwrite=True, verify=failing_check)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # the old export is untouched
    export_blip2(tiny_front, tiny_tower, tiny_llm, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blip2"]  # no temporary folders left behind


def test_cli_export_hf_from_a_saved_front(tmp_path, tiny_vit_dir, tiny_llm_dir, tiny_bert_dir, capsys):
    from pipelines.cli import main
    from vl_align.fronts import save_front

    vision = VisionTowerConfig(model=tiny_vit_dir, image_size=16)
    llm = FrozenLLM.load(tiny_llm_dir)
    front_cfg = FrontConfig(init_from=tiny_bert_dir, num_query_tokens=Q)
    torch.manual_seed(3)
    front = QFormerFront(front_cfg, 32, llm.hidden_size)
    _perturb(front, 0.3, 3)
    front_dir = save_front(front, tmp_path / "front", front_cfg, vision, tiny_llm_dir, bos_before_prefix=True)
    out = tmp_path / "hf"
    args = ["export-hf", f"front={front_dir}", f"output_dir={out}", "verify_images=3", "max_new_tokens=8"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["captions_equal"] == 3 and summary["vision_max_abs"] < 1e-5
    assert Blip2ForConditionalGeneration.from_pretrained(out).config.num_query_tokens == Q
    assert main(args) == 2 and "overwrite" in capsys.readouterr().err  # no silent replacement


# ---------------------------------------------------------------------------------------------------------------
# the packaged real models
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_real_models_generate_our_captions(tmp_path):
    tower = VisionTower.build(VisionTowerConfig(model="dinov2-s14", image_size=112))
    llm = FrozenLLM.load("smollm2-135m")
    torch.manual_seed(0)
    front = QFormerFront(FrontConfig(init_from="minilm-l6", num_query_tokens=8), tower.hidden_size,
                         llm.hidden_size).eval()
    _perturb(front.qformer, 0.02, 0)  # MiniLM + random cross-attention and queries; W stays as initialised
    out = export_blip2(front, tower, llm, tmp_path / "blip2")
    model = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    images = _easy_vqa_images(3)
    pixels = tower.preprocess(images)
    theirs_pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = tower(pixels)
        vision_err = (model.vision_model(pixel_values=pixels).last_hidden_state - feats).abs().max().item()
        prefix_err = (model.get_image_features(pixel_values=pixels).pooler_output
                      - front("queries", image_embeds=feats)["prompt_pred"]).abs().max().item()
    print(f"real models: pixels {(theirs_pixels - pixels).abs().max().item():.2e}, vision {vision_err:.2e}, "
          f"prefix {prefix_err:.2e}")
    assert (theirs_pixels - pixels).abs().max().item() < 1e-5 and vision_err < 1e-4 and prefix_err < 1e-4
    prompts = [None, ["Question: what colour is the shape? Short answer:", "Question: what shape is it? Short answer:",
                      "Question: is there a circle? Short answer:"]]
    for p in prompts:
        ours, our_ids = _our_generation(front, tower, llm, images, p, max_new_tokens=6)
        theirs, their_ids = hf_generate(model, processor, images, p, lead_token_id=llm.lead_token_id,
                                        max_new_tokens=6)
        print("ours:", ours, "\nexported:", theirs)
        assert torch.equal(their_ids, our_ids) and theirs == ours


def test_readme_snippet_of_the_export_reproduces_our_captions(exported, tiny_front, tiny_tower, tiny_llm):
    """The folder's README is what users run: its code, executed as written, gives our captions (the lead BOS
    that Blip2Processor cannot write included)."""
    readme = (exported.path / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    images = _easy_vqa_images(3)
    scope = {"PATH": str(exported.path), "images": images, "torch": torch}
    exec(code, scope)  # noqa: S102 - the README's own code
    ours, _ = _our_generation(tiny_front, tiny_tower, tiny_llm, images, None,
                              max_new_tokens=exported.model.generation_config.max_new_tokens)
    assert [c.strip() for c in scope["captions"]] == ours
