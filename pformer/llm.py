"""The frozen LLM that P-Former prompts (and that stage 2's front feeds): decoder-only or encoder-decoder.

A *prefix* is a sequence of vectors of the LLM's embedding width placed before the text: for a decoder-only LLM
``[lead token; prefix; embed(text)]`` goes through the decoder and the loss is on the text tokens; for an
encoder-decoder (T5 / Flan-T5) the prefix (plus an optional prompt) is the encoder input and the decoder
reconstructs the text.

The *lead token* (``bos_before_prefix``, on by default) is the tokenizer's BOS (else its EOS, the document separator
of most pre-training corpora) placed before the prefix, as LLaVA-style models put BOS before the image. A decoder
LLM dumps most of its attention on its first position (the attention sink); with a learned vector there instead of
a token it saw in pre-training, the prefix disturbs every later position. Measured on SmolLM2-135M (Q-Former front,
50 easy-VQA pairs, 60 steps, 3 seeds): held-out LM loss 2.0-6.1 and 0/3 runs captioning without the lead token,
0.30-0.73 and 3/3 with it. BLIP-2 itself puts the queries first (``bos_before_prefix=false`` reproduces that).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

from dvlp_common import zoo

from .losses import MeanOverRanks, identity_gather, over_global_tokens


@dataclass
class PrefixLMOutput:
    loss: torch.Tensor  # scalar, mean over target tokens (over the global batch's: see ``prefix_lm``)
    logits: torch.Tensor  # [B, T, V] logits that predict each target token
    target_ids: torch.Tensor  # [B, T], -100 where padded


class _StopOnlyAfterText(LogitsProcessor):
    """A logits processor: the stop tokens are -inf for every row that has generated fewer than
    ``min_text_tokens`` tokens with visible text (``blank``: [V] bool, True for whitespace and special tokens)."""

    def __init__(self, blank: torch.Tensor, stops: list[int], min_text_tokens: int):
        self.blank, self.stops, self.min_text_tokens = blank, stops, min_text_tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # input_ids: [rows, generated so far] (inputs_embeds: only the new tokens; T5: the decoder ids)
        if self.blank.device != input_ids.device:
            self.blank = self.blank.to(input_ids.device)  # once per generation, not per step
        vocab = len(self.blank)
        visible = (~self.blank[input_ids.clamp(max=vocab - 1)] | (input_ids >= vocab)).sum(dim=1)
        rows = (visible < self.min_text_tokens).nonzero(as_tuple=True)[0]
        scores[rows[:, None], self.stops] = float("-inf")
        return scores


class FrozenLLM(nn.Module):
    """Wraps a frozen ``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM`` and its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer, text_suffix: str = "\n", bos_before_prefix: bool = True,
                 prompt_special_tokens: bool = False):
        super().__init__()
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:  # decoder-only tokenizers often have none; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        self.text_suffix = text_suffix
        self.is_encoder_decoder = bool(model.config.is_encoder_decoder)
        self._supports_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        # the token before the prefix (decoder-only; see the module docstring); None: the prefix comes first
        lead = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.lead_token_id: int | None = lead if bos_before_prefix and not self.is_encoder_decoder else None
        # generation prompts tokenised with the tokenizer's special tokens (BLIP-2's layout: [queries][BOS][prompt]
        # for OPT, [queries][prompt][EOS] into T5's encoder), for published checkpoints (vl_align.checkpoints)
        self.prompt_special_tokens = prompt_special_tokens

    @classmethod
    def load(cls, ref: str, dtype: torch.dtype = torch.float32, text_suffix: str = "\n",
             bos_before_prefix: bool = True, prompt_special_tokens: bool = False) -> "FrozenLLM":
        return cls(zoo.load_language_model(ref, dtype=dtype), zoo.load_tokenizer(ref), text_suffix, bos_before_prefix,
                   prompt_special_tokens)

    def train(self, mode: bool = True) -> "FrozenLLM":  # always eval: the LLM is frozen, dropout stays off
        return super().train(False)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def embedding_table(self) -> torch.Tensor:  # [V, d_llm]
        return self.model.get_input_embeddings().weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def _with_lead(self, prefix: torch.Tensor, prefix_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, P, d], [B, P] -> [B, 1 + P, d], [B, 1 + P] with the lead token first (unchanged without one)."""
        if self.lead_token_id is None:
            return prefix, prefix_mask
        lead = self.embed(torch.full((prefix.shape[0], 1), self.lead_token_id, device=prefix.device))
        return (torch.cat([lead.to(prefix.dtype), prefix], dim=1),
                torch.cat([prefix_mask.new_ones(prefix.shape[0], 1), prefix_mask], dim=1))

    def _blank_tokens(self) -> torch.Tensor:
        """[V] bool: the tokens that decode to no visible text (whitespace, special tokens)."""
        if getattr(self, "_blank", None) is None:
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))], skip_special_tokens=True)
            self._blank = torch.tensor([not t.strip() for t in texts])
        return self._blank

    def _text_before_stop(self, min_text_tokens: int) -> LogitsProcessorList:
        if min_text_tokens <= 0:
            return LogitsProcessorList()
        return LogitsProcessorList([_StopOnlyAfterText(self._blank_tokens(), self.stop_token_ids(), min_text_tokens)])

    def stop_token_ids(self) -> list[int]:
        """Tokens that end a generated text: EOS, and the suffix the targets end with (a newline by default)."""
        ids = {self.tokenizer.eos_token_id}
        if self.text_suffix:
            suffix = self.tokenizer(self.text_suffix, add_special_tokens=False).input_ids
            if len(suffix) == 1:
                ids.add(suffix[0])
        return sorted(i for i in ids if i is not None)

    def tokenize_targets(self, texts: list[str], max_length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts with the suffix appended, right-padded: (ids [B, T], mask [B, T]). T5 adds its EOS itself."""
        batch = self.tokenizer([t + self.text_suffix for t in texts], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt",
                               add_special_tokens=self.is_encoder_decoder)
        return batch.input_ids.to(device), batch.attention_mask.to(device)

    def prefix_lm(self, prefix: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor,
                  prefix_mask: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                  prompt_mask: torch.Tensor | None = None,
                  mean_count_over_ranks: MeanOverRanks = identity_gather) -> PrefixLMOutput:
        """LM loss on the target text given ``prefix`` [B, P, d_llm] (and an optional text prompt after it).

        ``mean_count_over_ranks``: the mean of a tensor over the data-parallel ranks (identity in one process). The
        loss is this rank's summed token loss over (global token count / world size), so that the mean over ranks
        of the losses (DeepSpeed averages gradients over ranks) is the mean over all the global batch's target
        tokens, whatever the captions' lengths on each rank; in one process it is the plain token mean.
        """
        batch, n_prefix = prefix.shape[:2]
        prefix = prefix.to(self.dtype)
        if prefix_mask is None:
            prefix_mask = torch.ones(batch, n_prefix, dtype=target_mask.dtype, device=prefix.device)
        if prompt_embeds is not None:
            prefix = torch.cat([prefix, prompt_embeds.to(self.dtype)], dim=1)
            prefix_mask = torch.cat([prefix_mask, prompt_mask.to(prefix_mask.dtype)], dim=1)
        prefix, prefix_mask = self._with_lead(prefix, prefix_mask)
        labels = target_ids.masked_fill(target_mask == 0, -100)
        if self.is_encoder_decoder:
            out = self.model(inputs_embeds=prefix, attention_mask=prefix_mask, labels=labels)
            logits = out.logits  # [B, T, V]: the decoder predicts target t at step t
        else:
            inputs = torch.cat([prefix, self.embed(target_ids)], dim=1)
            mask = torch.cat([prefix_mask, target_mask], dim=1)
            # the logit at position p predicts token p+1: positions S-T-1 .. S-2 predict the T targets, so only
            # they need the (vocabulary-wide, costly) LM head. An index tensor, not an int: HF then gathers a
            # contiguous [B, T, d] copy, where a strided slice sends the head's linear to a batched matmul
            # against B expanded copies of the [V, d] weight (measured 10x slower on CPU).
            seq, t = inputs.shape[1], target_ids.shape[1]
            if self._supports_logits_to_keep:
                positions = torch.arange(seq - t - 1, seq - 1, device=inputs.device)
                logits = self.model(inputs_embeds=inputs, attention_mask=mask, logits_to_keep=positions).logits
            else:
                logits = self.model(inputs_embeds=inputs, attention_mask=mask).logits[:, -t - 1:-1]
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss = over_global_tokens(loss, (labels != -100).sum(), mean_count_over_ranks)
        return PrefixLMOutput(loss=loss, logits=logits, target_ids=labels)

    @torch.no_grad()
    def generate(self, prefix: torch.Tensor, prefix_mask: torch.Tensor | None = None,
                 prompts: list[str] | None = None, max_new_tokens: int = 30, num_beams: int = 1,
                 do_sample: bool = False, top_p: float = 0.9, temperature: float = 1.0,
                 min_new_tokens: int = 0, length_penalty: float = 1.0) -> list[str]:
        """Batched generation from a prefix [B, P, d_llm], optionally followed by a text prompt per sample.
        ``min_new_tokens``: the stop tokens (EOS, the target suffix) are suppressed until this many new tokens with
        visible text (a lone space before the newline is no answer). ``length_penalty``: beam search only, a beam's
        score is its summed log-probability / length**length_penalty (LAVIS's BLIP-2 VQA: 0 for OPT, -1 for
        Flan-T5, both favouring short answers).

        Prompts of different lengths are left-padded as a block ``[pad, lead token, prefix, prompt]`` so every
        sequence ends where generation starts.
        """
        batch, n_prefix = prefix.shape[:2]
        device = prefix.device
        prefix = prefix.to(self.dtype)
        if prefix_mask is None:
            prefix_mask = torch.ones(batch, n_prefix, dtype=torch.long, device=device)
        prefix, prefix_mask = self._with_lead(prefix, prefix_mask)
        specials = self.prompt_special_tokens  # an empty prompt then still gets them ([queries][BOS])
        prompt_ids = [self.tokenizer(p, add_special_tokens=specials).input_ids if p or specials else []
                      for p in (prompts or [""] * batch)]
        width = max(len(p) for p in prompt_ids)
        pad_id = self.tokenizer.pad_token_id
        rows, masks = [], []
        for i, ids in enumerate(prompt_ids):
            ids_t = torch.tensor(ids, dtype=torch.long, device=device)
            pad = width - len(ids)
            emb = torch.cat([self.embed(torch.full((pad,), pad_id, device=device)), prefix[i],
                             self.embed(ids_t)], dim=0)
            rows.append(emb)
            masks.append(torch.cat([torch.zeros(pad, dtype=torch.long, device=device), prefix_mask[i].long(),
                                    torch.ones(len(ids), dtype=torch.long, device=device)]))
        inputs, mask = torch.stack(rows), torch.stack(masks)
        stop = self.stop_token_ids()
        out = self.model.generate(inputs_embeds=inputs, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  num_beams=num_beams, do_sample=do_sample, top_p=top_p if do_sample else None,
                                  length_penalty=length_penalty if num_beams > 1 else None,
                                  temperature=temperature if do_sample else None, eos_token_id=stop,
                                  pad_token_id=pad_id, logits_processor=self._text_before_stop(min_new_tokens))
        # with inputs_embeds, decoder-only generate returns only the new tokens
        return [self.tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in out]


__all__ = ["FrozenLLM", "PrefixLMOutput"]
