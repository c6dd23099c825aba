"""The P-Former alignment (Jian et al. 2023, arXiv 2307.07063): the front's projected output W·Z is pulled toward
the frozen P-Former's prompts P(y) of the caption, ω₁·align in the representation stage and ω₂·align in the
generative stage; ω = 0 is the BLIP-2 baseline.

Here: the config (weight, kind, target), the corpus statistics of P(y) that the centred variants and the
caption-free control need, and the loss. The targets themselves come from ``pformer.targets``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from dvlp_common.config import Config, ConfigError, param

from .losses import Gather, identity

AlignmentKind = Literal["mse", "standardized_mse", "cosine", "contrastive"]


def alignment_loss(pred: torch.Tensor, target: torch.Tensor, kind: AlignmentKind = "mse",
                   center: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                   gather: Gather = identity, rank: int = 0, temperature: float = 0.07) -> torch.Tensor:
    """How far the projected front output W·Z [B, n, d] is from the P-Former prompts P(y) [B, n, d].

    * ``mse``: the paper's loss.
    * ``standardized_mse``: MSE after subtracting the corpus-mean prompt ``center`` [n, d] and dividing by
      ``scale`` [n, d] (the pipelines pass the corpus RMS deviation from the mean, one value), so the
      caption-specific part of P(y) carries the weight instead of the component all captions share; predicting the
      corpus mean scores 1.
    * ``cosine``: 1 - cosine similarity of the centred prompt vectors, averaged over the n prompts.
    * ``contrastive``: InfoNCE between the flattened centred W·Z and P(y) of the global batch (each prediction
      must be closer to its own caption's prompts than to the other captions').
    """
    pred, target = pred.float(), target.float()
    if kind == "mse":
        return F.mse_loss(pred, target)
    if center is None:
        raise ValueError(f"alignment kind '{kind}' needs the corpus-mean prompt (center)")
    pred_c, target_c = pred - center, target - center
    if kind == "standardized_mse":
        if scale is None:
            raise ValueError("alignment kind 'standardized_mse' needs the corpus scale")
        return F.mse_loss(pred_c / scale, target_c / scale)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(pred_c, target_c, dim=-1)).mean()
    if kind == "contrastive":
        p = F.normalize(pred_c.flatten(1), dim=-1)
        t = F.normalize(target_c.flatten(1), dim=-1)
        t_all = gather(t)
        logits = p @ t_all.T / temperature
        targets = torch.arange(p.shape[0], device=p.device) + rank * p.shape[0]
        return F.cross_entropy(logits, targets)
    raise ValueError(f"unknown alignment kind '{kind}'")


@dataclass
class AlignmentConfig(Config):
    weight: float = param(10.0, ge=0.0, help="ω: weight of the alignment to P(y) (0 = the BLIP-2 baseline)")
    kind: AlignmentKind = param("mse", help="mse (paper) | standardized_mse | cosine | contrastive")
    target: str = param("caption", help="caption: P(y) of the sample's caption | corpus_mean: the mean P(y) of the "
                                        "corpus for every sample (caption-free control)")

    def check(self) -> None:
        if self.target not in ("caption", "corpus_mean"):
            raise ConfigError("target", f"got {self.target!r}; allowed values: 'caption', 'corpus_mean'")


@dataclass
class AlignmentStats:
    """Corpus statistics of P(y) that the alignment variants need: the mean [n, d] and a scale [n, d]."""
    center: torch.Tensor
    scale: torch.Tensor


def corpus_statistics(prompts: torch.Tensor) -> AlignmentStats:
    """Mean and scale of the P(y) [N, n, d] of a caption corpus. One scale for every element: the RMS deviation
    from the corpus mean (per-element stds are ~1e-3 on some elements, and dividing by them made the loss ~8 and
    the arm collapse, measured on easy-VQA)."""
    center = prompts.mean(0)
    rms = (prompts - center).pow(2).mean().sqrt().clamp_min(1e-6)
    return AlignmentStats(center=center, scale=rms.expand_as(center))


@torch.no_grad()
def alignment_diagnostics(pred: torch.Tensor, target: torch.Tensor, center: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """How close W·Z [B, n, d] is to P(y) [B, n, d], whatever the loss (logged in every stage-2 run, the baseline's
    too):

    * ``align_mse``: MSE(W·Z, P(y)), the paper's loss;
    * ``align_rel``: MSE / mean(P(y)²): 1 is no better than predicting zeros;
    * ``align_r2``: the caption-specific R² = 1 - MSE(W·Z, P(y)) / MSE(corpus-mean prompt, P(y)): 0 is no better than
      the one prompt of the whole corpus (which carries no information about the caption), 1 is P(y) itself.
    """
    pred, target = pred.float(), target.float()
    mse = F.mse_loss(pred, target)
    out = {"align_mse": mse, "align_rel": mse / target.pow(2).mean().clamp_min(1e-12)}
    if center is not None:
        out["align_r2"] = 1.0 - mse / F.mse_loss(center.float().expand_as(target), target).clamp_min(1e-12)
    return out


__all__ = ["AlignmentKind", "AlignmentConfig", "AlignmentStats", "alignment_loss", "alignment_diagnostics",
           "corpus_statistics"]
