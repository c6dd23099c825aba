"""Image-text pairs whose images are bytes (webdataset shards, a datasets folder with an ``Image`` column): loaded as
typed records, cached by content like image files, and trained on by stage 2a."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import pytest

from conftest import shape_png

from vl_align.pairs import ImageTextPair, PairDataConfig, load_pairs

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def _write_sources(root: Path, bad: bool = False) -> dict:
    """12 pairs (16-px PNGs; 4 colours x 3 shapes, the third a copy of the first) as files + jsonl, as one webdataset
    shard and as a datasets folder with an ``Image`` column; ``bad`` adds a 13th pair whose image is not one."""
    files = root / "files"
    files.mkdir(parents=True)
    rows = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        for j, shape in enumerate(("square", "circle", "square")):
            path = files / f"img_{i}_{j}.png"
            path.write_bytes(shape_png(rgb, shape))
            rows.append({"image_id": f"{i}-{j}", "caption": f"a {name} {shape}", "image_path": str(path)})
    if bad:
        (files / "bad.png").write_text("not an image\n")
        rows.append({"image_id": "bad", "caption": "a text file", "image_path": str(files / "bad.png")})
    jsonl = root / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shard = root / "shards" / "000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tf:
        for r in rows:
            for name, payload in ((f"{r['image_id']}.png", Path(r["image_path"]).read_bytes()),
                                  (f"{r['image_id']}.txt", r["caption"].encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    folder = root / "saved"
    ds = datasets.Dataset.from_dict({"image": [r["image_path"] for r in rows], "caption": [r["caption"] for r in rows],
                                     "image_id": [r["image_id"] for r in rows]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(folder))  # embeds the files' bytes
    return {"rows": rows, "jsonl": jsonl, "webdataset": str(root / "shards" / "{000..000}.tar"), "disk": folder}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return _write_sources(tmp_path_factory.mktemp("pair_sources"))


@pytest.mark.parametrize("fmt", ["webdataset", "disk"])
def test_load_pairs_from_bytes_sources(sources, fmt):
    pairs, report = load_pairs(PairDataConfig(source=str(sources[fmt])), seed=0)
    good = sources["rows"]
    assert report.total == 0 and all(isinstance(p, ImageTextPair) for p in pairs)
    assert [(p.image_id, p.caption) for p in pairs] == [(r["image_id"], r["caption"]) for r in good]
    assert all(p.image_path is None and p.image == p.image_bytes for p in pairs)
    # the encoded bytes as stored: the PNG files themselves
    assert [p.image_bytes for p in pairs] == [Path(r["image_path"]).read_bytes() for r in good]
    # the seeded subset works on bytes records as on path records
    sub, _ = load_pairs(PairDataConfig(source=str(sources[fmt]), format=fmt, max_pairs=5), seed=3)
    ref, _ = load_pairs(PairDataConfig(source=str(sources["jsonl"]), max_pairs=5), seed=3)
    assert [p.image_id for p in sub] == [p.image_id for p in ref] and all(p.image_bytes for p in sub)


@pytest.mark.parametrize("fmt", ["webdataset", "disk"])
def test_bad_image_in_bytes_source_is_a_counted_skip(tmp_path, fmt):
    src = _write_sources(tmp_path, bad=True)
    pairs, report = load_pairs(PairDataConfig(source=str(src[fmt])), seed=0, max_skip_fraction=0.5)
    assert len(pairs) == 12 and "bad" not in {p.image_id for p in pairs}
    assert report.counts == {"not_an_image": 1}


# ------------------------------------------------------------------------------------------- stage 2a end to end
def _stage2_args(source, vit, bert, llm, pformer, out) -> list[str]:
    return [f"vision.model={vit}", "vision.image_size=16", f"front.init_from={bert}", "front.num_query_tokens=4",
            f"pformer={pformer}", f"llm={llm}", f"data.source={source}", "data.max_pairs=null",
            "optim.max_steps=2", "optim.warmup_steps=1", "optim.micro_batch_size=4", f"logging.output_dir={out}",
            "logging.log_every=1", "logging.save_every=2", "logging.tensorboard=false", "logging.progress_bar=false",
            "deepspeed.precision=fp32"]


@pytest.mark.parametrize("fmt, cached", [("webdataset", True), ("disk", True), ("webdataset", False)])
def test_stage2_trains_from_bytes_source(tmp_path, capsys, monkeypatch, sources, fmt, cached, tiny_vit_dir,
                                         tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir):
    """Cached: the frozen tower's features come from the bytes-keyed cache; else the tower decodes the bytes live."""
    from pipelines.cli import main

    monkeypatch.setenv("DVLP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["stage2", *_stage2_args(sources[fmt], tiny_vit_dir, tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir,
                                         out), f"vision.cache_features={str(cached).lower()}"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex("\n{") + 1:])
    assert summary["steps"] == 2 and summary["pairs"] == 12
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["itc"] > 0 and r["align"] > 0 for r in rows)
    assert (out / "front" / "model.safetensors").is_file()
    # the frozen tower's features were cached once per distinct content: 12 images, of which 4 are copies
    features = list((tmp_path / "cache" / "vision_features").glob("*/keys.json"))
    assert [len(json.loads(f.read_text())) for f in features] == ([8] if cached else [])
