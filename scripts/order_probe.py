"""Does a trained video front *encode* frame order, whatever its captions say? (issue 20)

A captioner can fail the order family of ``embedded:motion`` in two places: the front's output does not tell a clip
from its time reversal, or it does and the frozen LLM is not steered by it. This script separates the two with
linear probes on the front's outputs, fitted on order-family clips of the training split and scored on the test
split's:

* ``tower``: the video tower's output after the temporal modules and the mean over frames, ``image_embeds``
  (B, N, C), mean over the N tokens (C features); what the tiny probe of ``tests/test_video_order.py`` reads;
* ``prefix``: the front's prompt vectors W·Z (B, Nq, D), mean over the Nq positions (D features);
* ``prefix_flat``: the same, all positions (Nq·D features).

One ridge classifier per order kind (left/right, up/down, grows/shrinks, appears/disappears, blue/red: which of the
kind's two captions), its penalty chosen by 5-fold cross-validation on the training clips, features standardised on
them. Two probes, chance 0.5 for both:

* ``order``: each clip's uniformly sampled frames fed as sampled (its own label) and reversed (its pair partner's
  label). Both classes hold the same frames, so only their order separates them: an order-blind front (the faithful
  module) gives both the same features and scores exactly 0.5.
* ``partner``: a clip against its pair partner, each sampled uniformly, as the caption evaluation compares them.
  Uniform sampling takes frames ``floor(i·n/T)`` (0, 2, 4, 6 of 8), and the partner is the clip stored reversed, so
  the two show *different* frames (the partner's are the clip's 7, 5, 3, 1): a frame-set difference that even an
  order-blind front can pass on. Training does not teach a captioner this cue (head-tail sampling draws the same
  frame sets for a clip and its reversal, in distribution); the probe, fitted on uniform samples, can learn it.

Besides accuracy it reports the size of the order signal: the mean distance between the features of a clip's frames
and of the same frames reversed, over the mean distance between two different clips of the same kind (0 for an
order-blind front).

    python scripts/order_probe.py FRONT_DIR [FRONT_DIR ...] [--labels a,b] [--train-clips 800] [--out FILE]
        [--cache-dir DIR] [--connector-layers] [--connector-r R] [--rbf]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from dvlp_common.io import write_json_atomic, writing_file
from dvlp_common.precision import autocast, compute_dtype
from vl_align.fronts import load_front
from vl_align.motion import ORDER_PAIRS
from vl_align.pairs import PairDataConfig
from vl_align.ridge import kernel_ridge_path, median_gamma, ridge_fit, with_bias
from vl_align.video_data import load_video_pairs
from vl_align.video_inputs import VideoClipsConfig, VideoInputs, VideoRecord, front_frames, video_data_config

KINDS = [a for a, _ in ORDER_PAIRS]
SECOND = {b: a for a, b in ORDER_PAIRS}  # the reversed caption of each kind -> its kind
PENALTIES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # relative to the mean eigenvalue of XᵀX (of K for rbf)
RBF_WIDTHS = (0.25, 1.0, 4.0)  # x the median heuristic's gamma


def order_records(split: str, limit: int | None) -> list[VideoRecord]:
    """The order-family clips of ``embedded:motion``'s ``split``, complete pairs only (first ``limit`` clips)."""
    data = PairDataConfig(source="embedded:motion", video=VideoClipsConfig())
    pairs, _ = load_video_pairs(video_data_config(data, 4, 0.0), split=split)
    recs = [VideoRecord.of(p) for p in pairs if p.meta.get("family") == "order"]
    by_pair: dict[str, list[VideoRecord]] = defaultdict(list)
    for r in recs:
        by_pair[r.meta["pair_id"]].append(r)
    out = [r for group in by_pair.values() if len(group) == 2 for r in group]
    return out if limit is None else out[:limit - limit % 2]


def labels(recs: list[VideoRecord]) -> tuple[torch.Tensor, torch.Tensor]:
    """(kind index [n], label [n] in {-1, +1}: +1 = the kind's second caption)."""
    cats = [r.meta["category"] for r in recs]
    kind = torch.tensor([KINDS.index(SECOND.get(c, c)) for c in cats])
    return kind, torch.tensor([1.0 if c in SECOND else -1.0 for c in cats], dtype=torch.float64)


def clip_batches(front, tower, recs: list[VideoRecord], order: str, device, batch: int = 16) -> Iterator[dict]:
    """The front's inputs for ``recs``: uniformly sampled frames fed in ``order``, ``batch`` clips at a time."""
    inputs = VideoInputs(tower, front_frames(front), train=False, frame_order=order)
    for start in range(0, len(recs), batch):
        yield inputs([r.video_path for r in recs[start:start + batch]], device)


@torch.no_grad()
def features(front, batches: Iterable[dict], connector_layers: bool = False) -> dict:
    """``{tower, prefix, prefix_flat: [n, F]}`` of a video front on ``batches`` of its inputs; with
    ``connector_layers`` (a tome front) also the mean over tokens of the connector's input (``connector_in``, after
    its projection and norm) and of each layer's output (``connector_<i>``, after its merge)."""
    feats: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = []
    if connector_layers:
        connector = front.connector
        taps = [("connector_in", connector.input_norm)] + [(f"connector_{i + 1}", layer.output)
                                                             for i, layer in enumerate(connector.layers)]
        for name, module in taps:
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: feats[name].append(out.float().mean(1))))
    try:
        for clips in batches:
            out = front("queries", **clips)
            feats["tower"].append(out["image_embeds"].float().mean(1))
            feats["prefix"].append(out["prompt_pred"].float().mean(1))
            feats["prefix_flat"].append(out["prompt_pred"].float().flatten(1))
    finally:
        for hook in hooks:
            hook.remove()
    return {k: torch.cat(v).double() for k, v in feats.items()}


def _sign(score: torch.Tensor) -> torch.Tensor:
    """±1 per row (a score of exactly 0, e.g. a clip and its reversal that an order-blind front cannot tell
    apart, says +1: one of the two is then right)."""
    return torch.where(score >= 0, 1.0, -1.0).to(score.dtype)


def _cv_linear(train_x, train_y, test_x, fold, folds: int) -> tuple[dict, object]:
    """CV accuracy of ridge (with a bias) per (penalty, 1.0), and the refit on every training row: (penalty, _) ->
    the scores of the training and the test rows."""
    scores = {}
    for penalty in PENALTIES:
        right = 0
        for f in range(folds):
            w = ridge_fit(with_bias(train_x[fold != f]), train_y[fold != f], penalty)
            right += int((_sign(with_bias(train_x[fold == f]) @ w) == train_y[fold == f]).sum())
        scores[penalty, 1.0] = right / len(train_y)

    def refit(penalty: float, _width: float):
        w = ridge_fit(with_bias(train_x), train_y, penalty)
        return with_bias(train_x) @ w, with_bias(test_x) @ w
    return scores, refit


def _cv_rbf(train_x, train_y, test_x, fold, folds: int) -> tuple[dict, object]:
    """The same for kernel ridge with an RBF kernel (width x the median heuristic on the fitting rows) plus a
    constant (the bias): squared distances computed once, one eigendecomposition per fold and width."""
    n = len(train_y)
    d2 = torch.cdist(torch.cat([train_x, test_x]), train_x).pow(2)  # [n + m, n]
    scores = {(p, w): 0 for p in PENALTIES for w in RBF_WIDTHS}

    def fitted(fit: torch.Tensor, width: float):
        d2_fit = d2[fit][:, fit]
        gamma = width * median_gamma(d2_fit)
        return gamma, kernel_ridge_path(torch.exp(-gamma * d2_fit) + 1.0, train_y[fit], PENALTIES)

    for f in range(folds):
        fit, held = (fold != f).nonzero().squeeze(1), (fold == f).nonzero().squeeze(1)
        for width in RBF_WIDTHS:
            gamma, alphas = fitted(fit, width)
            k_held = torch.exp(-gamma * d2[held][:, fit]) + 1.0
            for penalty, alpha in alphas.items():
                scores[penalty, width] += int((_sign(k_held @ alpha) == train_y[held]).sum())

    def refit(penalty: float, width: float):
        gamma, alphas = fitted(torch.arange(n), width)
        score = (torch.exp(-gamma * d2) + 1.0) @ alphas[penalty]
        return score[:n], score[n:]
    return {k: v / n for k, v in scores.items()}, refit


def probe(train_x, train_y, test_x, test_y, group: int, folds: int = 5, reader: str = "linear") -> dict:
    """A ridge classifier (``reader`` linear or rbf) with its penalty (and kernel width) chosen by cross-validation
    on the training set. Folds keep each run of ``group`` consecutive rows whole: a clip, its pair partner (nearly
    the clip's frames reversed) and their reversals belong in one fold, or the fold's near-duplicates inflate the
    CV score. Either reader gives a clip and its reversal the same score when their features are equal, so an
    order-blind front scores exactly 0.5 on the order probe under both."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-8)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    fold = (torch.arange(len(train_y)) // group) % folds
    scores, refit = (_cv_rbf(train_x, train_y, test_x, fold, folds) if reader == "rbf" else
                     _cv_linear(train_x, train_y, test_x, fold, folds))
    best = max(scores, key=lambda pw: (scores[pw], pw[0], -pw[1]))  # ties: the stronger penalty, the wider kernel
    train_score, test_score = refit(*best)
    return {"accuracy": float((_sign(test_score) == test_y).double().mean()), "cv_accuracy": scores[best],
            "penalty": best[0], **({"kernel_width": best[1]} if reader == "rbf" else {}),
            "train_accuracy": float((_sign(train_score) == train_y).double().mean())}


def order_signal(x: torch.Tensor, x_reversed: torch.Tensor, kind: torch.Tensor) -> float:
    """mean |f(clip) - f(reversal)| / mean |f(a) - f(b)| over different clips a, b of the same kind."""
    own = (x - x_reversed).norm(dim=1).mean()
    spread = []
    for k in kind.unique():
        xs = x[kind == k]
        d = torch.cdist(xs, xs)
        spread.append(d.sum() / (len(xs) * (len(xs) - 1)))
    return float(own / torch.stack(spread).mean())


def set_connector_r(front, r: int) -> None:
    """Run a tome front's connector with ``r`` merges per layer from now on (its weights unchanged)."""
    front.connector.cfg = dataclasses.replace(front.connector.cfg, r=r)


def run(front_dir: str, train: list[VideoRecord], test: list[VideoRecord], cache: Path | None = None,
        connector_layers: bool = False, connector_r: int | None = None, rbf: bool = False) -> dict:
    """Probe one front; ``cache`` (a .pt file) keeps its features for a rerun of the fits. ``connector_r`` runs the
    trained tome connector with another number of merges per layer (0: none), a diagnostic of whether merging or
    the layers lose the order (the weights were trained with their own schedule, so it is off their distribution)."""
    started = time.perf_counter()
    meta = json.loads((Path(front_dir) / "front_config.json").read_text())
    key = {"front": str(Path(front_dir).resolve()), "train": [r.image_id for r in train],
           "test": [r.image_id for r in test], **({"connector_layers": True} if connector_layers else {}),
           **({"connector_r": connector_r} if connector_r is not None else {})}
    stored = torch.load(cache, weights_only=True) if cache is not None and cache.is_file() else None
    if stored is not None and stored["key"] == key:
        feats = {k: {name: x.double() for name, x in v.items()} for k, v in stored["features"].items()}
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = compute_dtype("auto", device)
        front, tower, _llm, _ = load_front(front_dir)
        front, tower = front.to(device), tower.to(device)
        if connector_r is not None:
            set_connector_r(front, connector_r)
        with autocast(device, dtype):
            feats = {(split, order): features(front, clip_batches(front, tower, recs, order, device), connector_layers)
                     for split, recs in (("train", train), ("test", test)) for order in ("as_is", "reversed")}
        if cache is not None:  # atomically: a cut-off write must not leave a cache that fails to load
            with writing_file(cache) as tmp:
                torch.save({"key": key, "features": {k: {name: x.float() for name, x in v.items()}
                                                     for k, v in feats.items()}}, tmp)
    result = {"front": front_dir, "video": meta["front"].get("video", {}), "train_clips": len(train),
              **({"connector_r": connector_r} if connector_r is not None else {}),
              "test_clips": len(test), "features_seconds": round(time.perf_counter() - started, 1)}
    return {**result, **score(feats, *labels(train), *labels(test), rbf=rbf)}


def score(feats: dict, train_k, train_y, test_k, test_y, rbf: bool = False) -> dict:
    """The probes on features ``{(split, order): {name: [n, F]}}`` (split train/test, order as_is/reversed; rows:
    a clip then its pair partner, as ``order_records`` gives them) with kinds and ±1 labels per split:
    ``{name: {order_accuracy, partner_accuracy, order_signal, features, per_kind}}``; with ``rbf`` also the order
    probe read by an RBF kernel (``order_accuracy_rbf``): is the order there but not linearly?"""
    result = {}
    for name in feats["train", "as_is"]:
        tr_x, tr_rev = feats["train", "as_is"][name], feats["train", "reversed"][name]
        te_x, te_rev = feats["test", "as_is"][name], feats["test", "reversed"][name]
        per_kind = {}
        for k, kind in enumerate(KINDS):
            tr, te = train_k == k, test_k == k
            # order: each clip's sampled frames as sampled (its label) and reversed (the partner's label): the two
            # classes hold the same frames, so only their order can separate them (rows interleaved: CV keeps a
            # clip and its reversal in one fold)
            order_data = (torch.stack([tr_x[tr], tr_rev[tr]], 1).flatten(0, 1),
                          torch.stack([train_y[tr], -train_y[tr]], 1).flatten(),
                          torch.cat([te_x[te], te_rev[te]]), torch.cat([test_y[te], -test_y[te]]))
            order = probe(*order_data, group=4)
            # partner: a clip against its pair partner, each uniformly sampled, as the captions are scored; the
            # sampled frame sets differ between the two (module docstring), so an order-blind front can pass
            partner = probe(tr_x[tr], train_y[tr], te_x[te], test_y[te], group=2)
            per_kind[kind] = {"order": order, "partner": partner, "test_clips": int(te.sum()),
                              **({"order_rbf": probe(*order_data, group=4, reader="rbf")} if rbf else {})}
        weights = torch.tensor([per_kind[k]["test_clips"] for k in KINDS], dtype=torch.float64)

        def mean_of(probe_name, kinds=per_kind, w=weights):
            return float(sum(kinds[k][probe_name]["accuracy"] * wk for k, wk in zip(KINDS, w)) / w.sum())

        result[name] = {"order_accuracy": mean_of("order"), "partner_accuracy": mean_of("partner"),
                        "order_signal": order_signal(te_x, te_rev, test_k), "features": int(tr_x.shape[1]),
                        "per_kind": per_kind, **({"order_accuracy_rbf": mean_of("order_rbf")} if rbf else {})}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fronts", nargs="+", help="front/ folders of trained video fronts")
    parser.add_argument("--labels", default=None, help="comma-separated names of the fronts, for the table")
    parser.add_argument("--train-clips", type=int, default=800)
    parser.add_argument("--test-clips", type=int, default=None)
    parser.add_argument("--out", default=None, help="json file (default: print only)")
    parser.add_argument("--connector-layers", action="store_true",
                        help="also probe the tome connector's input and each of its layers (where order is lost)")
    parser.add_argument("--rbf", action="store_true",
                        help="also read the order probe with an RBF kernel (is the order there, but not linearly?)")
    parser.add_argument("--connector-r", type=int, default=None,
                        help="run the trained tome connector with this many merges per layer (0: none; diagnostic)")
    parser.add_argument("--cache-dir", default=None, help="keep each front's features here (<label>.pt) for reruns")
    args = parser.parse_args()
    names = args.labels.split(",") if args.labels else args.fronts
    if len(names) != len(args.fronts):
        parser.error(f"--labels names {len(names)} fronts, {len(args.fronts)} given")
    train, test = order_records("train", args.train_clips), order_records("test", args.test_clips)
    results = {}
    for name, front_dir in zip(names, args.fronts):
        cache = Path(args.cache_dir) / f"{name}.pt" if args.cache_dir else None
        results[name] = run(front_dir, train, test, cache, args.connector_layers, args.connector_r, args.rbf)
        r = results[name]
        print(f"{name}: " + "; ".join(f"{f}: order {r[f]['order_accuracy']:.3f}, partner {r[f]['partner_accuracy']:.3f}, "
                                      + (f"order (rbf) {r[f]['order_accuracy_rbf']:.3f}, " if args.rbf else "")
                                      + f"signal {r[f]['order_signal']:.3f}" for f in r
                                      if isinstance(r[f], dict) and "order_accuracy" in r[f]),
              flush=True)
        if args.out:
            write_json_atomic(Path(args.out), results)
    if not args.out:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
