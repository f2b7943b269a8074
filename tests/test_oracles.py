"""ProximalOptimizer against solvers from outside: scikit-learn's Lasso and ElasticNet, skglm's group lasso.

Full-batch proximal gradient (ISTA): ``ProximalOptimizer(SGD(lr=1/L))`` with
``L = λ_max(XᵀX/n)`` on an ``nn.Linear(p, 1, bias=False)`` in float64, data
term ``0.5·mean((Xw − y)²)``, which is the ``(1/2n)·‖y − Xw‖²`` of both
oracles. It stops once the iterates stop changing. Designs: independent
columns, and neighbouring columns correlated 0.98 (AR(1), condition number ≈ 2000).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import ElasticNet, Lasso
from torch import nn

import sparsecraft as sc
from sparsecraft.optim import ProximalOptimizer

N, P = 60, 15
GROUP_SIZES = (3, 3, 4, 5)


def _design(kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, P))
    if kind == "correlated":
        cov = 0.98 ** np.abs(np.subtract.outer(np.arange(P), np.arange(P)))
        X = X @ np.linalg.cholesky(cov).T
    w = np.zeros(P)
    w[[0, 3, 7, 11]] = [2.0, -1.5, 1.0, 0.5]
    return X, X @ w + 0.5 * rng.standard_normal(N)


def _ista(X: np.ndarray, y: np.ndarray, penalty: sc.Penalty, max_iter: int = 30_000) -> np.ndarray:
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    model = nn.Linear(P, 1, bias=False, dtype=torch.float64)
    nn.init.zeros_(model.weight)
    reg = sc.Regularizer(model)
    reg.add_weight(model, penalty)
    lipschitz = float(torch.linalg.eigvalsh(Xt.T @ Xt / N).max())
    opt = ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=1.0 / lipschitz), reg)
    w = model.weight.detach()  # shares memory with the parameter
    prev = w.clone()
    for _ in range(max_iter):
        opt.zero_grad()
        loss = 0.5 * ((model(Xt).squeeze(1) - yt) ** 2).mean() + reg.loss()
        loss.backward()
        opt.step()
        if float((w - prev).abs().max()) <= 1e-13:
            break
        prev.copy_(w)
    else:
        raise AssertionError(f"ISTA did not settle in {max_iter} iterations")
    return w.squeeze(0).numpy()


def _alpha_max(X, y) -> float:
    return float(np.abs(X.T @ y).max() / N)


def _check(ours: np.ndarray, ref: np.ndarray) -> None:
    assert np.abs(ours - ref).max() <= 1e-8, np.abs(ours - ref).max()
    np.testing.assert_array_equal(ours == 0, ref == 0)
    assert (ref != 0).any()


@pytest.mark.parametrize("kind", ["independent", "correlated"])
@pytest.mark.parametrize("fraction", [0.95, 0.3, 0.05])
def test_lasso_matches_sklearn(kind, fraction):
    X, y = _design(kind)
    alpha = fraction * _alpha_max(X, y)
    ref = Lasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=10**6).fit(X, y).coef_
    ours = _ista(X, y, sc.L1(alpha))
    _check(ours, ref)
    if fraction == 0.05:
        assert (ref == 0).any(), "a case with zeros in the solution"


def test_lasso_at_alpha_max_is_all_zero():
    X, y = _design("independent")
    ours = _ista(X, y, sc.L1(1.001 * _alpha_max(X, y)))
    assert (ours == 0).all()


@pytest.mark.parametrize("kind", ["independent", "correlated"])
@pytest.mark.parametrize(("fraction", "l1_ratio"), [(0.95, 0.9), (0.3, 0.5), (0.05, 0.7)])
def test_elastic_net_matches_sklearn(kind, fraction, l1_ratio):
    X, y = _design(kind)
    alpha = fraction * _alpha_max(X, y) / l1_ratio  # alpha_max of the elastic net
    ref = ElasticNet(alpha=alpha, l1_ratio=l1_ratio, fit_intercept=False, tol=1e-14,
                     max_iter=10**6).fit(X, y).coef_
    ours = _ista(X, y, sc.L1L2.from_sklearn(alpha, l1_ratio))
    _check(ours, ref)


def test_group_lasso_matches_skglm():
    # One test for every case: skglm JIT-compiles its solver on first use (~20 s here).
    from skglm import GeneralizedLinearEstimator
    from skglm.datafits import QuadraticGroup
    from skglm.penalties import WeightedGroupL2
    from skglm.solvers import GroupBCD
    from skglm.utils.data import grp_converter

    grp_indices, grp_ptr = grp_converter(list(GROUP_SIZES), P)
    groups = tuple(g for g, size in enumerate(GROUP_SIZES) for _ in range(size))
    cases = [(kind, "sqrt_size", fraction) for kind in ("independent", "correlated")
             for fraction in (0.95, 0.3, 0.05)] + [("correlated", "none", 0.3)]
    for kind, weights, fraction in cases:
        X, y = _design(kind, seed=1)
        w_g = np.sqrt(GROUP_SIZES) if weights == "sqrt_size" else np.ones(len(GROUP_SIZES))
        corr = np.array([np.linalg.norm(X[:, grp_indices[grp_ptr[g]:grp_ptr[g + 1]]].T @ y) / N
                         for g in range(len(GROUP_SIZES))])
        alpha = fraction * float((corr / w_g).max())  # fraction of alpha_max
        skglm_pen = WeightedGroupL2(alpha, w_g, grp_ptr, grp_indices)
        ours_pen = sc.GroupLasso(alpha, groups=groups, dim=1, weights=weights)
        # Same objective: skglm's penalty value equals ours at any point.
        probe = np.random.default_rng(2).standard_normal(P)
        assert skglm_pen.value(probe) == pytest.approx(
            float(ours_pen(torch.from_numpy(probe)[None, :])), rel=1e-12)
        est = GeneralizedLinearEstimator(
            QuadraticGroup(grp_ptr, grp_indices), skglm_pen,
            GroupBCD(max_iter=10_000, tol=1e-14, fit_intercept=False))
        ref = est.fit(X, y).coef_
        ours = _ista(X, y, ours_pen)
        assert np.abs(ours - ref).max() <= 1e-8, (kind, weights, fraction, np.abs(ours - ref).max())
        np.testing.assert_array_equal(ours == 0, ref == 0, err_msg=f"{kind} {weights} {fraction}")
        assert (ref != 0).any()
        if fraction == 0.95:
            assert (ref == 0).sum() >= P - max(GROUP_SIZES)  # one group left at most
