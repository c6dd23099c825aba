"""Stage-1 evaluation: how well the frozen LLM reconstructs held-out sentences from P(y) alone."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .llm import FrozenLLM
from .model import PFormer


@dataclass
class Reconstruction:
    token_accuracy: float  # teacher-forced: argmax of the LLM given P(y) and the previous target tokens
    lm_loss: float  # teacher-forced cross-entropy per target token
    exact_match: float  # greedy regeneration from P(y) alone equals the sentence (whitespace-stripped)
    exact_match_nocase: float
    num_sentences: int
    predictions: list[dict[str, str]] = field(default_factory=list)

    def scores(self) -> dict[str, float]:
        return {"token_accuracy": self.token_accuracy, "lm_loss": self.lm_loss, "exact_match": self.exact_match,
                "exact_match_nocase": self.exact_match_nocase}


def encode_texts(tokenizer, texts: list[str], max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return batch.input_ids.to(device), batch.attention_mask.to(device)


@torch.no_grad()
def prompts_for(pformer: PFormer, tokenizer, texts: list[str], device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """P(y) [B, n, d_llm] of unmasked sentences (what stage 2 aligns to)."""
    ids, mask = encode_texts(tokenizer, texts, pformer.config.max_text_length, device)
    ctx = torch.autocast(device_type=torch.device(device).type, dtype=dtype) if dtype not in (None, torch.float32) \
        else contextlib.nullcontext()
    with ctx:
        return pformer(ids, mask)["prompts"].float()


@torch.no_grad()
def evaluate_reconstruction(pformer: PFormer, tokenizer, llm: FrozenLLM, sentences: list[str], *, batch_size: int = 32,
                            max_new_tokens: int = 32, device="cpu", dtype: torch.dtype | None = None,
                            generate: bool = True) -> Reconstruction:
    was_training = pformer.training
    pformer.eval()
    correct = total = 0
    loss_sum = 0.0
    predictions = []
    max_len = pformer.config.max_text_length
    for start in range(0, len(sentences), batch_size):
        texts = sentences[start:start + batch_size]
        prompts = prompts_for(pformer, tokenizer, texts, device, dtype)
        target_ids, target_mask = llm.tokenize_targets(texts, max_len, device)
        out = llm.prefix_lm(prompts, target_ids, target_mask)
        valid = out.target_ids != -100
        n_tokens = int(valid.sum())
        correct += int(((out.logits.argmax(-1) == out.target_ids) & valid).sum())
        loss_sum += float(out.loss) * n_tokens
        total += n_tokens
        if generate:
            texts_out = llm.generate(prompts, max_new_tokens=max_new_tokens)
            predictions += [{"reference": ref, "prediction": hyp} for ref, hyp in zip(texts, texts_out)]
    pformer.train(was_training)
    exact = sum(p["prediction"].strip() == p["reference"].strip() for p in predictions)
    nocase = sum(p["prediction"].strip().lower() == p["reference"].strip().lower() for p in predictions)
    n = max(len(predictions), 1)
    return Reconstruction(token_accuracy=correct / max(total, 1), lm_loss=loss_sum / max(total, 1),
                          exact_match=exact / n, exact_match_nocase=nocase / n, num_sentences=len(sentences),
                          predictions=predictions)


__all__ = ["Reconstruction", "evaluate_reconstruction", "prompts_for", "encode_texts"]


def bleu4(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 (pycocoevalcap's scorer) on lower-cased, whitespace-tokenised text; no Java needed."""
    from pycocoevalcap.bleu.bleu import Bleu

    if not predictions:
        return 0.0
    norm = lambda s: " ".join(s.lower().replace(".", " ").replace(",", " ").split()) or "<empty>"  # noqa: E731
    gts = {i: [norm(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [norm(p)] for i, p in enumerate(predictions)}
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(scores[3])
