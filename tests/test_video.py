"""The video front (vl_align.video): SimVLG's temporal token merging inserted into the tower's blocks from the outside,
on tiny random towers. What is proved: at alpha = 0 the front is the image model averaged over frames; the step-0
gradient structure; the faithful module's blindness to frame order and the position variant's sight of it; the
front's save/load round trip; and the clear errors."""
import itertools

import pytest
import torch
import transformers as tf

from dvlp_common.config import ConfigError
from vl_align.fronts import (
    FrontConfig,
    build_front,
    load_front,
    load_front_weights,
    needs_live_tower,
    save_front,
)
from vl_align.simvlg import TomeConnectorConfig
from vl_align.video import (
    TemporalBlock,
    TemporalTokenMerge,
    VideoConfig,
    VideoVisionTower,
)
from vl_align.vision import VisionTower, VisionTowerConfig

SIZE = 16  # 4-px patches: 16 patches + [CLS] = 17 tokens
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 4, "image_size": SIZE}
VIDEO = {"enabled": True, "hidden_dim": 16, "num_heads": 4}
TOME = TomeConnectorConfig(init_from=None, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                           num_hidden_layers=2, hidden_dropout_prob=0.0, r=2)


def _model(kind: str = "dinov2", seed: int = 0):
    torch.manual_seed(seed)
    if kind == "dinov2":
        return tf.Dinov2Model(tf.Dinov2Config(mlp_ratio=2, **TINY))
    if kind == "registers":
        return tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, **TINY))
    if kind == "vit":
        return tf.ViTModel(tf.ViTConfig(intermediate_size=64, **TINY), add_pooling_layer=False)
    if kind == "clip":
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(intermediate_size=64, **TINY))
    if kind == "siglip":
        return tf.SiglipVisionModel(tf.SiglipVisionConfig(intermediate_size=64, **TINY))
    raise AssertionError(kind)


def _tower(kind: str = "dinov2", feature_layer: int = -1) -> VisionTower:
    cfg = VisionTowerConfig(model="in-memory", image_size=SIZE, feature_layer=feature_layer, cache_features=False)
    return VisionTower(_model(kind), cfg, "in-memory", (0.5,) * 3, (0.5,) * 3)


def _clip(b=2, t=4, seed=1):
    return torch.randn(b, t, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _per_frame_mean(tower, video):
    b, t = video.shape[:2]
    feats = tower(video.flatten(0, 1))  # the image model, frame by frame
    return feats.view(b, t, *feats.shape[1:]).mean(1)


def _perturb(video_tower: VideoVisionTower, seed: int = 3, positions: bool = False) -> None:
    """What training would do: alpha away from 0 and Q/K (and frame positions) of a size that matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in video_tower.temporal.values():
            m.alpha.fill_(0.7)
            for lin in (m.query, m.key):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
            if positions and m.frame_pos is not None:
                m.frame_pos.copy_(torch.randn(m.frame_pos.shape, generator=g))


# ------------------------------------------------------------------------------------------ alpha = 0: the image model
@pytest.mark.parametrize("kind", ["dinov2", "registers", "vit", "clip"])
def test_alpha_zero_is_the_mean_of_per_frame_image_features(kind):
    tower = _tower(kind)
    video = VideoVisionTower(tower, VideoConfig(**VIDEO)).eval()
    assert len(video.temporal) == 2 and all(m.alpha.item() == 0.0 for m in video.temporal.values())
    clip = _clip()
    with torch.no_grad():
        torch.testing.assert_close(video(clip), _per_frame_mean(tower, clip), atol=1e-5, rtol=1e-5)
        # a clip of one repeated image is that image
        still = clip[:, :1].expand(-1, 5, -1, -1, -1)
        torch.testing.assert_close(video(still), tower(clip[:, 0]), atol=1e-5, rtol=1e-5)


def test_alpha_zero_honours_the_feature_layer():
    tower = _tower(feature_layer=-2)  # hidden_states[-2]: the first block's un-normed output
    video = VideoVisionTower(tower, VideoConfig(**VIDEO)).eval()
    assert video.depth == 1 and list(video.temporal) == ["0"]
    clip = _clip()
    with torch.no_grad():
        torch.testing.assert_close(video(clip), _per_frame_mean(tower, clip), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["tome", "qformer"])
def test_front_at_alpha_zero_is_the_image_front_on_averaged_features(kind, tiny_bert_dir):
    tower = _tower()
    cfg = FrontConfig(kind=kind, init_from=tiny_bert_dir, num_query_tokens=4, tome=TOME, video=VideoConfig(**VIDEO))
    assert needs_live_tower(cfg, tower.config) and needs_live_tower(cfg, tower.config.replace(cache_features=True))
    torch.manual_seed(0)
    front = build_front(cfg, tower.hidden_size, 24, vision_tower=tower).eval()
    assert isinstance(front.vision, VideoVisionTower)
    clip = _clip()
    with torch.no_grad():
        out = front("queries", pixel_values_videos=clip)
        mean = _per_frame_mean(tower, clip)
        torch.testing.assert_close(out["image_embeds"], mean, atol=1e-5, rtol=1e-5)
        if kind == "tome":
            expected = front.llm_proj(front.connector(mean)["tokens"])
        else:
            expected = front.llm_proj(front.qformer.forward_queries(mean))
        torch.testing.assert_close(out["prompt_pred"], expected, atol=1e-5, rtol=1e-5)
    # trainable: the temporal modules, the connector, W; the rest of the tower stays frozen
    trained = [n for n, p in front.named_parameters() if p.requires_grad]
    assert any(n.startswith("vision.temporal.") for n in trained) and any(n.startswith("llm_proj.") for n in trained)
    assert all(n.startswith("vision.temporal.") or not n.startswith("vision.") for n in trained)
    assert not any(p.requires_grad for p in tower.parameters())
    front.train()
    assert not tower.model.training and all(m.training for m in front.vision.temporal.values())


def test_the_module_by_hand():
    """Each token position attends over its video's frames: per head, softmax_s(q_t . k_s / sqrt(hidden_dim)) over
    the frames s, weighting the frames' own tokens (value = input, split into heads); x + alpha * that."""
    torch.manual_seed(0)
    c, hid, heads, b, t, n = 8, 4, 2, 2, 3, 2
    module = TemporalTokenMerge(c, hidden_dim=hid, num_heads=heads, max_frames=3)
    with torch.no_grad():
        module.alpha.fill_(0.5)
        module.query.weight.normal_()
        module.key.weight.normal_()
        module.frame_pos.normal_()
    x = torch.randn(b * t, n, c)
    expected = x.clone()
    for video, tok, head in itertools.product(range(b), range(n), range(heads)):
        frames = [x[video * t + s, tok] for s in range(t)]
        qk_in = [f + module.frame_pos[s] for s, f in enumerate(frames)]  # positions on Q/K only
        qs = [module.query(f)[head * hid // heads:(head + 1) * hid // heads] for f in qk_in]
        ks = [module.key(f)[head * hid // heads:(head + 1) * hid // heads] for f in qk_in]
        vs = [f[head * c // heads:(head + 1) * c // heads] for f in frames]
        for s in range(t):
            w = torch.softmax(torch.stack([qs[s] @ k for k in ks]) / hid ** 0.5, dim=0)
            expected[video * t + s, tok, head * c // heads:(head + 1) * c // heads] += 0.5 * sum(
                wi * v for wi, v in zip(w, vs))
    with torch.no_grad():
        torch.testing.assert_close(module(x, t), expected)


def test_the_module_sits_between_attention_and_mlp():
    """SimVLG's Block: x + attn(norm1 x) -> temporal -> + mlp(norm2 .), written out here for a DINOv2 layer."""
    block = _model().encoder.layer[0].eval()
    module = TemporalTokenMerge(32, hidden_dim=16, num_heads=4)
    with torch.no_grad():
        module.alpha.fill_(0.7)
        module.query.weight.normal_()
        x = torch.randn(6, 17, 32)  # 2 videos of 3 frames
        h = x + block.layer_scale1(block.attention(block.norm1(x))[0])
        h = module(h, 3)
        expected = h + block.layer_scale2(block.mlp(block.norm2(h)))
        torch.testing.assert_close(TemporalBlock(block, "dinov2", module)(x, 3), expected)
        module.alpha.zero_()
        torch.testing.assert_close(TemporalBlock(block, "dinov2", module)(x, 3), block(x))


# --------------------------------------------------------------------------------------------------- step-0 gradients
@pytest.mark.parametrize("max_frames", [None, 6])
def test_step0_gradients_then_both_move(max_frames):
    tower = _tower()
    torch.manual_seed(0)
    cfg = FrontConfig(kind="tome", tome=TOME, video=VideoConfig(max_frames=max_frames, **VIDEO))
    front = build_front(cfg, tower.hidden_size, 24, vision_tower=tower).train()
    params = [p for p in front.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    modules = list(front.vision.temporal.values())
    clip = _clip()
    target = torch.randn(2, 24)

    def step():
        opt.zero_grad()
        loss = (front("queries", pixel_values_videos=clip)["prompt_pred"].mean(1) - target).pow(2).mean()
        loss.backward()

    def qk(m):
        return [m.query.weight, m.query.bias, m.key.weight, m.key.bias] + ([m.frame_pos] if max_frames else [])

    step()
    for m in modules:
        assert m.alpha.grad is not None and m.alpha.grad.abs().item() > 0
        for p in qk(m):  # Q/K only act through alpha = 0: exactly no gradient
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    assert all(p.grad is None for p in tower.parameters())
    before = {id(p): p.detach().clone() for m in modules for p in [m.alpha, *qk(m)]}
    opt.step()
    for m in modules:
        assert not torch.equal(m.alpha, before[id(m.alpha)])  # alpha moves at the first step
        assert all(torch.equal(p, before[id(p)]) for p in qk(m))  # (SGD: Q/K had no gradient to move by)
    step()  # alpha != 0 now: Q/K (and the frame positions) have a gradient, and the next step moves them
    for m in modules:
        assert all(torch.count_nonzero(p.grad) > 0 for p in qk(m))
    opt.step()
    for m in modules:
        assert all(not torch.equal(p, before[id(p)]) for p in qk(m))


# ------------------------------------------------------------------------------------------------------- frame order
def test_the_faithful_module_is_blind_to_frame_order():
    torch.manual_seed(0)
    module = TemporalTokenMerge(32, hidden_dim=16, num_heads=4)
    with torch.no_grad():
        module.alpha.fill_(0.7)
        module.query.weight.normal_()
        module.key.weight.normal_()
    b, t, n = 2, 4, 5
    x = torch.randn(b, t, n, 32)
    out = module(x.flatten(0, 1), t).view(b, t, n, 32)
    assert (out - x).abs().max() > 0.1  # it does something
    for perm in itertools.permutations(range(t)):
        moved = module(x[:, list(perm)].flatten(0, 1), t).view(b, t, n, 32)
        torch.testing.assert_close(moved, out[:, list(perm)], atol=1e-5, rtol=0)  # per frame: permuted alike
        torch.testing.assert_close(moved.mean(1), out.mean(1), atol=1e-5, rtol=0)


def test_the_tower_is_blind_to_frame_order_and_frame_positions_see_it():
    tower = _tower()
    clip = _clip(t=4)
    perms = [[3, 2, 1, 0], [1, 3, 0, 2], [0, 2, 1, 3]]
    faithful = VideoVisionTower(tower, VideoConfig(**VIDEO)).eval()
    _perturb(faithful)
    with torch.no_grad():
        ref = faithful(clip)
        assert (ref - _per_frame_mean(tower, clip)).abs().max() > 1e-2  # the modules are active
        for perm in perms:
            torch.testing.assert_close(faithful(clip[:, perm]), ref, atol=1e-5, rtol=0)
    ordered = VideoVisionTower(tower, VideoConfig(max_frames=6, **VIDEO)).eval()
    _perturb(ordered, positions=False)  # positions still zero (as initialised): still blind
    with torch.no_grad():
        torch.testing.assert_close(ordered(clip[:, perms[0]]), ordered(clip), atol=1e-5, rtol=0)
    _perturb(ordered, positions=True)  # learned positions: the order now changes the features
    with torch.no_grad():
        ref = ordered(clip)
        for perm in perms:
            assert (ordered(clip[:, perm]) - ref).abs().max() > 1e-3


def test_cached_frozen_part_gives_the_same_features():
    tower = _tower()
    video = VideoVisionTower(tower, VideoConfig(blocks=[1], **VIDEO)).eval()
    _perturb(video)
    assert video.frozen_depth == 1 and list(video.temporal) == ["1"]
    clip = _clip()
    frozen = video.frozen_features(clip.flatten(0, 1))
    assert not frozen.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(video(frozen_hidden=frozen.view(2, 4, *frozen.shape[1:])), video(clip))
    none = VideoVisionTower(tower, VideoConfig(blocks=[], **VIDEO)).eval()  # no modules: plain mean pooling
    assert none.frozen_depth == 2 and len(none.temporal) == 0
    with torch.no_grad():
        torch.testing.assert_close(none(clip), _per_frame_mean(tower, clip), atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("kind", ["tome", "qformer"])
def test_save_load_round_trip(kind, tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir):
    vision_cfg = VisionTowerConfig(model=tiny_vit_dir, image_size=SIZE, cache_features=False)
    tower = VisionTower.build(vision_cfg)
    cfg = FrontConfig(kind=kind, init_from=tiny_bert_dir, num_query_tokens=4, tome=TOME,
                      video=VideoConfig(max_frames=4, blocks=[0, 5, 11], **VIDEO))
    torch.manual_seed(0)
    front = build_front(cfg, tower.hidden_size, 32, vision_tower=tower).eval()
    _perturb(front.vision, positions=True)
    folder = save_front(front, tmp_path / "front", cfg, vision_cfg, tiny_llm_dir, True)
    from safetensors.torch import load_file

    saved = load_file(str(folder / "model.safetensors"))
    assert {k for k in saved if k.startswith("vision.")} == {
        f"vision.temporal.{i}.{p}" for i in (0, 5, 11)
        for p in ("alpha", "frame_pos", "query.weight", "query.bias", "key.weight", "key.bias")}
    loaded, _, _, meta = load_front(folder)
    assert meta["front"]["video"]["enabled"] and isinstance(loaded.vision, VideoVisionTower)
    clip = _clip()
    with torch.no_grad():
        torch.testing.assert_close(loaded("queries", pixel_values_videos=clip)["prompt_pred"],
                                   front("queries", pixel_values_videos=clip)["prompt_pred"])
    # an image front's weights lack the temporal modules: a clear error, not a silent fresh init
    image_cfg = cfg.replace(video=VideoConfig())
    image_front = build_front(image_cfg, tower.hidden_size, 32, vision_tower=tower if kind == "tome" else None)
    image_dir = save_front(image_front, tmp_path / "image_front", image_cfg, vision_cfg, tiny_llm_dir, True)
    with pytest.raises(ConfigError, match="vision.temporal"):
        load_front_weights(front, image_dir)


# ------------------------------------------------------------------------------------------------------- clear errors
def test_clear_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        TemporalTokenMerge(30, hidden_dim=16, num_heads=4)  # the value is the input split into heads
    with pytest.raises(ValueError, match="hidden_dim=20 is not divisible"):
        TemporalTokenMerge(32, hidden_dim=20, num_heads=8)
    module = TemporalTokenMerge(32, hidden_dim=16, num_heads=4, max_frames=3)
    with pytest.raises(ValueError, match="whole number of videos"):
        module(torch.randn(5, 3, 32), 2)
    with pytest.raises(ValueError, match="max_frames=3"):
        module(torch.randn(8, 3, 32), 4)
    for bad, key in (({"hidden_dim": 10, "num_heads": 4}, "hidden_dim"), ({"max_frames": 2}, "max_frames"),
                     ({"blocks": [-1]}, "blocks"), ({"blocks": [1, 1]}, "blocks")):
        with pytest.raises(ConfigError) as err:
            VideoConfig(**bad)
        assert err.value.key == key
    with pytest.raises(ConfigError) as err:
        FrontConfig(kind="elip", video=VideoConfig(enabled=True))
    assert err.value.key == "video.enabled"
    assert FrontConfig().video.enabled is False and not needs_live_tower(FrontConfig(), VisionTowerConfig())

    tower = _tower()
    with pytest.raises(ConfigError, match="feature cache cannot serve it"):
        build_front(FrontConfig(kind="tome", tome=TOME, video=VideoConfig(**VIDEO)), 32, 24)
    with pytest.raises(ConfigError, match="reaches past") as err:
        VideoVisionTower(tower, VideoConfig(blocks=[2], **VIDEO))
    assert err.value.key == "front.video.blocks"
    with pytest.raises(ConfigError, match="width 32 is not divisible by 3") as err:
        VideoVisionTower(tower, VideoConfig(enabled=True, hidden_dim=12, num_heads=3))
    assert err.value.key == "front.video.num_heads"
    with pytest.raises(TypeError, match="SiglipVisionModel"):
        VideoVisionTower(_tower("siglip"), VideoConfig(**VIDEO))
    with pytest.raises(TypeError, match="cannot insert a temporal module into Linear"):
        TemporalBlock(torch.nn.Linear(32, 32), "dinov2", TemporalTokenMerge(32, 16, 4))

    front = build_front(FrontConfig(kind="tome", tome=TOME, video=VideoConfig(**VIDEO)), 32, 24, vision_tower=tower)
    with pytest.raises(ValueError, match="pixel_values_videos must be"):
        front("queries", pixel_values=torch.randn(2, 3, SIZE, SIZE))  # images, not clips
    with pytest.raises(ValueError, match="runs its tower live"):
        front("queries", image_embeds=torch.randn(2, 17, 32))  # cached features cannot stand in
