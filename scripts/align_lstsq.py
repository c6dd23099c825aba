"""Is a stage-2 run's alignment held back by the optimiser or by the features? (issue 19)

Takes a finished stage-2a run (its ``config.yaml`` and ``front/``), or one of a run's checkpoints
(``--checkpoint STEP``: the front's weights at that step, e.g. to follow the features over a long run), computes the query outputs Z of its training
images (eval mode, no dropout) and their captions' P(y), and compares on held-out halves of those pairs:

* the trained W (``llm_proj``): MSE(W·Z, P(y));
* a least-squares W (with bias) fitted on the other half of the same Z: the best any linear W reaches on these
  features;
* a shared W plus one bias per query position: whether the shared W lacks only the positions' offsets;
* the same with one W per query position: whether sharing W across the queries is what limits it;
* the corpus-mean prompt (per position): the R² = 0 reference.

It also reports how distinct the query positions are: the share of the query outputs' variance that lies between
the positions' means (0: every query gives the same output up to sample noise).

It also reads the alignment on held-out images (``heldout``: the run's zero-shot split, ``--heldout-images`` of
them, as ``align_curve`` does during training), where the rows above use training images.

``--zero-shot`` also measures, for that front, what the alignment is for (as a finished stage 2a does with
``zero_shot.enabled``): held-out captions generated from W·Z through the frozen LLM, and the LLM's held-out caption
loss with W·Z as prefix (the generative stage's step 0), written under ``RUN_DIR/zero_shot_step{STEP}/``.

    python scripts/align_lstsq.py RUN_DIR [--checkpoint STEP] [--zero-shot] [--max-pairs 2000] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from dvlp_common.config import ConfigError, load_config
from dvlp_common.io import write_json_atomic
from dvlp_common.precision import autocast, compute_dtype
from pipelines.stage2 import Stage2Config
from vl_align.fronts import load_front
from vl_align.inputs import prepare_stage_inputs
from vl_align.ridge import ridge_fit, with_bias


def _mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred - target).pow(2).mean())


def _front_at(run: Path, cfg: Stage2Config, step: int, inputs):
    """The run's front with the weights of its checkpoint at ``step`` (DeepSpeed's model states of rank 0)."""
    from vl_align.fronts import build_front

    folder = run / "checkpoints" / f"step_{step:08d}"
    states = folder / "mp_rank_00_model_states.pt"
    if not states.is_file():
        available = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
        raise SystemExit(f"{states} not found; checkpoints of {run}: {available}")
    front = build_front(cfg.front, inputs.tower.hidden_size, inputs.llm_width)
    front.load_state_dict(torch.load(states, map_location="cpu", weights_only=True)["module"])  # strict
    return front.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--max-pairs", type=int, default=2000, help="training pairs used (half fit, half scored)")
    p.add_argument("--ridge", type=float, default=1e-3, help="ridge of the least-squares fit (relative to the mean "
                                                             "eigenvalue of ZᵀZ)")
    p.add_argument("--checkpoint", type=int, default=None, help="score the front saved in this step's checkpoint "
                                                                 "(RUN_DIR/checkpoints/step_*) instead of RUN_DIR/front")
    p.add_argument("--zero-shot", action="store_true", help="also caption held-out images from W·Z and measure the "
                                                                "held-out LM loss at generative step 0 (the run's "
                                                                "zero_shot settings)")
    p.add_argument("--heldout-images", type=int, default=None, help="held-out images of the held-out reading "
                                                                      "(default: the run's align_curve.images)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    cfg = load_config(Stage2Config, run / "config.yaml", [])
    device = torch.device("cpu")
    dtype = compute_dtype(cfg.deepspeed.precision, device)
    inputs = prepare_stage_inputs(data=cfg.data, vision=cfg.vision, live_tower=False, llm=cfg.llm, align=cfg.align,
                                  pformer=cfg.pformer, align_stats_source=cfg.align_stats_source, seed=cfg.seed,
                                  max_skip_fraction=1.0, num_prompt_slots=cfg.front.num_query_tokens,
                                  device=device, dtype=dtype, verbose=False)
    front = _front_at(run, cfg, args.checkpoint, inputs) if args.checkpoint is not None else load_front(
        run / "front")[0]
    pairs = list(inputs.pairs)
    random.Random(0).shuffle(pairs)
    pairs = pairs[:args.max_pairs]
    zs, ps, preds = [], [], []
    front.eval()
    with torch.no_grad(), autocast(device, dtype):
        for s in range(0, len(pairs), 64):
            chunk = pairs[s:s + 64]
            out = front("queries", **inputs.images([r.image for r in chunk], device))
            zs.append(out["query_output"].float())  # [b, Q, H]
            preds.append(out["prompt_pred"].float())  # [b, Q, d]: the trained W·Z
            ps.append(inputs.targets.caption_prompts([r.caption for r in chunk], device).float())  # [b, Q, d]
    z, pred, target = torch.cat(zs), torch.cat(preds), torch.cat(ps)
    half = len(pairs) // 2
    q = z.shape[1]
    # one W shared by the Q query positions, as llm_proj is: rows are (sample, query)
    x = with_bias(z)  # [N, Q, H+1]
    x_fit, y_fit = x[:half].reshape(-1, x.shape[-1]).double(), target[:half].reshape(-1, target.shape[-1]).double()
    w = ridge_fit(x_fit, y_fit, args.ridge)  # [H+1, d]
    lstsq_pred = (x[half:].double() @ w).float()
    # one shared W plus a bias per query position: does the shared W lack only the positions' offsets?
    onehot = torch.eye(q).expand(z.shape[0], q, q)  # [N, Q, Q]
    xb = torch.cat([z, onehot], dim=-1)
    xb_fit = xb[:half].reshape(-1, xb.shape[-1]).double()
    shared_bias_pred = (xb[half:].double() @ ridge_fit(xb_fit, y_fit, args.ridge)).float()
    # the same fit with one W per query position (an upper bound for a non-shared projection): is sharing W the limit?
    per_query = torch.empty_like(target[half:])
    for i in range(q):
        xi, yi = x[:half, i].double(), target[:half, i].double()
        per_query[:, i] = (x[half:, i].double() @ ridge_fit(xi, yi, args.ridge)).float()
    # how different the query positions are: the share of Z's variance that is between the positions' means
    z_fit = z[:half]
    between = float((z_fit.mean(0) - z_fit.mean((0, 1))).pow(2).sum(-1).mean())
    total = float((z_fit - z_fit.mean((0, 1))).pow(2).sum(-1).mean())
    held = target[half:]
    mean_prompt = target[:half].mean(0, keepdim=True)  # [1, Q, d]: the corpus-mean prompt of the fitting half
    mean_mse = _mse(mean_prompt.expand_as(held), held)
    result = {
        "run": str(run), "step": args.checkpoint, "pairs_fit": half, "pairs_scored": len(pairs) - half, "queries": q,
        "mean_square_target": float(held.pow(2).mean()),
        "corpus_mean_prompt_mse": mean_mse,
        "trained_w_mse": _mse(pred[half:], held),
        "lstsq_w_mse": _mse(lstsq_pred, held),
        "lstsq_w_position_bias_mse": _mse(shared_bias_pred, held),
        "lstsq_per_query_w_mse": _mse(per_query, held),
        "query_position_variance_share": between / total if total else float("nan"),
        "zero_mse": float(held.pow(2).mean()),
    }
    for key in ("trained_w", "lstsq_w", "lstsq_w_position_bias", "lstsq_per_query_w"):
        result[f"{key}_r2"] = 1.0 - result[f"{key}_mse"] / mean_mse
    try:
        from dvlp_common import zoo
        from vl_align.evaluation import HeldoutAlignment

        if args.heldout_images:
            cfg = cfg.replace(align_curve=cfg.align_curve.replace(images=args.heldout_images))
        result["heldout"] = HeldoutAlignment(inputs.tower, cfg.align_curve_images(), cfg.data,
                                             cfg.pformer, inputs.stats.center, front.vision is not None, device,
                                             dtype, zoo.cache_root())(front)
    except ConfigError as err:  # a run on a source without held-out images: the training-image rows only
        print(f"no held-out reading: {err}", flush=True)
    if args.zero_shot:
        from pipelines.stage2 import prompt_layout, zero_shot_mechanism

        folder = run / ("zero_shot_final" if args.checkpoint is None else f"zero_shot_step{args.checkpoint}")
        result["zero_shot"] = zero_shot_mechanism(front, inputs.tower, cfg, prompt_layout(cfg), folder, device,
                                                  dtype)
    out = Path(args.out) if args.out else run / (
        "align_lstsq.json" if args.checkpoint is None else f"align_lstsq_step{args.checkpoint}.json")
    write_json_atomic(out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
