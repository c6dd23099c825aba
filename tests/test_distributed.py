"""Data parallelism: 2 ranks x batch b follow 1 rank x batch 2b, under ZeRO 0, 2 and 3 (torchrun, gloo on CPU).

Every stage runs as a user runs it (``python -m pipelines.cli`` for one process, ``torchrun`` for two) on tiny random
models, and the logged losses (the loop averages them over ranks) are compared step by step with a one-process
ZeRO-0 reference run, within 1e-4. They can agree that closely, not only approximately, because:

* the global batch of a step and its split over ranks follow from the seed alone (``training.GlobalBatchOrder``);
* the models have no dropout; the stage-1 masking and the ITM hard-negative draws are seeded per sample of the
  global batch, not per rank;
* ITC and L_c gather the other ranks' embeddings with gradient; hard negatives come from the global similarities;
* the token-averaged losses (ITG, the LLM's LM loss) divide a rank's summed token loss by the global token count
  over the world size (``pipelines.distributed.mean_over_ranks_tensor``), so the mean over ranks of the per-rank
  losses is the global token mean; the captions here have clearly unequal token lengths (3 to 12 LLM tokens, checked
  by the fixtures), so a per-rank token mean would not pass;
* ITM, the MSE alignment and the contrastive losses are means over equally many rows on every rank.

Under ZeRO-3 the weights that leave the engine (the saved P-Former / front, the evaluation after training) are
gathered from the ranks' partitions; the tests compare them with the reference's.
"""
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
ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4
STEPS = 4
# captions of unequal token lengths (5 to 14 MiniLM tokens, 3 to 12 SmolLM2 tokens; checked by the fixtures): the
# token-averaged losses must weigh ranks by their token counts to follow one rank
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 170, 30), "black": (10, 10, 10)}
SHAPES = ["circle", "square", "box", "line"]
SUFFIXES = ["", " on white", " in the middle of the picture", " drawn on a noisy white background with nothing else"]


def _caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}" + SUFFIXES[(list(COLOURS).index(colour) + SHAPES.index(shape)) % len(SUFFIXES)]


CAPTIONS = [_caption(c, s) for c in COLOURS for s in SHAPES]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # what torchrun sets for each of several ranks; they share the cores
    if nproc == 1:
        cmd = [sys.executable, "-m", "pipelines.cli", *args]
    else:
        cmd = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={_port()}", "-m",
               "pipelines.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_follow(reference: Path, run: Path, keys: tuple[str, ...]) -> float:
    """Both runs logged steps 1..STEPS with every loss within TOL; returns the largest difference."""
    one, two = _losses(reference), _losses(run)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    worst = 0.0
    for a, b in zip(one, two):
        for key in keys:
            assert abs(a[key] - b[key]) < TOL, (a["step"], key, a[key], b[key])
            worst = max(worst, abs(a[key] - b[key]))
    return worst


def _assert_same_weights(reference: Path, other: Path) -> float:
    """Two saved safetensors files hold the same tensors (none empty) within TOL; returns the largest difference.

    Attention key biases are left out: their gradient is zero in exact arithmetic (a bias on every key adds the same
    number to all of a query's logits, which softmax ignores), so what they receive is rounding noise, and Adam,
    which normalises the gradient's size away, turns noise of either sign into steps of about lr.
    """
    from safetensors.torch import load_file

    a, b = load_file(str(reference)), load_file(str(other))
    assert sorted(a) == sorted(b)
    worst = 0.0
    for key in a:
        assert a[key].shape == b[key].shape and a[key].numel() > 0, (key, a[key].shape, b[key].shape)
        if key.endswith("key.bias"):
            continue
        diff = float((a[key].float() - b[key].float()).abs().max())
        assert diff < TOL, (key, diff)
        worst = max(worst, diff)
    return worst


def _report(name: str, **values: float) -> None:
    print(f"{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in values.items()))


# ---------------------------------------------------------------------------------------------------------------
# data and a front initialisation with some spread
@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory, tiny_bert_dir, tiny_llm_dir) -> Path:
    from dvlp_common import zoo

    for ref in (tiny_bert_dir, tiny_llm_dir):  # unequal token lengths: per-rank token means would not be global
        lengths = [len(zoo.load_tokenizer(ref)(t).input_ids) for t in CAPTIONS]
        assert max(lengths) - min(lengths) >= 9, lengths
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(CAPTIONS) + "\n")
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, text_corpus) -> Path:
    """16 images of 16 px (a coloured shape on noise), one caption each, as jsonl."""
    import numpy as np
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    lines = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            image = Image.fromarray((255 - rng.integers(0, 40, (16, 16, 3))).astype(np.uint8))
            draw, box = ImageDraw.Draw(image), [3, 3, 12, 12]
            {"circle": lambda: draw.ellipse(box, fill=rgb), "square": lambda: draw.rectangle(box, fill=rgb),
             "box": lambda: draw.rectangle(box, outline=rgb), "line": lambda: draw.line(box, fill=rgb, width=2)}[shape]()
            image.save(root / f"{colour}_{shape}.png")
            lines.append(json.dumps({"image": f"{colour}_{shape}.png", "caption": _caption(colour, shape),
                                     "image_id": f"{colour}_{shape}"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


@pytest.fixture(scope="module")
def spread_bert_dir(tmp_path_factory, tiny_bert_dir) -> str:
    """The tiny BERT with larger random weights (initializer_range 0.5), for the P-Former's encoder and the fronts.
    From the conftest one (0.02) every sentence (and image) gets nearly the same contrastive feature, so L_c and ITC
    have almost no gradient: a wrong gradient through the gather would not show, and Adam would turn the rounding
    noise of the rest into weight differences."""
    import torch
    from transformers import BertConfig, BertModel

    from dvlp_common import zoo

    tok = zoo.load_tokenizer(tiny_bert_dir)
    torch.manual_seed(0)
    cfg = BertConfig.from_pretrained(tiny_bert_dir)
    cfg.initializer_range = 0.5
    out = tmp_path_factory.mktemp("spread_bert")
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


# ---------------------------------------------------------------------------------------------------------------
# stage 1
STAGE1_KEYS = ("loss", "lm", "vq", "contrastive")


def _stage1_args(out: Path, corpus: Path, bert: str, llm: str, nproc: int, zero_stage: int) -> list[str]:
    args = [f"model.text_encoder={bert}", f"model.llm={llm}", "model.num_prompts=4", f"data.source={corpus}",
            "data.holdout=2", f"optim.max_steps={STEPS}", "optim.warmup_steps=1", "optim.lr=1e-3",
            "optim.min_lr=1e-4", f"optim.micro_batch_size={4 // nproc}", "logging.log_every=1",
            "logging.tensorboard=false", "logging.progress_bar=false", "deepspeed.precision=fp32",
            f"deepspeed.zero_stage={zero_stage}", f"logging.output_dir={out}"]
    if zero_stage == 3:  # the evaluation after training runs on the main rank only, on the gathered weights
        return ["stage1", *args, "eval.compare_untrained=false", "eval.max_new_tokens=3"]
    return ["stage1", *args, "eval.enabled=false"]


@pytest.fixture(scope="module")
def stage1_reference(tmp_path_factory, text_corpus, spread_bert_dir, tiny_llm_dir) -> Path:
    out = tmp_path_factory.mktemp("stage1") / "one_rank_zero0"
    _run(_stage1_args(out, text_corpus, spread_bert_dir, tiny_llm_dir, 1, 0), 1)
    return out


@pytest.mark.parametrize("nproc, zero_stage", [(2, 0), (2, 2), (1, 3), (2, 3)])
def test_stage1_follows_one_rank_zero0(tmp_path, stage1_reference, text_corpus, spread_bert_dir, tiny_llm_dir, nproc,
                                       zero_stage):
    _run(_stage1_args(tmp_path, text_corpus, spread_bert_dir, tiny_llm_dir, nproc, zero_stage), nproc)
    worst = _assert_follow(stage1_reference, tmp_path, STAGE1_KEYS)
    weights = _assert_same_weights(stage1_reference / "pformer" / "model.safetensors",
                                   tmp_path / "pformer" / "model.safetensors")
    if zero_stage == 3:
        assert "eval" in json.loads((tmp_path / "stage1_summary.json").read_text())
    _report(f"stage 1, {nproc} rank(s), ZeRO-{zero_stage}", loss=worst, weights=weights)


# ---------------------------------------------------------------------------------------------------------------
# stage 2a: representation (qformer front, alignment on)
STAGE2_KEYS = ("loss", "itc", "itm", "itg", "align")


def _stage2_args(out: Path, pairs: Path, vit: str, spread_bert: str, llm: str, pformer: str, nproc: int,
                 zero_stage: int) -> list[str]:
    return ["stage2", f"vision.model={vit}", "vision.image_size=16", f"front.init_from={spread_bert}",
            "front.num_query_tokens=4", f"pformer={pformer}", f"llm={llm}", "align.weight=10",
            f"data.source={pairs}", "data.max_pairs=null", f"optim.max_steps={STEPS}", "optim.warmup_steps=1",
            "optim.lr=1e-3", "optim.min_lr=1e-4", f"optim.micro_batch_size={4 // nproc}", "logging.log_every=1",
            "logging.save_every=2", "logging.tensorboard=false", "logging.progress_bar=false",
            "deepspeed.precision=fp32", f"deepspeed.zero_stage={zero_stage}", f"eval.source={pairs}",
            "eval.max_images=4", "eval.k=2", f"logging.output_dir={out}"]


@pytest.fixture(scope="module")
def stage2_reference(tmp_path_factory, pairs_file, tiny_vit_dir, spread_bert_dir, tiny_llm_dir,
                     tiny_pformer_dir) -> Path:
    out = tmp_path_factory.mktemp("stage2") / "one_rank_zero0"
    _run(_stage2_args(out, pairs_file, tiny_vit_dir, spread_bert_dir, tiny_llm_dir, tiny_pformer_dir, 1, 0), 1)
    return out


def _assert_same_retrieval(reference: Path, run: Path) -> None:
    """The retrieval evaluation after training (main rank, gathered weights under ZeRO-3) scores alike."""
    a = json.loads((reference / "stage2_summary.json").read_text())["retrieval"]
    b = json.loads((run / "stage2_summary.json").read_text())["retrieval"]
    flat_a, flat_b = _numbers(a), _numbers(b)
    assert flat_a and flat_a.keys() == flat_b.keys()
    for key in [k for k in flat_a if "second" not in k and "time" not in k]:  # timings differ, scores must not
        assert abs(flat_a[key] - flat_b[key]) < 1e-6, (key, flat_a[key], flat_b[key])


def _numbers(tree, prefix: str = "") -> dict[str, float]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{prefix}{key}.").items()}
    return {prefix: float(tree)} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


@pytest.mark.parametrize("nproc, zero_stage", [(2, 0), (2, 2), (1, 3)])
def test_stage2_follows_one_rank_zero0(tmp_path, stage2_reference, pairs_file, tiny_vit_dir, spread_bert_dir,
                                       tiny_llm_dir, tiny_pformer_dir, nproc, zero_stage):
    _run(_stage2_args(tmp_path, pairs_file, tiny_vit_dir, spread_bert_dir, tiny_llm_dir, tiny_pformer_dir, nproc,
                      zero_stage), nproc)
    worst = _assert_follow(stage2_reference, tmp_path, STAGE2_KEYS)
    assert all(r["align"] > 0 for r in _losses(tmp_path))
    weights = _assert_same_weights(stage2_reference / "front" / "model.safetensors",
                                   tmp_path / "front" / "model.safetensors")
    _assert_same_retrieval(stage2_reference, tmp_path)
    _report(f"stage 2a, {nproc} rank(s), ZeRO-{zero_stage}", loss=worst, weights=weights)


def test_stage2_zero3_two_ranks_resume(tmp_path, stage2_reference, pairs_file, tiny_vit_dir, spread_bert_dir,
                                       tiny_llm_dir, tiny_pformer_dir):
    """ZeRO-3 on 2 ranks, stopped after 2 steps and resumed from its (partitioned) checkpoint: the losses of the
    whole run, the saved front and the evaluation are those of the uninterrupted one-rank ZeRO-0 run."""
    args = _stage2_args(tmp_path, pairs_file, tiny_vit_dir, spread_bert_dir, tiny_llm_dir, tiny_pformer_dir, 2, 3)
    _run([args[0], "--stop-after", "2", *args[1:]], 2)
    assert [r["step"] for r in _losses(tmp_path)] == [1, 2] and not (tmp_path / "front").exists()
    _run([args[0], "--resume", *args[1:]], 2)
    assert json.loads((tmp_path / "stage2_summary.json").read_text())["resumed_from"] == 2
    worst = _assert_follow(stage2_reference, tmp_path, STAGE2_KEYS)
    weights = _assert_same_weights(stage2_reference / "front" / "model.safetensors",
                                   tmp_path / "front" / "model.safetensors")
    _assert_same_retrieval(stage2_reference, tmp_path)
    _report("stage 2a, 2 ranks, ZeRO-3, resumed at step 2", loss=worst, weights=weights)


def test_ranks_padding_captions_to_different_lengths_agree(spread_bert_dir):
    """Each rank pads its captions to its own longest; ITM's negatives come from other ranks. Two ranks simulated by
    two threads whose gather exchanges tensors: ITC, ITM, ITG (weighted by the ranks' token counts, which differ
    here) and the alignment equal those of one process."""
    import threading

    import torch

    from dvlp_common import zoo
    from vl_align.fronts import FrontConfig, build_front
    from vl_align.alignment import AlignmentConfig
    from vl_align.objectives import RepresentationBatch, RepresentationWeights, representation_loss

    torch.manual_seed(0)
    front = build_front(FrontConfig(init_from=spread_bert_dir, num_query_tokens=4), 32, 32).eval()
    tok = zoo.load_tokenizer(spread_bert_dir)
    captions = ["a red box", "a blue line", "a large green circle on white", "a black square with a thin border"]
    images, targets = torch.randn(4, 17, 32), torch.randn(4, 4, 32)

    def batch(rows: slice) -> RepresentationBatch:
        enc = tok(captions[rows], padding=True, return_tensors="pt")
        return RepresentationBatch(record_ids=[], input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                   decoder_input_ids=enc.input_ids, caption_ids=torch.arange(4)[rows],
                                   image_embeds=images[rows], targets=targets[rows], noise_seed=7)

    def losses(rows: slice, gather=lambda x: x, rank: int = 0) -> dict[str, float]:
        with torch.no_grad():
            _, parts = representation_loss(front, batch(rows), RepresentationWeights(), AlignmentConfig(), None,
                                           gather, gather, rank, lambda c: gather(c[None]).double().mean())
        return {k: float(v) for k, v in parts.items()}

    slots, meet, results = [None, None], threading.Barrier(2), [None, None]

    def gather_for(rank: int):
        def gather(x):
            slots[rank] = x
            meet.wait()
            out = torch.cat(slots)
            meet.wait()
            return out
        return gather

    def rank_main(rank: int) -> None:
        results[rank] = losses(slice(2 * rank, 2 * rank + 2), gather_for(rank), rank)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(results), "a simulated rank failed"
    assert len({len(tok(c).input_ids) for c in captions[:2]} | {len(tok(c).input_ids) for c in captions[2:]}) > 1
    one = losses(slice(0, 4))
    for key in ("itc", "itm", "itg", "align"):
        assert abs(one[key] - (results[0][key] + results[1][key]) / 2) < 1e-5, (key, one[key], results)


# ---------------------------------------------------------------------------------------------------------------
# stage 2b: generative (qformer and tome fronts)
def _generative_args(out: Path, kind: str, pairs: Path, vit: str, spread_bert: str, llm: str, pformer: str,
                     nproc: int, zero_stage: int) -> list[str]:
    args = ["generate-stage", f"front.kind={kind}", f"vision.model={vit}", "vision.image_size=16",
            f"front.init_from={spread_bert}", "front.num_query_tokens=4", "init_front=null", f"pformer={pformer}",
            f"llm={llm}", f"data.source={pairs}", "data.max_pairs=null", f"optim.max_steps={STEPS}",
            "optim.warmup_steps=1", "optim.lr=1e-3", "optim.min_lr=1e-4", f"optim.micro_batch_size={4 // nproc}",
            "logging.log_every=1", "logging.save_every=2", "logging.tensorboard=false", "logging.progress_bar=false",
            "deepspeed.precision=fp32", f"deepspeed.zero_stage={zero_stage}", "eval.enabled=false",
            f"logging.output_dir={out}"]
    if kind == "tome":  # its merged tokens are not P(y)-shaped: SimVLG trains with the LM loss alone
        return args + [f"front.tome.init_from={spread_bert}", "front.tome.r=4", "align.weight=0"]
    return args + ["align.weight=10"]


@pytest.mark.parametrize("kind, zero_stage", [("qformer", 3), ("tome", 2)])
def test_generative_two_ranks_follow_one_rank(tmp_path, kind, zero_stage, pairs_file, tiny_vit_dir,
                                              spread_bert_dir, tiny_llm_dir, tiny_pformer_dir):
    common = (pairs_file, tiny_vit_dir, spread_bert_dir, tiny_llm_dir, tiny_pformer_dir)
    _run(_generative_args(tmp_path / "one", kind, *common, 1, 0), 1)
    _run(_generative_args(tmp_path / "two", kind, *common, 2, zero_stage), 2)
    keys = ("loss", "lm", "align") if kind == "qformer" else ("loss", "lm")
    worst = _assert_follow(tmp_path / "one", tmp_path / "two", keys)
    if kind == "qformer":
        assert all(r["align"] > 0 for r in _losses(tmp_path / "two"))
    weights = _assert_same_weights(tmp_path / "one" / "front" / "model.safetensors",
                                   tmp_path / "two" / "front" / "model.safetensors")
    _report(f"stage 2b {kind}, 2 ranks ZeRO-{zero_stage} vs 1 rank ZeRO-0", loss=worst, weights=weights)


# ---------------------------------------------------------------------------------------------------------------
# the DeepSpeed JSON
def test_batch_overrides_that_contradict_the_config_are_a_config_error():
    from dvlp_common.config import ConfigError
    from pipelines.config import DeepSpeedConfig, OptimConfig
    from pipelines.optim import deepspeed_config

    optim = OptimConfig(micro_batch_size=2, grad_accum_steps=3, warmup_steps=0)
    agreeing = {"train_batch_size": 12, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}
    assert deepspeed_config(optim, DeepSpeedConfig(config_overrides=agreeing), world_size=2)["train_batch_size"] == 12
    for key, value in [("train_batch_size", 6), ("train_micro_batch_size_per_gpu", 4),
                       ("gradient_accumulation_steps", 1)]:
        with pytest.raises(ConfigError, match=rf"deepspeed\.config_overrides\.{key}.*is {value} but the training "
                                              r"config implies .*world size 2"):
            deepspeed_config(optim, DeepSpeedConfig(config_overrides={key: value}), world_size=2)
