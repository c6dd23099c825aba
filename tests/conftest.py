"""Shared fixtures: tiny random models of the real architectures, saved as normal transformers folders.

The tokenizers are the packaged real ones (SmolLM2's, MiniLM's), so the tiny models exercise the same tokenisation
as the default run; the weights are random and small, so the tests are fast.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    """A 2-layer Llama with SmolLM2's tokenizer (49,152 tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dvlp_common import zoo

    tok = zoo.load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    """A 1+1-layer T5 with SmolLM2's tokenizer: the encoder-decoder path."""
    from transformers import T5Config, T5ForConditionalGeneration

    from dvlp_common import zoo

    tok = zoo.load_tokenizer("smollm2-135m")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                   num_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("tiny_t5")
    T5ForConditionalGeneration(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer BERT with MiniLM's WordPiece tokenizer."""
    from transformers import BertConfig, BertModel

    from dvlp_common import zoo

    tok = zoo.load_tokenizer("minilm-l6")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    out = tmp_path_factory.mktemp("tiny_bert")
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture
def small_corpus(tmp_path):
    colours = ["red", "blue", "green", "yellow"]
    shapes = ["circle", "square", "triangle"]
    lines = [f"a {c} {s}" for c in colours for s in shapes] + [f"the {s} is {c}" for c in colours for s in shapes]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    """A 12-layer (ELIP's pruning points need 12) DINOv2 of width 32 with 4-px patches, 16-px images."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=12, num_attention_heads=4, intermediate_size=64,
                       patch_size=4, image_size=16)
    cfg.image_mean, cfg.image_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    out = tmp_path_factory.mktemp("tiny_dinov2")
    Dinov2Model(cfg).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_pformer_dir(tmp_path_factory, tiny_bert_dir, tiny_llm_dir):
    """An (untrained) P-Former with 4 prompts for the tiny LLM: stands in for a stage-1 output."""
    from dvlp_common import zoo
    from pformer.model import PFormer, PFormerConfig

    torch.manual_seed(0)
    model = PFormer.build(PFormerConfig(text_encoder=tiny_bert_dir, llm=tiny_llm_dir, num_prompts=4))
    out = tmp_path_factory.mktemp("tiny_pformer") / "pformer"
    model.save_pretrained(out, tokenizer=zoo.load_tokenizer(tiny_bert_dir))
    return str(out)


def shape_png(colour: tuple[int, int, int], shape: str, size: int = 16) -> bytes:
    """A small PNG of a filled ``square`` or circle in ``colour`` on white: test images whose content differs."""
    import io

    from PIL import Image

    im = Image.new("RGB", (size, size), (255, 255, 255))
    px, c = im.load(), size // 2
    for y in range(size):
        for x in range(size):
            inside = (abs(x - c) < 5 and abs(y - c) < 5) if shape == "square" else (x - c) ** 2 + (y - c) ** 2 < 30
            if inside:
                px[x, y] = colour
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


SMALL_MOTION = {"num_train": 40, "num_test": 20, "image_size": 48, "frames_per_clip": 8, "corpus_size": 300}


@pytest.fixture
def motion_cache(tmp_path, monkeypatch):
    """A small embedded:motion build (SMALL_MOTION) in a private cache folder (the real one stays untouched);
    returns that folder."""
    import functools

    from vl_align import motion

    monkeypatch.setenv("DVLP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(motion, "build_embedded_motion",
                        functools.partial(motion.build_embedded_motion, **SMALL_MOTION))
    return tmp_path / "cache"


def grey_video(path, n: int, codec: str = "libx264", size: int = 32):
    """A video file whose frame i is a flat grey of level 10 + 20 i (recovered from its mean after lossy coding)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=10)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 10 + 20 * i, np.uint8), format="rgb24")
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path
