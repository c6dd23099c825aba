"""The frozen vision tower (tiny random DINOv2 / CLIP / SigLIP checkpoints) and its content-keyed feature cache."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dvlp_common.config import ConfigError
from vl_align.data import CLIP_MEAN, CLIP_STD
from vl_align.vision import SIGLIP_MEAN, VisionTower, VisionTowerConfig, vision_feature_cache

EASY_VQA_IMAGES = Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/easy_vqa/data/train/images"
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def _save_dinov2(out: Path, seed: int) -> str:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, patch_size=4,
                       image_size=16)
    cfg.image_mean, cfg.image_std = MEAN, STD
    Dinov2Model(cfg).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    return _save_dinov2(tmp_path_factory.mktemp("tiny_dinov2"), seed=0)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=16),
                     vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=16, patch_size=4),
                     projection_dim=16)
    out = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(cfg).save_pretrained(out)
    return str(out)


@pytest.fixture
def images(tmp_path):
    """Three distinct small PNGs and a byte-identical copy of the first under another name."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (20 + 4 * i, 24, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    copy = tmp_path / "sub" / "copy_of_0.png"
    copy.parent.mkdir()
    shutil.copyfile(paths[0], copy)
    return paths + [str(copy)]


# ---------------------------------------------------------------------------------------------------------- tower
def test_dinov2_tower_shapes_and_normalisation(dinov2_dir, images):
    tower = VisionTower.build(VisionTowerConfig(model=dinov2_dir, image_size=16))
    assert type(tower.model).__name__ == "Dinov2Model"
    assert (tower.hidden_size, tower.patch_size, tower.num_tokens) == (32, 4, (16 // 4) ** 2 + 1)
    assert tower.mean == pytest.approx(MEAN) and tower.std == pytest.approx(STD)  # from the config attributes
    pixels = tower.preprocess(images[:2])
    assert pixels.shape == (2, 3, 16, 16)
    out = tower(pixels)
    assert out.shape == (2, 17, 32)
    assert torch.allclose(out, tower.model(pixel_values=pixels).last_hidden_state)
    # a size other than the config's 16 (position embeddings interpolated)
    tower8 = VisionTower.build(VisionTowerConfig(model=dinov2_dir, image_size=8))
    assert tower8(tower8.preprocess(images[:1])).shape == (1, tower8.num_tokens, 32) and tower8.num_tokens == 5


def test_feature_layer_takes_a_hidden_state(dinov2_dir, images):
    tower = VisionTower.build(VisionTowerConfig(model=dinov2_dir, image_size=16, feature_layer=-2))
    pixels = tower.preprocess(images[:2])
    ref = tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(tower(pixels), ref)
    with pytest.raises(ConfigError, match="feature_layer"):
        VisionTower.build(VisionTowerConfig(model=dinov2_dir, image_size=16, feature_layer=3))  # 2 blocks: -3..2


def test_image_size_must_be_a_multiple_of_the_patch(dinov2_dir):
    with pytest.raises(ConfigError, match=r"18 is not a multiple of the patch size 4 .*e\.g\. 16 or 20"):
        VisionTower.build(VisionTowerConfig(model=dinov2_dir, image_size=18))


def test_tower_is_frozen(dinov2_dir, images):
    tower = VisionTower.build(VisionTowerConfig(model=dinov2_dir, image_size=16))
    assert not any(p.requires_grad for p in tower.parameters())
    parent = torch.nn.Sequential(tower, torch.nn.Identity())
    parent.train()
    tower.train()
    assert not tower.training and not any(m.training for m in tower.modules())
    out = tower(tower.preprocess(images[:1]))
    assert not out.requires_grad


def test_full_clip_checkpoint_gives_its_vision_tower(clip_dir, images, tmp_path):
    from transformers import CLIPModel

    tower = VisionTower.build(VisionTowerConfig(model=clip_dir, image_size=8))
    assert type(tower.model).__name__ == "CLIPVisionModel"
    assert (tower.hidden_size, tower.patch_size, tower.num_tokens) == (32, 4, 5)
    assert tower.mean == pytest.approx(CLIP_MEAN) and tower.std == pytest.approx(CLIP_STD)  # family default
    full = CLIPModel.from_pretrained(clip_dir)
    loaded, saved = tower.model.state_dict(), full.vision_model.state_dict()
    assert loaded.keys() == saved.keys()
    for name, value in saved.items():  # the checkpoint's weights, not a random init
        assert torch.equal(loaded[name], value), name
    pixels = tower.preprocess(images[:2])
    out = tower(pixels)  # 8 px on a model trained at 16: interpolate_pos_encoding
    assert out.shape == (2, 5, 32)
    ref = full.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    assert torch.allclose(out, ref, atol=1e-6)
    # a preprocessor_config.json next to the weights wins over the family default
    folder = tmp_path / "clip_with_preproc"
    shutil.copytree(clip_dir, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                 "image_std": [0.3, 0.2, 0.1]}))
    tower2 = VisionTower.build(VisionTowerConfig(model=str(folder), image_size=8))
    assert tower2.mean == pytest.approx((0.1, 0.2, 0.3)) and tower2.std == pytest.approx((0.3, 0.2, 0.1))
    assert tower2.fingerprint() != tower.fingerprint()


def test_siglip_has_no_cls_token(tmp_path, images):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    cfg = SiglipConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=16),
                       vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=4, image_size=16, patch_size=4))
    SiglipModel(cfg).save_pretrained(tmp_path / "siglip")
    tower = VisionTower.build(VisionTowerConfig(model=str(tmp_path / "siglip"), image_size=16))
    assert type(tower.model).__name__ == "SiglipVisionModel"
    assert tower.num_tokens == 16 and tower.mean == SIGLIP_MEAN
    assert tower(tower.preprocess(images[:1])).shape == (1, 16, 32)


# ---------------------------------------------------------------------------------------------------------- cache
def _counting(tower):
    calls = []
    forward = tower.model.forward

    def wrapped(*args, **kwargs):
        calls.append(kwargs.get("pixel_values", args[0] if args else None).shape[0])
        return forward(*args, **kwargs)

    tower.model.forward = wrapped
    return calls


def test_feature_cache_rows_are_computed_once_per_content(dinov2_dir, images, tmp_path):
    tower = VisionTower.build(VisionTowerConfig(model=dinov2_dir, image_size=16, batch_size=2))
    calls = _counting(tower)
    store = vision_feature_cache(tower, images, tmp_path / "cache")
    assert calls == [2, 1]  # 3 distinct contents in batches of 2: the copy was not computed
    assert len(store.cache) == 3 and store.producer == tower.fingerprint()
    direct = tower(tower.preprocess(images))
    assert torch.allclose(store.get(images), direct, atol=1e-6)
    assert torch.equal(store.get([images[0]])[0], store.get([images[3]])[0])  # same bytes, same row
    calls.clear()
    again = vision_feature_cache(tower, images[::-1], tmp_path / "cache")
    assert calls == [] and torch.equal(again.get(images), store.get(images))
    # a path never given to the cache but with known bytes is found by its digest
    other = tmp_path / "renamed.png"
    shutil.copyfile(images[1], other)
    assert torch.equal(again.get([str(other)]), store.get([images[1]]))


def test_feature_cache_from_bytes_has_the_rows_of_the_files(dinov2_dir, images, tmp_path):
    """Images as encoded bytes (webdataset shards, datasets Image columns) are keyed by those bytes: the same rows
    as the same images as files, whichever built the cache first."""
    tower = VisionTower.build(VisionTowerConfig(model=dinov2_dir, image_size=16, batch_size=2))
    blobs = [Path(p).read_bytes() for p in images]
    assert torch.equal(tower.preprocess(blobs), tower.preprocess(images))
    calls = _counting(tower)
    from_bytes = vision_feature_cache(tower, blobs, tmp_path / "a")
    assert calls == [2, 1] and len(from_bytes.cache) == 3  # the copy's bytes share a row
    from_files = vision_feature_cache(tower, images, tmp_path / "b")
    assert from_bytes.cache.keys == from_files.cache.keys
    assert torch.equal(from_bytes.get(blobs), from_files.get(images))
    assert blobs[2] in from_bytes and images[2] in from_files
    # one folder: files after bytes compute nothing; a mix, and bytes never given to the cache, find their rows
    calls.clear()
    mixed = vision_feature_cache(tower, [images[0], blobs[1], images[2]], tmp_path / "a")
    assert calls == [] and torch.equal(mixed.get(images), from_bytes.get(blobs))
    assert torch.equal(mixed.get([bytearray(blobs[3])]), from_files.get([images[0]]))
    assert torch.allclose(from_bytes.get(blobs), tower(tower.preprocess(blobs)), atol=1e-6)


def test_feature_cache_producer_follows_weights_and_preprocessing(dinov2_dir, images, tmp_path):
    cfg = VisionTowerConfig(model=dinov2_dir, image_size=16)
    base = vision_feature_cache(VisionTower.build(cfg), images, tmp_path / "cache")
    # the same weights in another folder: content-addressed, so the same producer
    same = tmp_path / "same_weights"
    shutil.copytree(dinov2_dir, same)
    assert VisionTower.build(cfg.replace(model=str(same))).fingerprint() == base.producer
    # other random weights saved over that folder: another producer, other rows
    _save_dinov2(same, seed=1)
    new = vision_feature_cache(VisionTower.build(cfg.replace(model=str(same))), images, tmp_path / "cache")
    assert new.producer != base.producer and new.folder != base.folder
    assert not torch.allclose(new.get(images), base.get(images))
    # another image size: another producer
    small = VisionTower.build(cfg.replace(image_size=8))
    assert small.fingerprint() != base.producer
    assert VisionTower.build(cfg.replace(feature_layer=-2)).fingerprint() != base.producer
    # bf16 autocast rows are kept apart from fp32 ones
    calls = _counting(small)
    half = vision_feature_cache(small, images, tmp_path / "cache", dtype=torch.bfloat16)
    assert half.producer != small.fingerprint() and calls
    assert half.get(images[:1]).dtype == torch.float32 and half.get(images[:1]).shape == (1, 5, 32)


def test_digesting_many_images_is_fast(tmp_path):
    import time

    from vl_align.vision import image_digests

    rng = np.random.default_rng(0)
    src = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src)
    data = src.read_bytes()
    paths = []
    for i in range(2000):
        p = tmp_path / f"{i}.png"
        p.write_bytes(data + i.to_bytes(4, "little"))  # distinct contents
        paths.append(str(p))
    start = time.perf_counter()
    digests = image_digests(paths)
    assert time.perf_counter() - start < 2.0 and len(set(digests.values())) == 2000


# ---------------------------------------------------------------------------------------------------------- real
@pytest.mark.slow
def test_dinov2_s14_preset_at_112px(tmp_path):
    paths = [str(EASY_VQA_IMAGES / f"{i}.png") for i in range(4)]
    if not Path(paths[0]).is_file():
        pytest.skip("easy-vqa images are not installed")
    tower = VisionTower.build(VisionTowerConfig(model="dinov2-s14", image_size=112))
    assert (tower.hidden_size, tower.patch_size, tower.num_tokens) == (384, 14, 65)
    assert tower.mean == pytest.approx((0.485, 0.456, 0.406))
    out = tower(tower.preprocess(paths))
    assert out.shape == (4, 65, 384) and torch.isfinite(out).all()
    store = vision_feature_cache(tower, paths, tmp_path / "cache")
    assert torch.allclose(store.get(paths), out, atol=1e-5)
