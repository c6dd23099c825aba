"""Tests for vl_align.tome: hand-worked cases plus a slow loop reference."""

import math

import pytest
import torch

from vl_align.tome import (
    bipartite_soft_matching,
    merge_schedule,
    merge_source,
    merge_wavg,
    proportional_attention_bias,
)


# --------------------------------------------------------------------------
# Hand-worked example 1: 5 tokens with a class token.
#   A = {0, 2, 4}, B = {1, 3}; r is clamped to (5 - 1) // 2 = 2.
#   metric (not unit norm on purpose):
#     t0 = (1, 0)     cls; would score 1.0 against t1 if not protected
#     t1 = (3, 0)     B0
#     t2 = (0.1, 1)   best B: t3, cos = 1/sqrt(1.01) ~= 0.995
#     t3 = (0, 2)     B1
#     t4 = (4, 2)     best B: t1, cos = 4/sqrt(20)  ~= 0.894
#   Raw (unnormalised) dot products would rank t4.t1 = 12 above t2.t3 = 2, so
#   the expected results below also check the L2 normalisation.
#   With class_token: r=1 merges t2->t3; r=2 also t4->t1.
#   Without class_token: t0 scores 1.0 (best), so r=1 merges t0->t1.
# --------------------------------------------------------------------------
def _metric5():
    return torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.1, 1.0], [0.0, 2.0], [4.0, 2.0]]])


def _x5():
    # row i = [i, 10 i] so each row is recognisable
    return torch.tensor([[[float(i), 10.0 * i] for i in range(5)]])


def test_class_token_r1_rows_and_order():
    merge, _ = bipartite_soft_matching(_metric5(), r=1, class_token=True)
    x = _x5()
    out = merge(x)
    # [unmerged A: t0, t4] + [B: t1, mean(t2, t3)]
    expected = torch.tensor([[[0.0, 0.0], [4.0, 40.0], [1.0, 10.0], [2.5, 25.0]]])
    assert out.shape == (1, 4, 2)
    torch.testing.assert_close(out, expected)


def test_class_token_r2_rows():
    merge, _ = bipartite_soft_matching(_metric5(), r=2, class_token=True)
    out = merge(_x5())
    # [t0] + [mean(t1, t4), mean(t2, t3)]
    expected = torch.tensor([[[0.0, 0.0], [2.5, 25.0], [2.5, 25.0]]])
    torch.testing.assert_close(out, expected)


def test_r_is_clamped():
    merge, unmerge = bipartite_soft_matching(_metric5(), r=100, class_token=True)
    out = merge(_x5())
    assert out.shape == (1, 3, 2)  # 5 - (5 - 1) // 2
    merge2, _ = bipartite_soft_matching(_metric5(), r=2, class_token=True)
    torch.testing.assert_close(out, merge2(_x5()))
    # without class token the clamp is 5 // 2 = 2 as well
    merge3, _ = bipartite_soft_matching(_metric5(), r=7, class_token=False)
    assert merge3(_x5()).shape == (1, 3, 2)


def test_without_class_token_cls_merges():
    merge, _ = bipartite_soft_matching(_metric5(), r=1, class_token=False)
    out = merge(_x5())
    # t0 (score 1.0) merges into t1; unmerged A by descending score: t2 (0.995), t4 (0.894)
    expected = torch.tensor([[[2.0, 20.0], [4.0, 40.0], [0.5, 5.0], [3.0, 30.0]]])
    torch.testing.assert_close(out, expected)


def test_identity_when_r_nonpositive():
    x = _x5()
    for r in (0, -3):
        merge, unmerge = bipartite_soft_matching(_metric5(), r=r, class_token=True)
        assert merge(x) is x
        assert merge(x, mode="sum") is x
        assert unmerge(x) is x
    # 2 tokens with a class token: (2 - 1) // 2 = 0 -> identity
    merge, _ = bipartite_soft_matching(torch.randn(1, 2, 3), r=5, class_token=True)
    x2 = torch.randn(1, 2, 4)
    assert merge(x2) is x2


# --------------------------------------------------------------------------
# Hand-worked example 2: 6 tokens, no class token; checks ToMe's order of the
# unmerged A tokens (descending best score, not position).
#   Unit vectors at angles: B: t1 = 0 deg, t3 = 120 deg, t5 = 240 deg
#   A: t0 = 50 deg (best t1, cos 50 = 0.643), t2 = 130 deg (best t3, cos 10 =
#   0.985), t4 = 240 deg (best t5, 1.0).
# --------------------------------------------------------------------------
def _metric6():
    deg = [50.0, 0.0, 130.0, 120.0, 240.0, 240.0]
    v = [[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in deg]
    return torch.tensor([v])


def test_unmerged_order_without_class_token():
    x = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1)
    merge, _ = bipartite_soft_matching(_metric6(), r=1)
    # t4 -> t5; unmerged A in descending score: t2, t0; then B: t1, t3, (t4+t5)/2
    torch.testing.assert_close(merge(x).flatten(), torch.tensor([2.0, 0.0, 1.0, 3.0, 4.5]))
    merge, _ = bipartite_soft_matching(_metric6(), r=2)
    # also t2 -> t3
    torch.testing.assert_close(merge(x).flatten(), torch.tensor([0.0, 1.0, 2.5, 4.5]))


def test_two_a_tokens_into_same_b():
    # t0 and t2 both closest to t1; t3 far away. 4 tokens, r = 2.
    metric = torch.tensor([[[1.0, 0.1], [1.0, 0.0], [1.0, -0.2], [0.0, 1.0]]])
    x = torch.tensor([[[1.0], [2.0], [6.0], [10.0]]])
    merge, unmerge = bipartite_soft_matching(metric, r=2)
    out = merge(x)
    torch.testing.assert_close(out.flatten(), torch.tensor([3.0, 10.0]))  # mean(1,2,6), t3
    torch.testing.assert_close(merge(x, mode="sum").flatten(), torch.tensor([9.0, 10.0]))
    torch.testing.assert_close(merge(x, mode="amax").flatten(), torch.tensor([6.0, 10.0]))
    torch.testing.assert_close(unmerge(out).flatten(), torch.tensor([3.0, 3.0, 3.0, 10.0]))


def test_sum_mode_hand_numbers():
    merge, _ = bipartite_soft_matching(_metric5(), r=2, class_token=True)
    out = merge(_x5(), mode="sum")
    # [t0] + [t1 + t4, t2 + t3]
    expected = torch.tensor([[[0.0, 0.0], [5.0, 50.0], [5.0, 50.0]]])
    torch.testing.assert_close(out, expected)


def test_bad_mode_and_shape():
    merge, unmerge = bipartite_soft_matching(_metric5(), r=1, class_token=True)
    with pytest.raises(ValueError):
        merge(_x5(), mode="median")
    with pytest.raises(ValueError):
        merge(torch.zeros(1, 4, 2))
    with pytest.raises(ValueError):
        unmerge(torch.zeros(1, 5, 2))
    with pytest.raises(ValueError):
        bipartite_soft_matching(torch.zeros(5, 2), r=1)


def test_merge_wavg_hand_numbers():
    merge, _ = bipartite_soft_matching(_metric5(), r=1, class_token=True)
    x = _x5()
    size = torch.tensor([[[1.0], [2.0], [3.0], [1.0], [4.0]]])
    xm, sm = merge_wavg(merge, x, size)
    # order [t0, t4, t1, t2+t3]; merged = (3 * x2 + 1 * x3) / 4 = [2.25, 22.5]
    torch.testing.assert_close(sm.flatten(), torch.tensor([1.0, 4.0, 2.0, 4.0]))
    expected = torch.tensor([[[0.0, 0.0], [4.0, 40.0], [1.0, 10.0], [2.25, 22.5]]])
    torch.testing.assert_close(xm, expected)


def test_merge_wavg_default_size_is_mean():
    merge, _ = bipartite_soft_matching(_metric5(), r=2, class_token=True)
    xm, sm = merge_wavg(merge, _x5())
    torch.testing.assert_close(sm.flatten(), torch.tensor([1.0, 2.0, 2.0]))
    torch.testing.assert_close(xm, merge(_x5(), mode="mean"))


def test_merge_source_and_two_steps():
    x = _x5()
    merge, _ = bipartite_soft_matching(_metric5(), r=2, class_token=True)
    src = merge_source(merge, x)
    expected = torch.tensor(
        [[[1.0, 0, 0, 0, 0], [0, 1, 0, 0, 1], [0, 0, 1, 1, 0]]]
    )  # [t0], [t1, t4], [t2, t3]
    torch.testing.assert_close(src, expected)
    xm, sm = merge_wavg(merge, x)
    torch.testing.assert_close(src.sum(-1, keepdim=True), sm)

    # second step on the 3 merged tokens: cls protected, (3 - 1) // 2 = 1 merge.
    # A = rows {0, 2}, B = row {1}; row 0 is cls, so the only mergeable A token
    # is row 2 ([t2, t3]), which merges into row 1 ([t1, t4]).
    metric2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    merge2, _ = bipartite_soft_matching(metric2, r=1, class_token=True)
    src2 = merge_source(merge2, xm, src)
    torch.testing.assert_close(src2, torch.tensor([[[1.0, 0, 0, 0, 0], [0, 1, 1, 1, 1]]]))
    _, sm2 = merge_wavg(merge2, xm, sm)
    torch.testing.assert_close(sm2.flatten(), torch.tensor([1.0, 4.0]))


def test_unmerge_restores_positions():
    x = _x5()
    merge, unmerge = bipartite_soft_matching(_metric5(), r=2, class_token=True)
    back = unmerge(merge(x))
    assert back.shape == x.shape
    # t0 -> itself; t1, t4 -> mean = [2.5, 25]; t2, t3 -> mean = [2.5, 25]
    m14 = torch.tensor([2.5, 25.0])
    expected = torch.stack([x[0, 0], m14, m14, m14, m14])[None]
    torch.testing.assert_close(back, expected)

    merge, unmerge = bipartite_soft_matching(_metric5(), r=1, class_token=True)
    back = unmerge(merge(x))
    expected = torch.tensor([[[0.0, 0.0], [1.0, 10.0], [2.5, 25.0], [2.5, 25.0], [4.0, 40.0]]])
    torch.testing.assert_close(back, expected)

    # unmerge of arbitrary values: each original token takes its output row's value
    y = torch.tensor([[[10.0], [20.0], [30.0], [40.0]]])  # rows [t0, t4, t1, t2+t3]
    torch.testing.assert_close(
        unmerge(y).flatten(), torch.tensor([10.0, 30.0, 40.0, 40.0, 20.0])
    )


def test_gradients_flow():
    x = _x5().clone().requires_grad_(True)
    merge, unmerge = bipartite_soft_matching(_metric5(), r=2, class_token=True)
    merge(x).sum().backward()
    # groups {t0}, {t1, t4}, {t2, t3}: d(mean)/dx_i = 1 / |group|
    torch.testing.assert_close(x.grad[0, :, 0], torch.tensor([1.0, 0.5, 0.5, 0.5, 0.5]))

    x.grad = None
    size = torch.tensor([[[1.0], [1.0], [3.0], [1.0], [3.0]]], requires_grad=True)
    xm, sm = merge_wavg(merge, x, size)
    (xm.sum() + unmerge(xm).sum()).backward()
    assert x.grad is not None and size.grad is not None
    # group {t1 (s=1), t4 (s=3)}: weights 1/4 and 3/4, output used 1 + 2 times
    torch.testing.assert_close(x.grad[0, :, 0], torch.tensor([2.0, 0.75, 2.25, 0.75, 2.25]))


def test_proportional_attention_bias():
    size = torch.tensor([[[1.0], [2.0], [4.0]], [[1.0], [1.0], [8.0]]])
    bias = proportional_attention_bias(size)
    assert bias.shape == (2, 1, 1, 3)
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([0.0, math.log(2), math.log(4)]))
    torch.testing.assert_close(bias[1, 0, 0], torch.tensor([0.0, 0.0, math.log(8)]))
    # broadcasting over [B, H, Nq, Nk] logits adds log(size of key) per column
    logits = torch.zeros(2, 4, 3, 3)
    attn = (logits + bias).softmax(-1)
    torch.testing.assert_close(attn[0, 2, 1], torch.tensor([1.0, 2.0, 4.0]) / 7)
    with pytest.raises(ValueError):
        proportional_attention_bias(torch.ones(2, 3))


# --------------------------------------------------------------------------
# merge_schedule
# --------------------------------------------------------------------------
def test_schedule_simvlg_constant():
    sched = merge_schedule(12, 257, 19, class_token=True)
    assert sched == [19] * 12
    assert 257 - sum(sched) == 29

    # and the functions really produce 29 tokens through 12 merge steps
    torch.manual_seed(0)
    x = torch.randn(2, 257, 8)
    size = source = None
    for r in sched:
        merge, _ = bipartite_soft_matching(x, r, class_token=True)
        source = merge_source(merge, x, source)
        x, size = merge_wavg(merge, x, size)
    assert x.shape == (2, 29, 8)
    assert source.shape == (2, 29, 257)
    torch.testing.assert_close(size.sum(dim=1).flatten(), torch.tensor([257.0, 257.0]))
    torch.testing.assert_close(source.sum(-1, keepdim=True), size)
    assert torch.all(source[:, 0, 0] == 1) and torch.all(source[:, 0, 1:] == 0)  # cls alone


def test_schedule_list_and_decreasing():
    assert merge_schedule(3, 50, [5, 0, 2], class_token=False) == [5, 0, 2]
    assert merge_schedule(3, 50, (1, 2, 3), class_token=True) == [1, 2, 3]
    assert merge_schedule(4, 100, "decreasing:12", class_token=True) == [12, 8, 4, 0]
    # 5, 3.33, 1.67, 0 rounded
    assert merge_schedule(4, 100, "decreasing:5", class_token=True) == [5, 3, 2, 0]
    assert merge_schedule(12, 257, "decreasing:11", True) == list(range(11, -1, -1))
    assert merge_schedule(1, 100, "decreasing:7", True) == [7]
    assert merge_schedule(3, 100, "4", True) == [4, 4, 4]
    assert merge_schedule(0, 100, 4, True) == []


def test_schedule_clamps():
    # 10 tokens with cls: (10-1)//2 = 4 -> 6 tokens; (6-1)//2 = 2 -> 4; (4-1)//2 = 1 -> 3
    assert merge_schedule(3, 10, 100, class_token=True) == [4, 2, 1]
    # without cls: 10//2 = 5 -> 5; 5//2 = 2 -> 3; 3//2 = 1 -> 2; 2//2 = 1 -> 1; then 0
    assert merge_schedule(5, 10, 100, class_token=False) == [5, 2, 1, 1, 0]
    for cls in (True, False):
        for n in range(1 + cls, 40):
            sched = merge_schedule(8, n, 50, class_token=cls)
            tokens = n
            for r in sched:
                assert r == min(50, (tokens - cls) // 2)
                tokens -= r
                assert tokens >= 1 + cls


def test_schedule_errors():
    with pytest.raises(ValueError, match="3 entries but there are 4 layers"):
        merge_schedule(4, 100, [1, 2, 3], class_token=True)
    with pytest.raises(ValueError, match=">= 0"):
        merge_schedule(4, 100, -1, class_token=True)
    with pytest.raises(ValueError, match=r"r\[1\]"):
        merge_schedule(3, 100, [1, -2, 3], class_token=True)
    with pytest.raises(ValueError):
        merge_schedule(3, 100, "decreasing:-2", class_token=True)
    with pytest.raises(ValueError):
        merge_schedule(3, 100, "decreasing:abc", class_token=True)
    with pytest.raises(ValueError):
        merge_schedule(3, 100, "constant", class_token=True)
    with pytest.raises(ValueError):
        merge_schedule(3, 100, 2.5, class_token=True)
    with pytest.raises(ValueError):
        merge_schedule(3, 100, True, class_token=True)
    with pytest.raises(ValueError):
        merge_schedule(-1, 100, 2, class_token=True)
    with pytest.raises(ValueError):
        merge_schedule(3, 1, 2, class_token=True)


# --------------------------------------------------------------------------
# Slow reference: ToMe's published algorithm re-stated as plain Python loops.
# --------------------------------------------------------------------------
def _reference_merge(metric, x, r, class_token):
    """Return (merged [B, N - r, D], groups) with loops over batch and tokens."""
    bsz, n, _ = metric.shape
    protected = 1 if class_token else 0
    r = min(r, (n - protected) // 2)
    outs, all_groups = [], []
    for bi in range(bsz):
        vecs = [metric[bi, i] / metric[bi, i].norm() for i in range(n)]
        a_pos = list(range(0, n, 2))
        b_pos = list(range(1, n, 2))
        best = {}  # a position -> (score, b position)
        for ia, pa in enumerate(a_pos):
            if class_token and ia == 0:
                best[pa] = (-math.inf, b_pos[0])
                continue
            best_s, best_pb = -math.inf, None
            for pb in b_pos:
                s = float(vecs[pa] @ vecs[pb])
                if s > best_s:
                    best_s, best_pb = s, pb
            best[pa] = (best_s, best_pb)
        ranked = sorted(a_pos, key=lambda p: -best[p][0])  # stable
        merged_a = ranked[:r]
        kept_a = ranked[r:]
        if class_token:
            kept_a = sorted(kept_a)
        groups = [[p] for p in kept_a]
        b_groups = {pb: [pb] for pb in b_pos}
        for pa in merged_a:
            b_groups[best[pa][1]].append(pa)
        groups += [b_groups[pb] for pb in b_pos]
        rows = [torch.stack([x[bi, p] for p in g]).mean(0) for g in groups]
        outs.append(torch.stack(rows))
        all_groups.append(groups)
    return torch.stack(outs), all_groups


@pytest.mark.parametrize("n,r,class_token", [(9, 3, True), (10, 4, False), (17, 8, True), (8, 9, False), (12, 1, True)])
def test_matches_loop_reference(n, r, class_token):
    g = torch.Generator().manual_seed(1000 + n * 10 + r)
    metric = torch.randn(3, n, 6, generator=g)
    x = torch.randn(3, n, 5, generator=g)
    merge, unmerge = bipartite_soft_matching(metric, r, class_token)
    ref, groups = _reference_merge(metric, x, r, class_token)
    out = merge(x)
    torch.testing.assert_close(out, ref)
    src = merge_source(merge, x)
    back = unmerge(out)
    for bi in range(3):
        for j, grp in enumerate(groups[bi]):
            assert sorted(torch.nonzero(src[bi, j]).flatten().tolist()) == sorted(grp)
            for p in grp:
                torch.testing.assert_close(back[bi, p], out[bi, j])
