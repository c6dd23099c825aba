"""CPU kernels for training steps: a cheap dropout mask, and attention by plain matmuls where torch's SDPA kernels
are slow. Both change how, never what, a step computes.

**Dropout.** On CPU, torch draws one Mersenne-Twister number per element for ``bernoulli_`` (about 7 ns per element
here, single-threaded), so the Q-Former's hidden and attention-probability dropouts were 13-15% of a representation
step (``benchmarks.profile_step``). :func:`bit_dropout` lets one 64-bit draw feed four elements: the mask compares
16-bit slices of the draws with a threshold, about 8x fewer generator calls. Each element is dropped independently
with probability ``p_eff = round(p * 65536) / 65536`` (for the usual 0.1: 0.1000061, within 6.1e-6 of ``p``; exact for
multiples of 2**-16) and kept elements are scaled by ``1 / (1 - p_eff)``, so the expectation is exactly the input's.
Masks come from torch's default CPU generator: the same seed gives the same masks, and the generator state a
checkpoint saves covers them. Elsewhere (CUDA's Philox dropout is already fast), in evaluation, or for ``p`` of 0 or
1, ``torch.nn.functional.dropout`` runs. :func:`use_bit_dropout` swaps a model's ``nn.Dropout`` modules.

**Attention.** transformers' ``sdpa`` attention calls torch's SDPA, whose CPU flash kernel is slow for short
sequences when gradients flow through it: forward + backward of a (32, 9, 38, 64) bf16 attention took 52 ms
against 11 ms by matmuls, 141 against 78 ms at 128 keys, and won from 256 keys on (330 against 516 ms), on a 2-core
AMD EPYC. In a generative step the frozen LLM's 30 attention backward passes were 29% of the step. And SDPA's CPU
kernels cannot drop attention probabilities at all (torch's math path draws the slow mask).
:func:`install_cpu_attention` replaces transformers' ``sdpa`` entry, process-wide, by a dispatcher that computes the
attention by matmuls on the CPU when probabilities are dropped (with :func:`bit_dropout` if asked) or when
gradients flow back through it (its query, key or value requires grad) and there are at most ``matmul_max_keys`` keys,
and calls transformers' own SDPA function otherwise (CUDA, evaluation, frozen models on frozen inputs, long
sequences). Models configured with ``eager`` or another implementation are not touched.
Grouped-query attention (fewer key/value heads) is handled by repeating the key/value heads, as SDPA's math does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BitDropout", "bit_dropout", "effective_p", "install_cpu_attention", "use_bit_dropout"]

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


_SETTINGS = {"matmul_max_keys": 0, "bit_dropout": False}
_TRANSFORMERS_SDPA: list = []  # transformers' own sdpa function, kept when ours replaces its registry entry


def install_cpu_attention(matmul_max_keys: int = 128, use_bit_dropout: bool = True) -> None:
    """Route transformers' ``sdpa`` attention through :func:`_dispatch` in this process (idempotent; the latest
    settings apply to every model). ``matmul_max_keys`` 0 keeps SDPA for everything except dropped probabilities."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _TRANSFORMERS_SDPA:
        _TRANSFORMERS_SDPA.append(sdpa_attention_forward)
        AttentionInterface.register("sdpa", _dispatch)
    _SETTINGS.update(matmul_max_keys=int(matmul_max_keys), bit_dropout=bool(use_bit_dropout))


def _dispatch(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention-function signature. query: (B, H, Lq, D); key, value: (B, Hkv, Lk, D); returns
    ((B, Lq, H, D), None). T5-style position biases and soft-capping stay with transformers' function."""
    if (query.device.type == "cpu" and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and (dropout > 0.0 or (key.shape[-2] <= _SETTINGS["matmul_max_keys"] and _needs_grad(query, key, value)))):
        return _math_attention(module, query, key, value, attention_mask, scaling, dropout, kwargs.get("is_causal"))
    return _TRANSFORMERS_SDPA[0](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 **kwargs)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Gradients will flow back through this attention (a frozen model run on a trainable input, or trained)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _math_attention(module, query, key, value, attention_mask, scaling, dropout, is_causal=None):
    """softmax(QKᵀ·scale + mask) V by matmuls, with the conventions of transformers' ``sdpa_attention_forward``:
    key/value heads repeated for grouped-query attention; bool masks keep True, float masks add; with no mask,
    causal (top-left aligned, keys cut to the query length) when ``is_causal`` or the module says so."""
    if key.shape[1] != query.shape[1]:  # (B, Hkv, Lk, D) -> (B, H, Lk, D)
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    q_len = query.shape[-2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and q_len > 1:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        attention_mask = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    if dropout > 0.0:
        probs = bit_dropout(probs, dropout) if _SETTINGS["bit_dropout"] else F.dropout(probs, dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def use_bit_dropout(model: nn.Module) -> int:
    """Swap every ``nn.Dropout`` inside ``model`` for :class:`BitDropout` (same ``p``; idempotent). Attention
    probabilities are dropped by the dispatcher (:func:`install_cpu_attention`). Returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, BitDropout(child.p, child.inplace))
                swapped += 1
    return swapped
