"""Stage 1 end to end through DeepSpeed (one process, gloo on CPU) on tiny random models."""
from __future__ import annotations

import json

import pytest

from dvlp_common.config import load_config
from pipelines.stage1 import Stage1Config, run_stage1, split_holdout


def _cfg(tmp_path, corpus, bert, llm, out="run", **extra):
    overrides = [f"model.text_encoder={bert}", f"model.llm={llm}", "model.num_prompts=4",
                 f"data.source={corpus}", "data.holdout=4", "optim.max_steps=6", "optim.warmup_steps=2",
                 "optim.micro_batch_size=4", "optim.lr=1e-3", "optim.min_lr=1e-4",
                 f"logging.output_dir={tmp_path / out}", "logging.log_every=1", "logging.save_every=2",
                 "logging.tensorboard=false", "logging.progress_bar=false", "eval.max_new_tokens=4",
                 "deepspeed.precision=fp32"]
    return load_config(Stage1Config, None, overrides + [f"{k}={v}" for k, v in extra.items()])


def _losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_split_holdout_removes_every_copy():
    texts = ["a", "b", "a", "c", "d", "b"]
    train, held = split_holdout(texts, 2, seed=0)
    assert len(held) == 2 and not set(held) & set(train)
    assert len(train) + sum(texts.count(h) for h in held) == len(texts)
    with pytest.raises(ValueError, match="leaves no training sentence"):
        split_holdout(texts, 4, seed=0)


def test_stage1_runs_and_writes_outputs(tmp_path, small_corpus, tiny_bert_dir, tiny_llm_dir):
    cfg = _cfg(tmp_path, small_corpus, tiny_bert_dir, tiny_llm_dir)
    summary = run_stage1(cfg)
    run = tmp_path / "run"
    assert summary["steps"] == 6
    for name in ("config.yaml", "metrics.jsonl", "heldout.txt", "pformer/model.safetensors", "eval.json",
                 "eval.md", "predictions.json", "stage1_summary.json"):
        assert (run / name).exists(), name
    assert load_config(Stage1Config, run / "config.yaml") == cfg
    rows = _losses(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all({"lm", "vq", "contrastive", "lr", "samples_per_s"} <= set(r) for r in rows)
    report = json.loads((run / "eval.json").read_text())
    assert list(report) == ["untrained", "trained"] and report["trained"]["num_sentences"] == 4
    assert 0.0 <= report["trained"]["token_accuracy"] <= 1.0 and "bleu4" in report["trained"]
    preds = json.loads((run / "predictions.json").read_text())
    assert len(preds["trained"]) == 4 and set(preds["trained"][0]) == {"sentence", "regeneration"}
    # only the last keep_checkpoints complete checkpoints remain
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]


def test_stage1_resume_is_exact(tmp_path, small_corpus, tiny_bert_dir, tiny_llm_dir):
    straight = _cfg(tmp_path, small_corpus, tiny_bert_dir, tiny_llm_dir, out="straight", **{"eval.enabled": "false"})
    run_stage1(straight)
    split = _cfg(tmp_path, small_corpus, tiny_bert_dir, tiny_llm_dir, out="split", **{"eval.enabled": "false"})
    first = run_stage1(split, stop_after=3)
    assert first["steps"] == 3
    # as if the process had died after step 3 but before its checkpoint: the run must go back to step 2
    import shutil

    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step_00000003")
    second = run_stage1(split, resume=True)
    assert second["resumed_from"] == 2
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "lm", "vq", "contrastive", "lr"):
            assert ra[key] == rb[key], (ra["step"], key)  # bitwise on CPU


def test_stage1_encoder_decoder_llm(tmp_path, small_corpus, tiny_bert_dir, tiny_t5_dir):
    summary = run_stage1(_cfg(tmp_path, small_corpus, tiny_bert_dir, tiny_t5_dir, **{"optim.max_steps": 3,
                                                                                       "optim.warmup_steps": 1}))
    assert summary["steps"] == 3 and "eval" in summary


def test_missing_corpus_is_one_clear_error(tmp_path, tiny_bert_dir, tiny_llm_dir):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        run_stage1(_cfg(tmp_path, tmp_path / "nope.txt", tiny_bert_dir, tiny_llm_dir))


def test_missing_model_path_is_one_clear_error(tmp_path, small_corpus, tiny_llm_dir):
    from dvlp_common.zoo import MissingModelError

    with pytest.raises(MissingModelError, match="model path does not exist: /no/such/model"):
        run_stage1(_cfg(tmp_path, small_corpus, "/no/such/model", tiny_llm_dir))


def test_a_wsd_run_extended_in_its_constant_phase_is_the_longer_run(tmp_path, small_corpus, tiny_bert_dir,
                                                                    tiny_llm_dir, capsys):
    """Warmup-stable-decay lets a run be lengthened until it converges: a 6-step run stopped at step 3 (before its
    decay starts at step 5) and resumed with max_steps=10 is, bitwise, the run planned for 10 steps."""
    wsd = {"eval.enabled": "false", "optim.schedule": "wsd", "optim.decay_fraction": "0.2"}
    run_stage1(_cfg(tmp_path, small_corpus, tiny_bert_dir, tiny_llm_dir, out="long", **wsd, **{"optim.max_steps": 10}))
    short = _cfg(tmp_path, small_corpus, tiny_bert_dir, tiny_llm_dir, out="extended", **wsd)
    assert short.optim.decay_start == 5
    run_stage1(short, stop_after=4)
    capsys.readouterr()
    run_stage1(short.replace(optim=short.optim.replace(max_steps=10)), resume=True)
    assert "the schedule changed" not in capsys.readouterr().out  # same rate at step 4 under both plans
    a, b = _losses(tmp_path / "long"), _losses(tmp_path / "extended")
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["lr"] for r in a][2:8] == [1e-3] * 6  # warm-up of 2 steps, constant until the decay at step 8
    for ra, rb in zip(a, b):
        for key in ("loss", "lm", "vq", "contrastive", "lr"):
            assert ra[key] == rb[key], (ra["step"], key)  # bitwise on CPU
    # a run resumed into a different schedule says so
    run_stage1(short.replace(optim=short.optim.replace(max_steps=12, lr=2e-3)), resume=True)
    assert "the schedule changed at the resume" in capsys.readouterr().out
