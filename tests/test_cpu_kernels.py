"""The CPU kernels (dvlp_common.cpu_kernels): the dropout mask has torch's distribution, exact gradients and seeded
masks; attention by matmuls gives SDPA's outputs and gradients (grouped-query, causal, padded); the dispatcher takes
the matmul path exactly where it should; a Q-Former is unchanged wherever nothing is dropped."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dvlp_common.cpu_kernels as K
from dvlp_common.cpu_kernels import BitDropout, bit_dropout, effective_p, install_cpu_attention, use_bit_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.25])
def test_drop_fraction_scale_and_mean(p):
    torch.manual_seed(0)
    x = torch.ones(1 << 20)
    y = bit_dropout(x, p)
    dropped = float((y == 0).float().mean())
    n = x.numel()
    # the drop fraction is Binomial(n, p_eff): within 5 standard deviations
    assert abs(dropped - effective_p(p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert abs(effective_p(p) - p) <= 2 ** -17
    kept = y[y != 0]
    assert torch.all(kept == 1.0 / (1.0 - effective_p(p)))  # kept elements carry exactly the inverse keep rate
    assert abs(float(y.mean()) - 1.0) < 5 * math.sqrt(p / (1 - p) / n)  # the expectation is the input's


def test_mask_bits_are_independent_of_position():
    """Each 64-bit draw feeds four elements: neighbours must not be correlated, and each of the four 16-bit slots of
    a draw must drop at the same rate (a slot taken from a narrower range would drop more or less often)."""
    torch.manual_seed(1)
    n = 1 << 22
    keep = bit_dropout(torch.ones(n), 0.5) != 0
    slots = keep.view(-1, 4).float().mean(0)
    assert torch.all((slots - 0.5).abs() < 5 * math.sqrt(0.25 / (n / 4))), slots
    a, b = keep[:-1].float(), keep[1:].float()
    corr = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))
    assert abs(corr) < 5 / math.sqrt(n)


def test_gradient_is_mask_times_scale_and_bf16_works():
    torch.manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(64, 37, dtype=dtype, requires_grad=True)
        y = bit_dropout(x, 0.1)
        g = torch.randn_like(y)
        y.backward(g)
        keep = y != 0
        assert y.dtype == dtype
        scale = 1.0 / (1.0 - effective_p(0.1))
        torch.testing.assert_close(x.grad, torch.where(keep, g * scale, torch.zeros_like(g)))
        torch.testing.assert_close(y[keep], (x.detach() * scale)[keep])


def test_seeded_and_identity_in_eval():
    x = torch.randn(3, 50, 40)
    torch.manual_seed(5)
    a = bit_dropout(x, 0.1)
    torch.manual_seed(5)
    b = bit_dropout(x, 0.1)
    assert torch.equal(a, b)
    assert not torch.equal(a, bit_dropout(x, 0.1))  # the generator moved on
    assert bit_dropout(x, 0.1, training=False) is x
    assert torch.equal(bit_dropout(x, 0.0), x)
    module = BitDropout(0.3).eval()
    assert torch.equal(module(x), x)


@pytest.fixture(autouse=True)
def _restore_kernel_settings():
    """The attention dispatch is process-wide: leave the settings as each test found them."""
    saved = dict(K._SETTINGS)
    yield
    K._SETTINGS.update(saved)


def _qformer(impl="sdpa"):
    from vl_align.qformer import QFormer, QFormerConfig

    cfg = QFormerConfig(vision_width=24, num_query_tokens=4, cross_attention_frequency=2, hidden_size=32,
                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=60,
                        max_position_embeddings=16, attn_implementation=impl)
    torch.manual_seed(0)
    return QFormer(cfg)


def test_qformer_outputs_unchanged_where_nothing_is_dropped():
    """Eval mode, and train mode with every dropout probability at 0, give the Q-Former's outputs as transformers'
    SDPA / eager attention do; with dropout on, train mode actually drops (outputs differ between two calls)."""
    torch.manual_seed(3)
    image = torch.randn(2, 7, 24)
    ids = torch.randint(1, 60, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    for impl in ("sdpa", "eager"):
        ref = _qformer(impl)
        ref.eval()
        with torch.no_grad():
            want = ref.forward_multimodal(image, None, ids, mask)
        fast = _qformer(impl)
        install_cpu_attention(128, use_bit_dropout=True)
        assert use_bit_dropout(fast) > 0
        assert use_bit_dropout(fast) == 0  # idempotent: nothing left to swap
        fast.eval()
        with torch.no_grad():
            got = fast.forward_multimodal(image, None, ids, mask)
        torch.testing.assert_close(_last(got), _last(want), atol=1e-5, rtol=1e-5)
        for m in (ref, fast):  # train mode, all dropout off: still the same function
            m.train()
            for mod in m.modules():
                if isinstance(mod, nn.Dropout):
                    mod.p = 0.0
                if hasattr(mod, "attention_dropout"):
                    mod.attention_dropout = 0.0
        with torch.no_grad():
            torch.testing.assert_close(_last(fast.forward_multimodal(image, None, ids, mask)),
                                       _last(ref.forward_multimodal(image, None, ids, mask)), atol=1e-5, rtol=1e-5)


def test_attention_probabilities_are_dropped_in_training(monkeypatch):
    """Only attention dropout on: the attention probabilities (B, H, Lq, Lk) are dropped by our kernel, in every
    layer's self-attention and in the cross-attention, and the outputs differ between calls."""
    shapes = []
    real = K._keep_mask
    monkeypatch.setattr(K, "_keep_mask", lambda shape, p: shapes.append(tuple(shape)) or real(shape, p))
    q = _qformer()
    install_cpu_attention(0, use_bit_dropout=True)  # dropped probabilities take the matmul path at any length
    use_bit_dropout(q)
    for mod in q.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
        if hasattr(mod, "attention_dropout"):
            mod.attention_dropout = 0.5
    torch.manual_seed(4)
    image, ids = torch.randn(2, 7, 24), torch.randint(1, 60, (2, 6))
    q.eval()
    with torch.no_grad():
        clean = _last(q.forward_multimodal(image, None, ids, None))
    q.train()
    with torch.no_grad():
        a = _last(q.forward_multimodal(image, None, ids, None))
        b = _last(q.forward_multimodal(image, None, ids, None))
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, clean)
    # per call: 2 layers of self-attention over 4 queries + 6 tokens, 1 cross-attention of the queries to 7 patches
    assert sorted(shapes) == sorted([(2, 4, 10, 10)] * 4 + [(2, 4, 4, 7)] * 2), shapes


def _last(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else (out[0] if isinstance(out, tuple) else out)


def test_masked_math_attention_matches_sdpa_without_dropout():
    torch.manual_seed(6)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    additive = torch.zeros(2, 1, 5, 7)
    additive[1, ..., 5:] = torch.finfo(torch.float32).min
    module = nn.Module()
    out, _ = K._math_attention(module, q, k, v, additive, None, 0.0)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=additive).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out_bool, _ = K._math_attention(module, q, k, v, additive == 0, None, 0.0)
    torch.testing.assert_close(out_bool, want, atol=1e-5, rtol=1e-5)


def _llama(impl="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # grouped-query: 2 query heads per key head
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("padded", [False, True])
def test_llm_attention_by_matmuls_matches_sdpa_with_gradients(padded):
    """A frozen LLM fed a trainable prefix (the stages' case): loss and the prefix's gradient are SDPA's, with
    grouped-query heads, causal masking, and left padding."""
    llm = _llama()
    torch.manual_seed(1)
    embeds = torch.randn(3, 9, 32)
    mask = torch.ones(3, 9, dtype=torch.long)
    if padded:
        mask[1, :3] = 0
    labels = torch.randint(0, 50, (3, 9)).masked_fill(mask == 0, -100)  # padding is never scored
    results = {}
    for keys in (0, 128):  # 0: transformers' SDPA function; 128: matmuls
        install_cpu_attention(keys, use_bit_dropout=True)
        x = embeds.clone().requires_grad_(True)
        loss = llm(inputs_embeds=x, attention_mask=mask if padded else None, labels=labels).loss
        loss.backward()
        results[keys] = (loss.detach(), x.grad)
    torch.testing.assert_close(results[128][0], results[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[128][1], results[0][1], atol=1e-5, rtol=1e-5)


def test_dispatch_takes_matmuls_only_where_it_should(monkeypatch):
    """Matmuls: on the CPU with gradients and at most matmul_max_keys keys, or when probabilities are dropped;
    transformers' SDPA otherwise (no gradients, longer sequences, the setting at 0)."""
    llm = _llama().requires_grad_(False)  # frozen, as the stages' LLM; the input embeddings stand for a trainable prefix
    calls = []
    real = K._math_attention
    monkeypatch.setattr(K, "_math_attention", lambda *a, **kw: calls.append(a[2].shape[-2]) or real(*a, **kw))
    ids = torch.randint(0, 50, (2, 10))

    def run(keys, grad, trainable=None):
        calls.clear()
        install_cpu_attention(keys, use_bit_dropout=True)
        with torch.set_grad_enabled(grad):
            llm.model.embed_tokens.weight.requires_grad_(grad if trainable is None else trainable)
            llm(input_ids=ids)
        return len(calls)

    assert run(128, True) == 2  # both layers
    assert run(128, False) == 0  # evaluation and generation keep SDPA
    assert run(128, True, trainable=False) == 0  # a frozen model on frozen inputs: no gradient flows, SDPA
    assert run(9, True) == 0  # 10 keys > 9
    assert run(10, True) == 2
    assert run(0, True) == 0


def test_models_configured_eager_are_not_routed(monkeypatch):
    llm = _llama("eager")
    install_cpu_attention(128, use_bit_dropout=True)
    monkeypatch.setattr(K, "_math_attention", lambda *a, **kw: pytest.fail("eager model routed"))
    x = torch.randn(2, 5, 32, requires_grad=True)
    llm(inputs_embeds=x).logits.sum().backward()
