"""How fast a streamed stage-1 corpus feeds training (``data.streaming``), on the packaged models.

    .venv/bin/python scripts/stream_rate.py --generate /tmp/corpus_1m.txt 1000000   # caption-like sentences
    .venv/bin/python scripts/stream_rate.py /tmp/corpus_1m.txt --sentences 1000000

Measures, one process, sentences per second:
  read       the stream alone (byte-range shards, block shuffle, UTF-8 decode, strip)
  +limit     plus the token-length filter stage 1 applies to each shuffle block (the P-Former tokenizer and the LLM's
             target tokenizer, batched per block)
  +collate   plus ``Stage1Collator`` on each batch (tokenising again, the two masked views, the LLM targets)
and the P(y) rate of the prompt-target computation (a P-Former on ``minilm-l6`` for ``smollm2-135m``: the packaged
pair; its weights are untrained, the cost is the same) over ``--targets`` sentences, and with ``--cache-build N``
the rate of ``streamed_prompt_cache`` on the corpus's first N sentences with 1 and 2 worker processes.

    .venv/bin/python scripts/stream_rate.py --vision 224    # streamed stage 2: the tower per batch vs a cache read

``--vision S``: per image, the frozen ``dinov2-s14`` tower on a batch of 32 (decode + resize + forward: what a
streamed batch pays) against reading the same rows from a ``vision_feature_cache`` (what a cached run pays).
Rates are wall-clock and CPU-time (``process_time``: all of this process's threads) so a shared machine's
contention can be read off.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("a", "the", "red", "blue", "green", "small", "large", "dog", "cat", "man", "woman", "child", "car", "street",
         "table", "plate", "pizza", "bench", "park", "river", "boat", "sitting", "standing", "running", "holding",
         "next", "to", "on", "in", "with", "near", "of", "two", "three", "people", "building", "tree", "sky", "white",
         "black", "train", "station", "field", "grass", "ball", "playing", "riding", "bike", "horse", "beach")


def generate(path: Path, n: int, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    with open(path, "w") as fh:
        for start in range(0, n, 100_000):
            m = min(100_000, n - start)
            lengths = rng.integers(5, 21, size=m)
            picks = rng.integers(0, len(words), size=int(lengths.sum()))
            pos = 0
            lines = []
            for k in lengths:
                lines.append(" ".join(words[picks[pos:pos + k]]))
                pos += k
            fh.write("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus", nargs="?")
    ap.add_argument("--generate", nargs=2, metavar=("PATH", "N"))
    ap.add_argument("--sentences", type=int, default=1_000_000, help="sentences read for the read rate")
    ap.add_argument("--tokenised", type=int, default=200_000, help="sentences for the +limit / +collate rates")
    ap.add_argument("--targets", type=int, default=4096, help="sentences for the P(y) rate (0: skip)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cache-build", type=int, default=0, help="sentences for the parallel cache build (0: skip)")
    ap.add_argument("--vision", type=int, default=0, help="image size for the tower-vs-cache measurement (0: skip)")
    args = ap.parse_args()
    if args.vision:
        print(json.dumps(vision_rates(args.vision)), flush=True)
        return
    if args.generate:
        t = time.perf_counter()
        generate(Path(args.generate[0]), int(args.generate[1]))
        print(f"wrote {args.generate[1]} sentences to {args.generate[0]} in {time.perf_counter() - t:.1f} s")
        return

    import torch

    from dvlp_common import zoo
    from dvlp_common.stream import Skip
    from pformer.llm import FrozenLLM
    from pformer.objective import Stage1Collator
    from pformer.text_stream import stream_text_corpus
    from pipelines.stage1 import text_lengths

    out: dict = {"corpus": args.corpus, "threads": torch.get_num_threads(), "python": platform.python_version()}

    def rate(n, keep=None, collate=None):
        stream = stream_text_corpus(args.corpus, rank=0, world_size=1, seed=0, buffer=10_000,
                                    shard_bytes=16 << 20, keep=keep)
        t, c = time.perf_counter(), time.process_time()
        done = 0
        while done < n:
            batch = stream.take(args.batch)
            if collate is not None:
                collate([r.text for r in batch], [r.uid for r in batch], step_key=done)
            done += len(batch)
        return {"per_s": round(done / (time.perf_counter() - t)), "per_cpu_s": round(done / (time.process_time() - c))}

    out["read_per_s"] = rate(args.sentences)
    print(json.dumps(out), flush=True)
    tokenizer = zoo.load_tokenizer("minilm-l6")
    llm = FrozenLLM.load("smollm2-135m")

    def within(records):
        return [Skip("too_long", r.where) if n > 32 else None
                for r, n in zip(records, text_lengths([r.text for r in records], tokenizer, llm))]

    out["read_limit_per_s"] = rate(args.tokenised, keep=within)
    print(json.dumps(out), flush=True)
    collate = Stage1Collator(tokenizer, llm, 32, 0.15, 0)
    out["read_limit_collate_per_s"] = rate(args.tokenised, keep=within, collate=collate)
    print(json.dumps(out), flush=True)
    if args.targets:
        from pformer.evaluation import prompts_for
        from pformer.model import PFormer, PFormerConfig

        pformer = PFormer.build(PFormerConfig(text_encoder="minilm-l6", llm="smollm2-135m", num_prompts=32),
                                llm_hidden_size=llm.hidden_size).eval()
        texts = [r.text for r in stream_text_corpus(args.corpus, rank=0, world_size=1, seed=0,
                                                    buffer=args.targets).take(args.targets)]
        with torch.no_grad():
            prompts_for(pformer, tokenizer, texts[:64], "cpu")  # warm-up
            t, c = time.perf_counter(), time.process_time()
            for s in range(0, len(texts), 64):
                prompts_for(pformer, tokenizer, texts[s:s + 64], "cpu")
        out["prompt_targets"] = {"per_s": round(len(texts) / (time.perf_counter() - t)),
                                 "per_cpu_s": round(len(texts) / (time.process_time() - c))}
        print(json.dumps(out), flush=True)
    if args.cache_build:
        import tempfile

        from pformer.model import PFormer, PFormerConfig
        from pformer.targets import streamed_prompt_cache

        with tempfile.TemporaryDirectory() as tmp:
            head = Path(tmp) / "head.txt"
            with open(args.corpus) as src, open(head, "w") as dst:
                dst.writelines(src.readline() for _ in range(args.cache_build))
            model = PFormer.build(PFormerConfig(text_encoder="minilm-l6", llm="smollm2-135m", num_prompts=32),
                                  llm_hidden_size=llm.hidden_size)
            model.save_pretrained(Path(tmp) / "pformer", tokenizer=tokenizer)
            for workers in (1, 2):
                t = time.perf_counter()
                cache = streamed_prompt_cache(Path(tmp) / "pformer", head, Path(tmp) / f"cache{workers}",
                                              workers=workers, threads=max(1, torch.get_num_threads() // workers),
                                              shard_bytes=max(1, head.stat().st_size // 8))
                out[f"cache_build_{workers}_workers_per_s"] = round(len(cache) / (time.perf_counter() - t), 1)
                print(json.dumps(out), flush=True)


def vision_rates(size: int, n: int = 128, batch: int = 32) -> dict:
    """ms per image: the tower on a streamed batch (decode, resize, forward) vs rows read from the feature cache."""
    import tempfile

    import numpy as np
    import torch
    from PIL import Image

    from vl_align.vision import VisionTower, VisionTowerConfig, vision_feature_cache

    tower = VisionTower.build(VisionTowerConfig(model="dinov2-s14", image_size=size, batch_size=batch))
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):  # 640x480 JPEGs, the size of a COCO image
        buf = __import__("io").BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    out = {"image_size": size, "tokens": tower.num_tokens, "hidden": tower.hidden_size, "threads":
           torch.get_num_threads()}
    with torch.no_grad():
        tower(tower.preprocess(images[:4]))  # warm-up
        t, c = time.perf_counter(), time.process_time()
        for s in range(0, n, batch):
            tower(tower.preprocess(images[s:s + batch]))
        out["tower_ms_per_image"] = round(1000 * (time.perf_counter() - t) / n, 2)
        out["tower_cpu_ms_per_image"] = round(1000 * (time.process_time() - c) / n, 2)
    with tempfile.TemporaryDirectory() as tmp:
        store = vision_feature_cache(tower, images, tmp)
        t = time.perf_counter()
        for s in range(0, n, batch):
            store.get(images[s:s + batch])  # hashing the bytes + reading the memory-mapped rows
        out["cache_read_ms_per_image"] = round(1000 * (time.perf_counter() - t) / n, 3)
    return out


if __name__ == "__main__":
    main()
