"""Stage-2 losses and the representation objective on tiny random fronts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vl_align.alignment import alignment_loss
from vl_align.losses import itc_loss, itg_loss, itm_loss, sample_hard_negatives


def _feats(b=4, q=3, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(b, q, e, generator=g), dim=-1), F.normalize(torch.randn(b, e, generator=g), dim=-1))


def test_itc_uses_the_best_query_and_matches_manual():
    img, txt = _feats()
    t = torch.tensor([0.1])
    loss, s_i2t, s_t2i = itc_loss(img, txt, t, label_smoothing=0.0)
    manual_i2t = torch.stack([torch.stack([(img[i] @ txt[j]).max() for j in range(4)]) for i in range(4)]) / t
    assert torch.allclose(s_i2t, manual_i2t, atol=1e-6) and torch.allclose(s_t2i, manual_i2t.T, atol=1e-6)
    ref = 0.5 * (F.cross_entropy(manual_i2t, torch.arange(4)) + F.cross_entropy(manual_i2t.T, torch.arange(4)))
    assert torch.isclose(loss, ref, atol=1e-6)


def test_itc_equal_captions_share_the_target():
    img, txt = _feats()
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True  # samples 0 and 1 have the same caption
    loss, s_i2t, _ = itc_loss(img, txt, torch.tensor([0.1]), label_smoothing=0.0, positives=positives)
    row0 = -(F.log_softmax(s_i2t[0], 0)[:2]).mean()  # half the target mass on each positive
    assert row0 < F.cross_entropy(s_i2t[:1], torch.tensor([0])) + 1.0 and torch.isfinite(loss)


def test_itc_two_ranks_equal_one_rank():
    img, txt = _feats(b=6)
    t = torch.tensor([0.07])
    full, _, _ = itc_loss(img, txt, t)
    halves = []
    for rank in range(2):
        sl = slice(3 * rank, 3 * rank + 3)
        li, lt = img[sl], txt[sl]
        table = {id(li): img, id(lt): txt}
        halves.append(itc_loss(li, lt, t, lambda x: table[id(x)], rank)[0])
    assert torch.isclose(sum(halves) / 2, full, atol=1e-6)


def test_hard_negatives_never_pick_a_positive_and_follow_similarity():
    sims = torch.tensor([[5.0, 4.9, -9.0, -9.0], [4.0, 5.0, -9.0, -9.0]])
    positives = torch.tensor([[True, False, False, False], [False, True, False, False]])
    picks = [sample_hard_negatives(sims, sims, 0, positives, torch.rand(2, 2, generator=torch.Generator().manual_seed(i)))
             for i in range(50)]
    neg_text = torch.stack([p[0] for p in picks])
    assert (neg_text[:, 0] != 0).all() and (neg_text[:, 1] != 1).all()
    assert (neg_text[:, 0] == 1).float().mean() > 0.9  # the hardest negative dominates
    # the same uniforms give the same draw whatever the rank layout
    u = torch.rand(2, 2)
    assert torch.equal(sample_hard_negatives(sims, sims, 0, positives, u)[0],
                       sample_hard_negatives(sims, sims, 0, positives, u)[0])


def test_itm_and_itg_losses():
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0], [5.0, 0.0]])
    assert itm_loss(logits, num_positive=1) < 0.01
    ids = torch.tensor([[7, 1, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    lm = torch.full((1, 4, 5), -10.0)
    lm[0, 0, 1] = lm[0, 1, 2] = 10.0  # predicts the next tokens; the padded position is ignored
    assert itg_loss(lm, ids, mask, label_smoothing=0.0) < 1e-6


def test_itg_split_over_ranks_is_the_global_token_mean():
    """Two simulated ranks whose captions have unequal token counts: the mean of their ITG losses and gradients is the
    one-process loss over all tokens (label smoothing stays per token); one process is the plain token mean."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 9, (4, 7), generator=g)
    mask = torch.tensor([[1] * 3 + [0] * 4, [1] * 2 + [0] * 5, [1] * 7, [1] * 6 + [0]])
    logits = torch.randn(4, 7, 9, generator=g)

    def loss_and_grad(rows: slice, **kw):
        x = logits[rows].clone().requires_grad_(True)
        loss = itg_loss(x, ids[rows], mask[rows], 0.1, **kw)
        loss.backward()
        return loss.detach(), x.grad

    one, one_grad = loss_and_grad(slice(0, 4))
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    assert one == F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                                  label_smoothing=0.1)  # bit for bit
    counts = [int(mask[r, 1:].sum()) for r in (slice(0, 2), slice(2, 4))]  # 3 and 11 tokens
    mean_count = lambda c: torch.tensor(sum(counts) / 2)  # noqa: E731  what the all-reduce returns on each rank
    (l0, g0), (l1, g1) = (loss_and_grad(r, mean_count_over_ranks=mean_count) for r in (slice(0, 2), slice(2, 4)))
    assert torch.isclose((l0 + l1) / 2, one, rtol=1e-6, atol=0)
    assert torch.allclose(torch.cat([g0, g1]) / 2, one_grad, rtol=1e-5, atol=1e-8)
    per_rank_means = (loss_and_grad(slice(0, 2))[0] + loss_and_grad(slice(2, 4))[0]) / 2
    assert abs(per_rank_means - one) > 1e-3  # what a per-rank token mean gives


def test_alignment_variants():
    torch.manual_seed(0)
    center = torch.randn(2, 4)
    target = center + 0.01 * torch.randn(3, 2, 4)
    pred = center.expand(3, 2, 4).clone()  # predicts the shared component only
    scale = torch.full((2, 4), 0.01)
    assert alignment_loss(pred, target, "mse") < 1e-3  # the plain MSE barely sees the caption-specific part
    assert alignment_loss(pred, target, "standardized_mse", center, scale) > 0.5  # the standardized one does
    assert torch.isclose(alignment_loss(target, target, "cosine", center), torch.tensor(0.0), atol=1e-5)
    assert alignment_loss(target, target, "contrastive", center) < alignment_loss(pred + 1e-3 * torch.randn(3, 2, 4),
                                                                                   target, "contrastive", center)
    with pytest.raises(ValueError, match="corpus-mean"):
        alignment_loss(pred, target, "cosine")


def test_alignment_diagnostics_have_their_reference_points():
    from vl_align.alignment import alignment_diagnostics

    torch.manual_seed(0)
    center = torch.randn(4, 6)
    target = center + 0.1 * torch.randn(5, 4, 6)  # P(y): a corpus-mean prompt plus a caption-specific part
    at_target = alignment_diagnostics(target, target, center)
    at_center = alignment_diagnostics(center.expand_as(target), target, center)
    at_zero = alignment_diagnostics(torch.zeros_like(target), target, center)
    assert at_target["align_mse"] == 0 and at_target["align_r2"] == 1
    assert abs(float(at_center["align_r2"])) < 1e-6  # the caption-free prompt explains nothing caption-specific
    assert float(at_zero["align_rel"]) == pytest.approx(1.0)
    assert float(at_center["align_rel"]) < 0.02  # ... yet it is close in plain MSE: why R² is reported


def test_control_diagnostics_compare_with_the_captions_prompts():
    """The caption-free control aligns to the corpus mean; its diagnostics must still read W·Z against each caption's
    P(y). Against its own target the R² denominator is 0 (session 15's reports showed about -4e10)."""
    from types import SimpleNamespace

    from vl_align.alignment import AlignmentConfig, corpus_statistics
    from vl_align.generative import GenerativeBatch, GenerativeWeights, generative_loss
    from vl_align.inputs import PromptTargets

    torch.manual_seed(0)
    prompts = {f"caption {i}": torch.randn(2, 4) for i in range(6)}
    stats = corpus_statistics(torch.stack(list(prompts.values())))
    cache = SimpleNamespace(get=lambda captions: torch.stack([prompts[c] for c in captions]))
    captions = ["caption 1", "caption 4", "caption 5"]
    control = PromptTargets(cache, "corpus_mean", stats).batch_fields(captions, "cpu")
    aligned = PromptTargets(cache, "caption", stats).batch_fields(captions, "cpu")
    assert torch.equal(control["targets"], stats.center.expand(3, 2, 4))
    assert torch.equal(control["caption_prompts"], aligned["targets"])
    assert torch.equal(aligned["caption_prompts"], aligned["targets"])

    prefix = stats.center.expand(3, 2, 4).clone()  # the control's optimum: the corpus-mean prompt for every image
    front = lambda mode, **kw: {"prompt_pred": prefix}  # noqa: E731
    batch = GenerativeBatch(record_ids=captions, target_ids=torch.zeros(3, 1, dtype=torch.long),
                            target_mask=torch.ones(3, 1), **control)
    _, parts = generative_loss(front, None, batch, GenerativeWeights(lm=0.0), AlignmentConfig(weight=1.0), stats)
    assert float(parts["align"]) == 0  # the loss pulls toward the corpus mean ...
    assert abs(float(parts["align_r2"])) < 1e-6  # ... and the diagnostics read R² = 0 against the captions' P(y)
    assert float(parts["align_mse"]) > 0
