"""Caches of frozen computations: keyed, fingerprinted, rebuilt when stale, never partially used."""
from __future__ import annotations

import json

import pytest
import torch

from dvlp_common import zoo
from dvlp_common.cache import KeyedArrayCache
from pformer.targets import prompt_target_cache
from pformer.evaluation import prompts_for
from pformer.model import PFormer, PFormerConfig


def _counting(calls):
    def compute(keys):
        calls.append(list(keys))
        return torch.tensor([[float(len(k)), float(ord(k[0]))] for k in keys])
    return compute


def test_keyed_cache_builds_once_and_extends(tmp_path):
    calls = []
    cache = KeyedArrayCache.open_or_build(tmp_path, "prodA", {}, ["ab", "c", "ab"], _counting(calls), batch_size=1)
    assert calls == [["ab"], ["c"]]  # duplicate keys computed once
    assert torch.equal(cache.get(["c", "ab"]), torch.tensor([[1.0, 99.0], [2.0, 97.0]]))
    KeyedArrayCache.open_or_build(tmp_path, "prodA", {}, ["c"], _counting(calls))
    assert len(calls) == 2  # everything present: nothing recomputed
    cache = KeyedArrayCache.open_or_build(tmp_path, "prodA", {}, ["zzz"], _counting(calls))
    assert calls[-1] == ["zzz"] and len(cache) == 3  # a missing key: old rows copied, only the new one computed
    assert torch.equal(cache.get(["ab", "zzz"]), torch.tensor([[2.0, 97.0], [3.0, 122.0]]))
    with pytest.raises(KeyError, match="no cached row for 'q'"):
        cache.get(["q"])


def test_other_producer_never_sees_the_rows(tmp_path):
    calls = []
    KeyedArrayCache.open_or_build(tmp_path, "prodA", {}, ["a"], _counting(calls))
    KeyedArrayCache.open_or_build(tmp_path, "prodB", {}, ["a"], _counting(calls))
    assert len(calls) == 2


def test_corrupt_cache_is_rebuilt(tmp_path):
    calls = []
    cache = KeyedArrayCache.open_or_build(tmp_path, "p", {}, ["a", "b"], _counting(calls))
    (cache.folder / "keys.json").write_text(json.dumps(["a"]))  # rows and keys disagree
    cache = KeyedArrayCache.open_or_build(tmp_path, "p", {}, ["a", "b"], _counting(calls))
    assert len(calls) == 2 and len(cache) == 2


def test_prompt_targets_match_the_pformer_and_follow_its_weights(tmp_path, tiny_bert_dir, tiny_llm_dir):
    cfg = PFormerConfig(text_encoder=tiny_bert_dir, llm=tiny_llm_dir, num_prompts=3)
    model = PFormer.build(cfg).eval()
    tok = zoo.load_tokenizer(tiny_bert_dir)
    model.save_pretrained(tmp_path / "pf", tokenizer=tok)
    captions = ["a red circle", "a blue square", "a red circle"]
    cache = prompt_target_cache(tmp_path / "pf", captions, tmp_path / "cache")
    direct = prompts_for(model, tok, ["a blue square", "a red circle"], "cpu")
    assert torch.allclose(cache.get(["a blue square", "a red circle"]), direct, atol=1e-6)
    # new weights, same folder: a different producer, so the old rows are not used
    with torch.no_grad():
        model.to_llm.bias.add_(1.0)
    model.save_pretrained(tmp_path / "pf", tokenizer=tok)
    fresh = prompt_target_cache(tmp_path / "pf", captions, tmp_path / "cache")
    assert fresh.folder != cache.folder
    assert torch.allclose(fresh.get(["a red circle"]), prompts_for(model, tok, ["a red circle"], "cpu"), atol=1e-6)
