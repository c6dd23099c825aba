"""Video data: the embedded motion set (determinism, time-reversed order pairs, the geometry its captions claim, the
corpus), the key-word metric, decoding small videos the tests encode with PyAV, frame sampling, counted skips and
the caption-file readers."""
from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dvlp_common.records import SkipReport
from tests.conftest import grey_video
from vl_align import motion
from vl_align.embedded import _norm
from vl_align.scenes import COLOURS
from vl_align.video_data import (
    FramePreprocessor,
    VideoClipDataset,
    VideoDataConfig,
    VideoError,
    collate_video_batch,
    count_frames,
    load_clip,
    load_video_pairs,
    random_crop_box,
    read_frames,
    read_video_pairs,
    sample_frame_indices,
)

SMALL = {"num_train": 60, "num_test": 30, "image_size": 64, "frames_per_clip": 8, "corpus_size": 2000}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("motion") / "motion"
    paths = motion.build_embedded_motion(out, **SMALL)
    recs = {s: [json.loads(line) for line in paths[f"pairs_{s}"].read_text(encoding="utf-8").splitlines()]
            for s in ("train", "test")}
    return paths, recs


def _frames(rec: dict) -> np.ndarray:
    """[n, S, S, 3] from the clip's filmstrip."""
    strip = np.asarray(Image.open(rec["video_path"]).convert("RGB"))
    s = strip.shape[0]
    return strip.reshape(s, -1, s, 3).transpose(1, 0, 2, 3)


def _centroid(frame: np.ndarray, colour: str) -> tuple[float, float] | None:
    ys, xs = np.nonzero((frame == np.asarray(COLOURS[colour], dtype=np.uint8)).all(-1))
    return (float(xs.mean()), float(ys.mean())) if len(xs) else None


# ----------------------------------------------------------------------------------------------------------
# the motion set
# ----------------------------------------------------------------------------------------------------------
def test_motion_build_is_deterministic_and_complete(built, tmp_path):
    paths, recs = built
    again = motion.build_embedded_motion(tmp_path / "motion", **SMALL)
    for split in ("train", "test"):
        a = paths[f"pairs_{split}"].read_text().replace(str(paths["readme"].parent), "ROOT")
        b = again[f"pairs_{split}"].read_text().replace(str(again["readme"].parent), "ROOT")
        assert a == b
    for rec in recs["train"][:12] + recs["test"][:6]:
        rel = Path(rec["video_path"]).relative_to(paths["readme"].parent)
        assert (again["readme"].parent / rel).read_bytes() == Path(rec["video_path"]).read_bytes()
    assert paths["caption_corpus"].read_bytes() == again["caption_corpus"].read_bytes()
    # a different seed draws other clips; the same parameters are returned as built (no rebuild)
    other = motion.build_embedded_motion(tmp_path / "other", **{**SMALL, "seed": 1})
    assert other["pairs_train"].read_text().replace(str(tmp_path / "other"), "") != \
        again["pairs_train"].read_text().replace(str(tmp_path / "motion"), "")
    stamp = again["build_info"].stat().st_mtime_ns
    assert motion.build_embedded_motion(tmp_path / "motion", **SMALL) == again
    assert again["build_info"].stat().st_mtime_ns == stamp
    info = json.loads(paths["build_info"].read_text())
    assert info["counts"]["pairs_train"] == 60 and info["counts"]["pairs_test"] == 30
    assert info["counts"]["families_train"] == {"order": 30, "set": 30}
    assert "embedded motion" in paths["readme"].read_text().lower()
    # every record: a caption of the space, its family's keywords in its own caption, none of its contrast's
    space = {motion.caption_of(k) for k in motion.caption_space()}
    for r in recs["train"] + recs["test"]:
        assert r["caption"] in space and r["family"] == motion.CATEGORIES[r["category"]].family
        assert motion.caption_keywords_ok(r["caption"], r["keywords"], r["contrast_keywords"])
        assert _frames(r).shape == (8, 64, 64, 3)
    with pytest.raises(ValueError, match="frames_per_clip"):
        motion.build_embedded_motion(tmp_path / "odd", **{**SMALL, "frames_per_clip": 5})


def test_order_pairs_are_time_reversals_with_the_opposite_caption(built):
    _, recs = built
    reverse = dict(motion.ORDER_PAIRS) | {b: a for a, b in motion.ORDER_PAIRS}
    pairs = itertools.groupby(recs["train"] + recs["test"], key=lambda r: r["pair_id"])
    n_order = 0
    for _, group in pairs:
        group = list(group)
        if group[0]["family"] != "order":
            continue
        a, b = group
        n_order += 1
        assert reverse[a["category"]] == b["category"] and a["caption"] != b["caption"]
        fa, fb = _frames(a), _frames(b)
        assert np.array_equal(fa[::-1], fb)  # the same frames, in the opposite order
        assert not np.array_equal(fa, fb)
    assert n_order == 15 + 8  # half of the pairs (an odd test count: the last pair is set or order)


def test_straight_moves_grows_and_colour_turns_do_what_their_captions_say(built):
    _, recs = built
    seen = set()
    for r in recs["train"] + recs["test"]:
        cat, f = r["category"], _frames(r)
        if cat in ("left", "right", "up", "down"):
            cs = [_centroid(fr, r["colour"]) for fr in f]
            xs, ys = np.array([c[0] for c in cs]), np.array([c[1] for c in cs])
            along, across = (xs, ys) if cat in ("left", "right") else (ys, xs)
            steps = np.diff(along)
            assert (steps < 0).all() if cat in ("left", "up") else (steps > 0).all(), (cat, along)
            assert np.ptp(across) == 0  # a straight move: the other coordinate never changes
            seen.add(cat)
        elif cat in ("grows", "shrinks"):
            area = [(fr == np.asarray(COLOURS[r["colour"]], np.uint8)).all(-1).sum() for fr in f]
            assert (np.diff(area) > 0).all() if cat == "grows" else (np.diff(area) < 0).all()
            seen.add(cat)
        elif cat in ("turns_blue", "turns_red"):
            first, second = ("red", "blue") if cat == "turns_blue" else ("blue", "red")
            assert all(_centroid(fr, first) and not _centroid(fr, second) for fr in f[:4])
            assert all(_centroid(fr, second) and not _centroid(fr, first) for fr in f[4:])
            seen.add(cat)
    assert {"left", "right", "up", "down"} <= seen


def test_set_family_still_clips_repeat_a_frame_of_their_positive(built):
    _, recs = built
    gap = round(motion.AROUND_GAP * 64)
    kinds = set()
    for _, group in itertools.groupby(recs["train"] + recs["test"], key=lambda r: r["pair_id"]):
        group = list(group)
        if group[0]["family"] != "set" or len(group) < 2:
            continue
        pos, still = group
        assert still["category"] == "still" and pos["category"] in motion.SET_POSITIVES
        fp, fs = _frames(pos), _frames(still)
        assert all(np.array_equal(fs[0], x) for x in fs)  # still: one frame repeated
        kinds.add(pos["category"])
        if pos["category"] == "around":  # placed where the moving shape passes
            assert any(np.array_equal(fs[0], x) for x in fp)
            cs = np.array([_centroid(fr, pos["colour"]) for fr in fp])
            for i, j in itertools.combinations(range(8), 2):  # never a straight horizontal / vertical step
                assert abs(cs[i, 0] - cs[j, 0]) >= gap - 1 and abs(cs[i, 1] - cs[j, 1]) >= gap - 1
        elif pos["category"] == "blinks":
            visible = [_centroid(fr, pos["colour"]) is not None for fr in fp]
            assert any(np.array_equal(fs[0], x) for x, v in zip(fp, visible) if v)
            # every head-tail sample of 2 + 2 frames shows the shape and its absence
            for h in itertools.combinations(range(4), 2):
                for t in itertools.combinations(range(4, 8), 2):
                    assert len({visible[i] for i in h + t}) == 2
        else:  # changes colour: a different colour in every frame, never the colour turn's red or blue
            colours = [next(c for c in COLOURS if _centroid(fr, c)) for fr in fp]
            assert len(set(colours)) == 8 and not {"red", "blue"} & set(colours)
            assert any(np.array_equal(fs[0], x) for x in fp)
    assert kinds == set(motion.SET_POSITIVES)


def test_corpus_holds_no_test_caption_and_outnumbers_the_pairs(built):
    paths, recs = built
    corpus = paths["caption_corpus"].read_text().splitlines()
    assert len(corpus) == 2000 > len(recs["train"]) and len(set(corpus)) == len(corpus)
    assert not {_norm(c) for c in corpus} & {_norm(r["caption"]) for r in recs["test"]}
    assert {r["caption"] for r in recs["train"]} & set(corpus)  # non-test train captions are in it
    # the default size fits the templates, and excluding every test caption is enforced
    full = motion.build_motion_corpus({"a red circle moves left"}, motion.DEFAULTS["corpus_size"], 0)
    assert len(full) == motion.DEFAULTS["corpus_size"] and "a red circle moves left" not in full


def test_keyword_accuracy_by_hand():
    recs = [
        {"video_id": "a", "family": "order", "category": "left", "keywords": ["left"], "contrast_keywords": ["right"]},
        {"video_id": "b", "family": "order", "category": "turns_blue", "keywords": ["turns blue"],
         "contrast_keywords": ["turns red"]},
        {"video_id": "c", "family": "order", "category": "appears", "keywords": ["appears"],
         "contrast_keywords": ["disappears"]},
        {"video_id": "d", "family": "set", "category": "still", "keywords": ["still"],
         "contrast_keywords": ["around", "blinks", "changes"]},
        {"video_id": "e", "family": "set", "category": "blinks", "keywords": ["blinks"], "contrast_keywords": ["still"]},
    ]
    preds = ["A red circle moves LEFT.",  # right (case, punctuation ignored)
             "a red star turns from red to blue",  # wrong: "turns blue" is not said as a phrase
             "a green cross disappears",  # wrong: "appears" is only inside "disappears"
             "a square stays still",  # right
             "a circle blinks and stays still"]  # wrong: the contrast word too
    assert motion.keyword_accuracy(preds, recs) == {"all": 2 / 5, "order": 1 / 3, "set": 1 / 2}
    by_cat = motion.keyword_accuracy(dict(zip("abcde", preds)), recs, by="category")
    assert by_cat == {"all": 0.4, "appears": 0.0, "blinks": 0.0, "left": 1.0, "still": 1.0, "turns_blue": 0.0}
    with pytest.raises(ValueError, match="2 predictions for 5"):
        motion.keyword_accuracy(preds[:2], recs)
    with pytest.raises(KeyError):
        motion.keyword_accuracy({"a": "x"}, recs)


# ----------------------------------------------------------------------------------------------------------
# decoding and sampling
# ----------------------------------------------------------------------------------------------------------



def _index_of(frame: Image.Image) -> int:
    return round((np.asarray(frame, dtype=np.float64).mean() - 10) / 20)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    out = {ext: grey_video(d / f"ten{ext}", 10, codec) for ext, codec in
           ((".mp4", "libx264"), (".webm", "libvpx"), (".avi", "mpeg4"))}
    out["short"] = grey_video(d / "short.mp4", 3, "libx264")
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    out["broken"] = d / "broken.mp4"
    good = out[".mp4"].read_bytes()
    out["truncated"] = d / "truncated.mp4"
    out["truncated"].write_bytes(good[: len(good) // 2])
    frames = d / "frames"
    frames.mkdir()
    for i in range(10):  # natural order: frame_2 before frame_10
        Image.fromarray(np.full((16, 16, 3), 10 + 20 * i, np.uint8)).save(frames / f"frame_{i + 1}.png")
    out["folder"] = frames
    return out


@pytest.mark.parametrize("kind", [".mp4", ".webm", ".avi", "folder"])
def test_decode_counts_and_reads_the_right_frames(videos, kind):
    path = videos[kind]
    assert count_frames(path) == 10
    frames = read_frames(path, [0, 3, 3, 9])
    assert [_index_of(f) for f in frames] == [0, 3, 3, 9] and frames[0].mode == "RGB"
    frames, idx = load_clip(path, 4, "uniform")
    assert idx == [0, 2, 5, 7] and [_index_of(f) for f in frames] == idx


def test_filmstrip_is_a_video(built):
    _, recs = built
    rec = recs["train"][0]
    assert count_frames(rec["video_path"]) == 8
    frames = read_frames(rec["video_path"], [1, 6])
    assert np.array_equal(np.asarray(frames[1]), _frames(rec)[6])
    with pytest.raises(VideoError, match="too_short"):
        read_frames(rec["video_path"], [8])


def test_frame_sampling_indices():
    assert sample_frame_indices(10, 4, "uniform") == [0, 2, 5, 7]
    assert sample_frame_indices(8, 4, "uniform") == [0, 2, 4, 6]
    assert sample_frame_indices(4, 4, "uniform") == [0, 1, 2, 3]
    seen = set()
    for seed in range(200):
        idx = sample_frame_indices(10, 4, "headtail", np.random.default_rng(seed))
        assert idx == sorted(idx) and len(set(idx)) == 4
        assert all(i < 5 for i in idx[:2]) and all(5 <= i < 10 for i in idx[2:])  # 2 from each half
        seen.add(tuple(idx))
    assert len(seen) > 50  # random, not a fixed pattern
    assert sample_frame_indices(10, 4, "headtail", np.random.default_rng(3)) == \
        sample_frame_indices(10, 4, "headtail", np.random.default_rng(3))
    six = sample_frame_indices(9, 6, "headtail", np.random.default_rng(0))  # T = 6: 3 from [0, 4), 3 from [4, 9)
    assert all(i < 4 for i in six[:3]) and all(4 <= i for i in six[3:])
    assert sample_frame_indices(4, 4, "headtail", np.random.default_rng(0)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="3 frames available, 4 asked"):
        sample_frame_indices(3, 4, "uniform")


def test_random_crop_box_is_inside_and_scaled():
    rng = np.random.default_rng(0)
    for _ in range(100):
        left, top, right, bottom = random_crop_box(64, 48, rng, min_scale=0.5)
        assert 0 <= left < right <= 64 and 0 <= top < bottom <= 48
        assert 0.45 <= (right - left) * (bottom - top) / (64 * 48) <= 1.0


def test_header_count_above_decodable_frames_is_resampled(videos, monkeypatch):
    # a container that promises 14 frames but decodes 10 (as some AVI headers do): counted again by decoding
    from vl_align import video_data

    monkeypatch.setattr(video_data, "count_frames", lambda path: 14)
    frames, idx = video_data.load_clip(videos[".mp4"], 4, "uniform")
    assert idx == [0, 2, 5, 7] and [_index_of(f) for f in frames] == idx


def test_broken_short_and_missing_videos_are_counted_skips_naming_the_file(videos, tmp_path):
    ann = tmp_path / "pairs.jsonl"
    rows = [{"video_path": str(videos[".mp4"]), "caption": "ten grey frames"},
            {"video_path": str(videos[".webm"]), "caption": "ten grey frames, webm", "video_id": "w"},
            {"video_path": str(videos["broken"]), "caption": "broken"},
            {"video_path": str(videos["truncated"]), "caption": "truncated"},
            {"video_path": str(videos["short"]), "caption": "three frames"},
            {"video_path": "nowhere.mp4", "caption": "missing"},
            {"video_path": str(videos[".avi"]), "caption": "   "}]
    ann.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    report = SkipReport(max_skip_fraction=1.0)
    pairs = read_video_pairs(ann, report=report, verify=True, min_frames=4)
    assert [p.caption for p in pairs] == ["ten grey frames", "ten grey frames, webm"]
    assert pairs[1].video_id == "w" and pairs[0].video_id == str(videos[".mp4"])
    assert dict(report.counts) == {"corrupt_video": 2, "too_short": 1, "missing_video": 1, "empty_caption": 1,
                                   "invalid_json": 1}
    ex = report.examples
    assert "broken.mp4" in ex["corrupt_video"][0] and "truncated.mp4" in ex["corrupt_video"][1]
    assert "short.mp4" in ex["too_short"][0] and "3 frames" in ex["too_short"][0]
    assert "nowhere.mp4" in ex["missing_video"][0] and f"{ann}:6" in ex["missing_video"][0]
    # unverified, the broken file is kept and decoding it is one error naming it
    kept = read_video_pairs(ann, report=SkipReport(max_skip_fraction=1.0))
    assert len(kept) == 5
    with pytest.raises(VideoError, match="broken.mp4"):
        load_clip(videos["broken"], 4, "uniform")
    with pytest.raises(VideoError, match="too_short.*short.mp4"):
        load_clip(videos["short"], 4, "uniform")
    # past the threshold the load aborts
    with pytest.raises(ValueError, match="skipped 6 of 8 records"):
        read_video_pairs(ann, report=SkipReport(max_skip_fraction=0.5), verify=True, min_frames=4)


# ----------------------------------------------------------------------------------------------------------
# caption files
# ----------------------------------------------------------------------------------------------------------
def test_msrvtt_vatex_msvd_and_caption_list_readers(videos, tmp_path):
    root = tmp_path / "vids"
    root.mkdir()
    for name in ("video0.mp4", "video1.webm", "abc_000010_000020.mp4", "-4wsuPCjDBc_5_15.avi"):
        (root / name).write_bytes(Path(videos["." + name.rsplit(".", 1)[1]]).read_bytes())
    msrvtt = tmp_path / "msrvtt.json"
    msrvtt.write_text(json.dumps({
        "videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video1", "split": "validate"},
                   {"video_id": "video9", "split": "train"}],
        "sentences": [{"video_id": "video0", "caption": "a man is cooking", "sen_id": 0},
                      {"video_id": "video0", "caption": "someone cooks", "sen_id": 1},
                      {"video_id": "video1", "caption": "a dog runs", "sen_id": 2},
                      {"video_id": "video9", "caption": "not downloaded", "sen_id": 3},
                      {"video_id": "video7", "caption": "no such video", "sen_id": 4}]}))
    rep = SkipReport(max_skip_fraction=1.0)
    train = read_video_pairs(msrvtt, video_root=root, split="train", report=rep)
    assert [(p.video_id, p.caption) for p in train] == [("video0", "a man is cooking"), ("video0", "someone cooks")]
    assert train[0].video_path == str(root / "video0.mp4") and train[0].meta == {"split": "train"}
    assert dict(rep.counts) == {"missing_video": 1, "unknown_video_id": 1}
    assert "video9" in rep.examples["missing_video"][0]
    every = read_video_pairs(msrvtt, video_root=root, report=SkipReport(max_skip_fraction=1.0))
    assert [p.video_id for p in every] == ["video0", "video0", "video1"]
    assert every[2].video_path.endswith("video1.webm")

    vatex = tmp_path / "vatex_training.json"
    vatex.write_text(json.dumps([{"videoID": "abc_000010_000020", "enCap": ["a girl sings", "she sings a song"],
                                  "chCap": ["..."]}, {"videoID": "zzz", "enCap": ["gone"]}, {"enCap": ["no id"]}]))
    rep = SkipReport(max_skip_fraction=1.0)
    pairs = read_video_pairs(vatex, video_root=root, report=rep)
    assert [p.caption for p in pairs] == ["a girl sings", "she sings a song"]
    assert dict(rep.counts) == {"missing_video": 1, "malformed_video_entry": 1}

    csv_path = tmp_path / "video_corpus.csv"
    csv_path.write_text("VideoID,Start,End,WorkerID,Source,AnnotationTime,Language,Description\n"
                        "-4wsuPCjDBc,5,15,1,clean,10,English,a man is slicing a tomato\n"
                        "-4wsuPCjDBc,5,15,2,clean,10,German,ein Mann\n"
                        "-4wsuPCjDBc,5,15,3,unverified,10,English,\n")
    rep = SkipReport(max_skip_fraction=1.0)
    pairs = read_video_pairs(csv_path, video_root=root, report=rep)
    assert [(p.video_id, p.caption) for p in pairs] == [("-4wsuPCjDBc_5_15", "a man is slicing a tomato")]
    assert pairs[0].video_path.endswith("-4wsuPCjDBc_5_15.avi") and dict(rep.counts) == {"empty_caption": 1}

    txt = tmp_path / "AllVideoDescriptions.txt"
    txt.write_text("# comment line\n\n-4wsuPCjDBc_5_15 a man slices a tomato\nabc_000010_000020 a girl sings\n")
    pairs = read_video_pairs(txt, video_root=root)
    assert [p.caption for p in pairs] == ["a man slices a tomato", "a girl sings"]

    lavis = tmp_path / "cap_test.json"
    lavis.write_text(json.dumps([{"video": "-4wsuPCjDBc_5_15.avi", "caption": ["one", "two"]},
                                 {"video": "video0.mp4", "caption": "three"}]))
    pairs = read_video_pairs(lavis, video_root=root)
    assert [(p.video_id, p.caption) for p in pairs] == [("-4wsuPCjDBc_5_15", "one"), ("-4wsuPCjDBc_5_15", "two"),
                                                        ("video0", "three")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="bad.json"):
        read_video_pairs(bad)


# ----------------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------------
def test_embedded_motion_batches(tmp_path, monkeypatch, videos, tiny_dinov2_tower):
    from vl_align import sources

    monkeypatch.setenv("DVLP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(motion, "build_embedded_motion", functools.partial(motion.build_embedded_motion, **SMALL))
    assert "motion" in sources.EMBEDDED
    files = sources.embedded_files("motion")
    assert files["pairs_train"].parent == tmp_path / "cache" / "data" / "motion"
    assert sources.resolve_text_source("embedded:motion") == files["caption_corpus"]

    cfg = VideoDataConfig(num_frames=4, crop_min_scale=0.8)
    pairs, report = load_video_pairs(cfg, "train")
    assert len(pairs) == 60 and report.total == 0
    assert {p.meta["family"] for p in pairs} == {"order", "set"} and pairs[0].meta["keywords"]
    tower = tiny_dinov2_tower
    prep = FramePreprocessor.from_tower(tower)
    ds = VideoClipDataset.from_config(pairs, cfg, prep, tower.image_size, train=True, seed=0)
    batch = collate_video_batch([ds[i] for i in range(3)])
    assert batch["pixel_values_videos"].shape == (3, 4, 3, 16, 16)
    assert batch["captions"] == [p.caption for p in pairs[:3]]
    assert all(idx[1] < 4 <= idx[2] for idx in batch["frame_indices"])  # head-tail over 8 stored frames
    # the same seed and epoch give the same clip; another epoch draws other frames or another crop
    assert torch.equal(ds[5]["pixel_values"], ds[5]["pixel_values"])
    first = [ds[i]["pixel_values"] for i in range(6)]
    ds.set_epoch(1)
    assert any(not torch.equal(a, ds[i]["pixel_values"]) for i, a in enumerate(first))
    # evaluation: uniform frames, no crop, exactly the tower's own preprocessing of those frames
    test_pairs, _ = load_video_pairs(cfg, "test")
    ev = VideoClipDataset.from_config(test_pairs, cfg, prep, tower.image_size, train=False, seed=0)
    item = ev[0]
    assert item["frame_indices"] == [0, 2, 4, 6]
    assert torch.equal(item["pixel_values"], tower.preprocess(read_frames(test_pairs[0].video_path, [0, 2, 4, 6])))

    # one crop shared by all frames: a clip of identical frames stays identical after the crop
    still = next(p for p in pairs if p.meta["category"] == "still")
    crop = VideoClipDataset([still], prep, tower.image_size, num_frames=4, train=True, seed=3, crop_min_scale=0.5)
    px = crop[0]["pixel_values"]
    assert all(torch.equal(px[0], px[t]) for t in range(4))
    assert not torch.equal(px[0], ev.preprocess(read_frames(still.video_path, [0]))[0])  # it did crop

    # a real video file through the same dataset
    real = VideoClipDataset(read_video_pairs(_jsonl(tmp_path, videos[".webm"])), prep, tower.image_size,
                            num_frames=4)
    assert real[0]["pixel_values"].shape == (4, 3, 16, 16) and real[0]["frame_indices"] == [0, 2, 5, 7]


def _jsonl(tmp_path: Path, video: Path) -> Path:
    p = tmp_path / "real.jsonl"
    p.write_text(json.dumps({"video_path": str(video), "caption": "grey frames"}) + "\n")
    return p


def test_video_data_config_rejects_image_sets():
    with pytest.raises(ValueError, match="embedded:scenes is not a video data set"):
        VideoDataConfig(source="embedded:scenes")


@pytest.fixture(scope="module")
def tiny_dinov2_tower(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    from vl_align.vision import VisionTower, VisionTowerConfig

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=4,
                       image_size=16)
    cfg.image_mean, cfg.image_std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    out = tmp_path_factory.mktemp("tiny_dinov2_video")
    Dinov2Model(cfg).save_pretrained(out)
    return VisionTower.build(VisionTowerConfig(model=str(out), image_size=16))
