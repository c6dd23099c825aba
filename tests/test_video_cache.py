"""The cache of what is frozen in a video front's tower (vl_align.video_cache): per (clip, frame), the hidden state after
the blocks below the first temporal module. What is proved: a cached step feeds the front what the live step feeds
it (same frames, same output, same loss and gradients); it falls back to the live tower where it is not valid and
says why; a rewritten clip is a cache miss, never a stale row; a stage-2 run with the cache trains, resumes exactly,
and ends where the live run ends."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dvlp_common.config import load_config
from tests.conftest import grey_video
from vl_align import video_cache, video_data
from vl_align.alignment import AlignmentConfig
from vl_align.fronts import FrontConfig, build_front
from vl_align.generative import GenerativeCollator, GenerativeWeights, generative_loss
from vl_align.objectives import (
    RepresentationCollator,
    RepresentationWeights,
    representation_loss,
    video_kwargs,
)
from vl_align.pairs import PairDataConfig
from vl_align.simvlg import TomeConnectorConfig
from vl_align.video import VideoConfig
from vl_align.video_data import VideoError, load_clip
from vl_align.video_inputs import VideoClipsConfig, VideoInputs, VideoSource
from vl_align.vision import VisionTower, VisionTowerConfig

TOME = TomeConnectorConfig(init_from=None, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                           num_hidden_layers=2, hidden_dropout_prob=0.0, r=2)
TINY = ["deepspeed.precision=fp32", "logging.tensorboard=false", "logging.progress_bar=false", "logging.log_every=1"]


def _video(blocks) -> VideoConfig:
    return VideoConfig(enabled=True, num_frames=4, hidden_dim=32, num_heads=4, blocks=blocks)


def _tower(tiny_vit_dir, **kw) -> VisionTower:
    return VisionTower.build(VisionTowerConfig(model=tiny_vit_dir, image_size=16, batch_size=24, **kw))


def _perturb(front, seed=3):
    """What training does to the temporal modules: α off 0 and Q/K of a size that matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in front.vision.temporal.values():
            m.alpha.fill_(0.7)
            for lin in (m.query, m.key):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))


# --------------------------------------------------------------------------- (a) same output, loss and gradients
@pytest.mark.parametrize("kind", ["tome", "qformer"])
@pytest.mark.parametrize("blocks", [[11], []], ids=["top_block", "no_modules"])
def test_cached_step_equals_the_live_step(kind, blocks, motion_cache, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                          capsys):
    from pformer.llm import FrozenLLM

    tower = _tower(tiny_vit_dir)
    video = _video(blocks)
    data = PairDataConfig(source="embedded:motion")
    source = VideoSource(data, 4, seed=0, video=video)
    pairs, _ = source.load_pairs()
    cached = source.inputs(tower, [p.image for p in pairs], verbose=True)
    assert cached.cached and f"blocks 0-{10 if blocks else 11}" in capsys.readouterr().out
    live = VideoInputs(tower, 4, train=True)
    assert not live.cached
    torch.manual_seed(0)
    front = build_front(FrontConfig(kind=kind, init_from=tiny_bert_dir, num_query_tokens=4, tome=TOME, video=video),
                        tower.hidden_size, 32, vision_tower=tower).train()
    if blocks:
        _perturb(front)
    llm = FrozenLLM.load(tiny_llm_dir)
    ids = [0, 7, 13, 21]
    batches = {}
    for name, images in (("live", live), ("cached", cached)):
        torch.manual_seed(11)  # as the training loop seeds each step
        batches[name] = GenerativeCollator(pairs, llm, 16, images)(ids, step=0)
    b_live, b_cached = batches["live"], batches["cached"]
    assert b_cached.pixel_values_videos is None and b_live.frozen_hidden_videos is None
    assert b_cached.frozen_hidden_videos.shape == (4, 4, tower.num_tokens, tower.hidden_size)
    assert b_live.pixel_values_videos.shape == (4, 4, 3, 16, 16)

    def step(batch):
        front.zero_grad()
        loss, _ = generative_loss(front, llm, batch, GenerativeWeights(), AlignmentConfig(weight=0.0))
        loss.backward()
        out = front("queries", **video_kwargs(batch))
        grads = {n: p.grad.clone() for n, p in front.named_parameters() if p.grad is not None}
        return loss.detach(), out, grads

    loss_l, out_l, grads_l = step(b_live)
    loss_c, out_c, grads_c = step(b_cached)
    torch.testing.assert_close(out_c["image_embeds"], out_l["image_embeds"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_c["prompt_pred"], out_l["prompt_pred"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_c, loss_l, atol=1e-5, rtol=1e-5)
    assert grads_l.keys() == grads_c.keys() and any(n.startswith("vision.temporal.") for n in grads_l) == bool(blocks)
    for n in grads_l:
        torch.testing.assert_close(grads_c[n], grads_l[n], atol=1e-5, rtol=1e-4, msg=n)
    if kind == "qformer":  # stage 2a's batch and objective carry the cached frames too
        from dvlp_common import zoo

        tok = zoo.load_tokenizer(tiny_bert_dir)
        index = {c: i for i, c in enumerate(dict.fromkeys(p.caption for p in pairs))}
        losses = []
        for images in (live, cached):
            torch.manual_seed(11)
            batch = RepresentationCollator(pairs, tok, 16, index, images)(ids, step=0)
            torch.manual_seed(12)
            losses.append(representation_loss(front, batch, RepresentationWeights(), AlignmentConfig(weight=0.0))[0])
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- (b) the same frames are sampled
def test_the_same_frame_indices_are_sampled(motion_cache, tmp_path, tiny_vit_dir, monkeypatch):
    tower = _tower(tiny_vit_dir)
    pairs, _ = VideoSource(PairDataConfig(source="embedded:motion"), 4, 0).load_pairs()
    paths = [p.video_path for p in pairs]
    frames = video_cache.video_frame_cache(tower, _video([11]), paths, motion_cache)
    for seed in range(3):  # the live path's indices, from the same per-clip streams
        for i, path in enumerate(paths):
            _, idx = load_clip(path, 4, "headtail", np.random.default_rng([seed, i]))
            _, n_header, n_decoded = frames.lookup(path)
            assert (n_header, n_decoded) == (8, 8)
            assert video_cache.clip_indices(n_header, n_decoded, 4, "headtail", np.random.default_rng([seed, i]),
                                            path) == idx
    # a seeded step: the cached clips are the frozen features of the frames the live step decodes, in that order
    live, cached = VideoInputs(tower, 4, train=True), VideoInputs(tower, 4, train=True, frames=frames)
    torch.manual_seed(5)
    pixels = live(paths[:6], "cpu")["pixel_values_videos"]
    torch.manual_seed(5)
    hidden = cached(paths[:6], "cpu")["frozen_hidden_videos"]
    vt = _frozen_tower(tower, [11])
    want = vt.frozen_features(pixels.flatten(0, 1)).view(hidden.shape)
    torch.testing.assert_close(hidden, want, atol=1e-5, rtol=1e-5)
    torch.manual_seed(6)
    assert not torch.equal(cached(paths[:6], "cpu")["frozen_hidden_videos"], hidden)
    # evaluation order probes permute the T axis as on pixels
    ev = VideoInputs(tower, 4, train=False, frames=frames)(paths[:3], "cpu")["frozen_hidden_videos"]
    rev = VideoInputs(tower, 4, train=False, frames=frames, frame_order="reversed")(paths[:3], "cpu")
    assert torch.equal(rev["frozen_hidden_videos"], ev.flip(1))
    ev_px = VideoInputs(tower, 4, train=False)(paths[:3], "cpu")["pixel_values_videos"]
    torch.testing.assert_close(ev, vt.frozen_features(ev_px.flatten(0, 1)).view(ev.shape), atol=1e-5, rtol=1e-5)

    # a video whose header promises 14 frames but 10 decode: load_clip samples again from 10; so does the cache
    mp4 = grey_video(tmp_path / "ten.mp4", 10)
    monkeypatch.setattr(video_data, "count_frames", lambda path: 14)
    monkeypatch.setattr(video_cache, "count_frames", lambda path: 14)
    frames = video_cache.video_frame_cache(tower, _video([11]), [str(mp4)], motion_cache)
    _, n_header, n_decoded = frames.lookup(mp4)
    assert (n_header, n_decoded) == (14, 10) and len(frames.frames) >= 10
    resampled = 0
    for seed in range(12):
        _, idx = load_clip(mp4, 4, "headtail", np.random.default_rng(seed))
        got = video_cache.clip_indices(14, 10, 4, "headtail", np.random.default_rng(seed), mp4)
        assert got == idx and max(idx) < 10
        resampled += max(video_data.sample_frame_indices(14, 4, "headtail", np.random.default_rng(seed))) >= 10
    assert 0 < resampled < 12  # both branches were taken
    torch.manual_seed(1)
    px = VideoInputs(tower, 4, train=True)([str(mp4)], "cpu")["pixel_values_videos"]
    torch.manual_seed(1)
    hd = VideoInputs(tower, 4, train=True, frames=frames)([str(mp4)], "cpu")["frozen_hidden_videos"]
    torch.testing.assert_close(hd, vt.frozen_features(px[0]).unsqueeze(0), atol=1e-5, rtol=1e-5)


def _frozen_tower(tower, blocks):
    from vl_align.video import VideoVisionTower

    return VideoVisionTower(tower, _video(blocks))


# --------------------------------------------------------------------------- (c) where the cache is not valid
def test_random_crop_or_no_cache_runs_live_and_says_why(motion_cache, tiny_vit_dir, capsys):
    tower = _tower(tiny_vit_dir)
    data = PairDataConfig(source="embedded:motion", max_pairs=6)
    paths = [p.image for p in VideoSource(data, 4, 0).load_pairs()[0]]
    cases = {
        "crop_min_scale=0.7": (tower, data.replace(video=VideoClipsConfig(crop_min_scale=0.7)), _video([11])),
        "vision.cache_features=false": (_tower(tiny_vit_dir, cache_features=False), data, _video([11])),
        "block 0": (tower, data, _video([0, 11])),
        "no front.video config": (tower, data, None),
        "would take 0.0 GiB > data.video.frame_cache_max_gib=1e-06": (
            tower, data.replace(video=VideoClipsConfig(frame_cache_max_gib=1e-6)), _video([11])),
    }
    for why, (tw, d, video) in cases.items():
        inputs = VideoSource(d, 4, 0, video=video).inputs(tw, paths, verbose=True)
        log = capsys.readouterr().out
        assert not inputs.cached and "runs live" in log and why in log, (why, log)
        torch.manual_seed(0)
        assert set(inputs(paths[:2], "cpu")) == {"pixel_values_videos"}
    assert not (motion_cache / "video_frames").exists()  # nothing was cached
    # the default on embedded:motion (no crop, cache_features on, modules above block 0): cached
    inputs = VideoSource(data, 4, 0, video=_video([11])).inputs(tower, paths, verbose=True)
    assert inputs.cached and "from the cache" in capsys.readouterr().out
    torch.manual_seed(0)
    assert set(inputs(paths[:2], "cpu")) == {"frozen_hidden_videos"}
    with pytest.raises(ValueError, match="random crop"):
        VideoInputs(tower, 4, train=True, crop_min_scale=0.7, frames=inputs.frames)


# --------------------------------------------------------------------------- (d) a rewritten clip: a miss, never stale
def test_a_rewritten_clip_is_a_cache_miss(motion_cache, tmp_path, tiny_vit_dir):
    import shutil

    from PIL import Image, ImageOps

    tower = _tower(tiny_vit_dir)
    pairs, _ = VideoSource(PairDataConfig(source="embedded:motion"), 4, 0).load_pairs()
    clips = tmp_path / "clips"
    clips.mkdir()
    paths = [str(shutil.copy(p.video_path, clips / f"{i}.png")) for i, p in enumerate(pairs[:3])]
    twin = str(shutil.copy(paths[0], clips / "twin.png"))  # the same bytes: the same rows
    vt = _frozen_tower(tower, [11])
    frames = video_cache.video_frame_cache(tower, _video([11]), [*paths, twin], motion_cache)
    assert len(frames.frames) == 3 * 8 and frames.lookup(twin)[0] == frames.lookup(paths[0])[0]
    old_digest = frames.lookup(paths[1])[0]
    live = VideoInputs(tower, 4, train=False)
    cached = VideoInputs(tower, 4, train=False, frames=frames)

    # rewrite clip 1 with other content (its colours inverted)
    ImageOps.invert(Image.open(paths[1]).convert("RGB")).save(paths[1])
    with pytest.raises(VideoError, match="changed_video.*1.png"):
        cached([paths[1]], "cpu")
    rebuilt = video_cache.video_frame_cache(tower, _video([11]), [*paths, twin], motion_cache)
    new_digest = rebuilt.lookup(paths[1])[0]
    assert new_digest != old_digest and len(rebuilt.frames) == 4 * 8  # the old rows stay, never served for it
    got = VideoInputs(tower, 4, train=False, frames=rebuilt)([paths[1]], "cpu")["frozen_hidden_videos"]
    want = vt.frozen_features(live([paths[1]], "cpu")["pixel_values_videos"][0])
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    stale = rebuilt.rows(old_digest, [0, 2, 4, 6])
    assert (stale - want).abs().max() > 1e-2  # what a stale row would have served
    # the same tower at another frozen depth, or another autocast dtype, is another folder
    other = video_cache.video_frame_cache(tower, _video([6]), paths, motion_cache)
    half = video_cache.video_frame_cache(tower, _video([11]), paths, motion_cache, dtype=torch.bfloat16)
    assert len({frames.producer, other.producer, half.producer}) == 3
    assert half.frames.array.dtype == np.float16 and frames.frames.array.dtype == np.float32


# --------------------------------------------------------------------------- (e) a stage-2 run with the cache
def _overrides(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir, out):
    return [f"vision.model={tiny_vit_dir}", "vision.image_size=16", f"llm={tiny_llm_dir}", "front.kind=qformer",
            f"front.init_from={tiny_bert_dir}", "front.num_query_tokens=4", "front.video.enabled=true",
            "front.video.num_frames=4", "front.video.hidden_dim=32", "front.video.blocks=[9,10,11]",
            "data.source=embedded:motion", "align_stats_source=embedded:motion", f"pformer={tiny_pformer_dir}",
            "align.weight=100", "optim.micro_batch_size=4", "optim.max_steps=4", "optim.warmup_steps=1",
            "optim.lr=1e-3", "logging.save_every=2", f"logging.output_dir={tmp_path / out}", "eval.enabled=false",
            "init_front=null", *TINY]


def test_stage_with_the_cache_resumes_exactly_and_ends_as_the_live_run(tmp_path, motion_cache, tiny_vit_dir,
                                                                       tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir,
                                                                       capsys):
    """test_video_pipeline's resume test with the cache on (no crop): stop after 2 steps + resume == the
    uninterrupted run; and the live run (vision.cache_features=false) ends with the same weights."""
    from pipelines.generative import GenerativeConfig, run_generative

    def run(out, *extra, **kw):
        cfg = load_config(GenerativeConfig, None, [*_overrides(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                               tiny_pformer_dir, out), *extra])
        return run_generative(cfg, **kw)

    run("whole")
    assert "from the cache" in capsys.readouterr().out
    first = run("parts", stop_after=2)
    assert first["steps"] == 2 and "front_dir" not in first
    second = run("parts", resume=True)
    assert second["resumed_from"] == 2 and second["steps"] == 4
    run("live", "vision.cache_features=false")
    assert "runs live on decoded clips (vision.cache_features=false)" in capsys.readouterr().out
    whole = load_file(str(tmp_path / "whole" / "front" / "model.safetensors"))
    parts = load_file(str(tmp_path / "parts" / "front" / "model.safetensors"))
    live = load_file(str(tmp_path / "live" / "front" / "model.safetensors"))
    assert whole.keys() == parts.keys() == live.keys() and any(k.startswith("vision.temporal.") for k in whole)
    for key in whole:
        torch.testing.assert_close(parts[key], whole[key], rtol=0, atol=1e-6, msg=key)
        torch.testing.assert_close(live[key], whole[key], rtol=0, atol=1e-5, msg=key)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("whole", "live")}
    assert all(r["align"] > 0 for r in rows["whole"])
    for a, b in zip(rows["whole"], rows["live"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
