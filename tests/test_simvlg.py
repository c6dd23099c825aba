"""Tests for vl_align.simvlg: SimVLG's ToMe connector over reused transformers BertLayers."""

import math

import pytest
import torch

from dvlp_common.config import ConfigError, load_config
from vl_align.simvlg import TomeConnector, TomeConnectorConfig, tome_bert_block
from vl_align.tome import bipartite_soft_matching, merge_schedule, merge_wavg

IMPLS = ["eager", "sdpa"]


def _tiny_cfg(**kw):
    base = dict(init_from=None, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                hidden_dropout_prob=0.0)
    base.update(kw)
    return TomeConnectorConfig(**base)


def _build(vision_width=24, seed=0, **kw):
    torch.manual_seed(seed)
    return TomeConnector.build(_tiny_cfg(**kw), vision_width)


def _project(conn, vis):
    return conn.input_norm(conn.input_proj(vis))


# ----------------------------------------------------------------------------------------------------------- config
def test_config_union_r_coercion_and_errors():
    assert TomeConnectorConfig(r=8).r == 8
    assert TomeConnectorConfig(r=8.0).r == 8
    assert TomeConnectorConfig(r="decreasing:8").r == "decreasing:8"
    assert TomeConnectorConfig(r=(1, 2, 3)).r == [1, 2, 3]  # length checked at build (checkpoint depth unknown)
    assert load_config(TomeConnectorConfig, overrides=["r=decreasing:4"]).r == "decreasing:4"
    assert load_config(TomeConnectorConfig, overrides=["r=[1, 2]"]).r == [1, 2]
    for bad in (True, "foo", -1, 2.5, [1, "a"], "decreasing:-2"):
        with pytest.raises(ConfigError) as err:
            TomeConnectorConfig(r=bad)
        assert err.value.key == "r"
    with pytest.raises(ConfigError) as err:  # depth known from the random-init sizes
        _tiny_cfg(r=[1, 2, 3])
    assert err.value.key == "r"
    with pytest.raises(ConfigError) as err:
        _tiny_cfg(num_layers=3)
    assert err.value.key == "num_layers"
    with pytest.raises(ConfigError):
        _tiny_cfg(hidden_size=30)
    with pytest.raises(ConfigError):
        TomeConnectorConfig(attn_implementation="flash")


def test_build_random_first_k_layers_and_dropout_override():
    conn = _build(num_hidden_layers=3, num_layers=2, dropout=0.25)
    assert conn.num_layers == 2 and conn.hidden_size == 32
    assert conn.input_proj.in_features == 24
    drops = [m.p for m in conn.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(p == 0.25 for p in drops)


# ------------------------------------------------------------------------------------------------ r = 0 == BertLayer
@pytest.mark.parametrize("impl", IMPLS)
def test_r0_equals_plain_bert_layers(impl):
    conn = _build(r=0, attn_implementation=impl, num_hidden_layers=3).eval()
    vis = torch.randn(2, 11, 24)
    with torch.no_grad():
        out = conn(vis)
        x = _project(conn, vis)
        for layer in conn.layers:
            x = layer(x)
            x = x[0] if isinstance(x, tuple) else x
    assert out["tokens"].shape == (2, 11, 32)
    torch.testing.assert_close(out["tokens"], x, atol=1e-6, rtol=0)
    assert out["tokens_per_layer"] == [11, 11, 11]
    assert torch.equal(out["size"], torch.ones(2, 11, 1))


# ----------------------------------------------------------------------------------------- SimVLG's 257 -> 29 schedule
def test_simvlg_schedule_257_to_29():
    conn = _build(r=19, num_hidden_layers=12, vision_width=16).eval()
    vis = torch.randn(2, 257, 16)
    with torch.no_grad():
        out = conn(vis)
    assert out["tokens"].shape == (2, 29, 32)
    assert out["schedule"] == [19] * 12
    assert out["tokens_per_layer"] == [257 - 19 * (i + 1) for i in range(12)]
    assert out["tokens_per_layer"][-1] == 29 == conn.output_tokens(257)
    size = out["size"]
    assert size.shape == (2, 29, 1) and size.dtype == torch.float32
    torch.testing.assert_close(size.sum(dim=1), torch.full((2, 1), 257.0))
    assert torch.equal(size[:, 0], torch.ones(2, 1))  # the class token never merges and stays first
    assert torch.isfinite(out["tokens"]).all()


def test_class_token_row_untouched_by_the_merge():
    """One layer: output row 0 (the [CLS]) is exactly what the plain layer gives for it, and holds one token."""
    torch.manual_seed(1)
    vis = torch.randn(2, 11, 24)
    conn = _build(r=5, num_hidden_layers=1).eval()
    conn_r0 = _build(r=0, num_hidden_layers=1).eval()  # same seed, same weights
    with torch.no_grad():
        out = conn(vis)
        ref = conn_r0(vis)["tokens"]
    assert out["tokens"].shape == (2, 6, 32)
    assert torch.equal(out["size"][:, 0], torch.ones(2, 1))
    torch.testing.assert_close(out["tokens"][:, 0], ref[:, 0], atol=1e-6, rtol=0)


def test_decreasing_and_list_schedules():
    conn = _build(r="decreasing:4", num_hidden_layers=3).eval()
    with torch.no_grad():
        out = conn(torch.randn(1, 20, 24))
    assert out["schedule"] == merge_schedule(3, 20, "decreasing:4", True) == [4, 2, 0]
    assert out["tokens_per_layer"] == [16, 14, 14]
    conn = _build(r=[3, 50], num_hidden_layers=2).eval()  # second entry clamped: (17 - 1) // 2 = 8
    with torch.no_grad():
        out = conn(torch.randn(1, 20, 24))
    assert out["schedule"] == [3, 8] and out["tokens"].shape[1] == 9


# ------------------------------------------------------------------------------------------- hand check of one layer
def _hand_attention(layer, x, bias=None):
    """BertAttention by hand: softmax(QK^T/sqrt(d) + bias) V, dense, residual, LayerNorm."""
    sa, so = layer.attention.self, layer.attention.output
    b, n, _ = x.shape
    h, d = sa.num_attention_heads, sa.attention_head_size
    q = sa.query(x).view(b, n, h, d).transpose(1, 2)
    k = sa.key(x).view(b, n, h, d).transpose(1, 2)
    v = sa.value(x).view(b, n, h, d).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        logits = logits + bias
    ctx = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, h * d)
    attn = so.LayerNorm(so.dense(ctx) + x)
    keys = k.mean(dim=1)  # heads averaged: [B, N, d]
    return attn, keys


def _hand_mlp(layer, a):
    return layer.output.LayerNorm(layer.output.dense(layer.intermediate.intermediate_act_fn(
        layer.intermediate.dense(a))) + a)


@pytest.mark.parametrize("impl", IMPLS)
def test_first_layer_merge_matches_hand_computation(impl):
    conn = _build(r=4, num_hidden_layers=1, attn_implementation=impl).eval()
    vis = torch.randn(3, 10, 24)
    with torch.no_grad():
        out = conn(vis)
        layer = conn.layers[0]
        x = _project(conn, vis)
        attn, keys = _hand_attention(layer, x)
        merge, _ = bipartite_soft_matching(keys, 4, class_token=True)
        merged, size = merge_wavg(merge, attn)
        expected = _hand_mlp(layer, merged)
    assert out["tokens"].shape == (3, 6, 32)
    torch.testing.assert_close(out["tokens"], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out["size"], size)
    # The merge is really on the keys: matching on the attention output instead gives other groups here.
    merge_other, _ = bipartite_soft_matching(attn, 4, class_token=True)
    assert not torch.equal(merge_other(torch.arange(10.0).expand(3, 10)[..., None]),
                           merge(torch.arange(10.0).expand(3, 10)[..., None]))


def test_plain_mean_versus_size_weighted_with_unequal_sizes():
    torch.manual_seed(0)
    conn = _build(r=3, num_hidden_layers=1).eval()
    layer = conn.layers[0]
    x = torch.randn(2, 9, 32)
    size = torch.randint(1, 5, (2, 9, 1)).float()
    with torch.no_grad():
        attn, keys = _hand_attention(layer, x)
        merge, _ = bipartite_soft_matching(keys, 3, class_token=True)
        out_mean, size_mean = tome_bert_block(layer, x, size, 3, size_weighted=False)
        out_wavg, size_wavg = tome_bert_block(layer, x, size, 3, size_weighted=True)
        exp_mean = _hand_mlp(layer, merge(attn, mode="mean"))
        wavg, exp_size = merge_wavg(merge, attn, size)
        exp_wavg = _hand_mlp(layer, wavg)
    torch.testing.assert_close(out_mean, exp_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_wavg, exp_wavg, atol=1e-5, rtol=1e-5)
    assert torch.equal(size_mean, exp_size) and torch.equal(size_wavg, exp_size)
    assert not torch.allclose(out_mean, out_wavg, atol=1e-4)


# ----------------------------------------------------------------------------------------- proportional attention
@pytest.mark.parametrize("impl", IMPLS)
def test_proportional_attention_bias_reaches_the_logits(impl):
    conn = _build(r=0, num_hidden_layers=1, attn_implementation=impl).eval()
    layer = conn.layers[0]
    x = torch.randn(2, 7, 32)
    size = torch.randint(1, 6, (2, 7, 1)).float()
    with torch.no_grad():
        out, _ = tome_bert_block(layer, x, size, 0, proportional_attention=True)
        attn, _ = _hand_attention(layer, x, bias=size.log()[:, None, None, :, 0])
        torch.testing.assert_close(out, _hand_mlp(layer, attn), atol=1e-5, rtol=1e-5)
        plain, _ = tome_bert_block(layer, x, size, 0, proportional_attention=False)
        assert not torch.allclose(out, plain, atol=1e-4)
        # all sizes 1: log(1) = 0, no change
        ones, _ = tome_bert_block(layer, x, torch.ones(2, 7, 1), 0, proportional_attention=True)
        torch.testing.assert_close(ones, plain, atol=1e-6, rtol=0)


def test_proportional_attention_in_the_connector():
    torch.manual_seed(1)
    vis = torch.randn(2, 17, 24)
    outs = {}
    for prop in (False, True):
        for r in (0, 3):
            conn = _build(r=r, num_hidden_layers=3, proportional_attention=prop).eval()
            with torch.no_grad():
                outs[prop, r] = conn(vis)["tokens"]
    torch.testing.assert_close(outs[True, 0], outs[False, 0], atol=1e-6, rtol=0)  # sizes all 1
    assert outs[True, 3].shape == outs[False, 3].shape == (2, 8, 32)
    assert not torch.allclose(outs[True, 3], outs[False, 3], atol=1e-4)  # sizes differ from layer 2 on


@pytest.mark.parametrize("prop", [False, True])
def test_gradients_reach_projection_and_every_layer(prop):
    conn = _build(r=3, num_hidden_layers=3, proportional_attention=prop, dropout=0.1).train()
    vis = torch.randn(2, 17, 24, requires_grad=True)
    out = conn(vis)
    (out["tokens"] * torch.randn_like(out["tokens"])).sum().backward()
    assert vis.grad is not None and vis.grad.abs().sum() > 0
    assert conn.input_proj.weight.grad.abs().sum() > 0
    for layer in conn.layers:
        for p in (layer.attention.self.query.weight, layer.attention.self.value.weight,
                  layer.attention.output.dense.weight, layer.intermediate.dense.weight, layer.output.dense.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_bad_input_shape():
    conn = _build()
    with pytest.raises(ValueError):
        conn(torch.randn(2, 5, 23))


# ----------------------------------------------------------------------------------------- packaged MiniLM (slow)
@pytest.mark.slow
def test_init_from_packaged_minilm():
    from dvlp_common import zoo

    cfg = TomeConnectorConfig(init_from="minilm-l6", r=4)
    conn = TomeConnector.build(cfg, vision_width=48).eval()
    ref = zoo.load_encoder("minilm-l6")
    assert conn.num_layers == 6 and conn.hidden_size == 384
    assert torch.equal(conn.layers[3].attention.self.query.weight, ref.encoder.layer[3].attention.self.query.weight)
    assert torch.equal(conn.layers[5].output.LayerNorm.weight, ref.encoder.layer[5].output.LayerNorm.weight)
    torch.manual_seed(0)
    with torch.no_grad():
        out = conn(torch.randn(2, 65, 48))
    assert out["tokens"].shape == (2, 41, 384)
    assert out["tokens_per_layer"] == [61, 57, 53, 49, 45, 41]
    torch.testing.assert_close(out["size"].sum(dim=1), torch.full((2, 1), 65.0))
    assert torch.isfinite(out["tokens"]).all()
    two = TomeConnector.build(cfg.replace(num_layers=2), vision_width=48)
    assert two.num_layers == 2
    with pytest.raises(ConfigError):
        TomeConnector.build(cfg.replace(num_layers=7), vision_width=48)
