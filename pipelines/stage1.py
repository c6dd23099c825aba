"""Stage 1: text-only pre-training of the P-Former against a frozen LLM, then its reconstruction evaluation.

Outputs in ``logging.output_dir``: ``config.yaml`` (resolved), ``checkpoints/`` (resumable), ``metrics.jsonl`` and
``tensorboard/`` (loss curve), ``pformer/`` (final weights, safetensors), ``heldout.txt``, ``eval.json``, ``eval.md``
and ``predictions.json`` (held-out reconstruction, trained vs untrained P-Former; the layout of every evaluation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dvlp_common.config import Config, param
from dvlp_common.io import write_json_atomic
from pformer.data import load_text_corpus
from pformer.evaluation import evaluate_reconstruction
from pformer.llm import FrozenLLM
from pformer.losses import Stage1LossWeights
from pformer.model import PFormer, PFormerConfig
from pformer.objective import Stage1Collator, stage1_loss
from dvlp_common.records import SkipReport, skip_too_long
from dvlp_common.stream import ShardedStream, Skip
from pformer.text_stream import TextRecord, corpus_shards, heldout_from_head, stream_text_corpus
from dvlp_common import zoo

from . import distributed, optim, training
from .config import DeepSpeedConfig, LoggingConfig, OptimConfig, ReliabilityConfig, TextDataConfig
from vl_align.sources import resolve_text_source


@dataclass
class Stage1EvalConfig(Config):
    enabled: bool = param(True, help="evaluate reconstruction on the held-out sentences after training")
    batch_size: int = param(32, ge=1, help="sentences per evaluation batch")
    max_new_tokens: int = param(32, ge=1, help="greedy regeneration length limit")
    compare_untrained: bool = param(True, help="also score an untrained P-Former (same seed) as the floor")


@dataclass
class Stage1Config(Config):
    model: PFormerConfig = field(default_factory=PFormerConfig)
    loss: Stage1LossWeights = field(default_factory=Stage1LossWeights)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(output_dir="runs/stage1"))
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    eval: Stage1EvalConfig = field(default_factory=Stage1EvalConfig)
    seed: int = param(0, help="seed of initialisation, data order, masking and dropout")


def split_holdout(texts: list[str], holdout: int, seed: int) -> tuple[list[str], list[str]]:
    """Hold out ``holdout`` distinct sentences; every copy of a held-out sentence leaves the training set."""
    distinct = sorted(set(texts))
    if holdout >= len(distinct):
        raise ValueError(f"data.holdout={holdout} leaves no training sentence ({len(distinct)} distinct)")
    rng = np.random.default_rng([seed, 17])
    held = {distinct[i] for i in rng.choice(len(distinct), size=holdout, replace=False)} if holdout else set()
    return [t for t in texts if t not in held], sorted(held)


def within_text_limit(texts: list[str], tokenizer, llm: FrozenLLM, cfg: Stage1Config, report: SkipReport) -> list[str]:
    """The sentences that fit ``model.max_text_length`` tokens for the P-Former and as the LLM's target; longer ones
    are counted skips (then the report's threshold applies to all skips)."""
    seen, limit = len(texts) + report.total, cfg.model.max_text_length
    lengths = text_lengths(texts, tokenizer, llm)
    keep = skip_too_long(lengths, limit, report, lambda i: f"{cfg.data.source}: sentence {i + 1} {texts[i][:40]!r}")
    report.check(seen)
    return [texts[i] for i in keep]


def text_lengths(texts: list[str], tokenizer, llm: FrozenLLM) -> list[int]:
    """Each sentence's token count, the longer of the P-Former's and the LLM target's."""
    lengths = []
    for start in range(0, len(texts), 1024):
        chunk = texts[start:start + 1024]
        encoder = [len(ids) for ids in tokenizer(chunk).input_ids]
        _, target_mask = llm.tokenize_targets(chunk, max_length=None)
        lengths += [max(a, int(b)) for a, b in zip(encoder, target_mask.sum(1))]
    return lengths


def streamed_corpus(cfg: Stage1Config, tokenizer, llm: FrozenLLM, report: SkipReport, rank: int,
                    world_size: int) -> tuple[ShardedStream, list[str]]:
    """(this rank's stream of training sentences, the held-out sentences) of ``data.streaming``: the corpus is never
    a list; sentences over the token limit are counted skips, tokenised block by block as the stream reads them."""
    source = resolve_text_source(cfg.data.source)
    shards, kind = corpus_shards(source, cfg.data.format, cfg.data.shard_bytes, text_field=cfg.data.text_field)
    heldout = heldout_from_head(shards, kind, cfg.data.holdout, cfg.seed, cfg.data.text_field)
    limit = cfg.model.max_text_length

    def within_limit(records: list[TextRecord]) -> list[Skip | None]:
        lengths = text_lengths([r.text for r in records], tokenizer, llm)
        return [Skip("too_long", f"{r.where} {r.text[:40]!r} ({n} tokens > {limit})") if n > limit else None
                for r, n in zip(records, lengths)]

    stream = stream_text_corpus(source, rank=rank, world_size=world_size, seed=cfg.seed,
                                buffer=cfg.data.shuffle_buffer, fmt=cfg.data.format, text_field=cfg.data.text_field,
                                shard_bytes=cfg.data.shard_bytes, exclude=heldout, keep=within_limit, report=report)
    return stream, heldout


def run_stage1(cfg: Stage1Config, resume: bool = False, stop_after: int | None = None) -> dict:
    dist, dtype, run_dir = training.start_run(cfg, resume)

    report = SkipReport(max_skip_fraction=cfg.reliability.max_skip_fraction, name="stage-1 corpus")
    if not cfg.data.streaming:
        corpus = load_text_corpus(resolve_text_source(cfg.data.source), fmt=cfg.data.format,
                                  text_field=cfg.data.text_field, max_records=cfg.data.max_records, report=report)
    training.seed_everything(cfg.seed)
    llm = FrozenLLM.load(cfg.model.llm, dtype=dtype if dtype != torch.float16 else torch.float16,
                         text_suffix=cfg.model.text_suffix, bos_before_prefix=cfg.model.bos_before_prefix
                         ).to(dist.device)
    tokenizer = zoo.load_tokenizer(cfg.model.text_encoder)
    stream = None
    if cfg.data.streaming:
        stream, heldout = streamed_corpus(cfg, tokenizer, llm, report, dist.rank, dist.world_size)
        train_texts: list[str] = []
    else:
        texts = within_text_limit(list(corpus["text"]), tokenizer, llm, cfg, report)
        train_texts, heldout = split_holdout(texts, cfg.data.holdout, cfg.seed)
    if dist.is_main:
        (run_dir / "heldout.txt").write_text("".join(t + "\n" for t in heldout))
        size = f"{len(stream.shards)} shards streamed" if stream else f"{len(train_texts)} training sentences"
        print(f"stage 1: {size}, {len(heldout)} held out; "
              f"skipped records: {report.total}" + (f"\n{report.summary()}" if report.total else ""), flush=True)

    pformer = PFormer.build(cfg.model, llm_hidden_size=llm.hidden_size)
    untrained_state = {k: v.clone() for k, v in pformer.state_dict().items()} if cfg.eval.compare_untrained else None

    collate = Stage1Collator(tokenizer, llm, cfg.model.max_text_length, cfg.model.mask_prob, cfg.seed)
    engine = optim.build_engine(pformer, cfg.optim, cfg.deepspeed, dist, dtype)

    streamed_where: list[str] = []  # the last streamed batch's sentences, for the non-finite-loss message

    def make_batch(ids: list[int], step: int):
        if stream is not None:  # the records themselves; a record's masking is seeded by its stable id
            streamed_where[:] = [r.where for r in ids]
            return collate([r.text for r in ids], [r.uid for r in ids], step_key=step, device=dist.device)
        return collate([train_texts[i] for i in ids], ids, step_key=step, device=dist.device)

    def loss_fn(eng, batch):
        return stage1_loss(eng, llm, batch, cfg.loss, cfg.model.label_smoothing, distributed.all_gather_with_grad,
                           dist.rank, distributed.mean_over_ranks_tensor)

    result = training.train(engine=engine, dist_info=dist, make_batch=make_batch, loss_fn=loss_fn,
                            num_samples=len(train_texts), optim=cfg.optim, logging=cfg.logging,
                            reliability=cfg.reliability, seed=cfg.seed, dtype=dtype, resume=resume,
                            stop_after=stop_after, stream=stream,
                            record_ids=lambda b: (list(streamed_where) if stream is not None
                                                  else [train_texts[i] for i in b.sample_ids]))
    summary = {"steps": result.final_step, "wall_seconds": result.wall_seconds, "resumed_from": result.resumed_from,
               "train_sentences": len(train_texts), "heldout_sentences": len(heldout), "skipped": report.as_dict()}
    if stream is not None:  # a streamed corpus is never counted whole
        summary.update(train_sentences=None, streamed={"shards": len(stream.shards), **stream.state_dict()})
    if result.final_step < cfg.optim.max_steps:
        return summary
    # every rank: under ZeRO-3 the weights are gathered from the ranks' partitions into a fresh P-Former
    final = optim.trained_module(engine, lambda: PFormer.build(cfg.model, llm_hidden_size=llm.hidden_size),
                                    keep=dist.is_main)
    if not dist.is_main:
        return summary

    out_dir = run_dir / "pformer"
    final.save_pretrained(out_dir, tokenizer=tokenizer)  # atomic: a crash leaves the previous P-Former
    summary["pformer"] = str(out_dir)
    if cfg.eval.enabled and heldout:
        summary["eval"] = evaluate_stage1(cfg, final, tokenizer, llm, heldout, untrained_state, dist.device, dtype,
                                          run_dir)
    write_json_atomic(run_dir / "stage1_summary.json", summary)
    return summary


def evaluate_stage1(cfg: Stage1Config, trained: PFormer, tokenizer, llm: FrozenLLM, sentences: list[str],
                    untrained_state: dict | None, device, dtype, run_dir: Path) -> dict:
    from dvlp_common.reports import write_report
    from pformer.evaluation import bleu4

    variants = {"trained": trained}
    if untrained_state is not None:
        untrained = PFormer(cfg.model, type(trained.encoder)(trained.encoder.config), trained.llm_hidden_size)
        untrained.load_state_dict(untrained_state)
        variants = {"untrained": untrained.to(device), **variants}
    rows, result, predictions = [], {}, {}
    for name, model in variants.items():
        rec = evaluate_reconstruction(model, tokenizer, llm, sentences, batch_size=cfg.eval.batch_size,
                                      max_new_tokens=cfg.eval.max_new_tokens, device=device, dtype=dtype)
        scores = rec.scores()
        scores["bleu4"] = bleu4([p["prediction"] for p in rec.predictions],
                                [[p["reference"]] for p in rec.predictions])
        rows.append({"p_former": name, **scores})
        result[name] = {"num_sentences": len(sentences), **scores}  # one section per P-Former, as eval.json elsewhere
        predictions[name] = [{"sentence": p["reference"], "regeneration": p["prediction"]} for p in rec.predictions]
    write_report(run_dir, "eval", result, rows, f"Stage-1 reconstruction on {len(sentences)} held-out sentences "
                                                f"(LLM {cfg.model.llm})", predictions)
    return result
