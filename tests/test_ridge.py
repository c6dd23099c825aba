"""vl_align/ridge.py: the ridge fit of the alignment's least-squares W and of the order probes."""
from __future__ import annotations

import torch

from vl_align.ridge import kernel_ridge_path, median_gamma, ridge_fit, with_bias


def test_ridge_fit_recovers_a_linear_map_and_its_bias():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    w_true = torch.randn(5, 3, generator=g, dtype=torch.float64)
    bias = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    w = ridge_fit(with_bias(x), x @ w_true + bias, penalty=1e-10)
    torch.testing.assert_close(w[:5], w_true, rtol=0, atol=1e-6)
    torch.testing.assert_close(w[5], bias, rtol=0, atol=1e-6)


def test_dual_form_gives_the_primal_solution():
    """More features than samples takes the dual form; with the penalty relative to the mean eigenvalue of xᵀx in
    both forms, the same W comes out (so a probe's penalty grid means the same at any width)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 80, generator=g, dtype=torch.float64)
    y = torch.randn(30, 2, generator=g, dtype=torch.float64)
    for penalty in (1e-3, 0.1, 10.0):
        dual = ridge_fit(x, y, penalty)
        gram = x.T @ x
        primal = torch.linalg.solve(gram + penalty * gram.diagonal().mean() * torch.eye(80, dtype=x.dtype), x.T @ y)
        torch.testing.assert_close(dual, primal, rtol=1e-7, atol=1e-9)
    # a stronger penalty shrinks W
    assert ridge_fit(x, y, 10.0).norm() < ridge_fit(x, y, 0.1).norm()


def test_kernel_ridge_path_solves_each_penalty():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randn(40, generator=g, dtype=torch.float64)
    d2 = torch.cdist(x, x).pow(2)
    gamma = median_gamma(d2)
    assert gamma == 1.0 / float(d2[~torch.eye(40, dtype=torch.bool)].median())
    kernel = torch.exp(-gamma * d2)
    for penalty, alpha in kernel_ridge_path(kernel, y, (1e-3, 1.0)).items():
        lam = penalty * kernel.diagonal().mean()
        torch.testing.assert_close(alpha, torch.linalg.solve(kernel + lam * torch.eye(40, dtype=x.dtype), y))
