import pytest
import torch
import transformers as tf

from vl_align.elip import ElipConfig, ElipVisionTower, num_kept, prune_and_fuse, token_schedule


def _dinov2(layers=12, eager=False, registers=0, seed=0, image=56):
    torch.manual_seed(seed)
    kw = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, mlp_ratio=2, image_size=image, patch_size=4)
    if eager:
        kw["attn_implementation"] = "eager"
    if registers:
        return tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
    return tf.Dinov2Model(tf.Dinov2Config(**kw))


def _vit(eager=False):
    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4)
    if eager:
        kw["attn_implementation"] = "eager"
    return tf.ViTModel(tf.ViTConfig(**kw), add_pooling_layer=False)


def _clip(eager=False):
    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4)
    if eager:
        kw["attn_implementation"] = "eager"
    return tf.CLIPVisionModel(tf.CLIPVisionConfig(**kw))


SMALL = ElipConfig(prune_after_layers=(1,), lookahead_depths=(2,), keep_ratios=(0.5,))


# ---------------------------------------------------------------- prune_and_fuse by hand
def test_prune_and_fuse_by_hand():
    cls = torch.tensor([[100.0, 100.0]])
    patches = torch.tensor([[float(i), 10.0 * i] for i in range(1, 6)])  # p_i = (i, 10 i)
    tokens = torch.cat([cls, patches]).unsqueeze(0)  # [1, 6, 2]
    attn = torch.tensor([[0.10, 0.40, 0.05, 0.30, 0.15]])
    out, kept = prune_and_fuse(tokens, attn, keep=2, num_special=1)
    assert kept.tolist() == [[1, 3]]  # patches 2 and 4, original order
    assert out.shape == (1, 4, 2)
    assert torch.equal(out[0, 0], cls[0])
    assert torch.equal(out[0, 1], torch.tensor([2.0, 20.0]))
    assert torch.equal(out[0, 2], torch.tensor([4.0, 40.0]))
    # pruned: p1 (0.10), p3 (0.05), p5 (0.15) -> weights 1/3, 1/6, 1/2
    expected = (1 / 3) * torch.tensor([1.0, 10.0]) + (1 / 6) * torch.tensor([3.0, 30.0]) + 0.5 * torch.tensor([5.0, 50.0])
    torch.testing.assert_close(out[0, 3], expected)
    torch.testing.assert_close(out[0, 3], torch.tensor([10 / 3, 100 / 3]))


def test_prune_and_fuse_order_batch_and_special_tokens():
    torch.manual_seed(0)
    tokens = torch.randn(2, 2 + 4, 3)  # 2 special tokens (CLS + register), 4 patches
    attn = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.1, 0.3, 0.2]])
    out, kept = prune_and_fuse(tokens, attn, keep=2, num_special=2)
    # topk returns (3, 2) and (0, 2); output must be in original order
    assert kept.tolist() == [[2, 3], [0, 2]]
    assert out.shape == (2, 2 + 2 + 1, 3)
    assert torch.equal(out[:, :2], tokens[:, :2])  # special tokens untouched
    assert torch.equal(out[0, 2:4], tokens[0, [4, 5]])
    assert torch.equal(out[1, 2:4], tokens[1, [2, 4]])
    torch.testing.assert_close(out[0, 4], (0.1 * tokens[0, 2] + 0.2 * tokens[0, 3]) / 0.3)
    torch.testing.assert_close(out[1, 4], (0.1 * tokens[1, 3] + 0.2 * tokens[1, 5]) / 0.3)
    # zero attention on the pruned set -> uniform fusion
    out0, _ = prune_and_fuse(tokens[:1], torch.tensor([[0.0, 0.0, 0.5, 0.5]]), keep=2, num_special=2)
    torch.testing.assert_close(out0[0, 4], tokens[0, 2:4].mean(0))
    with pytest.raises(ValueError, match="keep"):
        prune_and_fuse(tokens, attn, keep=4, num_special=2)
    with pytest.raises(ValueError, match="cls_attn"):
        prune_and_fuse(tokens, attn[:, :3], keep=2, num_special=2)


# ---------------------------------------------------------------- config
def test_config_validation():
    ElipConfig()
    with pytest.raises(ValueError, match="same length"):
        ElipConfig(prune_after_layers=(2, 4), lookahead_depths=(2, 6, 2))
    with pytest.raises(ValueError, match="keep_ratios"):
        ElipConfig(keep_ratios=(0.9, 0.65, 0.0))
    with pytest.raises(ValueError, match="keep_ratios"):
        ElipConfig(keep_ratios=(0.9, 1.2, 0.4))
    with pytest.raises(ValueError, match="keep_ratios.*non-increasing"):
        ElipConfig(keep_ratios=(0.6, 0.65, 0.4))
    with pytest.raises(ValueError, match="prune_after_layers.*increasing"):
        ElipConfig(prune_after_layers=(4, 2, 10))
    with pytest.raises(ValueError, match="lookahead_depths"):
        ElipConfig(lookahead_depths=(2, 0, 2))
    with pytest.raises(ValueError, match="text_weight"):
        ElipConfig(text_weight=1.5)
    # layer + depth > num_layers is checked at wrapping time
    cfg = ElipConfig(prune_after_layers=(2, 4, 10), lookahead_depths=(2, 6, 3))
    with pytest.raises(ValueError, match="lookahead_depths"):
        ElipVisionTower(_dinov2(layers=12), cfg)
    with pytest.raises(ValueError, match="prune_after_layers"):
        ElipVisionTower(_dinov2(layers=3), ElipConfig())


# ---------------------------------------------------------------- schedule on 196 patches, 12 layers
def test_tokens_per_layer_schedule_12_layers_196_patches():
    model = _dinov2(layers=12)
    tower = ElipVisionTower(model).train()
    x = torch.randn(2, 3, 56, 56)
    out, stats = tower(x)
    assert [num_kept(r, 196) for r in (0.9, 0.65, 0.4)] == [176, 127, 78]
    expected = [197, 197, 178, 178] + [129] * 6 + [80, 80]
    assert stats.tokens_per_layer == expected
    assert token_schedule(ElipConfig(), 12, 196) == expected
    assert out.shape == (2, 80, 32)
    assert stats.unpruned_tokens == 197
    assert stats.avg_tokens == pytest.approx(1684 / 12)
    assert stats.token_reduction == pytest.approx(1 - (1684 / 12) / 197)  # 0.2876 ~ paper's "about 29%"
    assert 0.28 < stats.token_reduction < 0.30
    assert stats.pruned_after_layers == [2, 4, 10]
    # fused token persists as a candidate: later kept indices come from the earlier kept set or are -1 (fused)
    for prev, cur in zip(stats.kept_patch_indices, stats.kept_patch_indices[1:]):
        for bi in range(2):
            allowed = set(prev[bi].tolist()) | {-1}
            assert set(cur[bi].tolist()) <= allowed
    assert [k.shape[1] for k in stats.kept_patch_indices] == [176, 127, 78]


def test_register_tokens_preserved():
    model = _dinov2(layers=4, registers=3, image=16)  # 16 patches + CLS + 3 registers
    tower = ElipVisionTower(model, ElipConfig((1, 2), (1, 2), (0.5, 0.25))).train()
    assert tower.num_special_tokens == 4
    out, stats = tower(torch.randn(2, 3, 16, 16))
    assert stats.tokens_per_layer == [20, 13, 9, 9]  # 4 + 8 + 1, 4 + 4 + 1
    assert out.shape == (2, 9, 32)
    assert token_schedule(tower.elip_config, 4, 16, num_special=4) == stats.tokens_per_layer


# ---------------------------------------------------------------- pruning off == plain model
@pytest.mark.parametrize("factory", [_dinov2, _vit, _clip])
def test_pruning_off_matches_plain_model(factory):
    model = factory() if factory is not _dinov2 else _dinov2(layers=12)
    cfg = ElipConfig() if factory is _dinov2 else SMALL
    tower = ElipVisionTower(model, cfg)
    size = 56 if factory is _dinov2 else 16
    x = torch.randn(2, 3, size, size)
    model.eval()
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
        out_eval, stats = tower.eval()(x)  # eval -> full ViT
        tower.train()
        tower.enabled = False
        out_off, stats_off = tower(x)  # flag off in training mode -> full ViT
    assert not stats.pruning and not stats_off.pruning
    assert out_eval.shape == ref.shape
    assert (out_eval - ref).abs().max() <= 1e-6
    assert (out_off - ref).abs().max() <= 1e-6
    assert stats.token_reduction == 0.0 and len(set(stats.tokens_per_layer)) == 1
    # and pruning on for ViT / CLIP works too
    with torch.no_grad():
        out_on, stats_on = tower(x, prune=True)
    n_patches = ref.shape[1] - 1
    assert out_on.shape[1] == 1 + num_kept(cfg.keep_ratios[-1], n_patches) + 1
    assert stats_on.token_reduction > 0


# ---------------------------------------------------------------- attention equals eager probabilities
@pytest.mark.parametrize("factory", [_dinov2, _vit, _clip])
def test_cls_attention_equals_eager(factory):
    model = factory(eager=True).eval()
    tower = ElipVisionTower(model, SMALL).eval()
    size = 56 if factory is _dinov2 else 16
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        o = model(pixel_values=x, output_attentions=True, output_hidden_states=True)
        assert torch.allclose(o.hidden_states[0], tower._embed(x))
        for i in range(len(tower.blocks)):
            ours = tower.cls_attention(i, o.hidden_states[i])
            ref = o.attentions[i][:, :, 0, :].mean(dim=1)
            torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- text guidance
def test_text_cls_changes_kept_set():
    # Constructed case: a single-block look-ahead (depth 1) so the score is the CLS attention of block 2.
    # With a large text vector t, the mixed CLS is ~0.2 t; LayerNorm(-t) = -LayerNorm(t) (zero bias at init)
    # and q_proj has zero bias, so the query flips sign: the ranking of the patches reverses and with
    # keep ratio 0.25 the kept sets for +t and -t are disjoint.
    model = _dinov2(layers=3, image=16)
    cfg = ElipConfig(prune_after_layers=(1,), lookahead_depths=(1,), keep_ratios=(0.25,))
    tower = ElipVisionTower(model, cfg).train()
    x = torch.randn(1, 3, 16, 16)
    t = torch.randn(1, 32)
    t = 1e3 * t / t.norm()
    _, s_pos = tower(x, text_cls=t)
    _, s_neg = tower(x, text_cls=-t)
    _, s_none = tower(x)
    kept_pos, kept_neg, kept_none = (set(s.kept_patch_indices[0][0].tolist()) for s in (s_pos, s_neg, s_none))
    assert len(kept_pos) == len(kept_neg) == 4
    assert kept_pos.isdisjoint(kept_neg)
    assert kept_pos != kept_none or kept_neg != kept_none
    _, s_pos2 = tower(x, text_cls=t)  # deterministic scoring
    assert torch.equal(s_pos2.kept_patch_indices[0], s_pos.kept_patch_indices[0])

    # the kept set is exactly the top-K of the attention with CLS := 0.2 t + 0.8 cls, computed by hand
    with torch.no_grad():
        h = model.encoder.layer[0](model.embeddings(x))
        h_mix = h.clone()
        h_mix[:, 0] = 0.2 * t + 0.8 * h[:, 0]
        a = tower.cls_attention(1, h_mix)[:, 1:]
    assert set(a.topk(4, dim=1).indices[0].tolist()) == kept_pos


# ---------------------------------------------------------------- gradients
def test_gradients_flow_through_pruned_forward():
    model = _dinov2(layers=12)
    tower = ElipVisionTower(model).train()
    x = torch.randn(2, 3, 56, 56)
    t = torch.randn(2, 32, requires_grad=True)
    out, stats = tower(x, text_cls=t)
    assert stats.pruning and out.shape == (2, 80, 32)
    out.pow(2).mean().backward()
    missing = [
        n for n, p in model.named_parameters() if "mask_token" not in n and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert missing == []
    assert t.grad is None  # the look-ahead scoring is no_grad
    assert sum(p.numel() for p in tower.parameters()) == sum(p.numel() for p in model.parameters())  # no new params


def test_text_cls_shape_checked():
    tower = ElipVisionTower(_dinov2(layers=3, image=16), SMALL).train()
    with pytest.raises(ValueError, match="text_cls"):
        tower(torch.randn(2, 3, 16, 16), text_cls=torch.randn(2, 16))
