"""Token Merging (ToMe) bipartite soft matching as pure functions.

Implements the matching step of Bolya et al. 2022, "Token Merging: Your ViT
But Faster", for use in SimVLG's token-merging connector. Everything here is
a pure function of its inputs: no module classes are patched and no global
state is kept; the caller threads ``size`` / ``source`` through its layers.

Algorithm (one merge step, per batch element):

1. ``metric`` (in ToMe: attention keys averaged over heads) is L2-normalised
   along the channel dimension.
2. Tokens are split alternately: set A = even positions ``0, 2, 4, ...``,
   set B = odd positions ``1, 3, 5, ...``; ``scores = A @ B^T`` (cosine
   similarity).
3. With ``class_token=True`` token 0 (always in A) is protected: its score
   row is set to ``-inf`` so it never merges.
4. Every A token picks its best B match. The ``r`` A tokens with the highest
   best-match score are merged into their B match (several A tokens may land
   on the same B token).
5. Output order is ``[unmerged A tokens, B tokens]``. The unmerged A tokens
   come in ToMe's order: by descending best-match score, except that with a
   class token they are sorted back into ascending original position (so the
   class token stays at output index 0). Ties in the score are broken by
   original position (a stable sort), which keeps the order deterministic.

``r`` is clamped to ``(N - protected) // 2`` where ``protected = int(class_token)``.

Shapes use ``B`` = batch, ``N`` = tokens before the merge, ``C`` = metric
channels, ``D`` = feature channels.

Gradients flow from the merged / unmerged outputs back to ``x`` (the merge is
a ``scatter_reduce``, the unmerge a ``gather``). The matching itself (which
tokens merge) is computed without gradients, as in ToMe.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bipartite_soft_matching",
    "merge_wavg",
    "merge_source",
    "proportional_attention_bias",
    "merge_schedule",
]

MergeFn = Callable[..., Tensor]
UnmergeFn = Callable[[Tensor], Tensor]

_MERGE_MODES = ("mean", "sum", "amax", "amin")


def _identity_merge(x: Tensor, mode: str = "mean") -> Tensor:
    if mode not in _MERGE_MODES:
        raise ValueError(f"merge mode must be one of {_MERGE_MODES}, got {mode!r}")
    return x


def _identity_unmerge(x: Tensor) -> Tensor:
    return x


def bipartite_soft_matching(
    metric: Tensor, r: int, class_token: bool = False
) -> tuple[MergeFn, UnmergeFn]:
    """Compute one ToMe bipartite soft matching step.

    Args:
        metric: ``[B, N, C]`` similarity features (ToMe uses the attention keys
            averaged over heads). Normalised internally; no gradient flows
            through it.
        r: number of tokens to remove. Clamped to ``(N - class_token) // 2``;
            ``r <= 0`` (after clamping) gives identity functions.
        class_token: if True, token 0 is protected and never merged; it stays at
            output index 0.

    Returns:
        ``(merge, unmerge)`` where

        * ``merge(x: [B, N, D], mode="mean") -> [B, N - r, D]`` reduces each
          group of merged tokens with ``mode`` (``"mean"``, ``"sum"``,
          ``"amax"`` or ``"amin"``; the B token's own value is part of the
          group). Output order: ``[unmerged A tokens, B tokens]``.
        * ``unmerge(x: [B, N - r, D]) -> [B, N, D]`` puts back at every original
          position the value of the output token it ended up in.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, N, C], got shape {tuple(metric.shape)}")
    bsz, n_tok, _ = metric.shape
    protected = int(bool(class_token))
    r = min(int(r), (n_tok - protected) // 2)
    if r <= 0:
        return _identity_merge, _identity_unmerge

    with torch.no_grad():
        m = F.normalize(metric.detach().float(), p=2.0, dim=-1)
        a, b = m[:, 0::2, :], m[:, 1::2, :]  # [B, Na, C], [B, Nb, C]
        n_a, n_b = a.shape[1], b.shape[1]
        scores = a @ b.transpose(-1, -2)  # [B, Na, Nb]
        if class_token:
            scores[:, 0, :] = -math.inf
        best_score, best_b = scores.max(dim=-1)  # [B, Na]
        order = torch.sort(best_score, dim=-1, descending=True, stable=True).indices
        src_a = order[:, :r]  # A indices that merge            [B, r]
        unm_a = order[:, r:]  # A indices that stay              [B, Na - r]
        if class_token:
            unm_a = torch.sort(unm_a, dim=-1).values
        dst_b = best_b.gather(1, src_a)  # B index each merged A joins  [B, r]

        n_unm = n_a - r
        n_out = n_tok - r
        # dest[b, i] = output row that original token i contributes to.
        dest = torch.empty(bsz, n_tok, dtype=torch.long, device=metric.device)
        ar_b = torch.arange(n_b, device=metric.device)
        dest[:, 1::2] = (n_unm + ar_b).expand(bsz, n_b)
        dest.scatter_(
            1, 2 * unm_a, torch.arange(n_unm, device=metric.device).expand(bsz, n_unm)
        )
        dest.scatter_(1, 2 * src_a, n_unm + dst_b)

    def _check(x: Tensor, n_expected: int, what: str) -> None:
        if x.dim() != 3 or x.shape[0] != bsz or x.shape[1] != n_expected:
            raise ValueError(
                f"{what} expects x of shape [{bsz}, {n_expected}, D], got {tuple(x.shape)}"
            )

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        """``[B, N, D] -> [B, N - r, D]``."""
        if mode not in _MERGE_MODES:
            raise ValueError(f"merge mode must be one of {_MERGE_MODES}, got {mode!r}")
        _check(x, n_tok, "merge")
        idx = dest.to(x.device)[:, :, None].expand(-1, -1, x.shape[-1])
        out = x.new_zeros(bsz, n_out, x.shape[-1])
        return out.scatter_reduce(1, idx, x, reduce=mode, include_self=False)

    def unmerge(x: Tensor) -> Tensor:
        """``[B, N - r, D] -> [B, N, D]``."""
        _check(x, n_out, "unmerge")
        idx = dest.to(x.device)[:, :, None].expand(-1, -1, x.shape[-1])
        return x.gather(1, idx)

    return merge, unmerge


def merge_wavg(
    merge: MergeFn, x: Tensor, size: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge.

    Args:
        merge: a ``merge`` function from :func:`bipartite_soft_matching`.
        x: ``[B, N, D]`` token features.
        size: ``[B, N, 1]`` number of original patches each token holds;
            ``None`` means all ones.

    Returns:
        ``(x_merged [B, N - r, D], size_merged [B, N - r, 1])`` with
        ``x_merged = sum_i s_i x_i / sum_i s_i`` over each merged group and
        ``size_merged = sum_i s_i``.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: MergeFn, x: Tensor, source: Tensor | None = None) -> Tensor:
    """Track which original tokens each current token covers.

    Args:
        merge: a ``merge`` function from :func:`bipartite_soft_matching`.
        x: ``[B, N, D]`` the (pre-merge) tokens; used only for shape, dtype and
            device when ``source`` is None.
        source: ``[B, N, N_orig]`` 0/1 matrix from the previous step, or None
            at the first merge (then the identity ``[B, N, N]`` is used).

    Returns:
        ``[B, N - r, N_orig]`` 0/1 matrix: row j marks the original tokens that
        output token j holds. Row sums equal the token sizes.
    """
    if source is None:
        bsz, n_tok = x.shape[0], x.shape[1]
        source = torch.eye(n_tok, dtype=x.dtype, device=x.device).expand(bsz, n_tok, n_tok)
    return merge(source, mode="amax")


def proportional_attention_bias(size: Tensor) -> Tensor:
    """Additive attention-logit bias for ToMe's proportional attention.

    Args:
        size: ``[B, N, 1]`` token sizes.

    Returns:
        ``[B, 1, 1, N]`` = ``log(size)`` along the key axis; add it to attention
        logits of shape ``[B, H, N_q, N]`` before the softmax.
    """
    if size.dim() != 3 or size.shape[-1] != 1:
        raise ValueError(f"size must be [B, N, 1], got shape {tuple(size.shape)}")
    return size.log()[:, None, None, :, 0]


RConfig = Union[int, str, Sequence[int]]


def _check_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


def merge_schedule(
    num_layers: int, num_tokens: int, r: RConfig, class_token: bool
) -> list[int]:
    """Per-layer number of tokens to merge.

    Args:
        num_layers: number of layers that merge (>= 0).
        num_tokens: tokens entering the first layer (including the class token).
        r: one of
            * ``int``: the same r at every layer (e.g. SimVLG: ``r=19`` over 12
              layers turns 257 tokens into ``257 - 12 * 19 = 29``);
            * a list/tuple of ints, one per layer (length must be ``num_layers``);
            * ``"decreasing:R"``: linearly decreasing from ``R`` at the first
              layer to 0 at the last, rounded half up (one layer gives ``[R]``);
            * a string holding an int, treated as that int.
        class_token: whether token 0 is a protected class token.

    Returns:
        ``list[int]`` of length ``num_layers``: the r each layer will actually
        remove. Each entry is clamped to what :func:`bipartite_soft_matching`
        merges, ``(tokens - class_token) // 2``, which also keeps the token count
        at or above ``1 + class_token``; so ``num_tokens - sum(schedule)`` is the
        final token count.

    Raises:
        ValueError: negative or non-int r, a list of the wrong length, an
            unknown string form, or bad ``num_layers`` / ``num_tokens``.
    """
    num_layers = _check_int(num_layers, "num_layers")
    num_tokens = _check_int(num_tokens, "num_tokens")
    protected = int(bool(class_token))
    if num_tokens < 1 + protected:
        raise ValueError(
            f"num_tokens must be >= {1 + protected} (class_token={class_token}), got {num_tokens}"
        )

    if isinstance(r, str):
        text = r.strip()
        if text.lower().startswith("decreasing:"):
            arg = text.split(":", 1)[1].strip()
            try:
                r_max = float(arg)
            except ValueError:
                raise ValueError(
                    f"r schedule {r!r}: expected 'decreasing:R' with a number R"
                ) from None
            if not math.isfinite(r_max) or r_max < 0:
                raise ValueError(f"r schedule {r!r}: R must be a finite number >= 0")
            if num_layers == 1:
                raw = [int(math.floor(r_max + 0.5))]
            else:
                raw = [
                    int(math.floor(r_max * (num_layers - 1 - i) / (num_layers - 1) + 0.5))
                    for i in range(num_layers)
                ]
        else:
            try:
                value = int(text)
            except ValueError:
                raise ValueError(
                    f"r schedule {r!r}: expected an int, a list of ints, or 'decreasing:R'"
                ) from None
            raw = [_check_int(value, "r")] * num_layers
    elif isinstance(r, (list, tuple)):
        if len(r) != num_layers:
            raise ValueError(
                f"r schedule has {len(r)} entries but there are {num_layers} layers"
            )
        raw = [_check_int(v, f"r[{i}]") for i, v in enumerate(r)]
    else:
        raw = [_check_int(r, "r")] * num_layers

    schedule = []
    tokens = num_tokens
    for r_layer in raw:
        r_eff = max(0, min(r_layer, (tokens - protected) // 2))
        schedule.append(r_eff)
        tokens -= r_eff
    return schedule
