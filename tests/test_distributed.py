"""Data parallelism: 2 ranks x batch b follow 1 rank x batch 2b (subprocesses: torchrun, gloo on CPU)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], nproc: int, cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    if nproc == 1:
        cmd = [sys.executable, "-m", "pipelines.cli", *args]
    else:
        cmd = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={_port()}", "-m",
               "pipelines.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_stage1_two_ranks_follow_one_rank(tmp_path, tiny_bert_dir, tiny_llm_dir, zero_stage):
    from pformer import zoo

    # sentences of one token length in both tokenizers, so per-rank token means average to the global one
    words = ["red", "blue", "green", "black"], ["circle", "square", "box", "line"]
    corpus = [f"a {c} {s}" for c in words[0] for s in words[1]]
    for ref in (tiny_bert_dir, tiny_llm_dir):
        assert len({len(zoo.load_tokenizer(ref)(t).input_ids) for t in corpus}) == 1
    (tmp_path / "corpus.txt").write_text("\n".join(corpus) + "\n")
    common = [f"model.text_encoder={tiny_bert_dir}", f"model.llm={tiny_llm_dir}", "model.num_prompts=4",
              f"data.source={tmp_path / 'corpus.txt'}", "data.holdout=2", "optim.max_steps=4",
              "optim.warmup_steps=1", "optim.lr=1e-3", "optim.min_lr=1e-4", "logging.log_every=1",
              "logging.tensorboard=false", "logging.progress_bar=false", "eval.enabled=false",
              "deepspeed.precision=fp32", f"deepspeed.zero_stage={zero_stage}"]
    root = Path(__file__).resolve().parent.parent
    _run(["stage1", *common, "optim.micro_batch_size=4", f"logging.output_dir={tmp_path / 'one'}"], 1, root)
    _run(["stage1", *common, "optim.micro_batch_size=2", f"logging.output_dir={tmp_path / 'two'}"], 2, root)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for key in ("loss", "lm", "vq", "contrastive"):
            assert abs(a[key] - b[key]) < 1e-4, (a["step"], key, a[key], b[key])
