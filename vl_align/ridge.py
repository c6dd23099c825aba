"""Ridge regression for read-outs of a front's features: the best linear W from query outputs to P(y)
(``scripts/align_lstsq.py``) and the probes of frame order (``scripts/order_probe.py``), linear or with an RBF
kernel.

The penalty is relative to the mean eigenvalue of XᵀX (trace / features), so one value means the same on features
of any scale or width. With more features than samples the dual form solves an n x n system instead of d x d;
with the penalty scaled the same way both forms give the same W.
"""
from __future__ import annotations

import torch


def with_bias(x: torch.Tensor) -> torch.Tensor:
    """[..., F] -> [..., F + 1]: a column of ones appended, so the last row of a fitted W is the bias."""
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], dim=-1)


def ridge_fit(x: torch.Tensor, y: torch.Tensor, penalty: float) -> torch.Tensor:
    """W [F, K] minimising |x·W - y|² + λ·|W|², λ = penalty x the mean eigenvalue of xᵀx (x [n, F], y [n, K] or
    [n]). Fit in float64 for conditioning; add a bias column with :func:`with_bias`."""
    n, features = x.shape
    if features > n:  # dual: W = xᵀ(x·xᵀ + λI)⁻¹y, the same solution from an n x n system
        gram = x @ x.T
        lam = penalty * gram.diagonal().sum() / features
        return x.T @ torch.linalg.solve(gram + lam * torch.eye(n, dtype=x.dtype, device=x.device), y)
    gram = x.T @ x
    lam = penalty * gram.diagonal().mean()
    return torch.linalg.solve(gram + lam * torch.eye(features, dtype=x.dtype, device=x.device), x.T @ y)


def median_gamma(sq_dists: torch.Tensor) -> float:
    """The median heuristic for an RBF kernel exp(-gamma·d²): 1 / the median squared distance between different
    rows, from their square matrix of squared distances."""
    off = sq_dists[~torch.eye(len(sq_dists), dtype=torch.bool, device=sq_dists.device)]
    return 1.0 / float(off.median().clamp_min(1e-12))


def kernel_ridge_path(kernel: torch.Tensor, y: torch.Tensor, penalties) -> dict[float, torch.Tensor]:
    """Dual weights α of kernel ridge regression for each penalty, (K + λI)α = y with λ = penalty x the mean
    eigenvalue of K (trace / n); predictions are K(new, train)·α. One eigendecomposition serves every penalty."""
    evals, evecs = torch.linalg.eigh(kernel)
    proj = evecs.T @ y
    unit = kernel.diagonal().sum() / len(kernel)
    shape = (-1,) + (1,) * (proj.dim() - 1)
    return {p: evecs @ (proj / (evals + p * unit).reshape(shape)) for p in penalties}


__all__ = ["ridge_fit", "with_bias", "median_gamma", "kernel_ridge_path"]
