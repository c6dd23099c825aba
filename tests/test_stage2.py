"""Stages 2a and 2b end to end on tiny random models and real easy-VQA images (one process, gloo on CPU)."""
from __future__ import annotations

import json

import pytest

from dvlp_common.config import ConfigError, load_config
from pipelines.evaluate import EvaluateConfig, run_evaluate
from pipelines.generative import GenerativeConfig, run_generative
from pipelines.stage2 import Stage2Config, run_stage2


def _common(tmp_path, out, vit, bert, llm, pformer):
    return [f"vision.model={vit}", "vision.image_size=16", f"front.init_from={bert}", "front.num_query_tokens=4",
            f"pformer={pformer}", f"llm={llm}", "data.max_pairs=16", "optim.max_steps=3", "optim.warmup_steps=1",
            "optim.micro_batch_size=4", f"logging.output_dir={tmp_path / out}", "logging.log_every=1",
            "logging.save_every=2", "logging.tensorboard=false", "logging.progress_bar=false",
            "deepspeed.precision=fp32"]


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["qformer", "elip"])
def test_representation_stage_runs_each_front(tmp_path, kind, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                              tiny_pformer_dir):
    cfg = load_config(Stage2Config, None, _common(tmp_path, kind, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                  tiny_pformer_dir) + [f"front.kind={kind}"])
    summary = run_stage2(cfg)
    assert summary["steps"] == 3 and (tmp_path / kind / "front" / "model.safetensors").is_file()
    rows = _rows(tmp_path / kind)
    assert all(r["itc"] > 0 and r["itm"] > 0 and r["itg"] > 0 and r["align"] > 0 for r in rows)
    # the alignment diagnostics: the MSE is the alignment loss here (kind mse), the share its weighted part
    assert all(r["align_mse"] == pytest.approx(r["align"], rel=1e-5) and r["align_r2"] < 1.0 and r["align_rel"] > 0
               and r["align_share"] == pytest.approx(10 * r["align"] / (r["itc"] + r["itm"] + r["itg"]), rel=1e-4)
               for r in rows)


def test_the_baseline_logs_the_alignment_diagnostics_without_the_term(tmp_path, tiny_vit_dir, tiny_bert_dir,
                                                                       tiny_llm_dir, tiny_pformer_dir):
    """ω = 0 trains as BLIP-2 but, with a P-Former at hand, still reports how far W·Z is from P(y)."""
    cfg = load_config(Stage2Config, None, _common(tmp_path, "base", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                  tiny_pformer_dir) + ["align.weight=0"])
    run_stage2(cfg)
    rows = _rows(tmp_path / "base")
    assert all(r["align"] == 0 and r["align_share"] == 0 and r["align_mse"] > 0 and "align_r2" in r for r in rows)


def test_baseline_has_no_alignment_term(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir):
    cfg = load_config(Stage2Config, None, _common(tmp_path, "base", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                  "/does/not/matter") + ["align.weight=0"])
    run_stage2(cfg)
    assert all(r["align"] == 0 for r in _rows(tmp_path / "base"))


def test_prompt_count_mismatch_is_a_clear_error(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir):
    cfg = load_config(Stage2Config, None, _common(tmp_path, "x", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                  tiny_pformer_dir) + ["front.num_query_tokens=5"])
    with pytest.raises(ConfigError, match="num_query_tokens"):
        run_stage2(cfg)


def test_tome_has_no_representation_stage():
    with pytest.raises(ConfigError, match="front.kind.*no representation stage"):
        load_config(Stage2Config, None, ["front.kind=tome"])


@pytest.mark.parametrize("kind", ["qformer", "tome"])
def test_generative_stage_trains_and_evaluates(tmp_path, kind, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                               tiny_pformer_dir):
    extra = [f"front.kind={kind}", "eval.max_images=6", "eval.max_questions=6", "eval.max_new_tokens=3",
             "eval.meteor=false"]
    if kind == "tome":
        extra += [f"front.tome.init_from={tiny_bert_dir}", "front.tome.r=4", "align.weight=0"]
    cfg = load_config(GenerativeConfig, None, _common(tmp_path, kind, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                      tiny_pformer_dir) + extra)
    summary = run_generative(cfg)
    assert summary["steps"] == 3
    scores = json.loads((tmp_path / kind / "eval.json").read_text())
    assert scores["captioning"]["num_images"] == 6 and "CIDEr" in scores["captioning"]
    assert scores["vqa"]["num_questions"] == 6 and 0.0 <= scores["vqa"]["accuracy"] <= 1.0
    preds = json.loads((tmp_path / kind / "predictions.json").read_text())
    assert len(preds["captions"]) == 6 and len(preds["vqa"]) == 6

    # `dvlp evaluate` rebuilds the saved front (tome included) from its folder alone: the same outputs
    again = load_config(EvaluateConfig, None, [f"front={tmp_path / kind / 'front'}", "precision=fp32",
                                               f"output_dir={tmp_path / 'again'}", *extra[1:5]])
    run_evaluate(again)
    assert json.loads((tmp_path / "again" / "predictions.json").read_text()) == preds
    assert json.loads((tmp_path / "again" / "eval.json").read_text()) == scores


def test_a_curve_point_lost_to_a_kill_after_its_checkpoint_is_made_on_resume(tmp_path, tiny_vit_dir, tiny_bert_dir,
                                                                             tiny_llm_dir, tiny_pformer_dir):
    """Killed after the checkpoint at step 2 but before that step's curve evaluation was written: the resumed run
    evaluates step 2 again (the same scores as an uninterrupted run) instead of leaving a hole in the curve."""
    args = _common(tmp_path, "curve", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir) + [
        "curve.every=2", "curve.images=4", "eval.enabled=false", "eval.max_new_tokens=3", "eval.meteor=false"]
    cfg = load_config(GenerativeConfig, None, args)
    run_generative(cfg, stop_after=2)
    curve = tmp_path / "curve" / "eval_curve.jsonl"
    written = json.loads(curve.read_text().splitlines()[0])
    assert written["step"] == 2
    curve.unlink()  # what a kill between the checkpoint and the evaluation leaves
    run_generative(cfg, resume=True)
    rows = [json.loads(line) for line in curve.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]
    assert {k: v for k, v in rows[0].items() if k != "train_seconds"} == {
        k: v for k, v in written.items() if k != "train_seconds"}


def test_evaluation_on_given_held_out_files(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir):
    """At scale the held-out captions and questions are files; a bad question line is named."""
    from vl_align.sources import embedded_files

    files = embedded_files("easy-vqa")
    pairs = [json.loads(line) for line in files["pairs_test"].read_text().splitlines()[:5]]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"image_path": p["image_path"], "caption": p["caption"],
                                                              "image_id": p["image_id"]}) + "\n" for p in pairs))
    questions = [{"image_path": p["image_path"], "question": "what shape is in the image?",
                  "answers": [p["caption"].split()[-1]] * 3} for p in pairs[:3]]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    cfg = load_config(GenerativeConfig, None, _common(tmp_path, "files", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                      tiny_pformer_dir) + [
        "eval.max_new_tokens=3", "eval.meteor=false", f"eval.captions_source={tmp_path / 'pairs.jsonl'}",
        f"eval.questions_source={tmp_path / 'questions.jsonl'}"])
    run_generative(cfg)
    scores = json.loads((tmp_path / "files" / "eval.json").read_text())
    assert scores["captioning"]["num_images"] == 5 and scores["vqa"]["num_questions"] == 3

    (tmp_path / "questions.jsonl").write_text(json.dumps(questions[0]) + "\n" + json.dumps({"question": "q"}) + "\n")
    again = load_config(EvaluateConfig, None, [f"front={tmp_path / 'files' / 'front'}", "precision=fp32",
                                               f"output_dir={tmp_path / 'again'}", "eval.meteor=false",
                                               f"eval.questions_source={tmp_path / 'questions.jsonl'}"])
    with pytest.raises(ConfigError, match="questions.jsonl.*line 2 lacks image_path"):
        run_evaluate(again)


def test_generative_layout_must_match_the_pformers(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                   tiny_pformer_dir):
    """P(y) are prompts for one LLM input layout (BOS before the prefix or not); aligning a prefix meant for the
    other layout to them is an error, not a silently weaker target. Without alignment either layout runs."""
    common = _common(tmp_path, "layout", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir)
    cfg = load_config(GenerativeConfig, None, common + ["bos_before_prefix=false"])
    with pytest.raises(ConfigError, match="bos_before_prefix.*trained with True"):
        run_generative(cfg)
    cfg = load_config(GenerativeConfig, None, common + ["bos_before_prefix=false", "align.weight=0",
                                                        "eval.enabled=false"])
    run_generative(cfg)
    meta = json.loads((tmp_path / "layout" / "front" / "front_config.json").read_text())
    assert meta["bos_before_prefix"] is False  # export-hf rebuilds the LLM with the layout the front was trained for


@pytest.mark.slow
def test_compiled_representation_stage_follows_the_eager_one(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                           tiny_pformer_dir):
    """deepspeed.compile=true: the same losses step by step (inductor told to draw dropout with eager's RNG, so the
    two runs see the same masks), and the evaluation after training still runs (eager)."""
    import torch._inductor.config as inductor_config

    runs = {}
    # inductor's own config patch (a monkeypatch's undo hid the setting from later compiles in this process)
    with inductor_config.patch(fallback_random=True):
        for name, extra in (("eager", []), ("compiled", ["deepspeed.compile=true"])):
            cfg = load_config(Stage2Config, None, _common(tmp_path, name, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                          tiny_pformer_dir) + extra)
            assert run_stage2(cfg)["steps"] == 3
            runs[name] = _rows(tmp_path / name)
    for eager, compiled in zip(runs["eager"], runs["compiled"], strict=True):
        for key in ("itc", "itm", "itg", "align"):
            assert compiled[key] == pytest.approx(eager[key], rel=2e-3, abs=1e-5), (key, eager["step"])
    assert (tmp_path / "compiled" / "retrieval.json").is_file()


def test_align_lstsq_diagnostic_runs_on_a_finished_run(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                       tiny_pformer_dir):
    """scripts/align_lstsq.py: trained W against a least-squares W on the same Z, and the corpus-mean prompt."""
    import importlib.util
    import math
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "align_lstsq.py"
    spec = importlib.util.spec_from_file_location("align_lstsq", script)
    align_lstsq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(align_lstsq)

    cfg = load_config(Stage2Config, None, _common(tmp_path, "run", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                  tiny_pformer_dir) + ["zero_shot.enabled=true",
                                                                       "zero_shot.max_images=4",
                                                                       "zero_shot.max_new_tokens=3",
                                                                       "zero_shot.meteor=false"])
    finished = run_stage2(cfg)["zero_shot"]
    assert align_lstsq.main([str(tmp_path / "run"), "--max-pairs", "16"]) == 0
    result = json.loads((tmp_path / "run" / "align_lstsq.json").read_text())
    assert result["pairs_fit"] == 8 and result["pairs_scored"] == 8
    assert 0.0 <= result["query_position_variance_share"] <= 1.0
    for key in ("trained_w", "lstsq_w", "lstsq_w_position_bias", "lstsq_per_query_w"):
        assert math.isfinite(result[f"{key}_mse"])
        assert result[f"{key}_r2"] == pytest.approx(1 - result[f"{key}_mse"] / result["corpus_mean_prompt_mse"])
    # --checkpoint: the final step's checkpoint holds the saved front's weights, an earlier one other weights
    steps = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert steps[-1] == 3 and len(steps) >= 2
    at = {}
    for step in (steps[0], 3):
        assert align_lstsq.main([str(tmp_path / "run"), "--max-pairs", "16", "--checkpoint", str(step)]) == 0
        at[step] = json.loads((tmp_path / "run" / f"align_lstsq_step{step}.json").read_text())
        assert at[step]["step"] == step
    assert at[3]["trained_w_mse"] == pytest.approx(result["trained_w_mse"], rel=1e-5)
    # --zero-shot on the last checkpoint measures what the finished run measured on its saved front
    assert align_lstsq.main([str(tmp_path / "run"), "--max-pairs", "16", "--checkpoint", "3", "--zero-shot"]) == 0
    again = json.loads((tmp_path / "run" / "align_lstsq_step3.json").read_text())["zero_shot"]
    assert again["heldout_lm"] == pytest.approx(finished["heldout_lm"], rel=1e-5)
    assert (tmp_path / "run" / "zero_shot_step3" / "zero_shot.json").is_file()
    assert at[steps[0]]["trained_w_mse"] != pytest.approx(result["trained_w_mse"], rel=1e-5)
    with pytest.raises(SystemExit, match="step_00000099"):
        align_lstsq.main([str(tmp_path / "run"), "--checkpoint", "99"])


def test_stage2a_reads_its_alignment_on_held_out_images(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                        tiny_pformer_dir):
    """align_curve: W·Z against P(y) on held-out images at every N steps and the last, resumed without a gap or a
    duplicate, and the same number an independent computation from the saved front gives."""
    import torch

    from dvlp_common import zoo
    from pformer.targets import prompt_target_cache
    from vl_align.evaluation import _test_records, first_images
    from vl_align.fronts import load_front
    from vl_align.inputs import ImageInputs

    cfg = load_config(Stage2Config, None, _common(tmp_path, "curve", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                  tiny_pformer_dir) + ["align_curve.every=2", "align_curve.images=5"])
    run_stage2(cfg, stop_after=2)
    summary = run_stage2(cfg, resume=True)
    rows = [json.loads(line) for line in (tmp_path / "curve" / "align_curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3] and rows[-1] == summary["heldout_align"]
    assert rows[-1]["images"] == 5 and rows[-1]["pairs"] >= 5
    assert all(r["align_rel"] > 0 and r["align_r2"] < 1 for r in rows)

    front, tower = load_front(tmp_path / "curve" / "front")[:2]
    records = _test_records(cfg.zero_shot, cfg.data)[0]
    chosen = set(first_images({r["image_id"] for r in records}, 5))
    pairs = [r for r in records if r["image_id"] in chosen]
    images = ImageInputs.build(tower, [r["image_path"] for r in pairs], live_tower=False, device="cpu",
                               dtype=torch.float32)
    with torch.no_grad():
        pred = front("queries", **images([r["image_path"] for r in pairs], "cpu"))["prompt_pred"]
    target = prompt_target_cache(tiny_pformer_dir, [r["caption"] for r in pairs], zoo.cache_root()).get(
        [r["caption"] for r in pairs])
    assert rows[-1]["align_mse"] == pytest.approx(float((pred - target).pow(2).mean()), rel=1e-4)
    # scripts/align_lstsq.py reads the same on a checkpoint's front, after the fact
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "align_lstsq", Path(__file__).resolve().parents[1] / "scripts" / "align_lstsq.py")
    align_lstsq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(align_lstsq)
    assert align_lstsq.main([str(tmp_path / "curve"), "--max-pairs", "16", "--checkpoint", "2",
                             "--heldout-images", "5"]) == 0
    at2 = json.loads((tmp_path / "curve" / "align_lstsq_step2.json").read_text())["heldout"]
    assert at2 == pytest.approx({k: v for k, v in rows[0].items() if k not in ("step", "train_seconds")}, rel=1e-4)
    with pytest.raises(ConfigError, match="align_curve.every"):
        run_stage2(load_config(Stage2Config, None, _common(tmp_path, "nope", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                           "/no/pformer") + ["align.weight=0", "align_curve.every=2"]))
