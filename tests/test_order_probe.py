"""scripts/order_probe.py (issue 20): its probes separate frame order from frame content.

Synthetic features stand in for a front's: rows a clip then its pair partner, as the script reads the motion clips.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers as tf

from vl_align.fronts import FrontConfig, build_front
from vl_align.simvlg import TomeConnectorConfig
from vl_align.video import VideoConfig
from vl_align.vision import VisionTower, VisionTowerConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "order_probe.py"


@pytest.fixture(scope="module")
def order_probe():
    spec = importlib.util.spec_from_file_location("order_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clips(n_pairs: int, kinds: int, dim: int, seed: int):
    """Per split: content features of each clip and its partner (a partner shares most of the clip's content), kind
    and ±1 label (the partner has the opposite one)."""
    g = torch.Generator().manual_seed(seed)
    content = torch.randn(n_pairs, dim, generator=g, dtype=torch.float64)
    x = torch.stack([content, content + 0.3 * torch.randn(n_pairs, dim, generator=g, dtype=torch.float64)], 1)
    kind = torch.arange(n_pairs).remainder(kinds).repeat_interleave(2)
    label = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(n_pairs)
    return x.flatten(0, 1), kind, label


def _score(order_probe, order_strength: float, dim: int = 20):
    """Features = content + order_strength · label · d: reversing the frames flips the label's sign."""
    d = torch.randn(dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    feats, labels = {}, {}
    for split, n, seed in (("train", 160, 0), ("test", 60, 1)):
        x, kind, label = _clips(n, len(order_probe.KINDS), dim, seed)
        labels[split] = (kind, label)
        feats[split, "as_is"] = {"f": x + order_strength * label[:, None] * d}
        feats[split, "reversed"] = {"f": x - order_strength * label[:, None] * d}
    return order_probe.score(feats, *labels["train"], *labels["test"])["f"]


def test_an_order_blind_front_scores_exactly_chance_on_the_order_probe(order_probe):
    result = _score(order_probe, 0.0)
    assert result["order_accuracy"] == 0.5  # a clip and its reversal have the same features and opposite labels
    assert result["order_signal"] == 0.0


def test_an_order_aware_front_is_read_by_the_order_probe(order_probe):
    result = _score(order_probe, 1.0)
    assert result["order_accuracy"] >= 0.95, result["order_accuracy"]
    assert result["order_signal"] > 0.1
    assert set(result["per_kind"]) == set(order_probe.KINDS)


def test_the_rbf_reader_finds_an_order_code_the_linear_one_cannot(order_probe):
    """--rbf: the order written as an XOR (the sign of coordinate 1 times a per-clip sign held in coordinate 0): no
    linear reader can use it, a kernel one can; an order-blind front stays exactly at chance under both."""
    g = torch.Generator().manual_seed(3)
    feats, labels = {}, {}
    for split, n, seed in (("train", 160, 0), ("test", 60, 1)):
        x, kind, label = _clips(n, len(order_probe.KINDS), 4, seed)
        sign = torch.where(torch.rand(len(x), generator=g) < 0.5, -1.0, 1.0).double()
        code = torch.zeros_like(x[:, :2])
        code[:, 0], code[:, 1] = 3 * sign, 3 * sign * label
        labels[split] = (kind, label)
        flip = torch.tensor([1.0, -1.0], dtype=torch.float64)  # reversing flips the label's part only
        feats[split, "as_is"] = {"xor": torch.cat([x, code], 1), "blind": x}
        feats[split, "reversed"] = {"xor": torch.cat([x, code * flip], 1), "blind": x}
    result = order_probe.score(feats, *labels["train"], *labels["test"], rbf=True)
    assert result["xor"]["order_accuracy"] < 0.65 < 0.9 < result["xor"]["order_accuracy_rbf"], result["xor"]
    assert result["blind"]["order_accuracy"] == result["blind"]["order_accuracy_rbf"] == 0.5
    assert "kernel_width" in result["xor"]["per_kind"]["left"]["order_rbf"]


def test_cross_validation_keeps_a_clip_and_its_partner_in_one_fold(order_probe):
    # the training partner is a near-copy of the clip's content with the opposite label: split across folds the
    # CV would be near 0 for an order-blind partner probe; kept together, the CV sees unrelated clips (chance)
    x, _, y = _clips(100, 1, 20, 0)
    test_x, _, test_y = _clips(40, 1, 20, 1)
    result = order_probe.probe(x, y, test_x, test_y, group=2)
    assert 0.3 <= result["cv_accuracy"] <= 0.7, result
    assert result["penalty"] in order_probe.PENALTIES


def test_connector_taps_reach_the_prefix(order_probe):
    """``--connector-layers``: the last connector layer's tapped output, through W, is the prefix (mean over tokens
    commutes with the linear W), and every layer is tapped once per clip; ``--connector-r 0`` runs the same weights
    without merging."""
    torch.manual_seed(0)
    model = tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                           patch_size=4, image_size=16))
    tower = VisionTower(model, VisionTowerConfig(model="in-memory", image_size=16, cache_features=False),
                        "in-memory", (0.5,) * 3, (0.5,) * 3)
    tome = TomeConnectorConfig(init_from=None, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                               num_hidden_layers=3, hidden_dropout_prob=0.0, r=2)
    cfg = FrontConfig(kind="tome", tome=tome, video=VideoConfig(enabled=True, hidden_dim=16, num_heads=4))
    front = build_front(cfg, tower.hidden_size, 24, vision_tower=tower).eval()
    clips = [{"pixel_values_videos": torch.randn(b, 4, 3, 16, 16, generator=torch.Generator().manual_seed(b))}
             for b in (3, 2)]
    feats = order_probe.features(front, clips, connector_layers=True)
    assert set(feats) == {"tower", "prefix", "prefix_flat", "connector_in", "connector_1", "connector_2",
                          "connector_3"}
    assert all(len(v) == 5 for v in feats.values())
    w = front.llm_proj
    through_w = feats["connector_3"] @ w.weight.double().T + w.bias.double()
    torch.testing.assert_close(through_w, feats["prefix"], rtol=1e-5, atol=1e-6)
    assert order_probe.features(front, clips)["prefix"].equal(feats["prefix"])  # the hooks are gone, same output
    assert not any(m._forward_hooks for m in front.modules())
    # --connector-r 0: the same weights without merging; every layer keeps all tokens (16 patches + [CLS])
    order_probe.set_connector_r(front, 0)
    unmerged = order_probe.features(front, clips, connector_layers=True)
    assert front.connector.schedule(17) == [0, 0, 0]
    assert unmerged["prefix_flat"].shape == (5, 17 * 24) and feats["prefix_flat"].shape == (5, (17 - 6) * 24)
    assert unmerged["connector_in"].equal(feats["connector_in"])  # before the first merge: the same
