"""The ablation runner: statistics on hand cases, config checks, and a tiny end-to-end grid that is re-run."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from dvlp_common.config import ConfigError, load_config
from pipelines import ablate_stats
from pipelines.ablate import AblateConfig, CaptionChecker, CollapseConfig, cell_name, run_ablation
from pipelines.ablate_stats import compare_to_baseline, group_cells, mean_std, time_to_baseline_quality


def _cell(arm, seed, cider, pairs=50, lr=1e-4, **extra):
    row = {"arm": arm, "pairs": pairs, "lr": lr, "seed": seed, "collapsed": False, "CIDEr": cider,
           "exact_match": cider / 2, "vqa_accuracy": 0.5, "curve": [], "loss_curve": []}
    for metric in ablate_stats.METRICS + ("train_seconds", "samples_per_s", "prefix_tokens"):
        row.setdefault(metric, 1.0)
    row.update(extra)
    return row


def test_mean_std_uses_sample_std_and_ignores_nan():
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0), 2)
    assert mean_std([2.0, float("nan")]) == (2.0, 0.0, 1)
    mean, std, n = mean_std([])
    assert math.isnan(mean) and n == 0


def test_comparison_separates_a_real_gap_from_seed_noise():
    cells = [_cell("blip2", s, c) for s, c in enumerate([1.0, 1.1, 0.9])]
    cells += [_cell("pformer", s, c) for s, c in enumerate([2.0, 2.1, 1.9])]  # Δ = 1.0, SE = 0.0816
    cells += [_cell("control", s, c) for s, c in enumerate([0.2, 1.9, 1.3])]  # Δ = 0.133, SE ≈ 0.50
    by = {(c["arm"], c["metric"]): c for c in compare_to_baseline(cells, "blip2")}
    assert by[("pformer", "CIDEr")]["verdict"] == "beyond seed spread"
    assert by[("pformer", "CIDEr")]["delta"] == pytest.approx(1.0)
    assert by[("pformer", "CIDEr")]["se"] == pytest.approx(math.sqrt(0.01 / 3 + 0.01 / 3))
    assert by[("control", "CIDEr")]["verdict"] == "within seed spread"
    assert by[("pformer", "vqa_accuracy")]["verdict"] == "within seed spread"  # equal means, zero spread
    one_seed = compare_to_baseline([_cell("blip2", 0, 1.0), _cell("pformer", 0, 3.0)], "blip2")
    assert one_seed[0]["verdict"] == "one seed: no test"
    assert one_seed[0]["paired_verdict"] == "under 2 shared seeds: no test"


def test_paired_comparison_sees_a_consistent_gap_that_seed_noise_hides():
    """Seeds move every arm together (shared pair subset, init, order): 2.0/0.9/1.4 for the baseline. An arm
    0.3 lower on every seed is lost in the unpaired spread but beyond it per seed; a gap that flips sign is not."""
    base = [2.0, 0.9, 1.4]
    cells = [_cell("blip2", s, c) for s, c in enumerate(base)]
    cells += [_cell("pformer_std", s, c - d) for s, (c, d) in enumerate(zip(base, [0.25, 0.30, 0.35]))]
    cells += [_cell("control", s, c + d) for s, (c, d) in enumerate(zip(base, [0.3, -0.3, 0.1]))]
    cells += [_cell("pformer", 0, 2.5), _cell("pformer", 5, 1.0)]  # only seed 0 shared with the baseline
    by = {(c["arm"], c["metric"]): c for c in compare_to_baseline(cells, "blip2")}
    std = by[("pformer_std", "CIDEr")]
    assert std["verdict"] == "within seed spread" and std["paired_verdict"] == "beyond seed spread"
    assert std["paired_delta"] == pytest.approx(-0.30) and std["paired_seeds"] == 3
    assert std["paired_se"] == pytest.approx(0.05 / math.sqrt(3)) and std["paired_t_crit"] == pytest.approx(4.303)
    assert by[("control", "CIDEr")]["paired_verdict"] == "within seed spread"
    assert by[("pformer", "CIDEr")]["paired_seeds"] == 1
    assert by[("pformer", "CIDEr")]["paired_verdict"] == "under 2 shared seeds: no test"
    assert ablate_stats.t_critical(2) == pytest.approx(4.303) and ablate_stats.t_critical(11) == pytest.approx(2.228)
    assert ablate_stats.t_critical(100) == pytest.approx(1.96)


def test_multiplicity_note_counts_paired_tests_and_chance_crossings():
    base = [2.0, 0.9, 1.4]
    cells = [_cell("blip2", s, c) for s, c in enumerate(base)]
    cells += [_cell("pformer_std", s, c - d) for s, (c, d) in enumerate(zip(base, [0.25, 0.30, 0.35]))]
    cells += [_cell("pformer", 0, 2.5)]  # one shared seed: no paired test, not counted
    note = ablate_stats.multiplicity_note(compare_to_baseline(cells, "blip2"))
    # pformer_std: CIDEr and exact_match (CIDEr / 2) lower on every seed; VQA identical -> 2 of 3 beyond
    assert note.startswith("2 of 3 paired tests are beyond the seed spread") and "about 0.15 would" in note
    assert ablate_stats.multiplicity_note(compare_to_baseline(cells[-1:] + cells[:1], "blip2")) == ""


def test_groups_report_collapse_rate_per_cell_group():
    cells = [_cell("blip2", 0, 1.0, collapsed=True), _cell("blip2", 1, 1.2), _cell("blip2", 0, 0.4, pairs=500)]
    groups = {(g["arm"], g["pairs"]): g for g in group_cells(cells)}
    assert groups[("blip2", 50)]["collapse_rate"] == 0.5 and groups[("blip2", 50)]["seeds"] == 2
    assert groups[("blip2", 50)]["CIDEr"] == pytest.approx(1.1)
    assert groups[("blip2", 500)]["CIDEr_std"] == 0.0


def _curve(points):
    return [{"step": i, "train_seconds": t, "CIDEr": c} for i, (t, c) in enumerate(points)]


def test_time_to_baseline_quality_uses_seed_mean_curves():
    # baseline: seed-mean curve (50 s, 0.2), (100 s, 0.6); target 0.6 reached at 100 s
    cells = [_cell("blip2", 0, 0.0, curve=_curve([(40, 0.2), (90, 0.5)])),
             _cell("blip2", 1, 0.0, curve=_curve([(60, 0.2), (110, 0.7)])),
             # tome: mean (10, 0.3), (30, 0.65), (50, 0.9): first reaches 0.6 at 30 s, ratio 0.3
             _cell("tome", 0, 0.0, curve=_curve([(10, 0.5), (30, 0.6), (50, 1.0)])),
             _cell("tome", 1, 0.0, curve=_curve([(10, 0.1), (30, 0.7), (50, 0.8)])),
             _cell("control", 0, 0.0, curve=_curve([(70, 0.1), (140, 0.2)]))]  # never reaches it
    by = {r["arm"]: r for r in time_to_baseline_quality(cells, "blip2")}
    assert by["blip2"]["target_CIDEr"] == pytest.approx(0.6) and by["blip2"]["ratio"] == pytest.approx(1.0)
    assert by["tome"]["seconds_to_target"] == pytest.approx(30) and by["tome"]["ratio"] == pytest.approx(0.3)
    assert by["tome"]["final_CIDEr"] == pytest.approx(0.9)
    assert math.isnan(by["control"]["seconds_to_target"]) and math.isnan(by["control"]["ratio"])
    collapsed = [_cell("blip2", 0, 0.0, curve=_curve([(40, 0.0), (90, 0.0)])),
                 _cell("tome", 0, 0.0, curve=_curve([(10, 0.0), (30, 0.4)]))]
    assert all(math.isnan(r["ratio"]) for r in time_to_baseline_quality(collapsed, "blip2"))


def test_gap_closed_is_the_arms_paired_gain_over_the_baselines_paired_data_gap():
    """blip2: CIDEr 0.2/0.3/0.4 at 50 pairs and 1.2/1.3/1.4 at 4,000 (a gap of 1.0 on every seed); pformer gains
    0.4/0.5/0.6 at 50 pairs: it closes half the gap. At 500 pairs the baseline is within noise of 4,000: no gap."""
    cells = [_cell("blip2", s, c, pairs=50) for s, c in enumerate([0.2, 0.3, 0.4])]
    cells += [_cell("blip2", s, c, pairs=4000) for s, c in enumerate([1.2, 1.3, 1.4])]
    cells += [_cell("blip2", s, c, pairs=500) for s, c in enumerate([1.3, 1.2, 1.45])]
    cells += [_cell("pformer", s, c, pairs=50) for s, c in enumerate([0.6, 0.8, 1.0])]
    cells += [_cell("pformer", s, c, pairs=500) for s, c in enumerate([1.3, 1.3, 1.3])]
    cells += [_cell("control", 0, 0.1, pairs=50), _cell("control", 7, 0.1, pairs=50)]  # seed 7: no baseline
    rows = {(r["arm"], r["pairs"]): r for r in ablate_stats.gap_closed(cells, "blip2")}
    half = rows[("pformer", 50)]
    assert half["fraction"] == pytest.approx(0.5) and half["gap"] == pytest.approx(1.0)
    assert half["gap_verdict"] == "gap beyond seed spread" and half["reference_pairs"] == 4000
    assert half["seed_fractions"] == pytest.approx([0.4, 0.5, 0.6]) and half["seeds"] == 3
    assert math.isnan(rows[("pformer", 500)]["fraction"])
    assert rows[("pformer", 500)]["gap_verdict"] == "no gap beyond seed spread at 4000 pairs"
    control = rows[("control", 50)]
    assert control["seeds"] == 1 and control["fraction"] == pytest.approx(-0.1)
    assert control["gap_verdict"] == "under 2 seeds: no test"
    assert ("pformer", 4000) not in rows and ("blip2", 50) not in rows
    assert ablate_stats.gap_closed([c for c in cells if c["pairs"] == 50], "blip2") == []  # one pair count
    from pipelines.ablate_report import report_markdown

    cfg = load_config(AblateConfig, None, ["arms=[blip2,pformer,control]", "pairs=[50,500,4000]"])
    text = report_markdown(cfg, cells, group_cells(cells), [], "", 1.0, descriptions=dict.fromkeys(cfg.arms, "-"),
                           gaps_closed=ablate_stats.gap_closed(cells, "blip2"))
    section = text.split("## Fraction of `blip2`'s data gap")[1]
    assert "| pformer | 50 | 0.0001 | 3 | 0.300 | 1.300 | 1.000 ± 0.000 | +0.500 | +0.50 | +0.40, +0.50, +0.60 |" \
        in section
    assert "| no gap beyond seed spread at 4000 pairs | —, +1.00, — |" in section


def test_grid_processes_share_the_cells_instead_of_training_one_twice(tmp_path):
    """Another grid process holds cell b; cell c's shared stage 2a is busy on its first try. This process runs the
    free cells first, then waits for b (its holder finishes or dies meanwhile: here, during cell d) and c."""
    from filelock import FileLock

    from pipelines.ablate import CellBusy, run_cells_once

    other = FileLock(str(tmp_path / "arm_b" / "seed0.lock"))
    (tmp_path / "arm_b").mkdir()
    other.acquire()
    calls, stage2_busy = [], {"arm_c/seed0"}

    def run_one(name):
        calls.append(name)
        if name in stage2_busy:
            stage2_busy.discard(name)
            raise CellBusy("its stage 2a is being trained")
        if name == "arm_d/seed0":
            other.release()  # the other process is done with b
        return {"cell": name}

    names = ["arm_a/seed0", "arm_b/seed0", "arm_c/seed0", "arm_d/seed0"]
    rows = run_cells_once(names, tmp_path, run_one, busy_poll_s=0.0)
    assert calls == ["arm_a/seed0", "arm_c/seed0", "arm_d/seed0", "arm_b/seed0", "arm_c/seed0"]
    assert rows == {n: {"cell": n} for n in names}
    for name in names:  # every lock is free again
        lock = FileLock(str(tmp_path / f"{name}.lock"))
        lock.acquire(timeout=0)
        lock.release()


def test_a_shared_stage2a_that_another_process_trains_puts_the_cell_off(tmp_path):
    """Two cells share one stage-2a run. While one grid process trains it, a second process's cell raises CellBusy
    at once (it does not wait for hours); once it is finished, that cell links to it without training it again."""
    from pipelines.ablate import CellBusy, _run_stage2_once
    from pipelines.stage2 import Stage2Config

    cfg = load_config(AblateConfig, None, [f"output_dir={tmp_path}"])
    s2 = load_config(Stage2Config, None, [f"logging.output_dir={tmp_path / 'cells' / 'one' / 'stage2'}"])
    trained = []

    def run_stage2(config, resume):
        # meanwhile, a second grid process reaches the other cell that shares this run
        with pytest.raises(CellBusy, match="stage2_runs/"):
            _run_stage2_once(cfg, tmp_path / "cells" / "two", s2, run_stage2)
        home = Path(config.logging.output_dir)
        home.mkdir(parents=True)
        (home / "stage2_summary.json").write_text("{}")
        trained.append(home)

    shared = _run_stage2_once(cfg, tmp_path / "cells" / "one", s2, run_stage2)
    assert len(trained) == 1 and shared.startswith("stage2_runs/")
    assert _run_stage2_once(cfg, tmp_path / "cells" / "two", s2, run_stage2) == shared
    assert len(trained) == 1
    assert (tmp_path / "cells" / "two" / "stage2").resolve() == trained[0].resolve()


def test_a_setting_added_since_a_grid_started_does_not_rename_its_shared_stage2a_runs(tmp_path):
    """A shared stage-2a run is found by a digest of its config. A setting added later (the wsd schedule) must not
    change that digest while at its default, or a grid resumed with newer code would train its stage 2a again.
    The real check: the calibration grid's two stage-2a runs were found again after these settings were added."""
    from dvlp_common.cache import fingerprint
    from dvlp_common.config import to_dict
    from pipelines.ablate import stage2_run_key
    from pipelines.stage2 import Stage2Config

    s2 = load_config(Stage2Config, None, [f"logging.output_dir={tmp_path}/a", "optim.max_steps=3000"])
    before = to_dict(s2)  # the config as a grid of session 12 keyed it: without the wsd settings
    before["logging"].pop("output_dir")
    for key in ("schedule", "decay_fraction", "decay_shape"):
        before["optim"].pop(key)
    before.pop("align_curve")
    assert stage2_run_key(s2) == fingerprint(before)
    assert stage2_run_key(s2.replace(logging=s2.logging.replace(output_dir=str(tmp_path / "b")))) == fingerprint(before)
    wsd = s2.replace(optim=s2.optim.replace(schedule="wsd"))
    assert stage2_run_key(wsd) != stage2_run_key(s2)
    assert stage2_run_key(wsd.replace(optim=wsd.optim.replace(decay_fraction=0.1))) != stage2_run_key(wsd)
    assert stage2_run_key(s2.replace(align_curve=s2.align_curve.replace(every=100))) != stage2_run_key(s2)


def test_the_key_word_plot_leaves_out_cells_whose_curves_predate_it(tmp_path):
    """A video grid resumed across versions: one cell's curve points carry the key words, an older one's do not."""
    from pipelines.ablate_report import write_plots

    cfg = load_config(AblateConfig, None, ["dataset=embedded:motion", "arms=[video_faithful,video_position]",
                                           "baseline=video_faithful"])
    points = [{"step": s, "train_seconds": 10.0 * s, "CIDEr": 0.1 * s, "exact_match": 0.0} for s in (1, 2)]
    cells = [_cell("video_faithful", 0, 1.0, curve=points, loss_curve=[{"step": 1, "lm": 2.0}]),
             _cell("video_position", 0, 1.0, curve=[{**p, "kw_order": 0.5, "kw_set": 0.5} for p in points],
                   loss_curve=[{"step": 1, "lm": 2.0}])]
    paths = write_plots(tmp_path, cfg, cells, group_cells(cells))
    assert tmp_path / "keywords_vs_steps.png" in paths


def test_caption_checker_flags_degenerate_outputs():
    check = CaptionChecker(["a red circle", "a small blue square left of a green triangle"])
    assert check("A red square.") and check("a green circle left of a blue triangle")
    assert not check("") and not check("the the the the the the the the the the the the the")
    assert not check("Paris is the capital")  # words the caption corpus never uses


def test_config_checks_arms_and_grid():
    with pytest.raises(ConfigError, match="arms.*unknown arm 'pformr'"):
        load_config(AblateConfig, None, ["arms=[blip2,pformr]"])
    with pytest.raises(ConfigError, match="baseline"):
        load_config(AblateConfig, None, ["arms=[pformer]"])
    with pytest.raises(ConfigError, match="seeds"):
        load_config(AblateConfig, None, ["seeds=[0,0]"])
    assert load_config(AblateConfig, None, []).collapse == CollapseConfig()


@pytest.mark.slow
def test_tiny_grid_end_to_end_and_rerun_skips_finished_cells(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                             monkeypatch):
    tiny = ["deepspeed.precision=fp32", "logging.tensorboard=false", "logging.log_every=1"]
    vl = [f"vision.model={tiny_vit_dir}", "vision.image_size=16", f"front.init_from={tiny_bert_dir}",
          "front.num_query_tokens=4", f"llm={tiny_llm_dir}", "optim.micro_batch_size=4", *tiny]
    overrides = [
        f"output_dir={tmp_path / 'ab'}", "arms=[blip2,pformer,tome]", "pairs=[16]", "lrs=[1e-3]", "seeds=[0,1]",
        "stage1_steps=2", "stage2_steps=2", "generative_steps=4", "curve_every=2", "curve_images=4",
        "eval_images=6", "eval_questions=4", "gallery_images=3", "retrieval_images=4", "zero_shot_images=3",
        f"stage1_overrides=[model.text_encoder={tiny_bert_dir},model.llm={tiny_llm_dir},model.num_prompts=4,"
        f"data.holdout=4,data.max_records=64,optim.micro_batch_size=8,{','.join(tiny)}]",
        f"stage2_overrides=[{','.join(vl)},align_curve.every=2,align_curve.images=3]",
        f"generative_overrides=[{','.join(vl)},eval.max_new_tokens=3,eval.meteor=false,"
        f"front.tome.init_from={tiny_bert_dir},front.tome.r=4]"]
    cfg = load_config(AblateConfig, None, overrides)
    result = run_ablation(cfg)
    out = tmp_path / "ab"
    assert len(result["cells"]) == 6
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["arm"], r["seed"]) for r in rows} == {(a, s) for a in ("blip2", "pformer", "tome") for s in "01"}
    saved = json.loads((out / "results.json").read_text())
    assert {g["arm"] for g in saved["groups"]} == {"blip2", "pformer", "tome"}
    assert {c["verdict"] for c in saved["comparisons"]} <= {"beyond seed spread", "within seed spread"}
    assert {c["paired_verdict"] for c in saved["comparisons"]} <= {"beyond seed spread", "within seed spread"}
    for cell in saved["cells"]:
        assert [p["step"] for p in cell["curve"]] == [2, 4]  # the curve points, training time increasing
        assert cell["curve"][0]["train_seconds"] < cell["curve"][1]["train_seconds"]
        assert cell["prefix_tokens"] == (4 if cell["arm"] != "tome" else cell["prefix_tokens"])
        assert (cell["arm"] == "tome") == (cell["stage2_seconds"] == 0.0)
        assert (cell["arm"] == "tome") == math.isnan(cell["retrieval_itc_r_mean"])  # 2a only
        # the mechanism after 2a (zero-shot captions from W·Z, the LLM's held-out loss) and the alignment
        # diagnostics, the baseline's included; tome has no 2a and a prefix of another size than P(y)
        for key in ("zero_shot_CIDEr_2a", "heldout_lm_step0", "align_r2_2a", "heldout_align_r2_2a", "align_r2_2b"):
            assert (cell["arm"] == "tome") == math.isnan(cell[key]), key
    # a finished cell keeps its fronts and results, not its checkpoints (a grid would fill the disk)
    # (stage 2a runs live in stage2_runs/, one per distinct stage-2a config, linked from each cell's stage2)
    assert not [*(out / "cells").rglob("checkpoints"), *(out / "stage2_runs").rglob("checkpoints")]
    assert len(list((out / "cells").rglob("front/model.safetensors"))) == 6
    assert len(list((out / "stage2_runs").rglob("front/model.safetensors"))) == 4
    tome = next(c for c in saved["cells"] if c["arm"] == "tome")
    assert tome["prefix_tokens"] < 17  # 16 patches + CLS merged by r=4 per layer
    for name in ("loss_curves.png", "metrics_vs_pairs.png", "quality_vs_time.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "beyond seed spread" in (out / "results.md").read_text() or "within seed spread" in (
        out / "results.md").read_text()
    report = (out / "results.md").read_text()
    section = report.split("## The alignment and what it is for")[1].split("\n## ")[0]
    assert "| blip2 " in section and "| pformer " in section and "| tome " in section  # tome's row: dashes
    gallery = (out / "captions.md").read_text()
    assert gallery.count("![](gallery/") == 3  # thumbnails beside the report: it renders wherever it is moved
    assert all((out / "gallery" / f"{i:03d}.png").read_bytes()[:4] == b"\x89PNG" for i in range(3))

    # a second invocation reuses every finished cell and stage 1
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr("pipelines.generative.run_generative", must_not_run)
    monkeypatch.setattr("pipelines.stage2.run_stage2", must_not_run)
    monkeypatch.setattr("pipelines.stage1.run_stage1", must_not_run)
    again = run_ablation(cfg)
    assert [c["CIDEr"] for c in again["cells"]] == [c["CIDEr"] for c in result["cells"]]
    # report_only on a larger grid: the finished cells, the missing ones listed, nothing run
    partial = run_ablation(load_config(AblateConfig, None, [*overrides, "seeds=[0,1,2]", "report_only=true"]))
    assert len(partial["cells"]) == 6 and len(partial["missing_cells"]) == 3
    assert "Not finished (left out of this report): 3 cells" in (out / "results.md").read_text()

    # re_evaluate under another protocol: the trained fronts are evaluated again (nothing trains), once
    evaluated = []
    from pipelines import evaluate as evaluate_module

    real_run_evaluate = evaluate_module.run_evaluate
    monkeypatch.setattr(evaluate_module, "run_evaluate", lambda c: evaluated.append(c.front) or real_run_evaluate(c))
    first_cell = out / "cells" / "blip2" / "pairs16_lr0.001_seed0"
    (first_cell / "generative" / "eval.json").unlink()  # proves eval.json is written anew
    changed = [*overrides[:-1], overrides[-1][:-1] + ",eval.min_new_tokens=0]", "re_evaluate=true"]
    redone = run_ablation(load_config(AblateConfig, None, changed))
    assert len(evaluated) == 6 and (first_cell / "generative" / "eval.json").is_file()
    assert all(c["eval_protocol"]["min_new_tokens"] == 0 for c in redone["cells"])
    assert [c["curve"] for c in redone["cells"]] == [c["curve"] for c in result["cells"]]
    run_ablation(load_config(AblateConfig, None, changed))
    assert len(evaluated) == 6  # already under these settings: not evaluated again
    with pytest.raises(ConfigError, match="re_evaluate"):
        load_config(AblateConfig, None, [*overrides, "re_evaluate=true", "report_only=true"])


@pytest.mark.slow
def test_the_sequential_arm_aligns_then_trains_the_lm_within_the_same_steps(tmp_path, tiny_vit_dir, tiny_bert_dir,
                                                                             tiny_llm_dir, monkeypatch):
    """pformer_seq (the authors' video recipe): ω₂·MSE alone for a share of the generative steps, then the LM loss
    alone from that front, the two adding up to the baseline's steps. Its stage 2a is pformer's: run once, shared."""
    tiny = ["deepspeed.precision=fp32", "logging.tensorboard=false", "logging.log_every=1"]
    vl = [f"vision.model={tiny_vit_dir}", "vision.image_size=16", f"front.init_from={tiny_bert_dir}",
          "front.num_query_tokens=4", f"llm={tiny_llm_dir}", "optim.micro_batch_size=4", *tiny]
    cfg = load_config(AblateConfig, None, [
        f"output_dir={tmp_path / 'ab'}", "arms=[blip2,pformer_seq,pformer]", "pairs=[16]", "lrs=[1e-3]", "seeds=[0]",
        "stage1_steps=2", "stage2_steps=2", "generative_steps=4", "seq_align_fraction=0.25", "curve_every=1",
        "curve_images=2", "eval_images=4", "eval_questions=0", "gallery_images=0",
        f"stage1_overrides=[model.text_encoder={tiny_bert_dir},model.llm={tiny_llm_dir},model.num_prompts=4,"
        f"data.holdout=4,data.max_records=64,optim.micro_batch_size=8,{','.join(tiny)}]",
        f"stage2_overrides=[{','.join(vl)}]",
        f"generative_overrides=[{','.join(vl)},eval.max_new_tokens=3,eval.meteor=false]"])
    from pipelines import stage2 as stage2_module

    runs_2a = []
    real_run_stage2 = stage2_module.run_stage2
    monkeypatch.setattr(stage2_module, "run_stage2", lambda c, **kw: runs_2a.append(c) or real_run_stage2(c, **kw))
    cells = {c["arm"]: c for c in run_ablation(cfg)["cells"]}
    seq_dir = tmp_path / "ab" / "cells" / cell_name("pformer_seq", 16, 1e-3, 0)
    # stage 2a ran twice for three arms: pformer_seq's cell links to the run pformer's cell uses
    homes = {arm: (tmp_path / "ab" / "cells" / cell_name(arm, 16, 1e-3, 0) / "stage2").resolve()
             for arm in ("blip2", "pformer", "pformer_seq")}
    assert len(runs_2a) == 2 and homes["pformer"] == homes["pformer_seq"] != homes["blip2"]
    assert (homes["pformer"] / "stage2_summary.json").is_file()
    assert cells["pformer_seq"]["stage2_run"] == cells["pformer"]["stage2_run"] != cells["blip2"]["stage2_run"]
    assert cells["pformer_seq"]["align_r2_2a"] == cells["pformer"]["align_r2_2a"]
    align = [json.loads(line) for line in (seq_dir / "generative_align" / "metrics.jsonl").read_text().splitlines()]
    lm = [json.loads(line) for line in (seq_dir / "generative" / "metrics.jsonl").read_text().splitlines()]
    assert len(align) == 1 and align[0]["lm"] == 0 and align[0]["align"] > 0  # phase 1: alignment alone
    assert len(lm) == 3 and all(r["align"] == 0 and r["lm"] > 0 for r in lm)  # phase 2: the LM loss alone
    assert [p["step"] for p in cells["pformer_seq"]["curve"]] == [2, 3, 4]  # on the baseline's step axis
    assert [p["step"] for p in cells["blip2"]["curve"]] == [1, 2, 3, 4]
    assert cells["pformer_seq"]["generative_seconds"] > json.loads(
        (seq_dir / "generative" / "generative_summary.json").read_text())["train_seconds"]


def test_weighted_arm_names_calibrate_the_alignment_at_the_papers_ratio_or_each_weight_on_its_own():
    from pipelines.ablate import arm_of, cell_name

    arm = arm_of("pformer:30")
    assert (arm.w1, arm.w2, arm.kind, arm.target) == (3.0, 30.0, "mse", "caption")
    assert arm_of("control:3").target == "corpus_mean" and arm_of("pformer_seq:1").sequential
    arm = arm_of("pformer:w1=100,w2=30")  # ω₁ on its own
    assert (arm.w1, arm.w2, arm.kind) == (100.0, 30.0, "mse") and "ω₁ = 100" in arm.description
    assert (arm_of("pformer:w1=100").w1, arm_of("pformer:w1=100").w2) == (100.0, 100.0)  # ω₂ keeps the arm's
    assert (arm_of("pformer_seq:w2=30").w1, arm_of("pformer_seq:w2=30").w2) == (3.0, 30.0)  # ω₁ at the ratio
    assert cell_name("pformer:w1=100,w2=30", 500, 1e-4, 0) == "pformer_w1-100_w2-30/pairs500_lr0.0001_seed0"
    assert cell_name("pformer:30", 500, 1e-4, 0) == "pformer_w30/pairs500_lr0.0001_seed0"
    for bad in ("blip2:10", "pformer:x", "pformer:0", "nope:1", "pformer:w3=1", "pformer:w1=1,w1=2",
                "pformer:w1=x", "pformer:w1=-1", "blip2:w1=1"):
        with pytest.raises(ConfigError, match="arms"):
            arm_of(bad)
    cfg = load_config(AblateConfig, None, ["arms=[blip2,pformer:10,pformer:100]", "validation_images=50",
                                           "eval_split=validation"])
    assert cfg.arms[1] == "pformer:10"
    with pytest.raises(ConfigError, match="eval_split"):
        load_config(AblateConfig, None, ["eval_split=validation"])


def test_a_setting_added_since_a_cell_ran_is_no_protocol_change():
    """re_evaluate compares a finished cell's recorded eval settings with the current ones; a setting added later
    (here eval.frame_order) takes its default, which keeps the old behaviour, so it alone re-evaluates nothing."""
    from dvlp_common.config import to_dict
    from pipelines.ablate import _recorded_protocol
    from vl_align.evaluation import EvalConfig

    current = to_dict(EvalConfig(max_images=7))
    old_row = {"eval_protocol": {k: v for k, v in current.items() if k != "frame_order"}}
    assert _recorded_protocol(old_row, EvalConfig) == current
    assert _recorded_protocol({"eval_protocol": {**old_row["eval_protocol"], "max_images": 8}}, EvalConfig) != current
    assert _recorded_protocol({}, EvalConfig) is None


class _Stop(Exception):
    pass


def _capture_stages(monkeypatch, stop_after: str) -> dict:
    """Replace the stages a cell runs by recorders of their configs; raise ``_Stop`` once ``stop_after`` has been
    reached ("stage2" or "generative"). Returns the dict they record into (stage name -> config)."""
    from pipelines import generative as generative_module
    from pipelines import stage2 as stage2_module

    seen = {}

    def capture(name):
        def run(c, **kwargs):
            seen[name] = c
            if name == stop_after:
                raise _Stop
            return {}
        return run

    monkeypatch.setattr(stage2_module, "run_stage2", capture("stage2"))
    monkeypatch.setattr(generative_module, "run_generative", capture("generative"))
    return seen


def test_an_arms_front_settings_reach_both_stages(tmp_path, monkeypatch):
    """elip_la1: ELIP's schedule with a look-ahead of 1 block at each pruning point, in stage 2a and in 2b."""
    from pipelines.ablate import run_cell

    seen = _capture_stages(monkeypatch, "generative")
    cfg = load_config(AblateConfig, None, [f"output_dir={tmp_path}", "arms=[blip2,elip_la1]",
                                           'stage2_overrides=["front.elip.lookahead_depths=[2,2,2]"]'])
    with pytest.raises(_Stop):
        run_cell(cfg, "elip_la1", 16, 1e-4, 0, tmp_path / "pformer", None)
    for stage in ("stage2", "generative"):
        assert seen[stage].front.kind == "elip"
        assert list(seen[stage].front.elip.lookahead_depths) == [1, 1, 1], stage  # the arm wins over the grid's


@pytest.mark.parametrize("name", ["ablate_fair_calibrate.yaml", "ablate_fair.yaml"])
def test_the_fair_test_grids_build_their_stages_as_the_protocol_says(tmp_path, monkeypatch, name):
    """Issue 19's protocol: 32 prompts and queries, stage 2a with W at 30x on its own schedule, the arm's weights
    (ω₁ = ω₂/10), 200 validation images carved out of every cell; the stage overrides parse and reach the stages."""
    from pipelines.ablate import CONFIG_DIR, arm_of, run_cell

    seen = _capture_stages(monkeypatch, "stage2")
    cfg = load_config(AblateConfig, CONFIG_DIR / name, [f"output_dir={tmp_path}"])
    assert "model.num_prompts=32" in cfg.stage1_overrides and cfg.validation_images == 200
    for arm in cfg.arms:
        seen.clear()
        with pytest.raises(_Stop):
            run_cell(cfg, arm, cfg.pairs[0], cfg.lrs[0], 0, tmp_path / "pformer", None)
        s2 = seen["stage2"]
        assert s2.front.num_query_tokens == 32 and s2.optim.max_steps == 3000 and s2.optim.warmup_steps == 20
        assert s2.optim.lr_scale == {"llm_proj": 30} and s2.align.weight == arm_of(arm).w1
        assert s2.data.validation_images == 200 and s2.zero_shot.enabled
        if name == "ablate_fair.yaml":  # the curve's stage 2a is read for convergence on validation images only
            assert s2.align_curve.every == 250 and s2.align_curve.split == "validation"
            assert s2.zero_shot.split == "test"
    assert any(arm_of(a).w1 == 0 for a in cfg.arms) and any(arm_of(a).w1 > 0 for a in cfg.arms)


def test_scenes_grids_report_what_the_captions_get_right_slot_by_slot():
    from pipelines.ablate import _slot_metrics
    from pipelines.ablate_report import slots_section

    preds = [{"prediction": "a large pink circle left of a small red star",
              "references": ["a large pink circle left of a small red star"]},
             {"prediction": "A large pink circle above a small red star.",
              "references": ["a large blue circle above a small red star"]}]
    slots = _slot_metrics(preds, "slot")
    assert slots["slot_well_formed"] == slots["slot_relation"] == 1.0 and slots["slot_first_colour"] == 0.5
    assert len(slots) == 8
    # another data set (references off the template) or no predictions: nan, and no report section
    assert all(math.isnan(v) for v in _slot_metrics([{"prediction": "a cat", "references": ["a cat"]}], "x").values())
    assert all(math.isnan(v) for v in _slot_metrics([], "zero_shot_slot").values())
    nan_slots = {k: float("nan") for k in ablate_stats.SLOT_METRICS}
    assert slots_section(group_cells([_cell("blip2", s, 1.0, **nan_slots) for s in range(2)])) == []
    cells = [_cell("blip2", s, 1.0, **{**nan_slots, **slots}) for s in range(2)]
    text = "\n".join(slots_section(group_cells(cells)))
    assert "## Caption slots, after the generative stage" in text and "zero-shot" not in text
    assert "| first colour |" in text and "| 0.500 ± 0.000 |" in text  # first colour, the same in both seeds
