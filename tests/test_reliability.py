"""Reliability: kill -9 and resume, a crash during a save, safe checkpoint loading, bad inputs, NaN/inf stop and
reproducibility, on tiny random models (CPU, fp32).

Covered elsewhere, not repeated here: bad records at the loader level (missing / truncated / non-image files, empty
captions, invalid UTF-8, jsonl lines that are not JSON, COCO files missing a key, the skip threshold) in
``test_data.py``; misspelt keys and wrong types in ``test_config.py``; a missing corpus and a missing model path in
``test_stage1.py``; resume after a clean stop in ``test_stage1.py::test_stage1_resume_is_exact``; DeepSpeed batch
overrides that contradict the config, at the function level, in ``test_distributed.py``.

The ``slow`` tests start real training processes (``python -m pipelines.cli``) and SIGKILL them.
"""
from __future__ import annotations

import ast
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import shape_png

from dvlp_common.config import ConfigError, load_config
from dvlp_common.records import SkipReport
from pipelines import checkpoint, training
from pipelines.cli import main
from pipelines.stage1 import Stage1Config, run_stage1
from pipelines.stage2 import Stage2Config, run_stage2

ROOT = Path(__file__).resolve().parent.parent
STAGE1_KEYS = ("loss", "lm", "vq", "contrastive", "lr")
STAGE2_KEYS = ("loss", "itc", "itm", "itg", "align", "lr")
MAX_STEPS, SAVE_EVERY = 10, 3


# ---------------------------------------------------------------------------------------------------------------
# inputs and arguments
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}


def _write_pairs(folder: Path, extra_lines: list[bytes] = ()) -> Path:
    """12 good image-text pairs (16-px PNGs) in ``folder/pairs.jsonl``, then ``extra_lines``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        for j, shape in enumerate(("square", "circle", "square")):
            file = f"img_{i}_{j}.png"
            (folder / file).write_bytes(shape_png(rgb, shape))
            lines.append(json.dumps({"image": file, "caption": f"a {name} {shape}", "image_id": f"{i}-{j}"}).encode())
    path = folder / "pairs.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in [*lines, *extra_lines]))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    colours, shapes = ["red", "blue", "green", "yellow"], ["circle", "square", "triangle"]
    lines = [f"a {c} {s}" for c in colours for s in shapes] + [f"the {s} is {c}" for c in colours for s in shapes]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return _write_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A DVLP_CACHE of this module's own, so that the first stage-2 run really computes its caches."""
    return tmp_path_factory.mktemp("dvlp_cache")


def _stage1_args(corpus: Path, bert: str, llm: str, out: Path, **extra) -> list[str]:
    args = [f"model.text_encoder={bert}", f"model.llm={llm}", "model.num_prompts=4", f"data.source={corpus}",
            "data.holdout=4", f"optim.max_steps={MAX_STEPS}", "optim.warmup_steps=2", "optim.micro_batch_size=4",
            "optim.lr=1e-3", "optim.min_lr=1e-4", f"logging.output_dir={out}", "logging.log_every=1",
            f"logging.save_every={SAVE_EVERY}", "logging.keep_checkpoints=10", "logging.tensorboard=false",
            "logging.progress_bar=false", "eval.enabled=false", "deepspeed.precision=fp32"]
    return args + [f"{k}={v}" for k, v in extra.items()]


def _stage2_args(pairs: Path, vit: str, bert: str, llm: str, pformer: str, out: Path, **extra) -> list[str]:
    args = [f"vision.model={vit}", "vision.image_size=16", f"front.init_from={bert}", "front.num_query_tokens=4",
            f"pformer={pformer}", f"llm={llm}", f"data.source={pairs}", "data.max_pairs=null",
            f"optim.max_steps={MAX_STEPS}",
            "optim.warmup_steps=1", "optim.micro_batch_size=4", f"logging.output_dir={out}", "logging.log_every=1",
            f"logging.save_every={SAVE_EVERY}", "logging.keep_checkpoints=10", "logging.tensorboard=false",
            "logging.progress_bar=false", "deepspeed.precision=fp32"]
    return args + [f"{k}={v}" for k, v in extra.items()]


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # a line still being written (no newline yet) is left out
    return [json.loads(line) for line in lines if line.strip()]


def _assert_same_losses(got: list[dict], want: list[dict], keys, context: str = "") -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want], context
    for a, b in zip(got, want):
        for key in keys:
            assert a[key] == b[key], f"{context} step {a['step']} {key}: {a[key]!r} != {b[key]!r}"  # bitwise


def _checkpoint_steps(run: Path) -> list[int]:
    manager = checkpoint.CheckpointManager(run, keep=10, dist_info=None)
    return [int(p.name.split("_")[1]) for p in manager.complete()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ---------------------------------------------------------------------------------------------------------------
# subprocesses
def _env(cache_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DVLP_CACHE=str(cache_dir), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    return env


def _cli(args: list[str], cache_dir: Path, wrapper: str | None = None, check: bool = True,
         timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m pipelines.cli ARGS``, or ``python -c WRAPPER ARGS`` (a wrapper ends by calling the CLI)."""
    cmd = [sys.executable, "-c", wrapper, *args] if wrapper else [sys.executable, "-m", "pipelines.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(cache_dir), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


_CALL_CLI = "from pipelines.cli import main\nsys.exit(main(sys.argv[1:]))\n"

# The process to be killed runs each step 0.2 s slower (a sleep where each step re-seeds), so that the poller below
# sees every step; its numbers are those of the plain CLI.
THROTTLED = """import sys, time
import pipelines.training as T
_seed = T.seed_everything
def _slow(seed):
    time.sleep(0.2)
    _seed(seed)
T.seed_everything = _slow
""" + _CALL_CLI


def _kill_during_save(step: int) -> str:
    """A CLI that SIGKILLs itself in the save of ``step``: DeepSpeed's files are in staging, the trainer state is
    half written, nothing is renamed yet."""
    return f"""import os, signal, sys
import pipelines.checkpoint as C
_write = C.write_json_atomic
def _write_then_die(path, data, **kwargs):
    if path.name == C.STATE_NAME and data["step"] == {step}:
        (path.parent / f".{{path.name}}.partial.tmp").write_text('{{"step": ')
        os.kill(os.getpid(), signal.SIGKILL)
    _write(path, data, **kwargs)
C.write_json_atomic = _write_then_die
""" + _CALL_CLI


def _kill_at_random_step(command: str, args: list[str], run: Path, cache_dir: Path) -> tuple[int, list[dict]]:
    """Start a throttled training process, SIGKILL it once a checkpoint exists and a random later step was logged.
    Returns (the step chosen, the metric rows at the kill)."""
    target = random.randint(SAVE_EVERY + 1, MAX_STEPS - 1)
    log = run.parent / "killed_run.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", THROTTLED, command, *args], cwd=ROOT, env=_env(cache_dir),
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            rows = _rows(run)
            if rows and rows[-1]["step"] >= target and _checkpoint_steps(run):
                os.kill(proc.pid, signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before step {target}:\n{log.read_text()[-3000:]}")
            time.sleep(0.02)
        else:
            pytest.fail(f"step {target} not reached in time")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"killed at step {target}: rc {proc.returncode}"
    return target, _rows(run)


def _resumed_from(stdout: str) -> int:
    found = re.findall(r"resumed from \S+ \(step (\d+)\)", stdout)
    assert found, stdout[-3000:]
    return int(found[-1])


# ---------------------------------------------------------------------------------------------------------------
# kill -9 at a random step, then --resume: the same losses as the uninterrupted run, bitwise
@pytest.fixture(scope="module")
def stage1_reference(tmp_path_factory, corpus, tiny_bert_dir, tiny_llm_dir, cache_dir) -> Path:
    run = tmp_path_factory.mktemp("stage1_reference") / "run"
    _cli(["stage1", *_stage1_args(corpus, tiny_bert_dir, tiny_llm_dir, run)], cache_dir)
    assert [r["step"] for r in _rows(run)] == list(range(1, MAX_STEPS + 1))
    return run


@pytest.fixture(scope="module")
def stage2_reference(tmp_path_factory, pairs, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir,
                     cache_dir) -> Path:
    run = tmp_path_factory.mktemp("stage2_reference") / "run"
    _cli(["stage2", *_stage2_args(pairs, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir, run)], cache_dir)
    assert [r["step"] for r in _rows(run)] == list(range(1, MAX_STEPS + 1))
    return run


def _kill9_resume_and_compare(command: str, args: list[str], run: Path, reference_run: Path, keys, final: str,
                              cache_dir: Path) -> None:
    """SIGKILL ``command`` at a random step, resume it, and require the reference run's losses and final weights
    (``final``: the folder the finished run writes, absent while it is unfinished)."""
    target, at_kill = _kill_at_random_step(command, args, run, cache_dir)
    reference = _rows(reference_run)
    context = f"(killed at step {target})"
    _assert_same_losses(at_kill, reference[:len(at_kill)], keys, context)  # a fresh run is reproducible
    latest = _checkpoint_steps(run)[-1]
    assert SAVE_EVERY <= latest < MAX_STEPS and not (run / final).exists(), context

    proc = _cli([command, "--resume", *args], cache_dir)
    assert _resumed_from(proc.stdout) == latest, context
    _assert_same_losses(_rows(run), reference, keys, context)
    _assert_same_weights(run / final / "model.safetensors", reference_run / final / "model.safetensors")
    # final weights are safetensors only: nothing a later load would have to unpickle
    assert sorted(p.name for p in (run / final).rglob("*") if p.suffix in (".pt", ".bin", ".pkl", ".pth")) == []


@pytest.mark.slow
def test_stage1_kill9_then_resume_matches_uninterrupted(tmp_path, stage1_reference, corpus, tiny_bert_dir,
                                                        tiny_llm_dir, cache_dir):
    run = tmp_path / "run"
    _kill9_resume_and_compare("stage1", _stage1_args(corpus, tiny_bert_dir, tiny_llm_dir, run), run,
                              stage1_reference, STAGE1_KEYS, "pformer", cache_dir)


@pytest.mark.slow
def test_stage2_kill9_then_resume_matches_uninterrupted(tmp_path, stage2_reference, pairs, tiny_vit_dir,
                                                        tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir, cache_dir):
    run = tmp_path / "run"
    _kill9_resume_and_compare("stage2", _stage2_args(pairs, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                     tiny_pformer_dir, run), run,
                              stage2_reference, STAGE2_KEYS, "front", cache_dir)


# ---------------------------------------------------------------------------------------------------------------
# a crash during a save
def test_latest_ignores_incomplete_and_staged_folders(tmp_path):
    manager = checkpoint.CheckpointManager(tmp_path, keep=2, dist_info=None)
    assert manager.latest() is None  # no checkpoints folder yet
    root = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = root / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if complete:
            (folder / checkpoint.STATE_NAME).write_text(json.dumps({"step": step}))
    staged = root / ".staging" / "step_00000008"  # a save that never reached its rename
    staged.mkdir(parents=True)
    (staged / checkpoint.STATE_NAME).write_text(json.dumps({"step": 8}))
    (root / "step_00000010").write_text("a stray file, not a folder")
    assert manager.latest() == root / "step_00000004"
    assert [p.name for p in manager.complete()] == ["step_00000002", "step_00000004"]


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, stage1_reference, corpus, tiny_bert_dir, tiny_llm_dir,
                                                    cache_dir):
    dying_step = 2 * SAVE_EVERY
    run = tmp_path / "run"
    args = _stage1_args(corpus, tiny_bert_dir, tiny_llm_dir, run)
    proc = _cli(["stage1", *args], cache_dir, wrapper=_kill_during_save(dying_step), check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]

    checkpoints = run / "checkpoints"
    staged = checkpoints / ".staging" / f"step_{dying_step:08d}"
    assert (staged / "mp_rank_00_model_states.pt").is_file()  # DeepSpeed had written its part ...
    assert not (staged / checkpoint.STATE_NAME).exists()  # ... ours was cut short
    assert not (checkpoints / f"step_{dying_step:08d}").exists()
    assert _checkpoint_steps(run) == [SAVE_EVERY]  # the partial save is not taken for a checkpoint
    # the previous checkpoint is intact: the same state as the uninterrupted run's at that step
    previous, same_step = (r / "checkpoints" / f"step_{SAVE_EVERY:08d}" for r in (run, stage1_reference))
    assert json.loads((previous / checkpoint.STATE_NAME).read_text())["step"] == SAVE_EVERY
    got, want = (torch.load(p / "mp_rank_00_model_states.pt", weights_only=True)["module"] for p in (previous,
                                                                                                     same_step))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)

    proc = _cli(["stage1", "--resume", *args], cache_dir)
    assert _resumed_from(proc.stdout) == SAVE_EVERY
    _assert_same_losses(_rows(run), _rows(stage1_reference), STAGE1_KEYS)
    assert _checkpoint_steps(run) == list(range(SAVE_EVERY, MAX_STEPS, SAVE_EVERY)) + [MAX_STEPS]
    assert not any((checkpoints / ".staging").iterdir())  # the dead save's leftovers are gone


# ---------------------------------------------------------------------------------------------------------------
# checkpoints are read with torch.load(weights_only=True)
class _Payload:
    """Unpickling this runs a shell command (creates ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _stage1_cfg(tmp_path, corpus, bert, llm, out="run", **extra) -> Stage1Config:
    return load_config(Stage1Config, None, _stage1_args(corpus, bert, llm, tmp_path / out, **extra))


@pytest.mark.parametrize("zero_stage, tampered", [(0, "mp_rank_00_model_states.pt"),
                                                  (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, corpus, tiny_bert_dir, tiny_llm_dir, zero_stage,
                                                         tampered):
    cfg = _stage1_cfg(tmp_path, corpus, tiny_bert_dir, tiny_llm_dir, **{"deepspeed.zero_stage": zero_stage,
                                                                         "optim.max_steps": 4,
                                                                         "logging.save_every": 2})
    assert run_stage1(cfg, stop_after=2)["steps"] == 2
    # a normal resume goes through the weights_only reader (ZeRO-2 needs DeepSpeed's few plain-data classes)
    summary = run_stage1(cfg, resume=True, stop_after=1)
    assert summary["resumed_from"] == 2 and summary["steps"] == 3

    path = tmp_path / "run" / "checkpoints" / "step_00000003" / tampered
    state = torch.load(path, weights_only=False)  # our own, untampered file
    marker = tmp_path / "pwned"
    state["note"] = _Payload(marker)
    torch.save(state, path, _use_new_zipfile_serialization=False)  # DeepSpeed's format
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=rf"{re.escape(str(path))}.*posix\.system"):
        run_stage1(cfg, resume=True)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what DeepSpeed alone would do: the payload is live
    assert marker.exists()


def test_no_unsafe_unpickling_in_the_code():
    """Every torch.load passes weights_only=True; no pickle/dill/joblib loads; no np.load(allow_pickle=True)."""
    offenders = []
    for folder in ("pformer", "vl_align", "pipelines", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
                kw = {k.arg: k.value for k in node.keywords}
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if owner == "torch" and node.func.attr == "load":
                    flag = kw.get("weights_only")
                    if not (isinstance(flag, ast.Constant) and flag.value is True):
                        offenders.append(f"{where} torch.load without weights_only=True")
                if owner in ("pickle", "dill", "joblib", "cloudpickle") and node.func.attr in ("load", "loads"):
                    offenders.append(f"{where} {owner}.{node.func.attr}")
                if owner in ("np", "numpy") and node.func.attr == "load":
                    flag = kw.get("allow_pickle")
                    if isinstance(flag, ast.Constant) and flag.value is True:
                        offenders.append(f"{where} np.load(allow_pickle=True)")
    assert not offenders, offenders


# ---------------------------------------------------------------------------------------------------------------
# NaN / inf loss: stop, name the step, the records and the parts, checkpoint the last good state
@pytest.fixture(scope="module")
def stage1_inprocess(tmp_path_factory, corpus, tiny_bert_dir, tiny_llm_dir) -> Path:
    out = tmp_path_factory.mktemp("stage1_inprocess")
    run_stage1(_stage1_cfg(out, corpus, tiny_bert_dir, tiny_llm_dir))
    return out / "run"


def test_nonfinite_loss_stops_with_names_and_last_good_state(tmp_path, monkeypatch, stage1_inprocess, corpus,
                                                             tiny_bert_dir, tiny_llm_dir):
    import pipelines.stage1 as stage1

    bad_step = SAVE_EVERY + 1  # the 5th step breaks: 4 good steps, the last periodic save was at step 3
    real_loss, calls = stage1.stage1_loss, []

    def loss_with_nan(*args, **kwargs):
        calls.append(1)
        total, parts = real_loss(*args, **kwargs)
        if len(calls) == bad_step + 1:
            parts = {**parts, "lm": parts["lm"] * float("nan")}
            total = total + parts["lm"]
        return total, parts

    monkeypatch.setattr(stage1, "stage1_loss", loss_with_nan)
    cfg = _stage1_cfg(tmp_path, corpus, tiny_bert_dir, tiny_llm_dir)
    with pytest.raises(training.NonFiniteLoss) as err:
        run_stage1(cfg)
    msg = str(err.value)
    assert f"at step {bad_step}" in msg and "'lm': nan" in msg and "'vq':" in msg and "'contrastive':" in msg
    records = re.search(r"records (\[.*?\])", msg).group(1)
    assert re.search(r"'(a|the) \w+ (is )?\w+'", records), msg  # the batch's sentences
    assert f"step_{bad_step:08d}" in msg
    assert _checkpoint_steps(tmp_path / "run") == [SAVE_EVERY, bad_step]
    assert [r["step"] for r in _rows(tmp_path / "run")] == list(range(1, bad_step + 1))

    monkeypatch.setattr(stage1, "stage1_loss", real_loss)  # the cause fixed: resume from the last good state
    assert run_stage1(cfg, resume=True)["resumed_from"] == bad_step
    _assert_same_losses(_rows(tmp_path / "run"), _rows(stage1_inprocess), STAGE1_KEYS)


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(stage1_inprocess, corpus, tiny_bert_dir, tiny_llm_dir):
    """Rerunning a command without --resume into its own folder would start over and overwrite that run's config and
    metric log: it is an error naming the key and --resume, and the folder is left as it was."""
    before = {p.name: p.read_bytes() for p in (stage1_inprocess / "metrics.jsonl", stage1_inprocess / "config.yaml")}
    cfg = _stage1_cfg(stage1_inprocess.parent, corpus, tiny_bert_dir, tiny_llm_dir, out=stage1_inprocess.name,
                      **{"optim.max_steps": 2})
    with pytest.raises(ConfigError, match=r"output_dir.*already holds a run \(checkpoint step_\d+\).*--resume"):
        run_stage1(cfg)
    assert {p.name: p.read_bytes() for p in (stage1_inprocess / "metrics.jsonl",
                                             stage1_inprocess / "config.yaml")} == before


def test_nonfinite_loss_in_stage2_names_image_ids_and_parts(tmp_path, monkeypatch, pairs, tiny_vit_dir,
                                                            tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir, cache_dir):
    import pipelines.stage2 as stage2

    monkeypatch.setenv("DVLP_CACHE", str(cache_dir))
    real_loss = stage2.representation_loss

    def inf_itc(*args, **kwargs):
        total, parts = real_loss(*args, **kwargs)
        parts = {**parts, "itc": parts["itc"] + float("inf")}
        return total + parts["itc"], parts

    monkeypatch.setattr(stage2, "representation_loss", inf_itc)
    cfg = load_config(Stage2Config, None, _stage2_args(pairs, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                       tiny_pformer_dir, tmp_path / "run"))
    with pytest.raises(training.NonFiniteLoss) as err:
        run_stage2(cfg)
    msg = str(err.value)
    assert "non-finite loss inf at step 0" in msg and "'itc': inf" in msg
    assert all(f"'{k}':" in msg for k in ("itm", "itg", "align"))
    ids = re.search(r"records (\[.*?\])", msg).group(1)
    assert len(re.findall(r"'\d-\d'", ids)) == 4, msg  # the image ids of the batch
    assert _checkpoint_steps(tmp_path / "run") == [0]  # the initial state: nothing good came after it


# ---------------------------------------------------------------------------------------------------------------
# reproducibility: the same config and seed give the same losses
def test_stage1_same_config_and_seed_same_losses(tmp_path, stage1_inprocess, corpus, tiny_bert_dir, tiny_llm_dir):
    run_stage1(_stage1_cfg(tmp_path, corpus, tiny_bert_dir, tiny_llm_dir))
    _assert_same_losses(_rows(tmp_path / "run"), _rows(stage1_inprocess), STAGE1_KEYS)
    _assert_same_weights(tmp_path / "run" / "pformer" / "model.safetensors",
                         stage1_inprocess / "pformer" / "model.safetensors")
    other_seed = tmp_path / "seed1"
    run_stage1(_stage1_cfg(tmp_path, corpus, tiny_bert_dir, tiny_llm_dir, out="seed1", **{"optim.max_steps": 2,
                                                                                         "seed": 1}))
    assert _rows(other_seed)[0]["loss"] != _rows(stage1_inprocess)[0]["loss"]  # the seed is what matters


def test_stage2_same_config_and_seed_same_losses(tmp_path, monkeypatch, pairs, tiny_vit_dir, tiny_bert_dir,
                                                 tiny_llm_dir, tiny_pformer_dir):
    """The first run computes the vision-feature and P(y) caches, the second reads them: the same losses."""
    monkeypatch.setenv("DVLP_CACHE", str(tmp_path / "cache"))
    runs = []
    for name in ("first", "second"):
        cfg = load_config(Stage2Config, None, _stage2_args(pairs, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir,
                                                           tiny_pformer_dir, tmp_path / name,
                                                           **{"optim.max_steps": 4}))
        run_stage2(cfg)
        runs.append(_rows(tmp_path / name))
    assert len(runs[0]) == 4
    _assert_same_losses(runs[1], runs[0], STAGE2_KEYS)
    _assert_same_weights(tmp_path / "first" / "front" / "model.safetensors",
                         tmp_path / "second" / "front" / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# bad inputs at the pipeline level
def test_cli_deepspeed_contradiction_is_one_clear_error(tmp_path, capsys, corpus, tiny_bert_dir, tiny_llm_dir):
    args = _stage1_args(corpus, tiny_bert_dir, tiny_llm_dir, tmp_path / "run")
    assert main(["stage1", *args, "deepspeed.config_overrides={train_batch_size: 7}"]) == 2
    err = capsys.readouterr().err
    assert "deepspeed.config_overrides.train_batch_size" in err and "is 7 but the training config implies 4" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("key", ["vision.model", "front.init_from", "pformer", "llm"])
def test_cli_stage2_missing_model_path_names_it(tmp_path, capsys, key, pairs, tiny_vit_dir, tiny_bert_dir,
                                                tiny_llm_dir, tiny_pformer_dir, cache_dir, monkeypatch):
    monkeypatch.setenv("DVLP_CACHE", str(cache_dir))
    missing = str(tmp_path / "no" / "such" / "model")
    args = _stage2_args(pairs, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir, tmp_path / "run")
    assert main(["stage2", *args, f"{key}={missing}"]) == 2
    err = capsys.readouterr().err
    assert missing in err and "Traceback" not in err, err


LONG = "a red square " + "next to a blue circle and a green triangle " * 6  # ~50 tokens for every tokenizer


def test_stage1_sentence_over_the_token_limit_is_a_counted_skip(tmp_path, capsys, corpus, tiny_bert_dir,
                                                                 tiny_llm_dir):
    source = tmp_path / "corpus.txt"
    source.write_text(corpus.read_text() + LONG + "\n" + LONG.upper() + "\n")  # 24 good sentences + 2 too long
    args = _stage1_args(source, tiny_bert_dir, tiny_llm_dir, tmp_path / "run", **{"optim.max_steps": 1,
                                                                                  "optim.warmup_steps": 0})
    assert main(["stage1", *args, "reliability.max_skip_fraction=0.1"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex("\n{") + 1:])
    assert summary["train_sentences"] + summary["heldout_sentences"] == 24
    assert summary["skipped"]["counts"] == {"too_long": 2}
    first = summary["skipped"]["examples"]["too_long"][0]
    assert re.fullmatch(rf"{re.escape(str(source))}: sentence 25 'a red square next .*' \(\d+ tokens > 32\)", first)
    assert LONG.strip() not in (tmp_path / "run" / "heldout.txt").read_text()
    # the default threshold, 5%: the run aborts with one message
    assert main(["stage1", *args, f"logging.output_dir={tmp_path / 'strict'}"]) == 1
    assert re.search(r"(?s)error: TooManySkippedRecords: .*skipped 2 of 26 records.*too_long: 2",
                     capsys.readouterr().err)


def test_webdataset_caption_with_invalid_utf8_is_a_counted_skip(tmp_path):
    from vl_align.data import load_image_text_pairs

    shard = tmp_path / "000.tar"
    with tarfile.open(shard, "w") as tf:
        for key, caption in (("a0", b"a red square"), ("a1", b"caf\xe9 au lait"), ("a2", b"a green circle")):
            for name, payload in ((f"{key}.png", shape_png(COLOURS["red"], "square")), (f"{key}.txt", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    report = SkipReport(max_skip_fraction=1.0)
    rows = list(load_image_text_pairs(str(shard), report=report))
    assert [(r["image_id"], r["caption"]) for r in rows] == [("a0", "a red square"), ("a2", "a green circle")]
    assert report.counts == {"invalid_utf8": 1} and report.examples["invalid_utf8"] == [f"{shard}:a1"]


def test_cli_stage2_bad_records_are_counted_reported_and_thresholded(tmp_path, capsys, tiny_vit_dir, tiny_bert_dir,
                                                                      tiny_llm_dir, tiny_pformer_dir, cache_dir,
                                                                      monkeypatch):
    monkeypatch.setenv("DVLP_CACHE", str(cache_dir))
    folder = tmp_path / "data"
    folder.mkdir()
    noisy = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(noisy, "PNG")
    (folder / "truncated.png").write_bytes(noisy.getvalue()[: len(noisy.getvalue()) // 2])
    (folder / "notes.png").write_text("not an image\n")
    bad = [json.dumps({"image": "gone.png", "caption": "a lost image"}).encode(),  # line 13
           json.dumps({"image": "truncated.png", "caption": "a cut image"}).encode(),  # 14
           json.dumps({"image": "notes.png", "caption": "a text file"}).encode(),  # 15
           json.dumps({"image": "img_0_0.png", "caption": "  "}).encode(),  # 16
           b'{"image": "img_0_0.png", "caption": "caf\xe9"}',  # 17: latin-1, not UTF-8
           b"{this is not json",  # 18
           json.dumps({"image": "img_0_1.png", "caption": LONG, "image_id": "long"}).encode()]  # 19: > 32 tokens
    source = _write_pairs(folder, bad)
    args = _stage2_args(source, tiny_vit_dir, tiny_bert_dir, tiny_llm_dir, tiny_pformer_dir, tmp_path / "run",
                        **{"optim.max_steps": 1, "reliability.max_skip_fraction": 0.5})
    assert main(["stage2", *args]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex("\n{") + 1:])  # the summary the run prints at its end
    skipped = summary["skipped"]
    assert summary["pairs"] == 12 and skipped["total"] == 7
    expected = {"missing_image": 13, "corrupt_image": 14, "not_an_image": 15, "empty_caption": 16,
                "invalid_utf8": 17, "invalid_json": 18}
    assert skipped["counts"] == {reason: 1 for reason in [*expected, "too_long"]}
    for reason, line in expected.items():
        assert skipped["examples"][reason][0].startswith(f"{source}:{line}"), (reason, skipped["examples"])
    assert re.fullmatch(r"image_id long 'a red square .*' \(\d+ tokens > 32\)", skipped["examples"]["too_long"][0])

    assert main(["stage2", *args[:-1], "reliability.max_skip_fraction=0.05",
                 f"logging.output_dir={tmp_path / 'strict'}"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: TooManySkippedRecords: .*skipped 6 of 19 records.*max_skip_fraction=5\.0%", err)
    assert f"{source}:13" in err and "missing_image: 1" in err


def test_replace_folder_puts_the_old_folder_back_when_the_new_one_cannot_go_in(tmp_path, monkeypatch):
    """Used by the feature/prompt caches, the model zoo, export-hf and the DINOv2 conversion."""
    from dvlp_common import io as atomic

    out, new = tmp_path / "cache", tmp_path / "new"
    for folder, text in ((out, "old"), (new, "new")):
        folder.mkdir()
        (folder / "v").write_text(text)
    real = os.replace

    def failing(src, dst):
        if Path(src) == new:
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        atomic.replace_folder(new, out)
    assert (out / "v").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "new"]
    monkeypatch.setattr(atomic.os, "replace", real)
    atomic.replace_folder(new, out)
    assert (out / "v").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_writing_file_keeps_the_old_file_when_the_writer_fails(tmp_path):
    """Used for files written by other libraries' writers (torch.save of the order probe's feature cache, csv)."""
    from dvlp_common.io import writing_file

    path = tmp_path / "features.pt"
    torch.save({"v": torch.ones(2)}, path)
    with pytest.raises(RuntimeError, match="cut off"):
        with writing_file(path) as tmp:
            tmp.write_bytes(b"half a pick")
            raise RuntimeError("cut off")
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["features.pt"]  # no temporary file left behind
    with writing_file(path) as tmp:
        torch.save({"v": torch.zeros(3)}, tmp)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["features.pt"]
    # the finished file has the permissions a plain open() would give it (mkstemp's are 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_building_folder_gives_the_folder_mkdirs_permissions(tmp_path):
    """mkdtemp makes 0700 folders; a cache or saved model shared on a cluster must get what mkdir would give it."""
    from dvlp_common.io import building_folder

    with building_folder(tmp_path / "model") as tmp:
        (tmp / "weights").write_text("w")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "model" / "weights").read_text() == "w"
