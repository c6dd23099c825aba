"""The benchmark's FLOP counter against hand counts and torch's FlopCounterMode, and its measurement units end to
end on the tiny fixtures (no timing assertions)."""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks import flops as F
from benchmarks.bench import measure_in_subprocess, measure_step, plan, run_case


def test_linear_layer_hand_count():
    led = F.FlopLedger()
    led.linear("x", tokens=15, d_in=8, d_out=4, grad=F.TRAIN)
    assert (led.forward, led.backward) == (2 * 15 * 8 * 4, 2 * 2 * 15 * 8 * 4)
    frozen = F.FlopLedger()
    frozen.linear("x", 15, 8, 4, F.THROUGH)
    frozen.linear("y", 15, 8, 4, F.NONE)
    assert (frozen.forward, frozen.backward) == (2 * 960, 960)
    # torch executes the same forward; its backward skips the input gradient nobody needs
    lin = torch.nn.Linear(8, 4)
    with F.flop_counter() as fwd:
        y = lin(torch.randn(3, 5, 8))
    with F.flop_counter() as bwd:
        y.sum().backward()
    assert fwd.get_total_flops() == 960 and bwd.get_total_flops() == 960


def test_attention_matmuls_count_twice_in_backward_even_when_frozen():
    led = F.FlopLedger()
    led.attention("a", batch_heads=6, lq=5, lk=7, head_dim=4, grad=F.THROUGH)
    assert led.forward == 2 * (2 * 6 * 5 * 4 * 7) and led.backward == 2 * led.forward


def test_cpu_attention_kernel_is_counted():
    q = torch.randn(2, 3, 5, 8)
    with F.flop_counter() as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(2, 1, 5, 5))
    assert fc.get_total_flops() == 2 * (2 * 2 * 3 * 5 * 8 * 5)


def _tiny_qformer(queries=4):
    from vl_align.qformer import QFormer, QFormerConfig

    torch.manual_seed(0)
    return QFormer(QFormerConfig(vision_width=24, num_query_tokens=queries, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, vocab_size=50,
                                 max_position_embeddings=16, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0))


def test_qformer_queries_pass_hand_count_and_torch():
    b, q, nv, h, inter, dv = 3, 4, 17, 32, 64, 24
    # by hand: 2 layers of self-attention (q,k,v,o + scores + values) and query FFN over 4 queries; layer 0 also
    # cross-attends (q, o over the queries; k, v over the 17 image tokens of width 24)
    self_attn = 4 * 2 * q * h * h + 2 * (2 * q * q * h)
    ffn = 2 * (2 * q * h * inter)
    cross = 2 * (2 * q * h * h) + 2 * (2 * nv * dv * h) + 2 * (2 * q * nv * h)
    per_sample = 2 * (self_attn + ffn) + cross
    model = _tiny_qformer(q)
    dims = F.QFormerDims.from_config(model.hf_config, q)
    led = F.FlopLedger()
    F.qformer_pass(led, "qformer", b, q, 0, nv, dims, F.TRAIN)
    assert led.forward == b * per_sample and led.backward == 2 * led.forward
    with F.flop_counter() as fc:
        model.forward_queries(torch.randn(b, nv, dv))
    assert fc.get_total_flops() == led.forward


def test_qformer_joint_pass_and_lm_head_match_torch():
    b, t, nv = 2, 6, 9
    model = _tiny_qformer()
    dims = F.QFormerDims.from_config(model.hf_config, model.num_query_tokens)
    led = F.FlopLedger()
    F.qformer_pass(led, "qformer", b, dims.queries, t, nv, dims, F.TRAIN)
    F.qformer_lm_head(led, "head", b, t, dims, F.TRAIN)
    ids = torch.randint(1, 50, (b, t))
    with F.flop_counter() as fc:
        model.forward_generation(torch.randn(b, nv, 24), None, ids, torch.ones_like(ids))
    assert fc.get_total_flops() == led.forward


def _tiny_overrides(stage, vit, bert, llm):
    if stage == "stage1":
        return [f"model.text_encoder={bert}", f"model.llm={llm}", "model.num_prompts=4"]
    return [f"vision.model={vit}", f"front.init_from={bert}", "front.num_query_tokens=4", f"llm={llm}",
            f"front.tome.init_from={bert}", "front.tome.r=4"]


def _spec(stage, front, vit, bert, llm, **kw):
    return {"name": f"{stage}/{front}", "kind": "step", "stage": stage, "front": front, "image_size": 16, "batch": 4,
            "dtype": "float32", "device": "cpu", "warmup": 0, "steps": 1, "count_executed": True,
            "overrides": _tiny_overrides(stage, vit, bert, llm), **kw}


@pytest.mark.parametrize("stage,front", [("stage1", None), ("representation", "qformer"),
                                         ("representation", "elip"), ("representation", "qformer+tower"),
                                         ("generative", "qformer"),
                                         ("generative", "tome"), ("generative", "elip")])
def test_step_units_end_to_end_on_tiny_models(stage, front, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir):
    r = run_case(_spec(stage, front, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir))
    assert r["samples_per_s"] > 0 and math.isfinite(r["loss"])
    fl, ex = r["flops_per_sample"], r["executed_flops_per_sample"]
    # the analytic forward is exactly what torch executes (tiny models make every small term visible)
    assert fl["forward"] == pytest.approx(ex["forward"], rel=1e-9)
    assert 0 < ex["backward"] <= fl["backward"] * 1.3  # torch recomputes attention scores, skips unneeded grads
    tokens = r["tokens"]
    if stage == "stage1":
        assert tokens["prefix_tokens_to_llm"] == 4
        return
    assert tokens["vision_tokens"] == 17  # 16 px / 4 px patches + [CLS]
    if front == "tome":  # r=4 per layer over 2 layers: 17 -> 13 -> 9
        assert tokens["visual_tokens_to_next_stage"] == 9 and tokens["connector_tokens_per_layer"] == [13, 9]
    else:
        assert tokens["visual_tokens_to_next_stage"] == 4
    if front == "qformer+tower":  # the frozen tower's forward is in the step and in the count
        assert fl["by_component"]["vision"] > 0 and tokens["vision_tokens_into_front"] == 17
    if front == "elip":  # keep 14, 10, 6 of 16 patches (+1 fused) after layers 2, 4, 10
        assert tokens["vision_tokens_into_front"] == 1 + 6 + 1
        assert tokens["vit_tokens_per_layer"] == [17, 17, 16, 16, 12, 12, 12, 12, 12, 12, 8, 8]
        assert tokens["vit_mean_tokens_per_layer"] == pytest.approx(154 / 12)


@pytest.mark.parametrize("vision_input", ["features", "pixels"])
def test_blip2_reference_unit(vision_input, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir):
    spec = _spec("reference", f"blip2_hf_{vision_input}", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                 vision_input=vision_input)
    r = run_case(spec)  # raises if the image does not reach the loss
    sh = r["shapes"]
    assert sh["loss_own_images"] != sh["loss_other_images"]
    assert r["tokens"]["visual_tokens_to_next_stage"] == 4
    assert r["flops_per_sample"]["forward"] == pytest.approx(r["executed_flops_per_sample"]["forward"], rel=1e-9)
    frozen_vision = 12 * 32 * 32 * 4 if vision_input == "pixels" else 0
    assert r["frozen_params"] > frozen_vision  # LLM (+ vision tower) frozen; Q-Former, queries, projection train


def test_subprocess_measurement_reports_its_own_peak_memory(tmp_path):
    r = measure_in_subprocess({"name": "peak", "kind": "peak", "device": "cpu", "sizes": [64], "repeats": 1},
                              tmp_path, timeout_s=300)
    assert "error" not in r, r.get("log_tail")
    assert r["peak"]["float32"]["tflops"] > 0 and r["peak_rss_mb"] > 10


def test_plan_covers_every_stage_and_front():
    names = [c["name"] for c in plan(quick=True, device="cpu", dtype="float32")]
    for part in ("stage1@", "representation/qformer@112", "representation/elip@112", "representation/qformer+tower@112",
                 "generative/qformer@112",
                 "generative/tome@112", "generative/elip@112", "blip2_hf_features", "blip2_hf_pixels",
                 "generative/qformer@112/bfloat16"):
        assert any(part in n for n in names), part
    full = plan(quick=False, device="cpu", dtype="float32")
    assert {c["image_size"] for c in full if c.get("scaling")} == {112, 224, 448}


def test_elip_schedule_analysis_counts_the_look_ahead():
    """The paper's look-ahead (7 extra full-length blocks of 12) costs more than its 29% token saving returns."""
    from benchmarks.elip_schedules import analyse

    rows = {(r["tower"], r["schedule"]): r for r in analyse()}
    paper, cheap = rows["dinov2-s14", "paper"], rows["dinov2-s14", "paper, look-ahead 1"]
    assert paper["token_reduction"] == pytest.approx(cheap["token_reduction"]) == pytest.approx(0.29, abs=0.01)
    assert paper["speedup_bound"] < 1.0 < cheap["speedup_bound"]
    assert paper["lookahead_share"] > 0.4 > cheap["lookahead_share"]


def test_ab_times_both_arms_in_one_process(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir):
    """benchmarks.ab builds both arms as the stages do and times them in alternating rounds; each arm gets its own
    config (here the CPU dropout kernel, the A/B this tool was written for)."""
    from benchmarks import ab
    common = _tiny_overrides("representation", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir)
    r = ab.measure("representation/qformer", ["deepspeed.cpu_dropout=torch"], ["deepspeed.cpu_dropout=bits"],
                   common, batch=2, rounds=3, warmup=1)
    assert len(r["times_s"]["A"]) == len(r["times_s"]["B"]) == len(r["ratios_b_over_a"]) == 3
    assert all(t > 0 for t in r["times_s"]["A"] + r["times_s"]["B"]) and 0 <= r["b_faster_rounds"] <= 3
    assert r["dropout_modules"] == {"A": 0, "B": r["dropout_modules"]["B"]} and r["dropout_modules"]["B"] > 0
    ab.write(r, tmp_path)
    assert (tmp_path / "ab.md").read_text().startswith("# A/B: representation/qformer")


def test_profile_step_warms_up_and_reports_page_faults(tmp_path, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir):
    """The profile attributes every operator to a phase; it warms up until a step runs without page faults (at most
    ``max_warmup`` steps) and says how many faults its profiled steps had (they inflate fills and copies)."""
    from benchmarks import profile_step

    overrides = _tiny_overrides("representation", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir)
    r = profile_step.profile_one("representation_qformer", 2, 1, overrides, max_warmup=3, image_size=16)
    assert 2 <= len(r["warmup_page_faults"]) <= 3 and r["profiled_page_faults_per_step"] >= 0
    assert r["category_ms"]["matmul"] > 0 and r["frozen_params_with_grad"] == []
    assert set(r["phase_ms"]) == set(profile_step.PHASES) and r["phase_ms"]["backward"] > 0
    profile_step.write([r], tmp_path, overrides)
    assert "page faults per profiled step" in (tmp_path / "profile.md").read_text()


def test_profile_step_refuses_a_filter_that_matches_no_step(capsys):
    """``--only representation/qformer`` (bench's spelling) once profiled nothing and wrote an empty table."""
    from benchmarks import profile_step

    with pytest.raises(SystemExit) as exit_info:
        profile_step.main(["--only", "representation/qformer"])
    assert exit_info.value.code == 2 and "representation_qformer" in capsys.readouterr().err


def test_cell_cost_times_the_grids_steps_as_the_runner_builds_them(tmp_path, monkeypatch, tiny_vit_dir,
                                                                   tiny_bert_dir, tiny_llm_dir):
    """benchmarks.cell: each stage's step of one grid cell at the grid's shapes, with the overrides the runner gives
    that stage (checked against the configs run_cell builds); projected time = steps x step time, floor = steps x
    FLOPs / the matmul peak, and a target under the floor is said to be out of reach."""
    import yaml

    from benchmarks import bench, cell
    from dvlp_common.config import ConfigError, load_config
    from pipelines import generative as generative_module
    from pipelines import stage2 as stage2_module
    from pipelines.ablate import AblateConfig, run_cell
    from pipelines.generative import GenerativeConfig
    from pipelines.stage2 import Stage2Config

    front = [*_tiny_overrides("representation", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir), "vision.image_size=16",
             "optim.micro_batch_size=3"]
    grid = {"dataset": "embedded:easy-vqa", "arms": ["blip2", "pformer:w1=100,w2=30"],
            "stage1_steps": 3, "stage2_steps": 7, "generative_steps": 5,
            "stage1_overrides": [*_tiny_overrides("stage1", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir),
                                 "optim.micro_batch_size=2"],
            "stage2_overrides": front, "generative_overrides": front}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    cfg = load_config(AblateConfig, tmp_path / "grid.yaml", [f"output_dir={tmp_path / 'grid'}"])
    cases = cell.plan(cfg, "pformer:w1=100,w2=30", "cpu", "float32", warmup=0, steps=1)
    assert [c["name"] for c in cases] == ["matmul_peak", "stage1", "representation", "generative",
                                          "matmul_peak_after"]
    assert [c.get("cell_steps") for c in cases[1:-1]] == [3, 7, 5] and [c["batch"] for c in cases[1:-1]] == [2, 3, 3]
    assert [c["name"] for c in cell.plan(cfg, "blip2", "cpu", "float32", 0, 1)][1:-1] == [
        "stage1", "representation", "generative"]
    with pytest.raises(ConfigError, match="video"):  # --arm names it
        cell.plan(cfg, "video_faithful", "cpu", "float32", 0, 1)

    # the same stage configs as the runner's (what shapes the step: data, weights, queries, batch, image size)
    seen = {}

    def record(name):
        def run(c, **kwargs):
            seen[name] = c
            return {}
        return run
    monkeypatch.setattr(stage2_module, "run_stage2", record("stage2"))
    monkeypatch.setattr(generative_module, "run_generative", record("generative"))
    with pytest.raises(FileNotFoundError):  # at the cell's summary, after the stages (nothing was trained)
        run_cell(cfg, "pformer:w1=100,w2=30", 500, 1e-4, 0, tmp_path / "pformer", None)
    ours = {"stage2": load_config(Stage2Config, bench.CONFIG_DIR / "stage2.yaml", cases[2]["overrides"]),
            "generative": load_config(GenerativeConfig, bench.CONFIG_DIR / "generative.yaml", cases[3]["overrides"])}
    for stage, c in ours.items():
        runner = seen[stage]
        for key in ("data.source", "front.kind", "front.num_query_tokens", "align.kind", "align.weight",
                    "optim.micro_batch_size", "vision.image_size", "vision.model", "front.init_from"):
            section, field = key.split(".")
            assert getattr(getattr(c, section), field) == getattr(getattr(runner, section), field), (stage, key)
    assert (ours["stage2"].align.weight, ours["generative"].align.weight) == (100.0, 30.0)

    # measured in this process (the tool runs each in a fresh subprocess)
    for c in (cases[0], cases[-1]):
        c.update(sizes=[64], repeats=1)
    results = [{**bench.run_case(c), "spec": c, "peak_rss_mb": 1.0} for c in cases]
    report = cell.assemble(results, target_minutes=1e-6)
    assert report["peak_tflops"]["float32"] == max(r["peak"]["float32"]["tflops"] for r in (results[0], results[-1]))
    stages, total = report["stages"], report["cell"]
    for name, c in zip(("stage1", "representation", "generative"), cases[1:-1]):
        s, r = stages[name], results[cases.index(c)]
        assert s["projected_s"] == pytest.approx(c["cell_steps"] * r["step_time_s"])
        assert s["floor_s"] == pytest.approx(c["cell_steps"] * r["flops_per_sample"]["total"] * c["batch"]
                                             / (report["peak_tflops"]["float32"] * 1e12))
    assert total["projected_s"] == pytest.approx(stages["representation"]["projected_s"]
                                                 + stages["generative"]["projected_s"])  # stage 1: once per grid
    assert total["mfu_needed"] > 1
    full = {"config": "grid.yaml", "arm": "pformer:w1=100,w2=30", "overrides": [], "dtype": "float32",
            "machine": bench.machine_info("cpu"), "warmup_steps": 0, "timed_steps": 1, "result": report, "wall_s": 1.0,
            "load_average_end": [0.0, 0.0, 0.0]}
    cell.write_markdown(full, tmp_path / "cell.md")
    text = (tmp_path / "cell.md").read_text()
    assert "stage1 (once per grid)" in text and "below the floor" in text


def test_ab_times_a_video_step_against_the_single_frame_step(tmp_path, motion_cache, tiny_vit_dir, tiny_bert_dir,
                                                             tiny_llm_dir):
    """Issue 20's 'training time per step against the image pipeline': benchmarks.ab builds a video front's
    generative step as the stage serves it (clips of embedded:motion, the frozen blocks from the frame cache) beside
    the single-frame step; benchmarks.bench, which reports MFU, refuses it (no FLOP count for the live blocks)."""
    from benchmarks import ab
    common = [*_tiny_overrides("generative", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir), "data.source=embedded:motion",
              "front.video.enabled=true", "front.video.hidden_dim=16", "front.video.num_heads=4"]
    r = ab.measure("generative/tome", ["front.video.num_frames=1", "front.video.blocks=[]"],
                   ["front.video.blocks=[10,11]", "front.video.max_frames=8"], common, batch=2, rounds=2, warmup=1,
                   image_size=16)
    assert len(r["times_s"]["B"]) == 2 and all(t > 0 for t in r["times_s"]["A"] + r["times_s"]["B"])
    spec = _spec("generative", "tome", tiny_vit_dir, tiny_bert_dir, tiny_llm_dir)
    spec["overrides"] += ["data.source=embedded:motion", "front.video.enabled=true", "front.video.blocks=[11]",
                          "front.video.hidden_dim=16", "front.video.num_heads=4"]
    with pytest.raises(ValueError, match="no FLOP count for a video front"):
        measure_step(spec)
