"""Video fronts through the stages (issue 20, item 4): the generative stage (2b) and the representation stage (2a) on
``embedded:motion`` with tiny models, checkpoints and resume, the saved front under ``dvlp evaluate`` (key-word
accuracy per caption family, frames reversed and shuffled), the export refusal, and the frame feeding itself."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dvlp_common.config import ConfigError, load_config
from vl_align import motion

TINY = ["deepspeed.precision=fp32", "logging.tensorboard=false", "logging.progress_bar=false", "logging.log_every=1"]


def _video_overrides(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir, kind="tome", out="run"):
    return [f"vision.model={tiny_vit_dir}", "vision.image_size=16", f"llm={tiny_llm_dir}",
            f"front.kind={kind}", f"front.init_from={tiny_bert_dir}", f"front.tome.init_from={tiny_bert_dir}",
            "front.tome.r=2", "front.num_query_tokens=4", "front.video.enabled=true", "front.video.num_frames=4",
            "front.video.hidden_dim=32", "front.video.blocks=[9,10,11]", "data.source=embedded:motion",
            "align_stats_source=embedded:motion", f"pformer={tmp_path / 'no_pformer'}", "align.weight=0",
            "optim.micro_batch_size=4", "optim.max_steps=4", "optim.warmup_steps=1", "optim.lr=1e-3",
            "logging.save_every=2", f"logging.output_dir={tmp_path / out}", "eval.max_images=8",
            "eval.max_new_tokens=3", "eval.meteor=false", "eval.batch_size=4", *TINY]


def test_generative_stage_trains_saves_and_evaluates_a_video_front(tmp_path, motion_cache, tiny_vit_dir,
                                                                   tiny_bert_dir, tiny_llm_dir):
    from pipelines.evaluate import EvaluateConfig, run_evaluate
    from pipelines.export import ExportConfig, run_export
    from pipelines.generative import GenerativeConfig, run_generative

    cfg = load_config(GenerativeConfig, None, [*_video_overrides(tmp_path, tiny_vit_dir, tiny_bert_dir,
                                                                 tiny_llm_dir), "init_front=null",
                                                   "curve.every=4", "curve.images=8"])
    summary = run_generative(cfg)
    run = tmp_path / "run"
    assert summary["steps"] == 4 and summary["pairs"] == 40
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(np.isfinite(r["lm"]) and r["lm"] > 0 for r in rows)
    # the temporal modules trained inside the tower and were saved with the front (α moved off 0)
    state = load_file(str(run / "front" / "model.safetensors"))
    alphas = [v for k, v in state.items() if k.startswith("vision.temporal.") and k.endswith("alpha")]
    assert len(alphas) == 3 and all(float(a.abs()) > 0 for a in alphas)
    assert not [k for k in state if k.startswith("vision.tower.")]  # the frozen tower is not saved
    scores = json.loads((run / "eval.json").read_text())
    assert scores["captioning"]["num_images"] == 8 and scores["captioning"]["num_frames"] == 4
    assert set(scores["keywords"]) == {"all", "order", "set"} and 0.0 <= scores["keywords"]["all"] <= 1.0
    assert set(scores["keywords_by_category"]) - {"all"} <= set(motion.CATEGORIES)
    # the curve point at the last step captioned the same 8 clips: its key-word accuracy is the final evaluation's
    (point,) = [json.loads(line) for line in (run / "eval_curve.jsonl").read_text().splitlines()]
    assert point["step"] == 4
    assert {k: point[f"keywords_{k}"] for k in ("all", "order", "set")} == scores["keywords"]
    preds = json.loads((run / "predictions.json").read_text())["captions"]
    assert [p["image_id"] for p in preds] == [f"test/{i}" for i in range(8)]

    # dvlp evaluate on the saved front: the same captions as_is, and the reversed frames scored both ways
    out = tmp_path / "reeval"
    again = run_evaluate(load_config(EvaluateConfig, None, [f"front={run / 'front'}", f"output_dir={out}",
                                                            "data_source=embedded:motion", "precision=fp32",
                                                            "eval.max_images=8", "eval.max_new_tokens=3",
                                                            "eval.meteor=false"]))
    assert again["keywords"] == scores["keywords"]
    assert [p["prediction"] for p in json.loads((out / "predictions.json").read_text())["captions"]] == \
        [p["prediction"] for p in preds]
    rev = run_evaluate(load_config(EvaluateConfig, None, [f"front={run / 'front'}", f"output_dir={out}_rev",
                                                          "data_source=embedded:motion", "precision=fp32",
                                                          "eval.max_images=8", "eval.max_new_tokens=3",
                                                          "eval.meteor=false", "eval.frame_order=reversed"]))
    assert set(rev["keywords_shown"]) == {"all", "order", "set"}
    assert rev["keywords_shown"]["set"] == rev["keywords"]["set"]  # reversal changes only order-family truths
    with pytest.raises(ConfigError, match="image set"):  # a video front on an image set: one clear error
        run_evaluate(load_config(EvaluateConfig, None, [f"front={run / 'front'}", f"output_dir={out}_img",
                                                        "precision=fp32", "eval.max_images=2"]))
    with pytest.raises(ConfigError, match="video front"):
        run_export(load_config(ExportConfig, None, [f"front={run / 'front'}", f"output_dir={tmp_path / 'hf'}"]))


def test_resume_follows_the_uninterrupted_run(tmp_path, motion_cache, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                              tiny_pformer_dir):
    """Head-tail frames and crops come from the step-seeded generator, so a run stopped after 2 steps and resumed
    ends with the uninterrupted run's weights. Q-Former video front aligned to P(y) (the P-Former arm's path)."""
    from pipelines.generative import GenerativeConfig, run_generative

    def cfg(out):
        return load_config(GenerativeConfig, None, [
            *_video_overrides(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir, kind="qformer", out=out),
            "init_front=null", f"pformer={tiny_pformer_dir}", "align.weight=100", "eval.enabled=false",
            "data.video.crop_min_scale=0.7"])

    run_generative(cfg("whole"))
    first = run_generative(cfg("parts"), stop_after=2)
    assert first["steps"] == 2 and "front_dir" not in first
    second = run_generative(cfg("parts"), resume=True)
    assert second["resumed_from"] == 2 and second["steps"] == 4
    whole = load_file(str(tmp_path / "whole" / "front" / "model.safetensors"))
    parts = load_file(str(tmp_path / "parts" / "front" / "model.safetensors"))
    assert whole.keys() == parts.keys() and any(k.startswith("vision.temporal.") for k in whole)
    for key in whole:
        torch.testing.assert_close(parts[key], whole[key], rtol=0, atol=1e-6, msg=key)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["align"] > 0 for r in rows)  # W·Z was aligned to the captions' P(y)


def test_representation_stage_on_video(tmp_path, motion_cache, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir):
    """Stage 2a (ITC + ITM + ITG) with a video Q-Former front, then held-out video-text retrieval; its front starts
    the generative stage."""
    from pipelines.generative import GenerativeConfig, run_generative
    from pipelines.stage2 import Stage2Config, run_stage2

    base = _video_overrides(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir, kind="qformer", out="s2")
    s2 = run_stage2(load_config(Stage2Config, None, [o for o in base if not o.startswith("eval.")] + [
        "optim.max_steps=2", "eval.max_images=6", "eval.k=3"]))
    assert s2["steps"] == 2 and s2["retrieval"]["gallery"]["num_images"] == 6
    rows = [json.loads(line) for line in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["itc"] > 0 and r["itm"] > 0 and r["itg"] > 0 for r in rows)
    gen = run_generative(load_config(GenerativeConfig, None, [
        *_video_overrides(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir, kind="qformer", out="g"),
        f"init_front={tmp_path / 's2' / 'front'}", "optim.max_steps=1", "eval.enabled=false"]))
    assert gen["steps"] == 1


def test_video_inputs_sample_as_the_authors_and_reorder_for_evaluation(motion_cache, tiny_vit_dir):
    from vl_align.pairs import PairDataConfig
    from vl_align.video_inputs import VideoInputs, VideoSource, order_permutation
    from vl_align.vision import VisionTower, VisionTowerConfig

    tower = VisionTower.build(VisionTowerConfig(model=tiny_vit_dir, image_size=16))
    data = PairDataConfig(source="embedded:motion", max_pairs=10)
    source = VideoSource(data, num_frames=4, seed=3)
    pairs, report = source.load_pairs()
    assert len(pairs) == 10 and report.total == 0 and pairs[0].meta["keywords"]
    assert [p.image_id for p in pairs] == [p.image_id for p in VideoSource(data, 4, seed=3).load_pairs()[0]]
    assert [p.image_id for p in pairs] != [p.image_id for p in VideoSource(data, 4, seed=4).load_pairs()[0]]
    train = source.inputs(tower)
    assert train.crop_min_scale == 1.0  # embedded:motion: no crop by default (it can cut the shape out)
    paths = [p.video_path for p in pairs[:3]]
    torch.manual_seed(0)
    a = train(paths, "cpu")["pixel_values_videos"]
    torch.manual_seed(0)
    b = train(paths, "cpu")["pixel_values_videos"]
    c = train(paths, "cpu")["pixel_values_videos"]
    assert a.shape == (3, 4, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    # evaluation: uniform frames 0, 2, 4, 6 of 8; reversed is exactly that clip backwards
    ev = VideoInputs(tower, 4, train=False)(paths, "cpu")["pixel_values_videos"]
    rev = VideoInputs(tower, 4, train=False, frame_order="reversed")(paths, "cpu")["pixel_values_videos"]
    shuf = VideoInputs(tower, 4, train=False, frame_order="shuffled")(paths, "cpu")["pixel_values_videos"]
    assert torch.equal(rev, ev.flip(1))
    for i, path in enumerate(paths):
        perm = order_permutation(4, "shuffled", path)
        assert sorted(perm) == [0, 1, 2, 3] and perm not in ([0, 1, 2, 3], [3, 2, 1, 0])
        assert torch.equal(shuf[i], ev[i][perm])
    with pytest.raises(ValueError, match="evaluation probe"):
        VideoInputs(tower, 4, train=True, frame_order="reversed")
    with pytest.raises(ConfigError, match="image set"):
        VideoSource(PairDataConfig(source="embedded:easy-vqa"), 4, 0)
    with pytest.raises(ConfigError, match="validation_images"):
        VideoSource(PairDataConfig(source="embedded:motion", validation_images=3), 4, 0)


def test_reversal_truth_is_the_pair_partner_for_the_order_family():
    from vl_align.video_eval import shown_records

    recs = [{"video_id": "a", "pair_id": "p", "family": "order", "category": "left", "keywords": ["left"]},
            {"video_id": "b", "pair_id": "p", "family": "order", "category": "right", "keywords": ["right"]},
            {"video_id": "c", "pair_id": "q", "family": "set", "category": "blinks", "keywords": ["blinks"]},
            {"video_id": "d", "pair_id": "q", "family": "set", "category": "still", "keywords": ["still"]}]
    shown = shown_records(recs, recs, "reversed")
    assert [(r["video_id"], r["keywords"]) for r in shown] == [("a", ["right"]), ("b", ["left"]), ("c", ["blinks"]),
                                                               ("d", ["still"])]
    assert shown_records(recs, recs, "shuffled") is recs


@pytest.mark.slow
def test_video_arms_through_the_ablation(tmp_path, motion_cache, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir):
    """Every video arm of ``dvlp ablate`` on embedded:motion with a tiny budget: the arms' fronts are what they
    claim (frames, modules, positions, alignment phases), every cell is evaluated as fed, reversed and shuffled,
    and the report carries the key-word accuracy per family with paired comparisons (video_pformer against
    video_qformer)."""
    from pipelines.ablate import AblateConfig, arm_of, cell_name, run_ablation

    tiny = ["deepspeed.precision=fp32", "logging.tensorboard=false", "logging.log_every=1"]
    vl = [f"vision.model={tiny_vit_dir}", "vision.image_size=16", f"front.init_from={tiny_bert_dir}",
          "front.num_query_tokens=4", f"llm={tiny_llm_dir}", "optim.micro_batch_size=4", *tiny]
    arms = ["video_faithful", "video_frame", "video_mean", "video_position", "video_qformer", "video_pformer"]
    cfg = load_config(AblateConfig, None, [
        f"output_dir={tmp_path / 'ab'}", "dataset=embedded:motion", f"arms=[{','.join(arms)}]",
        "baseline=video_faithful", "pairs=[8]", "lrs=[1e-3]", "seeds=[0,1]", "stage1_steps=2", "generative_steps=2",
        "curve_every=2", "curve_images=20", "eval_images=20", "eval_questions=0", "gallery_images=2",
        (f"stage1_overrides=[model.text_encoder={tiny_bert_dir},model.llm={tiny_llm_dir},model.num_prompts=4,"
         f"data.holdout=4,data.max_records=64,optim.micro_batch_size=8,{','.join(tiny)}]"),
    ]).replace(generative_overrides=[  # a list here: "blocks=[11]" would not survive a YAML flow list
        *vl, "eval.max_new_tokens=3", "eval.meteor=false", "eval.batch_size=4", f"front.tome.init_from={tiny_bert_dir}",
        "front.tome.r=2", "front.video.hidden_dim=32", "front.video.blocks=[11]"])
    result = run_ablation(cfg)
    cells = {(c["arm"], c["seed"]): c for c in result["cells"]}
    assert len(cells) == 12
    out = tmp_path / "ab"
    for (arm, seed), cell in cells.items():
        gen = out / "cells" / cell_name(arm, 8, 1e-3, seed) / "generative"
        front_cfg = json.loads((gen / "front" / "front_config.json").read_text())["front"]
        video = front_cfg["video"]
        assert video["enabled"] and front_cfg["kind"] == arm_of(arm).front
        assert video["num_frames"] == (1 if arm == "video_frame" else 4)
        assert (video["blocks"] == []) == (arm in ("video_frame", "video_mean"))
        assert (video["max_frames"] == 8) == (arm == "video_position")
        assert cell["stage2_seconds"] == 0.0  # no representation stage for the video arms
        for order in ("reversed", "shuffled"):
            assert json.loads((gen / f"frames_{order}" / "eval.json").read_text())["keywords"]
        for key in ("kw_order", "kw_set", "kw_order_reversed", "kw_order_reversed_shown", "kw_order_shuffled"):
            assert 0.0 <= cell[key] <= 1.0, key
        # the curve point at the last step captions the same 20 clips with the same weights: the same key words
        (point,) = cell["curve"]
        assert point["step"] == 2 and (point["kw_order"], point["kw_set"]) == (cell["kw_order"], cell["kw_set"])
        if arm == "video_frame":  # one frame: every order feeds the same clip
            assert cell["kw_order"] == cell["kw_order_reversed"] == cell["kw_order_shuffled"]
        state = load_file(str(gen / "front" / "model.safetensors"))
        temporal = [k for k in state if k.startswith("vision.temporal.")]
        assert bool(temporal) == (arm not in ("video_frame", "video_mean"))
        assert any(k.endswith("frame_pos") for k in temporal) == (arm == "video_position")
    seq = out / "cells" / cell_name("video_pformer", 8, 1e-3, 0)
    align = [json.loads(line) for line in (seq / "generative_align" / "metrics.jsonl").read_text().splitlines()]
    lm = [json.loads(line) for line in (seq / "generative" / "metrics.jsonl").read_text().splitlines()]
    assert len(align) == 1 and align[0]["lm"] == 0 and align[0]["align"] > 0  # 100·MSE alone
    assert len(lm) == 1 and lm[0]["align"] == 0 and lm[0]["lm"] > 0  # then the LM loss alone
    comparisons = result["comparisons"]
    assert {(c["arm"], c["vs"]) for c in comparisons} == {
        *((a, "video_faithful") for a in ("video_frame", "video_mean", "video_position", "video_qformer")),
        ("video_pformer", "video_qformer")}
    assert {c["metric"] for c in comparisons} >= {"kw_order", "kw_set", "kw_order_reversed"}
    text = (out / "results.md").read_text()
    assert "Key-word accuracy per caption family" in text and "order, shuffled" in text
    assert "keywords_vs_steps.png" in text and (out / "keywords_vs_steps.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="image set"):
        load_config(AblateConfig, None, ["arms=[video_faithful]", "baseline=video_faithful"])
    with pytest.raises(ConfigError, match="mixes"):
        load_config(AblateConfig, None, ["dataset=embedded:motion", "arms=[video_faithful,tome]",
                                         "baseline=tome"])
