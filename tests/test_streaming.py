"""Streamed training data (``data.streaming``): shards split over ranks, a seeded block shuffle, and a checkpointed
position from which a resumed run takes exactly the batches an uninterrupted one would have; stages 1, 2a and 2b
train from a streamed text corpus, webdataset shards and a datasets folder and resume at the right sample."""
from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import datasets
import pytest
from conftest import shape_png

from dvlp_common.config import ConfigError, load_config
from dvlp_common.records import SkipReport, TooManySkippedRecords
from dvlp_common.stream import ShardedStream, read_text_lines, text_shards
from pformer.text_stream import TextRecord, heldout_from_head, stream_text_corpus
from vl_align.pair_stream import pair_stream
from vl_align.pairs import ImageTextPair, PairDataConfig

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def _lines(path: Path, n: int) -> list[str]:
    lines = [f"sentence number {i} is here" for i in range(n)]
    path.write_text("".join(f"{t}\n" for t in lines))
    return lines


def _reader(shard, record, offset):
    return read_text_lines(shard, record, offset, lambda text, where: text)


# --------------------------------------------------------------------------------------------- the stream itself
def test_byte_range_shards_partition_a_file_and_seek_like_skipping(tmp_path):
    lines = _lines(tmp_path / "c.txt", 103)
    shards = text_shards([str(tmp_path / "c.txt")], 97)  # ranges that cut lines
    assert len(shards) > 20
    got = [v for s in shards for _, _, v in _reader(s, 0, None)]
    assert got == lines  # every line once, in the range its first byte is in
    for shard in shards[:6]:
        full = list(_reader(shard, 0, None))
        for k in range(1, len(full)):
            assert list(_reader(shard, k, full[k - 1][1])) == list(_reader(shard, k, None)) == full[k:]


def test_stream_resumes_at_the_same_record_and_splits_ranks(tmp_path):
    lines = _lines(tmp_path / "c.txt", 103)
    shards = text_shards([str(tmp_path / "c.txt")], 97)

    def stream(rank=0, seed=1):
        return ShardedStream(shards, _reader, rank=rank, world_size=2, seed=seed, buffer=7)

    reference = stream().take(250)  # more than two epochs of rank 0
    assert reference[:20] != sorted(reference[:20], key=lines.index)  # shuffled
    assert reference[:20] != stream(seed=2).take(20)  # by the seed
    for cut in range(0, 200, 11):  # a checkpoint after `cut` records, loaded into a fresh stream
        first = stream()
        first.take(cut)
        state = json.loads(json.dumps(first.state_dict()))  # it travels through trainer_state.json
        resumed = stream()
        resumed.load_state_dict(state)
        assert resumed.take(40) == reference[cut:cut + 40], cut
    # the ranks' shards partition the corpus: an epoch of each holds every line exactly once
    sizes = [sum(1 for s in stream(r).mine for _ in _reader(s, 0, None)) for r in (0, 1)]
    assert sorted(stream(0).take(sizes[0]) + stream(1).take(sizes[1])) == sorted(lines)
    # each epoch has its own order
    assert reference[:sizes[0]] != reference[sizes[0]:2 * sizes[0]]
    assert sorted(reference[:sizes[0]]) == sorted(reference[sizes[0]:2 * sizes[0]])
    with pytest.raises(ValueError, match="same shards, ranks and shuffle buffer"):
        ShardedStream(shards, _reader, rank=0, world_size=2, seed=1, buffer=8).load_state_dict(state)
    with pytest.raises(ValueError, match="every rank needs at least one"):
        ShardedStream(shards[:1], _reader, rank=0, world_size=2, seed=1, buffer=7)


def test_text_stream_counts_skips_and_leaves_out_held_out_sentences(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [json.dumps({"text": f"line {i}"}) for i in range(60)] + ["not json", json.dumps({"other": 1}), ""]
    path.write_text("\n".join(rows) + "\n")
    report = SkipReport(max_skip_fraction=0.1)
    held = heldout_from_head(text_shards([str(path)], 1 << 20), "jsonl", 5, seed=0)
    stream = stream_text_corpus(path, rank=0, world_size=1, seed=0, buffer=16, shard_bytes=256, exclude=held,
                                report=report)
    got = stream.take(55)
    assert all(isinstance(r, TextRecord) for r in got)
    assert sorted(r.text for r in got) == sorted(f"line {i}" for i in range(60) if f"line {i}" not in held)
    assert len({r.uid for r in got}) == 55
    assert report.counts == {"invalid_json": 1, "missing_field:text": 1, "empty_line": 1}
    bad = tmp_path / "bad.txt"
    bad.write_text("ok\n" * 5 + "\n" * 20)
    with pytest.raises(TooManySkippedRecords):
        stream_text_corpus(bad, rank=0, world_size=1, seed=0, buffer=100).take(5)


# ----------------------------------------------------------------------------------------- image-text sources
def _write_pairs(root: Path, shards: int = 2, per_shard: int = 8) -> dict:
    """Pairs (16-px PNGs, distinct captions) as webdataset shards (plain and gzipped) and as a datasets folder."""
    rows = []
    for i in range(shards * per_shard):
        name, rgb = list(COLOURS.items())[i % 4]
        shape = ("square", "circle")[i // 4 % 2]
        rows.append({"image_id": f"k{i:03d}", "caption": f"a {name} {shape} number {i}",
                     "png": shape_png(rgb, shape)})
    (root / "shards").mkdir(parents=True)
    for s in range(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for r in rows[s * per_shard:(s + 1) * per_shard]:
                for name, payload in ((f"{r['image_id']}.png", r["png"]), (f"{r['image_id']}.txt",
                                                                          r["caption"].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        (root / "shards" / f"{s:03d}.tar").write_bytes(buf.getvalue())
        (root / "shards" / f"{s:03d}.tar.gz").write_bytes(gzip.compress(buf.getvalue()))
    folder = root / "saved"
    ds = datasets.Dataset.from_dict({"image": [{"bytes": r["png"], "path": None} for r in rows],
                                     "caption": [r["caption"] for r in rows],
                                     "image_id": [r["image_id"] for r in rows]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "caption": datasets.Value("string"),
                                                                "image_id": datasets.Value("string")}))
    ds.save_to_disk(str(folder))
    (root / "captions.txt").write_text("".join(r["caption"] + "\n" for r in rows))
    pattern = str(root / "shards" / f"{{000..{shards - 1:03d}}}")
    return {"rows": rows, "captions": str(root / "captions.txt"), "webdataset": pattern + ".tar",
            "gz": pattern + ".tar.gz", "disk": str(folder)}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return _write_pairs(tmp_path_factory.mktemp("streamed_pairs"))


@pytest.mark.parametrize("fmt", ["webdataset", "gz", "disk"])
def test_pair_stream_reads_bytes_and_resumes(pairs, fmt):
    data = PairDataConfig(source=pairs[fmt], streaming=True, shuffle_buffer=5, shard_rows=8,
                          format="disk" if fmt == "disk" else "webdataset")

    def stream():
        return pair_stream(data, seed=0, rank=0, world_size=1, report=SkipReport())

    reference = stream().take(40)  # 2.5 epochs
    assert all(isinstance(p, ImageTextPair) and p.image_bytes for p in reference)
    by_id = {r["image_id"]: r for r in pairs["rows"]}
    assert {p.image_id for p in reference[:16]} == set(by_id)
    assert all(p.caption == by_id[p.image_id]["caption"] and p.image_bytes == by_id[p.image_id]["png"]
               for p in reference)
    for cut in (3, 8, 13, 16, 21):
        first = stream()
        first.take(cut)
        resumed = stream()
        resumed.load_state_dict(first.state_dict())
        assert [p.image_id for p in resumed.take(12)] == [p.image_id for p in reference[cut:cut + 12]], cut
    two = [pair_stream(data, seed=0, rank=r, world_size=2, report=SkipReport()).take(8) for r in (0, 1)]
    assert sorted(p.image_id for p in two[0] + two[1]) == sorted(by_id)  # one shard each


def test_streaming_config_rules():
    with pytest.raises(ConfigError, match="max_pairs"):
        PairDataConfig(source="x.tar", streaming=True, max_pairs=4)
    with pytest.raises(ConfigError, match="streaming"):
        PairDataConfig(streaming=True)  # the embedded set is in-memory by nature


# ------------------------------------------------------------------------------------------------ the stages
def _record_batches(monkeypatch, cls, method):
    """Every batch the stage builds: (step, its records' ids), in order."""
    seen: list[tuple[int, list]] = []
    original = getattr(cls, method)

    def spy(self, records, step, *args, **kwargs):
        seen.append((step, [getattr(r, "image_id", getattr(r, "text", r)) for r in records]))
        return original(self, records, step, *args, **kwargs)

    monkeypatch.setattr(cls, method, spy)
    return seen


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _straight_and_resumed(run, make_cfg, tmp_path, seen, stop=3, drop=None):
    """Train 5 steps straight; then 3 steps, (optionally drop the last checkpoint), resume to 5. Returns the two
    runs' batches by step and the metric rows."""
    run(make_cfg("straight"))
    straight = list(seen)
    seen.clear()
    first = run(make_cfg("split"), stop_after=stop)
    assert first["steps"] == stop
    if drop:  # as if the process died after this step but before its checkpoint
        shutil.rmtree(tmp_path / "split" / "checkpoints" / drop)
    second = run(make_cfg("split"), resume=True)
    return straight, list(seen), second, _rows(tmp_path / "straight"), _rows(tmp_path / "split")


def test_stage1_streams_a_corpus_and_resumes_at_the_next_batch(tmp_path, monkeypatch, tiny_bert_dir, tiny_llm_dir):
    from pformer.objective import Stage1Collator
    from pipelines.stage1 import Stage1Config, run_stage1

    corpus = tmp_path / "corpus.txt"
    _lines(corpus, 90)

    def cfg(out):
        return load_config(Stage1Config, None, [
            f"model.text_encoder={tiny_bert_dir}", f"model.llm={tiny_llm_dir}", "model.num_prompts=4",
            f"data.source={corpus}", "data.streaming=true", "data.shuffle_buffer=8", "data.shard_bytes=300",
            "data.holdout=4", "optim.max_steps=5", "optim.warmup_steps=1", "optim.micro_batch_size=4",
            "optim.grad_accum_steps=2", f"logging.output_dir={tmp_path / out}", "logging.log_every=1",
            "logging.save_every=2", "logging.tensorboard=false", "logging.progress_bar=false",
            "eval.enabled=false", "deepspeed.precision=fp32"])

    # Stage1Collator is called as collate(texts, ids, step_key=step): record the texts
    seen_texts: list = []
    original = Stage1Collator.__call__

    def spy(self, texts, sample_ids, step_key=0, device="cpu"):
        seen_texts.append((step_key, list(texts)))
        return original(self, texts, sample_ids, step_key=step_key, device=device)

    monkeypatch.setattr(Stage1Collator, "__call__", spy)
    straight, resumed, second, a, b = _straight_and_resumed(run_stage1, cfg, tmp_path, seen_texts, stop=3,
                                                            drop="step_00000003")
    assert second["resumed_from"] == 2 and second["streamed"]["shards"] > 1
    held = set((tmp_path / "straight" / "heldout.txt").read_text().splitlines())
    assert len(held) == 4 and not held & {t for _, texts in straight for t in texts}
    # the resumed run's first batch (step 2) is the uninterrupted run's, and so is every batch after it
    after = [x for x in straight if x[0] >= 2]
    assert resumed[-len(after):] == after
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"], ra["step"]  # bitwise on CPU


def _stage2_overrides(source, fmt, vit, bert, llm, pformer, out, steps=4):
    return [f"vision.model={vit}", "vision.image_size=16", f"front.init_from={bert}", "front.num_query_tokens=4",
            f"pformer={pformer}", f"llm={llm}", f"data.source={source}", f"data.format={fmt}",
            "data.streaming=true", "data.shuffle_buffer=6", "data.shard_rows=8", f"optim.max_steps={steps}",
            "optim.warmup_steps=1", "optim.micro_batch_size=4", f"logging.output_dir={out}", "logging.log_every=1",
            "logging.save_every=1", "logging.tensorboard=false", "logging.progress_bar=false",
            "deepspeed.precision=fp32"]


@pytest.mark.parametrize("fmt", ["webdataset", "disk"])
def test_stage2a_streams_pairs_and_resumes_at_the_next_batch(tmp_path, monkeypatch, pairs, fmt, tiny_vit_dir,
                                                             tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir):
    from pipelines.stage2 import Stage2Config, run_stage2
    from vl_align.objectives import RepresentationCollator

    monkeypatch.setenv("DVLP_CACHE", str(tmp_path / "cache"))
    seen = _record_batches(monkeypatch, RepresentationCollator, "batch")

    def cfg(out):
        return load_config(Stage2Config, None, _stage2_overrides(
            pairs[fmt], fmt, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir, tmp_path / out) +
            ["eval.enabled=false"])

    straight, resumed, second, a, b = _straight_and_resumed(run_stage2, cfg, tmp_path, seen, stop=2)
    assert second["resumed_from"] == 2 and second["pairs"] is None and second["steps"] == 4
    assert [s for s, _ in straight] == [0, 1, 2, 3]
    assert resumed[2:] == straight[2:]  # after the resume: the uninterrupted run's batches, in order
    assert all(r["itc"] > 0 and r["align"] > 0 for r in b)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise on CPU
    # streamed: no feature cache was filled, the tower ran on each batch
    assert not list((tmp_path / "cache").glob("vision_features/*/keys.json"))


def test_stage2b_streams_from_a_shard_with_the_parallel_prompt_cache(tmp_path, monkeypatch, pairs, tiny_vit_dir,
                                                                     tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir):
    from pipelines.generative import GenerativeConfig, run_generative

    monkeypatch.setenv("DVLP_CACHE", str(tmp_path / "cache"))
    cfg = load_config(GenerativeConfig, None, _stage2_overrides(
        pairs["webdataset"], "webdataset", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir,
        tmp_path / "gen", steps=2) + ["eval.enabled=false", "bos_before_prefix=true",
                                      f"data.prompt_cache_source={pairs['captions']}"])
    summary = run_generative(cfg)
    assert summary["steps"] == 2 and summary["streamed"]["shards"] == 2
    rows = _rows(tmp_path / "gen")
    assert len(rows) == 2 and all(r["lm"] > 0 and r["align"] > 0 for r in rows)
    assert (tmp_path / "gen" / "front" / "model.safetensors").is_file()
    # the targets came from the digest cache of the captions file: one row per caption
    built = list((tmp_path / "cache" / "prompt_targets_streamed").glob("*/meta.json"))
    assert [json.loads(m.read_text())["num_keys"] for m in built] == [16]


def test_streamed_prompt_cache_in_parallel_matches_the_p_former(tmp_path, tiny_pformer_dir):
    import torch

    from pformer.evaluation import prompts_for
    from pformer.model import PFormer, load_pformer_tokenizer
    from pformer.targets import streamed_prompt_cache

    corpus = tmp_path / "c.txt"
    texts = [f"a caption number {i % 37}" for i in range(90)]  # 37 distinct, each several times, in every shard
    corpus.write_text("\n".join(texts) + "\n\n")
    cache = streamed_prompt_cache(tiny_pformer_dir, corpus, tmp_path / "cache", workers=2, threads=1,
                                  shard_bytes=400, batch_size=8)
    assert len(cache) == 37 and cache.meta["workers"] == 2
    distinct = sorted(set(texts))
    model, tok = PFormer.from_pretrained(tiny_pformer_dir).eval(), load_pformer_tokenizer(tiny_pformer_dir)
    with torch.no_grad():
        expected = prompts_for(model, tok, distinct, "cpu")
    torch.testing.assert_close(cache.get(distinct), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache.get(distinct[::-1]), expected.flip(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyError, match="no cached row"):
        cache.get(["a sentence not in the corpus"])
    again = streamed_prompt_cache(tiny_pformer_dir, corpus, tmp_path / "cache", workers=2)
    assert again.folder == cache.folder and not list(cache.folder.glob("part*"))  # opened, not rebuilt


@pytest.mark.slow
def test_two_ranks_stream_their_own_shards_and_resume_each_at_its_position(tmp_path, pairs, tiny_vit_dir,
                                                                         tiny_bert_dir, tiny_llm_dir,
                                                                         tiny_pformer_dir):
    """torchrun, 2 ranks on gloo: each rank reads one shard; the checkpoint keeps both positions; killed after step
    2 and resumed, the run logs the uninterrupted run's losses."""
    import os
    import socket
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent

    def run(out, *extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", DVLP_CACHE=str(tmp_path / "cache"))
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", f"--master_port={port}", "-m",
               "pipelines.cli", "stage2", *_stage2_overrides(pairs["webdataset"], "webdataset", tiny_vit_dir,
                                                             tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir,
                                                             tmp_path / out),
               "eval.enabled=false", "data.max_pairs=null", *extra]  # configs/stage2.yaml sets a subset
        proc = subprocess.run(cmd, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run("straight")
    run("split", "--stop-after", "2")
    state = json.loads((tmp_path / "split" / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert [p["rank"] for p in state["data_position"]] == [0, 1]
    assert all(p["taken"] == 2 and p["block"] == 1 for p in state["data_position"])  # 8 of 6+2 records each
    run("split", "--resume")
    a, b = _rows(tmp_path / "straight"), _rows(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
