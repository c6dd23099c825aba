"""Data loaders: skip accounting, text corpora, image-text pairs, webdataset shards, the embedded easy-VQA set.

The fast tests build tiny inputs in tmp_path; the ``slow`` ones read the installed easy-vqa package.
"""

from __future__ import annotations

import io
import json
import tarfile
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pformer.data import load_text_corpus
from dvlp_common.records import SkipReport, TooManySkippedRecords
from vl_align.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    expand_shards,
    load_image,
    load_image_text_pairs,
    verify_image,
)

LENIENT = 1.0  # max_skip_fraction that never aborts, for tests that count skips in tiny files


# ----------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------
def _png_bytes(colour=(255, 0, 0), size=(12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _jpg_bytes(colour=(0, 0, 255), size=(12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def images(tmp_path):
    """good.png, good2.jpg, sub/good3.png, truncated.png (cut in half), fake.png (a text file)."""
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    (d / "good.png").write_bytes(_png_bytes())
    (d / "good2.jpg").write_bytes(_jpg_bytes())
    (d / "sub" / "good3.png").write_bytes(_png_bytes((0, 255, 0)))
    rng = np.random.default_rng(0)
    noisy = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noisy, "PNG")
    (d / "truncated.png").write_bytes(noisy.getvalue()[: len(noisy.getvalue()) // 2])
    (d / "fake.png").write_text("this is not an image\n")
    return d


def _write_lines(path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _reasons(report: SkipReport) -> dict[str, int]:
    return dict(report.counts)


# ----------------------------------------------------------------------------------------------------------
# SkipReport
# ----------------------------------------------------------------------------------------------------------
def test_skip_report_counts_examples_merge_and_threshold():
    r = SkipReport(max_skip_fraction=0.25, max_examples=2)
    for i in range(3):
        r.skip("empty_caption", f"a.jsonl:{i + 1}")
    r.skip("invalid_json", "a.jsonl:9")
    assert r.total == 4 and r.counts["empty_caption"] == 3
    assert r.examples["empty_caption"] == ["a.jsonl:1", "a.jsonl:2"]  # first few only
    s = r.summary()
    assert "empty_caption: 3" in s and "a.jsonl:1" in s and "invalid_json: 1" in s
    d = r.as_dict()
    assert d["total"] == 4 and d["counts"] == {"empty_caption": 3, "invalid_json": 1}

    other = SkipReport()
    other.skip("missing_image", "b.json:annotations[3]")
    r.merge(other)
    assert r.total == 5 and r.counts["missing_image"] == 1

    r.check(20)  # 5/20 = 25%: not above the threshold
    with pytest.raises(TooManySkippedRecords, match="missing_image") as e:
        r.check(19)
    assert isinstance(e.value, ValueError)
    SkipReport().check(0)  # nothing skipped, nothing read: fine


# ----------------------------------------------------------------------------------------------------------
# text corpora
# ----------------------------------------------------------------------------------------------------------
def test_text_txt_counts_blank_and_invalid_utf8_lines(tmp_path):
    p = tmp_path / "corpus.txt"
    _write_lines(p, [b"a red circle is here", b"", b"  ", b"bad \xff\xfe bytes", b"caf\xc3\xa9 au lait", b"  padded  "])
    rep = SkipReport(max_skip_fraction=LENIENT)
    ds = load_text_corpus(p, report=rep)
    assert isinstance(ds, datasets.Dataset) and ds.column_names == ["text"]
    assert ds["text"] == ["a red circle is here", "café au lait", "padded"]
    assert _reasons(rep) == {"empty_line": 2, "invalid_utf8": 1}
    assert rep.examples["empty_line"] == [f"{p}:2", f"{p}:3"]
    assert rep.examples["invalid_utf8"][0].startswith(f"{p}:4")

    assert load_text_corpus(p, max_records=2, report=SkipReport(max_skip_fraction=LENIENT))["text"] == [
        "a red circle is here",
        "café au lait",
    ]


def test_text_jsonl_bad_lines_are_counted(tmp_path):
    p = tmp_path / "corpus.jsonl"
    _write_lines(
        p,
        [
            json.dumps({"text": "first sentence"}).encode(),
            b"{not json",
            json.dumps({"other": "no text field"}).encode(),
            json.dumps({"text": "   "}).encode(),
            b'{"text": "bad \xff byte"}',
            json.dumps({"text": "second", "extra": 1}).encode(),
            json.dumps({"body": "custom field"}).encode(),
        ],
    )
    rep = SkipReport(max_skip_fraction=LENIENT)
    ds = load_text_corpus(p, report=rep)
    assert ds["text"] == ["first sentence", "second"]
    assert _reasons(rep) == {"invalid_json": 1, "missing_field:text": 2, "empty_text": 1, "invalid_utf8": 1}
    assert rep.examples["invalid_json"] == [f"{p}:2"]
    assert rep.examples["empty_text"] == [f"{p}:4"]
    assert rep.examples["invalid_utf8"][0].startswith(f"{p}:5")

    ds = load_text_corpus(p, fmt="jsonl", text_field="body", report=SkipReport(max_skip_fraction=LENIENT))
    assert ds["text"] == ["custom field"]


def test_text_saved_dataset_and_missing_column(tmp_path):
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"sentence": ["one", "", "two", "three"], "n": [1, 2, 3, 4]}).save_to_disk(str(folder))
    rep = SkipReport(max_skip_fraction=LENIENT)
    ds = load_text_corpus(folder, text_field="sentence", report=rep)
    assert ds.column_names == ["text"] and ds["text"] == ["one", "two", "three"]
    assert rep.counts["empty_text"] == 1 and rep.examples["empty_text"] == [f"{folder}[row 1]"]
    with pytest.raises(ValueError, match=r"no column 'text'.*\['sentence', 'n'\]"):
        load_text_corpus(folder)


def test_text_missing_path_and_unknown_format(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text_corpus(missing)
    odd = tmp_path / "corpus.csv"
    odd.write_text("a,b\n")
    with pytest.raises(ValueError, match="corpus.csv"):
        load_text_corpus(odd)


def test_text_threshold_aborts(tmp_path):
    p = tmp_path / "mostly_blank.txt"
    _write_lines(p, [b"one", b"", b"", b"two"])
    with pytest.raises(TooManySkippedRecords, match=r"skipped 2 of 4"):
        load_text_corpus(p)  # default 5%
    rep = SkipReport(max_skip_fraction=0.5)
    assert len(load_text_corpus(p, report=rep)) == 2 and rep.total == 2


# ----------------------------------------------------------------------------------------------------------
# image-text pairs
# ----------------------------------------------------------------------------------------------------------
def test_verify_image_reasons(images):
    assert verify_image(images / "good.png") is None
    assert verify_image(images / "good2.jpg") is None
    assert verify_image((images / "good.png").read_bytes()) is None
    assert verify_image(images / "missing.png") == "missing_image"
    assert verify_image(images / "truncated.png") == "corrupt_image"
    assert verify_image(images / "fake.png") == "not_an_image"


def test_pairs_jsonl_every_bad_record_kind_is_counted(tmp_path, images):
    p = images / "pairs.jsonl"  # relative paths resolve against the jsonl's folder
    _write_lines(
        p,
        [
            json.dumps({"image": "good.png", "caption": "a red box", "image_id": 7}).encode(),  # 1
            json.dumps({"image": "sub/good3.png", "caption": " a green box "}).encode(),  # 2
            json.dumps({"image": "missing.png", "caption": "gone"}).encode(),  # 3
            json.dumps({"image": "truncated.png", "caption": "cut"}).encode(),  # 4
            json.dumps({"image": "fake.png", "caption": "text renamed png"}).encode(),  # 5
            json.dumps({"image": "good.png", "caption": "   "}).encode(),  # 6
            b'{"image": "good.png", "caption": "bad \xff utf8"}',  # 7
            b"this is not json",  # 8
            json.dumps({"image_path": str(images / "good2.jpg"), "caption": "absolute path"}).encode(),  # 9
        ],
    )
    rep = SkipReport(max_skip_fraction=LENIENT)
    ds = load_image_text_pairs(p, report=rep)
    assert ds.column_names == ["image_path", "caption", "image_id"]
    assert ds["caption"] == ["a red box", "a green box", "absolute path"]
    assert ds["image_path"] == [str(images / "good.png"), str(images / "sub" / "good3.png"), str(images / "good2.jpg")]
    assert ds["image_id"] == ["7", "sub/good3.png", str(images / "good2.jpg")]
    assert _reasons(rep) == {
        "missing_image": 1,
        "corrupt_image": 1,
        "not_an_image": 1,
        "empty_caption": 1,
        "invalid_utf8": 1,
        "invalid_json": 1,
    }
    assert rep.examples["missing_image"][0].startswith(f"{p}:3")
    assert rep.examples["corrupt_image"][0].startswith(f"{p}:4")
    assert rep.examples["not_an_image"][0].startswith(f"{p}:5")
    assert rep.examples["empty_caption"] == [f"{p}:6"]
    assert rep.examples["invalid_utf8"][0].startswith(f"{p}:7")
    assert rep.examples["invalid_json"] == [f"{p}:8"]

    # same file, default threshold: 6 of 9 bad -> abort naming the reasons
    with pytest.raises(TooManySkippedRecords, match="corrupt_image"):
        load_image_text_pairs(p)
    # without verification only the text-level problems are skips
    rep2 = SkipReport(max_skip_fraction=LENIENT)
    assert len(load_image_text_pairs(p, report=rep2, verify_images=False)) == 6
    assert set(rep2.counts) == {"empty_caption", "invalid_utf8", "invalid_json"}


def test_pairs_jsonl_image_root_and_max_records(tmp_path, images):
    p = tmp_path / "elsewhere" / "pairs.jsonl"
    p.parent.mkdir()
    _write_lines(p, [json.dumps({"image": n, "caption": f"c{i}"}).encode() for i, n in enumerate(["good.png", "good2.jpg"])])
    ds = load_image_text_pairs(p, image_root=images, max_records=1)
    assert ds["image_path"] == [str(images / "good.png")]


def _coco(images_list, annotations) -> dict:
    return {"info": {}, "images": images_list, "annotations": annotations}


def test_pairs_coco_loads_and_counts(tmp_path, images):
    p = tmp_path / "captions.json"
    data = _coco(
        [{"id": 1, "file_name": "good.png"}, {"id": 2, "file_name": "good2.jpg"}, {"id": 3, "file_name": "missing.png"}],
        [
            {"id": 10, "image_id": 1, "caption": "a red box"},
            {"id": 11, "image_id": 1, "caption": "red square"},
            {"id": 12, "image_id": 2, "caption": "a blue box"},
            {"id": 13, "image_id": 3, "caption": "no file"},
            {"id": 14, "image_id": 2, "caption": ""},
            {"id": 15, "image_id": 99, "caption": "unknown image"},
        ],
    )
    p.write_text(json.dumps(data))
    rep = SkipReport(max_skip_fraction=LENIENT)
    ds = load_image_text_pairs(p, image_root=images, report=rep)
    assert len(ds) == 3 and ds["image_id"] == ["1", "1", "2"]
    assert ds["image_path"][2] == str(images / "good2.jpg")
    assert _reasons(rep) == {"missing_image": 1, "empty_caption": 1, "unknown_image_id": 1}
    assert rep.examples["missing_image"][0].startswith(f"{p}:annotations[3]")


@pytest.mark.parametrize(
    "data, key, where",
    [
        ({"images": []}, "annotations", "top-level"),
        (_coco([{"id": 1}], []), "file_name", "images[0]"),
        (_coco([{"id": 1, "file_name": "good.png"}], [{"image_id": 1, "caption": "ok"}, {"image_id": 1}]), "caption", "annotations[1]"),
    ],
)
def test_pairs_coco_missing_key_is_one_clear_error(tmp_path, images, data, key, where):
    p = tmp_path / "broken.json"
    p.write_text(json.dumps(data))
    with pytest.raises(ValueError) as e:
        load_image_text_pairs(p, image_root=images)
    msg = str(e.value)
    assert str(p) in msg and where in msg and repr(key) in msg


def test_pairs_coco_unreadable_and_missing(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        load_image_text_pairs(p)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        load_image_text_pairs(tmp_path / "absent.json")


def test_pairs_saved_dataset_keeps_pil_images(tmp_path, images):
    folder = tmp_path / "saved_pairs"
    paths = [str(images / n) for n in ("good.png", "truncated.png", "good2.jpg", "sub/good3.png")]
    ds = datasets.Dataset.from_dict({"img": paths, "text": ["red", "cut", "", "green"]}).cast_column("img", datasets.Image())
    ds.save_to_disk(str(folder))  # embeds the bytes
    rep = SkipReport(max_skip_fraction=LENIENT)
    out = load_image_text_pairs(folder, image_field="img", caption_field="text", report=rep)
    assert out.column_names == ["image", "caption", "image_id"]
    assert isinstance(out.features["image"], datasets.Image)
    assert out["caption"] == ["red", "green"] and out["image_id"] == ["0", "3"]
    assert isinstance(out[0]["image"], Image.Image) and out[0]["image"].size == (12, 8)
    assert _reasons(rep) == {"corrupt_image": 1, "empty_caption": 1}
    assert rep.examples["corrupt_image"] == [f"{folder}[row 1]"]
    with pytest.raises(ValueError, match=r"no caption column 'caption'.*\['img', 'text'\]"):
        load_image_text_pairs(folder, image_field="img")
    # undecoded (what training keeps): the files' bytes as stored
    raw = load_image_text_pairs(folder, image_field="img", caption_field="text",
                                report=SkipReport(max_skip_fraction=LENIENT), decode_images=False)
    assert [r["image"]["bytes"] for r in raw] == [(images / n).read_bytes() for n in ("good.png", "sub/good3.png")]


def _make_shards(root, n_shards=2, per_shard=3, bad=None):
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(root / f"{s:03d}.tar", "w") as tf:
            for k in range(per_shard):
                key = f"{s:03d}{k:03d}"
                img = b"plain text, not a jpeg" if key == bad else _jpg_bytes((40 * k, 0, 255 - 40 * k))
                for name, payload in ((f"{key}.jpg", img), (f"{key}.txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))


def test_webdataset_streams_and_splits_across_ranks(tmp_path):
    _make_shards(tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "{000..001}.tar")
    assert expand_shards(pattern) == [str(tmp_path / "shards" / "000.tar"), str(tmp_path / "shards" / "001.tar")]
    full = load_image_text_pairs(pattern)
    assert isinstance(full, datasets.IterableDataset)
    all_rows = list(full)
    assert [r["image_id"] for r in all_rows] == ["000000", "000001", "000002", "001000", "001001", "001002"]
    assert all_rows[0]["caption"] == "caption 000000" and isinstance(all_rows[0]["image"], Image.Image)

    per_rank = [{r["image_id"] for r in load_image_text_pairs(pattern, rank=rank, world_size=2)} for rank in range(2)]
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == {r["image_id"] for r in all_rows}

    # a list of shards works too, and max_records caps per rank
    assert len(list(load_image_text_pairs(expand_shards(pattern), fmt="webdataset", max_records=2))) == 2
    # undecoded: the member's bytes as stored
    raw = list(load_image_text_pairs(pattern, decode_images=False))
    assert [r["image_id"] for r in raw] == [r["image_id"] for r in all_rows]
    assert raw[1]["image"] == {"bytes": _jpg_bytes((40, 0, 215)), "path": "000001.jpg"}


def test_webdataset_bad_sample_is_counted_and_missing_shard_errors(tmp_path):
    _make_shards(tmp_path / "shards", bad="001001")
    rep = SkipReport(max_skip_fraction=LENIENT)
    ids = [r["image_id"] for r in load_image_text_pairs(str(tmp_path / "shards" / "*.tar"), report=rep)]
    assert "001001" not in ids and len(ids) == 5
    assert rep.counts == {"not_an_image": 1} and rep.examples["not_an_image"][0].endswith("001.tar:001001")
    with pytest.raises(FileNotFoundError, match="002.tar"):
        load_image_text_pairs(str(tmp_path / "shards" / "{000..002}.tar"))


def test_webdataset_threshold_aborts_while_streaming(tmp_path, monkeypatch):
    import vl_align.data as vd

    monkeypatch.setattr(vd, "STREAM_CHECK_AFTER", 3)  # judge after 3 samples instead of 100
    _make_shards(tmp_path / "shards", bad="000001")
    with pytest.raises(TooManySkippedRecords, match="not_an_image"):
        list(load_image_text_pairs(str(tmp_path / "shards" / "*.tar")))  # 1 of 3 > 5%


# ----------------------------------------------------------------------------------------------------------
# load_image
# ----------------------------------------------------------------------------------------------------------
def test_load_image_shape_and_normalisation(images, tmp_path):
    t = load_image(images / "good.png", 16)  # solid red 12x8, upscaled
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    expected = (np.array([1.0, 0.0, 0.0]) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert torch.allclose(t.mean(dim=(1, 2)), torch.tensor(expected, dtype=torch.float32), atol=1e-4)
    t2 = load_image(images / "good.png", 16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert torch.allclose(t2[:, 5, 5], torch.tensor([1.0, -1.0, -1.0]), atol=1e-4)
    # PIL input (grey, non-square) gives the same as its path; shorter side resized, centre crop
    arr = np.zeros((20, 40), dtype=np.uint8)
    arr[:, :10] = 255  # white left quarter, cropped away by the centre crop
    grey = Image.fromarray(arr, mode="L")
    grey.save(tmp_path / "grey.png")
    a = load_image(grey, 8, mean=(0, 0, 0), std=(1, 1, 1))
    b = load_image(tmp_path / "grey.png", 8, mean=(0, 0, 0), std=(1, 1, 1))
    assert a.shape == (3, 8, 8) and torch.allclose(a, b)
    assert a[:, :, 4:].abs().max() < 1e-3  # right part of the crop is black
    assert a.min() >= -0.05 and a.max() <= 1.05


# ----------------------------------------------------------------------------------------------------------
# embedded easy-VQA
# ----------------------------------------------------------------------------------------------------------
def test_embedded_missing_package_error(monkeypatch):
    import importlib.util

    from vl_align import embedded

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "easy_vqa" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps easy-vqa"):
        embedded.easy_vqa_data_dir()


def test_derive_colour_shape_rules():
    from vl_align.embedded import derive_colour_shape

    d = derive_colour_shape([("what color is the shape?", "red"), ("what shape is present?", "circle")])
    assert (d["colour"], d["shape"], d["colour_how"], d["shape_how"]) == ("red", "circle", "direct", "direct")
    d = derive_colour_shape([("what is the blue shape?", "triangle")])  # colour presupposed by the question
    assert (d["colour"], d["shape"], d["colour_how"]) == ("blue", "triangle", "presupposed")
    d = derive_colour_shape([("is there not a teal shape?", "no"), ("does the image contain a circle?", "no")])
    assert d["colour"] == "teal" and d["shape"] is None and d["shape_how"] == "undetermined"
    d = derive_colour_shape([("is no circle present?", "yes"), ("is there a triangle?", "no"), ("is a red shape present?", "yes")])
    assert (d["colour"], d["shape"], d["shape_how"]) == ("red", "rectangle", "elimination")
    d = derive_colour_shape([("what color is the shape?", "red"), ("is there a red shape?", "no")])
    assert d["colour"] is None and d["colour_how"] == "conflict"


def test_caption_corpus_is_deterministic_and_clean():
    from vl_align.embedded import build_caption_corpus, forbidden_captions

    a, b = build_caption_corpus(), build_caption_corpus()
    assert a == b and len(a) == len(set(a)) > 2000
    assert not forbidden_captions() & set(a)
    assert "there is a green triangle in the picture" in a or any(s.startswith("there is a ") for s in a)


# Found on easy-vqa 1.0 (see vl_align/embedded.py and the built README.md): images whose colour or shape
# the questions do not determine are counted skips.
EXPECTED = {
    "train": {"images": 4000, "questions": 38575, "pairs": 3578, "skipped": 422},
    "test": {"images": 1000, "questions": 9673, "pairs": 888, "skipped": 112},
}


@pytest.fixture(scope="module")
def embedded_build(tmp_path_factory):
    from vl_align.embedded import build_embedded_easy_vqa

    out = tmp_path_factory.mktemp("embedded") / "easy_vqa"
    return out, build_embedded_easy_vqa(out)


@pytest.mark.slow
def test_easy_vqa_documented_counts():
    from vl_align.embedded import _answers, _image_files, easy_vqa_data_dir, read_easy_vqa_questions

    data = easy_vqa_data_dir()
    assert len(_answers(data)) == 13
    for split, exp in EXPECTED.items():
        rep = SkipReport()
        qs = read_easy_vqa_questions(split, rep)
        assert rep.total == 0
        assert len(_image_files(data, split)) == exp["images"]
        assert len(qs) == exp["questions"]
        assert len({iid for _, _, iid in qs}) == exp["images"]


@pytest.mark.slow
def test_easy_vqa_pairs_skips_and_files(embedded_build):
    out, paths = embedded_build
    info = json.loads(paths["build_info"].read_text())
    for split, exp in EXPECTED.items():
        st = info["stats"][split]
        assert st["pairs"] == exp["pairs"] and st["skips"]["total"] == exp["skipped"]
        assert st["pairs"] + st["skips"]["total"] == exp["images"]  # every image: a caption or a counted skip
        assert set(st["skips"]["counts"]) <= {"colour_undetermined", "shape_undetermined", "colour_and_shape_undetermined"}
        assert st["unparsed_questions"] == 0
        pairs = load_image_text_pairs(paths[f"pairs_{split}"], extra_fields=("colour", "shape"))
        assert len(pairs) == exp["pairs"]
        assert all(c == f"a {col} {sh}" for c, col, sh in zip(pairs["caption"], pairs["colour"], pairs["shape"]))
        assert len(set(pairs["image_id"])) == exp["pairs"]
        vqa = load_text_corpus(paths[f"vqa_{split}"], text_field="question")
        assert len(vqa) == exp["questions"]
    assert "3578" in paths["readme"].read_text() and "422" in paths["readme"].read_text()


@pytest.mark.slow
def test_easy_vqa_colour_matches_pixels(embedded_build):
    """The colour derived from the questions is the shape's exact palette colour (checked on every 4th pair)."""
    palette = {
        "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
        "black": (0, 0, 0), "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42),
    }  # fmt: skip
    _, paths = embedded_build
    for split in ("train", "test"):
        lines = paths[f"pairs_{split}"].read_text().splitlines()[::4]
        for rec in map(json.loads, lines):
            px = np.asarray(Image.open(rec["image_path"]).convert("RGB")).reshape(-1, 3)
            counts = {c: int((px == np.array(v)).all(axis=1).sum()) for c, v in palette.items()}
            assert max(counts, key=counts.get) == rec["colour"], (rec, counts)


@pytest.mark.slow
def test_easy_vqa_corpus_and_idempotent_build(embedded_build, tmp_path):
    from vl_align.embedded import build_embedded_easy_vqa

    out, paths = embedded_build
    corpus = load_text_corpus(paths["caption_corpus"])["text"]
    test_captions = set(load_image_text_pairs(paths["pairs_test"], verify_images=False)["caption"])
    paired = test_captions | set(load_image_text_pairs(paths["pairs_train"], verify_images=False)["caption"])
    assert len(paired) == 24
    assert not test_captions & set(corpus)
    assert len(corpus) == len(set(corpus)) > 10 * len(paired)

    before = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    t0 = time.perf_counter()
    again = build_embedded_easy_vqa(out)
    assert time.perf_counter() - t0 < 5 and {k: p.stat().st_mtime_ns for k, p in again.items()} == before

    other = build_embedded_easy_vqa(tmp_path / "rebuilt")  # deterministic: same bytes
    for k in paths:
        assert other[k].read_bytes() == paths[k].read_bytes(), k
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
