"""P-Former model, losses and the frozen-LLM prefix path, on tiny random models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dvlp_common import zoo
from pformer.llm import FrozenLLM
from pformer.losses import contrastive_loss, nearest_embeddings, vq_loss
from pformer.model import PFormer, PFormerConfig, load_pformer_tokenizer, mask_tokens


def _pformer(bert_dir, llm_dir, **kw):
    cfg = PFormerConfig(text_encoder=bert_dir, llm=llm_dir, **kw)
    return cfg, PFormer.build(cfg)


def test_prompt_count_is_independent_of_text_length(tiny_bert_dir, tiny_llm_dir):
    cfg, model = _pformer(tiny_bert_dir, tiny_llm_dir, num_prompts=3, max_text_length=16)
    tok = zoo.load_tokenizer(tiny_bert_dir)
    batch = tok(["a red circle", "the blue square is big and round"], padding=True, return_tensors="pt")
    out = model(batch.input_ids, batch.attention_mask)
    assert out["prompts"].shape == (2, 3, 32)  # n prompts of the LLM's width, whatever the text length
    assert out["embedding"].shape == (2, 256)
    assert torch.allclose(out["embedding"].norm(dim=-1), torch.ones(2), atol=1e-5)


def test_save_and_load_round_trip(tmp_path, tiny_bert_dir, tiny_llm_dir):
    cfg, model = _pformer(tiny_bert_dir, tiny_llm_dir, num_prompts=4)
    tok = zoo.load_tokenizer(tiny_bert_dir)
    model.save_pretrained(tmp_path / "p", tokenizer=tok)
    loaded = PFormer.from_pretrained(tmp_path / "p")
    assert loaded.config == cfg
    batch = tok(["a green triangle"], return_tensors="pt")
    model.eval(), loaded.eval()
    assert torch.equal(model(batch.input_ids, batch.attention_mask)["prompts"],
                       loaded(batch.input_ids, batch.attention_mask)["prompts"])
    assert load_pformer_tokenizer(tmp_path / "p")("x").input_ids == tok("x").input_ids
    assert (tmp_path / "p" / "model.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="not a P-Former checkpoint"):
        PFormer.from_pretrained(tmp_path)


def test_a_save_that_dies_before_its_folder_is_in_place_keeps_the_previous_pformer(tmp_path, tiny_bert_dir,
                                                                                    tiny_llm_dir, monkeypatch):
    """Stage 1 used to delete the saved P-Former and then rename the new one in: a crash in between lost both."""
    import os

    cfg, model = _pformer(tiny_bert_dir, tiny_llm_dir, num_prompts=4)
    out = tmp_path / "pformer"
    model.save_pretrained(out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)

    def dies_moving_the_new_folder_in(src, dst):
        if Path(dst) == out and Path(src).name.startswith(".pformer"):
            raise OSError("killed while putting the new folder in place")
        return real_replace(src, dst)

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", dies_moving_the_new_folder_in)
    monkeypatch.setattr(Path, "rename", lambda self, dst: dies_moving_the_new_folder_in(self, dst))
    with pytest.raises(OSError, match="killed"):
        model.save_pretrained(out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert PFormer.from_pretrained(out).config == cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pformer"]  # no temporary folder left behind


def test_mask_tokens_spares_padding_and_cls():
    ids = torch.tensor([[101, 5, 6, 7, 8, 9, 102, 0, 0]] * 200)
    mask = (ids != 0).long()
    out = mask_tokens(ids, mask, mask_token_id=103, cls_token_id=101, prob=0.25,
                      generator=torch.Generator().manual_seed(0))
    assert (out[:, 0] == 101).all() and (out[:, 7:] == 0).all()
    rate = (out[:, 1:7] == 103).float().mean().item()
    assert 0.2 < rate < 0.3
    assert torch.equal(mask_tokens(ids, mask, 103, 101, 0.0), ids)


def test_nearest_embeddings_and_vq_loss():
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    vectors = torch.tensor([[[0.9, 0.1], [0.1, 4.0], [-0.2, 0.1]]])
    expect = torch.tensor([[[1.0, 0.0], [0.0, 5.0], [0.0, 0.0]]])
    assert torch.equal(nearest_embeddings(vectors, table, chunk=2), expect)
    vectors.requires_grad_(True)
    loss = vq_loss(vectors, table)
    assert torch.isclose(loss, F.mse_loss(vectors, expect))
    loss.backward()  # the target is a stop-gradient: only the prompts receive gradient
    assert torch.allclose(vectors.grad, 2 * (vectors - expect).detach() / vectors.numel())


def test_contrastive_loss_matches_manual_and_gather():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    t = torch.tensor([0.07])
    logits = a @ b.T / t
    manual = 0.5 * (F.cross_entropy(logits, torch.arange(4), label_smoothing=0.1)
                    + F.cross_entropy(logits.T, torch.arange(4), label_smoothing=0.1))
    assert torch.isclose(contrastive_loss(a, b, t, label_smoothing=0.1), manual)
    # two "ranks" of 2 with a gather that returns the global batch give the same mean as one rank of 4
    halves = []
    for rank in range(2):
        sl = slice(2 * rank, 2 * rank + 2)
        local_a, local_b = a[sl], b[sl]
        lookup = {id(local_a): a, id(local_b): b}
        halves.append(contrastive_loss(local_a, local_b, t, lambda x: lookup[id(x)], rank, 0.1))
    assert torch.isclose(sum(halves) / 2, manual, atol=1e-6)


@pytest.mark.parametrize("bos_before_prefix", [True, False], ids=["bos-first", "prefix-first"])
def test_prefix_lm_decoder_only_matches_hf_labels(tiny_llm_dir, bos_before_prefix):
    llm = FrozenLLM.load(tiny_llm_dir, bos_before_prefix=bos_before_prefix)
    assert not any(p.requires_grad for p in llm.parameters())
    assert llm.lead_token_id == (llm.tokenizer.bos_token_id if bos_before_prefix else None)
    torch.manual_seed(0)
    prefix = torch.randn(2, 3, llm.hidden_size, requires_grad=True)
    ids, mask = llm.tokenize_targets(["a red circle", "a blue square shape"], 16)
    out = llm.prefix_lm(prefix, ids, mask)
    # reference: HF's own shifted loss on [BOS?, prefix, text] with -100 on BOS, the prefix and padding
    lead = [llm.embed(torch.full((2, 1), llm.tokenizer.bos_token_id))] if bos_before_prefix else []
    inputs = torch.cat([*lead, prefix, llm.embed(ids)], dim=1)
    n = inputs.shape[1] - ids.shape[1]
    labels = torch.cat([torch.full((2, n), -100), ids.masked_fill(mask == 0, -100)], dim=1)
    ref = llm.model(inputs_embeds=inputs, attention_mask=torch.cat([torch.ones(2, n, dtype=torch.long), mask], 1),
                    labels=labels).loss
    assert torch.isclose(out.loss, ref, atol=1e-5)
    out.loss.backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
    assert ids[0, -1].item() in llm.stop_token_ids() or mask[0, -1] == 0  # the suffix "\n" ends every target
    # generation continues the same sequence: its first greedy token is the argmax of the loss's first logit
    first = llm.tokenizer.decode([int(out.logits[0, 0].argmax())], skip_special_tokens=True).strip()
    generated = llm.generate(prefix.detach()[:1], max_new_tokens=1)[0]
    assert generated == first


@pytest.mark.parametrize("llm_fixture", ["tiny_llm_dir", "tiny_t5_dir"])
def test_prefix_lm_split_over_ranks_is_the_global_token_mean(request, llm_fixture):
    """Two simulated ranks with captions of unequal token lengths: the mean of their losses (and of their
    gradients, what DeepSpeed averages) is the one-process loss over all tokens, and one process is unchanged."""
    llm = FrozenLLM.load(request.getfixturevalue(llm_fixture))
    torch.manual_seed(0)
    captions = ["a red circle", "a blue square", "a large green circle on a noisy white background", "a box"]
    prefix = torch.randn(4, 3, llm.hidden_size)
    ids, mask = llm.tokenize_targets(captions, 32)

    def loss_and_grad(rows: slice, mean_count=None):
        p = prefix[rows].clone().requires_grad_(True)
        r_ids, r_mask = llm.tokenize_targets(captions[rows], 32)  # each rank pads to its own longest
        kw = {} if mean_count is None else {"mean_count_over_ranks": mean_count}
        loss = llm.prefix_lm(p, r_ids, r_mask, **kw).loss
        loss.backward()
        return loss.detach(), p.grad

    one, one_grad = loss_and_grad(slice(0, 4))
    plain = F.cross_entropy(llm.prefix_lm(prefix, ids, mask).logits.float().flatten(0, 1),
                            ids.masked_fill(mask == 0, -100).flatten(), ignore_index=-100)
    assert one == plain  # one process: the plain token mean, bit for bit
    counts = [int(llm.tokenize_targets(captions[r], 32)[1].sum()) for r in (slice(0, 2), slice(2, 4))]
    assert counts[0] != counts[1]
    mean_count = lambda c: torch.tensor(sum(counts) / 2)  # noqa: E731  what the all-reduce returns on each rank
    (l0, g0), (l1, g1) = loss_and_grad(slice(0, 2), mean_count), loss_and_grad(slice(2, 4), mean_count)
    assert torch.isclose((l0 + l1) / 2, one, rtol=1e-5, atol=0)
    assert torch.allclose(torch.cat([g0, g1]) / 2, one_grad, rtol=1e-4, atol=1e-7)
    per_rank_means = (loss_and_grad(slice(0, 2))[0] + loss_and_grad(slice(2, 4))[0]) / 2
    assert not torch.isclose(per_rank_means, one, rtol=1e-5, atol=0)  # what a per-rank token mean would give


def test_prefix_lm_and_generation_encoder_decoder(tiny_t5_dir):
    llm = FrozenLLM.load(tiny_t5_dir)
    assert llm.is_encoder_decoder
    prefix = torch.randn(2, 4, llm.hidden_size, requires_grad=True)
    ids, mask = llm.tokenize_targets(["a red circle", "a blue square"], 16)
    out = llm.prefix_lm(prefix, ids, mask)
    out.loss.backward()
    assert torch.isfinite(out.loss) and prefix.grad.abs().sum() > 0
    assert out.logits.shape[:2] == ids.shape
    texts = llm.generate(prefix.detach(), max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_generation_with_prompts_of_different_lengths(tiny_llm_dir):
    llm = FrozenLLM.load(tiny_llm_dir)
    prefix = torch.randn(2, 3, llm.hidden_size)
    batched = llm.generate(prefix, prompts=["Question: what colour? Short answer:", "a photo of"],
                           max_new_tokens=5)
    single = llm.generate(prefix[1:], prompts=["a photo of"], max_new_tokens=5)
    assert batched[1] == single[0]  # left padding does not change a sample's greedy output


def test_min_new_tokens_holds_the_stop_back_until_there_is_text(tiny_llm_dir):
    """A model that wants to stop at once answers nothing, unless min_new_tokens holds the stop tokens back (LAVIS's
    min_len=1); a lone space does not count as the answer (measured: SmolLM2 answers " " then the newline)."""
    llm = FrozenLLM.load(tiny_llm_dir)
    word = llm.tokenizer("red", add_special_tokens=False).input_ids[0]
    space = llm.tokenizer(" ", add_special_tokens=False).input_ids[-1]
    stops = llm.stop_token_ids()
    assert bool(llm._blank_tokens()[space]) and not bool(llm._blank_tokens()[word])
    ranking, first_step = {}, {}

    def bias(module, inputs, logits):  # stop tokens first, then "red"; on the first new token a space before both
        logits = logits.clone()
        for token, value in [*ranking.items(), *first_step.items()]:
            logits[..., token] += value
        logits[..., stops] += 100.0
        first_step.clear()
        return logits

    handle = llm.model.get_output_embeddings().register_forward_hook(bias)
    prefix = torch.randn(2, 3, llm.hidden_size)
    prompts = ["Question: what colour? Short answer:"] * 2
    try:
        ranking[word] = 50.0
        assert llm.generate(prefix, prompts=prompts, max_new_tokens=5) == ["", ""]
        assert llm.generate(prefix, prompts=prompts, max_new_tokens=5, min_new_tokens=1) == ["red", "red"]
        first_step[space] = 80.0
        assert llm.generate(prefix, prompts=prompts, max_new_tokens=5) == ["", ""]  # " " then the stop
        first_step[space] = 80.0
        assert llm.generate(prefix, prompts=prompts, max_new_tokens=5, min_new_tokens=1, num_beams=2) == ["red"] * 2
    finally:
        handle.remove()
