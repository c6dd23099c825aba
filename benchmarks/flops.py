"""Analytic model FLOPs of one training step, counted from the architecture and the batch's shapes.

Convention (``CONVENTION`` is written into every report):

* every linear layer and every activation-activation matmul counts ``2·m·n·k`` in the forward; a convolution
  (the ViT's patch embedding) counts as the matmul it is; norms, softmax, GELU, embedding look-ups, losses and
  optimizer updates count 0;
* attention counts its score (Q·Kᵀ) and value (P·V) matmuls densely over all query/key pairs: causal and padding
  masks do not reduce the count;
* backward, by the role of the module:
  - ``train`` (trainable parameters): 2× the forward (activation and weight gradients), the usual 6·N·D rule;
  - ``through`` (frozen, but gradients flow through it to something trainable, e.g. the frozen LLM behind a
    prefix): linear layers 1× (activation gradients only, no weight gradients), attention matmuls 2× (both
    operands are activations);
  - ``none`` (frozen and nothing upstream needs a gradient: the cached or live frozen vision tower, ELIP's
    look-ahead scoring, ToMe's matching, detached passes): 0.

``benchmarks.bench`` also counts the FLOPs torch actually executes (``executed_flops``: torch's FlopCounterMode
over one real step) as a cross-check of the forward; its backward is smaller than the convention's wherever
autograd skips an unneeded gradient (e.g. the input gradient of the first trainable layer).
"""
from __future__ import annotations

from dataclasses import dataclass, field

TRAIN, THROUGH, NONE = "train", "through", "none"
_LINEAR_BACKWARD = {TRAIN: 2.0, THROUGH: 1.0, NONE: 0.0}
_MATMUL_BACKWARD = {TRAIN: 2.0, THROUGH: 2.0, NONE: 0.0}

CONVENTION = ("analytic model FLOPs: 2·m·n·k per linear layer / matmul in the forward (attention score and value "
              "matmuls included, dense over all query-key pairs; norms, activations, embeddings and the optimizer "
              "not counted); backward = 2x forward for trainable modules, for frozen modules that gradients pass "
              "through 1x for linear layers (activation gradients only) and 2x for attention matmuls, and 0 for "
              "frozen parts no gradient reaches (the frozen vision tower, ELIP look-ahead scoring, ToMe matching, "
              "detached passes)")


@dataclass
class FlopLedger:
    """Forward and backward FLOPs by component (``llm``, ``qformer``, ``vision``...)."""
    parts: dict[str, list[float]] = field(default_factory=dict)

    def _add(self, part: str, forward: float, backward: float) -> None:
        row = self.parts.setdefault(part, [0.0, 0.0])
        row[0] += forward
        row[1] += backward

    def linear(self, part: str, tokens: int, d_in: int, d_out: int, grad: str) -> None:
        """``tokens`` rows through a ``d_in -> d_out`` weight."""
        f = 2.0 * tokens * d_in * d_out
        self._add(part, f, _LINEAR_BACKWARD[grad] * f)

    def matmul(self, part: str, batch: int, m: int, k: int, n: int, grad: str) -> None:
        """``batch`` products of two activations ``[m, k] @ [k, n]``."""
        f = 2.0 * batch * m * k * n
        self._add(part, f, _MATMUL_BACKWARD[grad] * f)

    def attention(self, part: str, batch_heads: int, lq: int, lk: int, head_dim: int, grad: str) -> None:
        self.matmul(part, batch_heads, lq, head_dim, lk, grad)  # scores Q·Kᵀ
        self.matmul(part, batch_heads, lq, lk, head_dim, grad)  # values P·V

    def merge(self, other: "FlopLedger", scale: float = 1.0) -> "FlopLedger":
        for part, (f, b) in other.parts.items():
            self._add(part, scale * f, scale * b)
        return self

    @property
    def forward(self) -> float:
        return sum(f for f, _ in self.parts.values())

    @property
    def backward(self) -> float:
        return sum(b for _, b in self.parts.values())

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def per_sample(self, batch: int) -> dict:
        return {"forward": self.forward / batch, "backward": self.backward / batch, "total": self.total / batch,
                "by_component": {k: (f + b) / batch for k, (f, b) in sorted(self.parts.items())}}


# ---------------------------------------------------------------------------------------------------------------
# architecture sizes, read from the configs of the modules actually built
@dataclass(frozen=True)
class EncoderDims:
    """A post/pre-LN transformer encoder block stack (BERT, MiniLM, a ViT's blocks)."""
    hidden: int
    layers: int
    heads: int
    intermediate: int

    @classmethod
    def from_config(cls, c) -> "EncoderDims":
        if getattr(c, "mlp_ratio", None) is not None:  # DINOv2 sizes its MLP by mlp_ratio
            inter = int(c.hidden_size * c.mlp_ratio)
        else:
            inter = c.intermediate_size
        return cls(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, inter)


@dataclass(frozen=True)
class ViTDims:
    enc: EncoderDims
    patch: int
    channels: int = 3
    special_tokens: int = 1  # [CLS] + registers

    @classmethod
    def from_config(cls, c) -> "ViTDims":
        patch = c.patch_size[0] if isinstance(c.patch_size, (list, tuple)) else c.patch_size
        return cls(EncoderDims.from_config(c), int(patch), int(getattr(c, "num_channels", 3)),
                   1 + int(getattr(c, "num_register_tokens", 0) or 0))

    def num_patches(self, image_size: int) -> int:
        return (image_size // self.patch) ** 2


@dataclass(frozen=True)
class QFormerDims:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    cross_every: int
    vision_width: int
    vocab: int
    queries: int

    @classmethod
    def from_config(cls, c, queries: int) -> "QFormerDims":
        """``c``: a transformers ``Blip2QFormerConfig``."""
        return cls(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
                   c.cross_attention_frequency, c.encoder_hidden_size, c.vocab_size, queries)


@dataclass(frozen=True)
class LlamaDims:
    """A decoder-only LLM with a gated MLP (Llama, SmolLM2, Mistral, Qwen2)."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, c) -> "LlamaDims":
        if getattr(c, "is_encoder_decoder", False) or c.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
            raise NotImplementedError(f"analytic FLOPs for LLM model_type {c.model_type!r} (gated-MLP decoders only)")
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                   getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim, c.intermediate_size,
                   c.vocab_size)


# ---------------------------------------------------------------------------------------------------------------
# blocks
def encoder_block(led: FlopLedger, part: str, b: int, n: int, d: EncoderDims, grad: str,
                  mlp_tokens: int | None = None) -> None:
    """Self-attention (q, k, v, o) over ``n`` tokens and an MLP over ``mlp_tokens`` (default ``n``)."""
    h = d.hidden
    for _ in range(4):
        led.linear(part, b * n, h, h, grad)
    led.attention(part, b * d.heads, n, n, h // d.heads, grad)
    m = n if mlp_tokens is None else mlp_tokens
    led.linear(part, b * m, h, d.intermediate, grad)
    led.linear(part, b * m, d.intermediate, h, grad)


def vit(led: FlopLedger, part: str, b: int, image_size: int, d: ViTDims, grad: str = NONE,
        tokens_per_layer: list[int] | None = None) -> None:
    """Patch embedding + blocks (each block ``i`` over ``tokens_per_layer[i]`` tokens; default: all tokens)."""
    n_patch = d.num_patches(image_size)
    led.linear(part, b * n_patch, d.channels * d.patch ** 2, d.enc.hidden, grad)
    for n in tokens_per_layer or [d.special_tokens + n_patch] * d.enc.layers:
        encoder_block(led, part, b, n, d.enc, grad)


def elip_vit(led: FlopLedger, part: str, b: int, image_size: int, d: ViTDims, elip) -> dict:
    """The ELIP-pruned ViT (``elip``: a ``vl_align.elip.ElipConfig``): blocks over the shrinking sequence, plus
    at each applied pruning point the look-ahead blocks on the unpruned copy, the [CLS]->token attention of the
    last look-ahead block and the weighted fusion of the pruned tokens. All forward-only (frozen, no_grad)."""
    from vl_align.elip import num_kept, token_schedule

    n_patch = d.num_patches(image_size)
    schedule = token_schedule(elip, d.enc.layers, n_patch, d.special_tokens)
    vit(led, part, b, image_size, d, NONE, schedule)
    h, heads = d.enc.hidden, d.enc.heads
    points = {l: (dep, r) for l, dep, r in zip(elip.prune_after_layers, elip.lookahead_depths, elip.keep_ratios)}
    seq, n_cand = d.special_tokens + n_patch, n_patch
    for layer in range(1, d.enc.layers + 1):
        if layer not in points:
            continue
        depth, ratio = points[layer]
        k = num_kept(ratio, n_patch)
        if k >= n_cand:
            continue
        for _ in range(depth - 1):  # look-ahead blocks on the text-guided copy
            encoder_block(led, part + "_elip_scoring", b, seq, d.enc, NONE)
        led.linear(part + "_elip_scoring", b * 1, h, h, NONE)  # q of the [CLS] only
        led.linear(part + "_elip_scoring", b * seq, h, h, NONE)  # k of every token
        led.matmul(part + "_elip_scoring", b * heads, 1, h // heads, seq, NONE)  # [CLS] scores
        led.matmul(part + "_elip_scoring", b, 1, n_cand, h, NONE)  # fusion of the pruned tokens
        n_cand = k + 1
        seq = d.special_tokens + n_cand
    return {"tokens_per_layer": schedule, "mean_tokens_per_layer": sum(schedule) / len(schedule),
            "output_tokens": seq, "unpruned_tokens": d.special_tokens + n_patch}


def qformer_pass(led: FlopLedger, part: str, b: int, q: int, t: int, nv: int, d: QFormerDims, grad: str) -> None:
    """One Q-Former pass over ``q`` queries + ``t`` text tokens; the queries cross-attend to ``nv`` image tokens
    every ``cross_every``-th layer; queries and text have their own FFNs."""
    h, hd = d.hidden, d.hidden // d.heads
    n = q + t
    for i in range(d.layers):
        for _ in range(4):
            led.linear(part, b * n, h, h, grad)
        led.attention(part, b * d.heads, n, n, hd, grad)
        if q and i % d.cross_every == 0:
            led.linear(part, b * q, h, h, grad)  # query
            led.linear(part, b * nv, d.vision_width, h, grad)  # key of the image tokens
            led.linear(part, b * nv, d.vision_width, h, grad)  # value
            led.attention(part, b * d.heads, q, nv, hd, grad)
            led.linear(part, b * q, h, h, grad)  # output
        for tokens in (q, t):
            if tokens:
                led.linear(part, b * tokens, h, d.intermediate, grad)
                led.linear(part, b * tokens, d.intermediate, h, grad)


def qformer_lm_head(led: FlopLedger, part: str, b: int, t: int, d: QFormerDims, grad: str) -> None:
    led.linear(part, b * t, d.hidden, d.hidden, grad)  # BertPredictionHeadTransform
    led.linear(part, b * t, d.hidden, d.vocab, grad)  # decoder tied to the word embeddings


def llm_prefix_lm(led: FlopLedger, part: str, b: int, seq: int, logit_positions: int, d: LlamaDims,
                  grad: str = THROUGH) -> None:
    """A gated-MLP decoder over ``seq`` positions; the vocabulary head on ``logit_positions`` of them."""
    q_width, kv_width = d.heads * d.head_dim, d.kv_heads * d.head_dim
    tokens = b * seq
    for _ in range(d.layers):
        led.linear(part, tokens, d.hidden, q_width, grad)
        led.linear(part, tokens, d.hidden, kv_width, grad)
        led.linear(part, tokens, d.hidden, kv_width, grad)
        led.attention(part, b * d.heads, seq, seq, d.head_dim, grad)  # per query head (GQA shares k/v only)
        led.linear(part, tokens, q_width, d.hidden, grad)
        led.linear(part, tokens, d.hidden, d.intermediate, grad)  # gate
        led.linear(part, tokens, d.hidden, d.intermediate, grad)  # up
        led.linear(part, tokens, d.intermediate, d.hidden, grad)  # down
    led.linear(part + "_head", b * logit_positions, d.hidden, d.vocab, grad)


def tome_connector(led: FlopLedger, part: str, b: int, n_in: int, schedule: list[int], d: EncoderDims,
                   vision_width: int, grad: str = TRAIN) -> int:
    """SimVLG's connector: input projection, then per layer attention over the current tokens, ToMe matching
    (head-averaged keys, A·Bᵀ scores; no gradient) and the MLP over the merged tokens. Returns the output count."""
    h, hd = d.hidden, d.hidden // d.heads
    led.linear(part, b * n_in, vision_width, h, grad)
    n = n_in
    for r in schedule:
        for _ in range(4):
            led.linear(part, b * n, h, h, grad)
        led.attention(part, b * d.heads, n, n, hd, grad)
        if r > 0:
            led.linear(part + "_tome_matching", b * n, h, h, NONE)  # keys again, for the metric
            led.matmul(part + "_tome_matching", b, (n + 1) // 2, hd, n // 2, NONE)
        n -= r
        led.linear(part, b * n, h, d.intermediate, grad)
        led.linear(part, b * n, d.intermediate, h, grad)
    return n


# ---------------------------------------------------------------------------------------------------------------
# training steps
def stage1_step(b: int, t_enc: int, t_llm: int, enc: EncoderDims, num_prompts: int, llm: LlamaDims,
                contrastive_dim: int, pooler: bool = True, lm: bool = True, vq: bool = True,
                contrastive: bool = True, lead: int = 1) -> FlopLedger:
    """P-Former (trainable) on two masked views, frozen LLM reconstructing the sentence from view A's prompts
    (``lm``, ``vq``, ``contrastive``: which loss terms have a non-zero weight; ``lead``: tokens before the
    prompts, 1 for the BOS of ``bos_before_prefix``)."""
    led = FlopLedger()
    rows, d = 2 * b, enc.hidden
    for _ in range(enc.layers):
        encoder_block(led, "pformer", rows, t_enc, enc, TRAIN)
    if pooler:  # BertModel's pooler runs but its output is unused: no backward
        led.linear("pformer", rows, d, d, NONE)
    led.linear("pformer", rows, d, num_prompts * d, TRAIN)  # expand (prompts of both views, view B discarded)
    led.linear("pformer", rows * num_prompts, d, d, TRAIN)  # mix
    led.linear("pformer", rows * num_prompts, d, llm.hidden, TRAIN)  # to the LLM width
    led.linear("pformer", rows, d, contrastive_dim, TRAIN)
    if contrastive:
        led.matmul("losses", 2, b, contrastive_dim, b, TRAIN)  # L_c logits, both directions
    if vq:
        led.matmul("losses", 1, b * num_prompts, llm.hidden, llm.vocab, NONE)  # L_vq nearest-embedding search
    if lm:
        llm_prefix_lm(led, "llm", b, lead + num_prompts + t_llm, t_llm, llm)
    return led


def representation_step(b: int, t: int, nv: int, qf: QFormerDims, embed_dim: int, llm_width: int,
                        itm: bool = True, itg: bool = True, elip_vision: tuple | None = None,
                        live_vision: tuple | None = None) -> tuple[FlopLedger, dict]:
    """BLIP-2 stage 1 (ITC + ITM + ITG) + the W·Z projection for the alignment. ``elip_vision`` =
    (image_size, ViTDims, ElipConfig) when the pruned tower runs inside the step (ELIP); then ``nv`` is ignored.
    ``live_vision`` = (image_size, ViTDims) when the unpruned frozen tower runs inside the step (no feature cache)."""
    led, info = FlopLedger(), {}
    if live_vision is not None:
        vit(led, "vision", b, *live_vision, NONE)
    if elip_vision is not None:
        info = elip_vit(led, "vision", b, *elip_vision)
        nv = info["output_tokens"]
    q, h = qf.queries, qf.hidden
    qformer_pass(led, "qformer", b, 0, t, nv, qf, TRAIN)  # text (ITC)
    led.linear("heads", b, h, embed_dim, TRAIN)  # text_proj on [CLS]
    qformer_pass(led, "qformer", b, q, 0, nv, qf, TRAIN)  # queries (ITC)
    led.linear("heads", b * q, h, embed_dim, TRAIN)  # vision_proj
    led.linear("heads", b * q, h, llm_width, TRAIN)  # W (alignment)
    led.matmul("heads", 2, b * q, embed_dim, b, TRAIN)  # ITC similarities, both directions
    if itm:
        qformer_pass(led, "qformer", 3 * b, q, t, nv, qf, TRAIN)  # positives + 2 hard negatives
        led.linear("heads", 3 * b * q, h, 2, TRAIN)
    if itg:
        qformer_pass(led, "qformer", b, q, t, nv, qf, TRAIN)
        qformer_lm_head(led, "qformer_lm_head", b, t, qf, TRAIN)
    return led, {**info, "vision_tokens_to_front": nv}


def generative_step(front: str, b: int, t_llm: int, nv: int, llm: LlamaDims, qf: QFormerDims | None = None,
                    t_text: int = 0, elip_vision: tuple | None = None, tome: tuple | None = None,
                    t_prompt: int = 0, lm: bool = True, embed_dim: int = 0, lead: int = 1) -> tuple[FlopLedger, dict]:
    """Front (trainable) -> W -> frozen LLM (LM loss on the caption, after ``t_prompt`` training-prompt tokens).
    ``tome`` = (connector EncoderDims, schedule, vision_width) for the SimVLG front; ``elip_vision`` as in
    :func:`representation_step` (ELIP also runs the Q-Former's text pass for the guidance, detached).
    ``lm=False``: the MSE-only variant (no LLM). ``embed_dim``: width of the Q-Former front's ITC projections,
    which its forward also computes here, unused (no backward). ``lead``: LLM tokens before the prefix (BOS)."""
    led, info = FlopLedger(), {}
    if front == "tome":
        enc, schedule, vision_width = tome
        prefix = tome_connector(led, "connector", b, nv, schedule, enc, vision_width, TRAIN)
        led.linear("heads", b * prefix, enc.hidden, llm.hidden, TRAIN)
    else:
        if front == "elip":
            qformer_pass(led, "qformer_text_guidance", b, 0, t_text, nv, qf, NONE)  # detached text [CLS]
            led.linear("qformer_text_guidance", b, qf.hidden, embed_dim, NONE)  # text_proj
            info = elip_vit(led, "vision", b, *elip_vision)
            nv = info["output_tokens"]
        qformer_pass(led, "qformer", b, qf.queries, 0, nv, qf, TRAIN)
        led.linear("heads", b * qf.queries, qf.hidden, embed_dim, NONE)  # vision_proj (ITC only)
        led.linear("heads", b * qf.queries, qf.hidden, llm.hidden, TRAIN)
        prefix = qf.queries
    if lm:
        llm_prefix_lm(led, "llm", b, lead + prefix + t_prompt + t_llm, t_llm, llm)
    return led, {**info, "vision_tokens_to_front": nv, "tokens_to_llm": prefix}


def blip2_reference_step(b: int, t_llm: int, nv: int, qf: QFormerDims, llm: LlamaDims,
                         vision: tuple | None = None) -> FlopLedger:
    """transformers' Blip2ForConditionalGeneration: (frozen ViT, when ``vision`` = (image_size, ViTDims)) ->
    Q-Former queries -> language_projection -> frozen LLM with the vocabulary head on every position."""
    led = FlopLedger()
    if vision is not None:
        vit(led, "vision", b, vision[0], vision[1], NONE)
    qformer_pass(led, "qformer", b, qf.queries, 0, nv, qf, TRAIN)
    led.linear("heads", b * qf.queries, qf.hidden, llm.hidden, TRAIN)
    seq = qf.queries + t_llm
    llm_prefix_lm(led, "llm", b, seq, seq, llm)
    return led


# ---------------------------------------------------------------------------------------------------------------
# cross-check: the FLOPs torch executes
def _cpu_sdpa_formulas() -> dict:
    """torch's FlopCounterMode has no formula for the CPU flash-attention kernels; count them like the GPU ones."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    out = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

        def bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

        out[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return out


def flop_counter():
    """A ``torch.utils.flop_counter.FlopCounterMode`` that also counts the CPU attention kernels."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_formulas())


__all__ = ["CONVENTION", "TRAIN", "THROUGH", "NONE", "FlopLedger", "EncoderDims", "ViTDims", "QFormerDims",
           "LlamaDims", "encoder_block", "vit", "elip_vit", "qformer_pass", "qformer_lm_head", "llm_prefix_lm",
           "tome_connector", "stage1_step", "representation_step", "generative_step", "blip2_reference_step",
           "flop_counter"]
