"""Dropout whose random mask is cheap on the CPU.

Why: on CPU, torch draws one Mersenne-Twister number per element for ``bernoulli_`` (about 7 ns per element here,
single-threaded), so the Q-Former's hidden and attention-probability dropouts were 13-15% of a representation step
(``benchmarks.profile_step``). Here one 64-bit draw feeds four elements: the mask compares 16-bit slices of the draws
with a threshold, about 8x fewer generator calls for the same mask quality.

Semantics: each element is dropped independently with probability ``p_eff = round(p * 65536) / 65536`` (for the
usual 0.1: 0.1000061, within 6.1e-6 of ``p``; ``p_eff`` is exact for multiples of 2**-16) and kept elements are scaled
by ``1 / (1 - p_eff)``, so the expectation is exactly the input's. Masks come from torch's default CPU generator: the
same seed gives the same masks, and the generator state a checkpoint saves covers them. On other devices (CUDA's
Philox dropout is already fast), in evaluation, or for ``p`` of 0 or 1, ``torch.nn.functional.dropout`` runs.

Use: ``use_fast_dropout(model)`` swaps every ``nn.Dropout`` child for :class:`BitDropout` (module replacement, no
class patching) and routes transformers' attention through :func:`attention_with_fast_dropout`, which computes the
attention itself only when it must drop attention probabilities on the CPU, and otherwise calls the implementation
the model was configured with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BitDropout", "bit_dropout", "use_fast_dropout", "attention_with_fast_dropout", "effective_p"]

_LEVELS = 1 << 16


def effective_p(p: float) -> float:
    """The drop probability the 16-bit mask realises for a requested ``p``."""
    return round(p * _LEVELS) / _LEVELS


def _keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """Bool mask of ``shape``, each element False with probability ``effective_p(p)``."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)  # full 64-bit range
    halves = words.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    return halves >= (round(p * _LEVELS) - (1 << 15))


class _MaskedScale(torch.autograd.Function):
    """y = x * keep * scale, saving the bool mask (1 byte per element, as ``native_dropout`` does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x * scale, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0), None, None


def bit_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the cheap CPU mask (see the module docstring)."""
    if not training or p <= 0.0 or p >= 1.0 or x.device.type != "cpu" or effective_p(p) == 0.0:
        return F.dropout(x, p, training)
    return _MaskedScale.apply(x, _keep_mask(x.shape, p), 1.0 / (1.0 - effective_p(p)))


class BitDropout(nn.Dropout):
    """``nn.Dropout`` drawing its CPU mask with :func:`bit_dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:  # an in-place request still gets a correct (out-of-place) result
            return x.copy_(bit_dropout(x, self.p, self.training)) if self.training else x
        return bit_dropout(x, self.p, self.training)


def attention_with_fast_dropout(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: torch.Tensor | None, scaling: float | None = None,
                                dropout: float = 0.0, **kwargs):
    """A transformers attention function: the implementation the model was configured with, except where attention
    probabilities are dropped on the CPU. There SDPA's CPU kernels cannot drop and torch's math path would draw the
    slow mask, so softmax(QKᵀ·scale + mask) is computed here and dropped with :func:`bit_dropout`.

    query: (B, H, Lq, D); key, value: (B, H, Lk, D); mask additive or bool, broadcastable to (B, H, Lq, Lk).
    Returns (B, Lq, H, D) and the probabilities, as transformers' own attention functions do.
    """
    inner = getattr(module, "_dvlp_inner_attention", "sdpa")
    dropout = dropout if module.training else 0.0
    if inner == "eager" or (dropout > 0.0 and query.device.type == "cpu"):
        return _math_attention(module, query, key, value, attention_mask, scaling, dropout)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[inner](module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)


def _math_attention(module, query, key, value, attention_mask, scaling, dropout):
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if attention_mask is None and getattr(module, "is_causal", False) and query.shape[-2] > 1:
        attention_mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool,
                                    device=query.device).tril(key.shape[-2] - query.shape[-2])
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    probs = bit_dropout(probs, dropout, dropout > 0.0)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


ATTENTION_NAME = "dvlp_fast_dropout"


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every ``nn.Dropout`` inside ``model`` for :class:`BitDropout` (same ``p``) and route the attention of its
    BERT-family transformers modules (those with ``attention_probs_dropout_prob > 0``) through :func:`attention_with_fast_dropout`, which keeps each module's configured
    implementation for everything but CPU attention dropout. Idempotent. Returns how many modules were swapped."""
    from transformers import AttentionInterface, PretrainedConfig

    AttentionInterface.register(ATTENTION_NAME, attention_with_fast_dropout)
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, BitDropout(child.p, child.inplace))
                swapped += 1
    # BERT-family modules that drop attention probabilities (Q-Former, P-Former encoder, ToMe connector); a frozen LLM's
    # attention (GQA, sliding windows, no dropout) is left alone
    users = [m for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)
             and (getattr(m.config, "attention_probs_dropout_prob", 0.0) or 0.0) > 0.0]
    for mod in users:  # remember the configured implementation on each module before the shared config changes
        if mod.config._attn_implementation != ATTENTION_NAME:
            mod._dvlp_inner_attention = mod.config._attn_implementation or "sdpa"
    for mod in users:
        mod.config._attn_implementation = ATTENTION_NAME
    return swapped
