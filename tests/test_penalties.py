"""Tests of sparsecraft.penalties.

* prox: by the optimality condition (convex penalties), by a brute-force argmin on a
  grid (L0, MCP), by random perturbations and a generic minimiser — never by a second
  copy of the same formula;
* values: against numpy written from each docstring's formula;
* one generic test over every registered penalty (config, spec, dtype);
* bad input: clear errors naming the argument and the value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsecraft.penalties as P

SETTINGS = settings(max_examples=60, deadline=None)
TOL = 1e-9

# --------------------------------------------------------------------------- strategies

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)
small_shapes = st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple)
strengths = st.floats(0.0, 2.0, width=64)
# 0 is its own case (identity); other steps stay away from it so that (v − x)/t is accurate.
step_values = st.one_of(st.just(0.0), st.floats(0.01, 2.0, width=64))


@st.composite
def tensors(draw, shape):
    n = math.prod(shape)
    vals = draw(st.lists(st.floats(-3.0, 3.0, allow_nan=False, width=64), min_size=n, max_size=n))
    return torch.tensor(vals, dtype=torch.float64).reshape(shape)


@st.composite
def separable_steps(draw, shape, elements=step_values):
    """A float step, or one step per coordinate (a tensor of ``shape``)."""
    if draw(st.booleans()):
        return draw(elements)
    vals = draw(st.lists(elements, min_size=math.prod(shape), max_size=math.prod(shape)))
    return torch.tensor(vals, dtype=torch.float64).reshape(shape)


# --------------------------------------------------------------------------- numpy definitions


def np_group_masks(p, shape):
    """One boolean mask per group, from the GroupLasso docstring: named groups are
    slices along dim 0 (rows) or 1 (columns); an index sequence merges slices along ``dim``."""
    if isinstance(p.groups, str):
        d = {"rows": 0, "out_channels": 0, "columns": 1, "in_channels": 1}[p.groups]
        ids, n = np.arange(shape[d]), shape[d]
    else:
        d = p.dim % len(shape)
        ids, n = np.asarray(p.groups), max(p.groups) + 1
    full = np.broadcast_to(ids.reshape([-1 if i == d else 1 for i in range(len(shape))]), shape)
    return [full == g for g in range(n)]


def np_group_weights(p, masks):
    return [math.sqrt(m.sum()) if p.weights == "sqrt_size" else 1.0 for m in masks]


def np_mcp(x, lam, gamma):
    a = np.abs(x)
    return np.where(a <= gamma * lam, lam * a - a**2 / (2 * gamma), gamma * lam**2 / 2)


def np_orthogonal(x, factor, mode):
    v = x if mode == "rows" else x.T
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    u = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
    gram = u @ u.T
    off = gram - np.diag(np.diag(gram))
    n = v.shape[0]
    return factor * 0.5 * np.abs(off).sum() / (n * (n - 1) / 2)


def np_value(p, x):
    """R(x) written from each class docstring, in float64 numpy."""
    x = np.asarray(x, dtype=np.float64)
    if isinstance(p, P.L1):
        return p.l1 * np.abs(x).sum()
    if isinstance(p, P.L2):
        return p.l2 * (x**2).sum()
    if isinstance(p, P.L1L2):
        return p.l1 * np.abs(x).sum() + p.l2 * (x**2).sum()
    if isinstance(p, P.L0):
        return p.strength * np.count_nonzero(x)
    if isinstance(p, P.MCP):
        return np_mcp(x, p.strength, p.gamma).sum()
    if isinstance(p, (P.GroupLasso, P.SparseGroupLasso)):
        masks = np_group_masks(p, x.shape)
        group = sum(w * np.linalg.norm(x[m]) for w, m in zip(np_group_weights(p, masks), masks, strict=True))
        if isinstance(p, P.GroupLasso):
            return p.strength * group
        return p.l1 * np.abs(x).sum() + p.group * group
    if isinstance(p, P.Hoyer):
        n2 = np.linalg.norm(x)
        return 0.0 if n2 == 0 else p.strength * np.abs(x).sum() / n2
    if isinstance(p, P.Orthogonal):
        return np_orthogonal(x, p.factor, p.mode)
    raise AssertionError(f"no numpy definition for {p!r}")


def full_step(p, v, step):
    """The step of each coordinate: per-group steps spread over their groups."""
    if isinstance(step, torch.Tensor) and isinstance(p, (P.GroupLasso, P.SparseGroupLasso)):
        t = np.zeros(v.shape)
        for g, m in enumerate(np_group_masks(p, tuple(v.shape))):
            t[m] = float(step[g])
        return t
    return np.broadcast_to(np.asarray(step, dtype=np.float64), tuple(v.shape))


def prox_objective(p, x, v, t):
    """R(x) + Σ (x − v)²/(2t) with per-coordinate t > 0."""
    return np_value(p, x) + ((x - v) ** 2 / (2 * t)).sum()


# --------------------------------------------------------------------------- shared checks


def check_variants(p, v, step, x):
    """out=v, out=buffer and prox_ (hot path) equal the out-of-place result; prox
    leaves its inputs alone."""
    v0 = v.clone()
    s0 = step.clone() if isinstance(step, torch.Tensor) else step
    assert torch.equal(v, v0), "prox modified its input"
    if isinstance(step, torch.Tensor):
        assert torch.equal(step, s0), "prox modified its step"
    w = v.clone()
    res = p.prox(w, step, out=w)
    assert res.data_ptr() == w.data_ptr()
    torch.testing.assert_close(w, x, rtol=0, atol=1e-15)
    buf = torch.empty_like(v)
    p.prox(v, step, out=buf)
    torch.testing.assert_close(buf, x, rtol=0, atol=1e-15)
    w = v.clone()
    res = p.prox_(w, step.clone() if isinstance(step, torch.Tensor) else step)
    assert res.data_ptr() == w.data_ptr()
    torch.testing.assert_close(w, x, rtol=0, atol=1e-15)


def check_global_min_by_perturbation(p, v, t, x, rng, n=40):
    """prox is a global argmin: no nearby or sparser point has a lower objective."""
    vn, xn = v.numpy(), x.numpy()
    pos = t > 0
    if not pos.all():
        # zero-step coordinates: the prox is the identity there
        np.testing.assert_array_equal(xn[~pos], vn[~pos])
        return
    base = prox_objective(p, xn, vn, t)
    for k in range(n):
        scale = (1e-4, 1e-2, 0.3)[k % 3]
        cand = xn + scale * rng.standard_normal(xn.shape)
        if k % 4 == 0:  # flip some coordinates between 0 and v
            flip = rng.random(xn.shape) < 0.5
            cand = np.where(flip, np.where(xn == 0, vn, 0.0), xn)
        assert prox_objective(p, cand, vn, t) >= base - 1e-12


def grid_check(p, v, t, x, lo=-3.5, hi=3.5, n=7001):
    """Separable penalties: per coordinate, R(x) + (x − v)²/(2t) at the prox is no more
    than its minimum over a fine grid (plus the points 0 and v)."""
    vn, xn = v.numpy().ravel(), x.numpy().ravel()
    tn = np.broadcast_to(t, v.shape).ravel()
    zero = tn == 0
    np.testing.assert_array_equal(xn[zero], vn[zero])
    vn, xn, tn = vn[~zero], xn[~zero], tn[~zero]
    if vn.size == 0:
        return
    grid = np.concatenate([np.broadcast_to(np.linspace(lo, hi, n), (vn.size, n)),
                           np.zeros((vn.size, 1)), vn[:, None]], axis=1)

    def obj(z, vv, tt):
        return np_elementwise(p, z) + (z - vv) ** 2 / (2 * tt)

    best = obj(grid, vn[:, None], tn[:, None]).min(axis=1)
    mine = obj(xn, vn, tn)
    assert np.all(mine <= best + 1e-12), (mine - best).max()


def np_elementwise(p, z):
    if isinstance(p, P.L0):
        return p.strength * (z != 0)
    if isinstance(p, P.MCP):
        return np_mcp(z, p.strength, p.gamma)
    raise AssertionError(p)


# --------------------------------------------------------------------------- 1. prox, convex separable


@st.composite
def convex_separable_case(draw):
    kind = draw(st.sampled_from(["l1", "l2", "l1l2"]))
    a, b = draw(strengths), draw(strengths)
    p = {"l1": P.L1(a), "l2": P.L2(b), "l1l2": P.L1L2(a, b)}[kind]
    shape = draw(shapes)
    return p, draw(tensors(shape)), draw(separable_steps(shape))


def l1_l2_parts(p):
    return getattr(p, "l1", 0.0), getattr(p, "l2", 0.0)


@SETTINGS
@given(convex_separable_case(), st.integers(0, 2**32 - 1))
def test_convex_separable_prox_optimality(case, seed):
    p, v, step = case
    x = p.prox(v, step)
    l1, l2 = l1_l2_parts(p)
    t = full_step(p, v, step)
    vn, xn = v.numpy(), x.numpy()
    pos = t > 0
    np.testing.assert_array_equal(xn[~pos], vn[~pos])
    # (v − x)/t ∈ ∂R(x) = l1·∂|x| + 2·l2·x, coordinate-wise
    g = np.divide(vn - xn, t, out=np.zeros_like(vn), where=pos)
    nz = pos & (xn != 0)
    np.testing.assert_allclose(g[nz], (l1 * np.sign(xn) + 2 * l2 * xn)[nz], rtol=0, atol=TOL)
    z = pos & (xn == 0)
    assert np.all(np.abs(g[z]) <= l1 + TOL)
    check_variants(p, v, step, x)
    check_global_min_by_perturbation(p, v, t, x, np.random.default_rng(seed))


def test_separable_prox_broadcast_step():
    v = torch.tensor([[3.0, -0.2, 0.5], [1.0, -2.0, 0.05]], dtype=torch.float64)
    step = torch.tensor([[1.0], [0.1]], dtype=torch.float64)  # one step per row
    for p in (P.L1(0.4), P.L2(0.4), P.L1L2(0.4, 0.3), P.L0(0.4), P.MCP(0.4, 2.0)):
        x = p.prox(v, step)
        for i in range(2):
            torch.testing.assert_close(x[i], p.prox(v[i], float(step[i])), rtol=0, atol=0)
        check_variants(p, v, step, x)


# --------------------------------------------------------------------------- 1. prox, non-convex (grid)


@st.composite
def near_kinks(draw, kinks):
    """Values, each uniform in [-3, 3] or within 3 % of one of its coordinate's kinks
    (where a wrong threshold would show)."""
    out = []
    for ks in kinks:
        if draw(st.booleans()):
            out.append(draw(st.floats(-3.0, 3.0)))
        else:
            k = draw(st.sampled_from(ks)) * draw(st.floats(0.97, 1.03))
            out.append(math.copysign(min(k, 3.0), draw(st.sampled_from([-1.0, 1.0]))))
    return out


@st.composite
def l0_case(draw):
    shape = draw(small_shapes)
    p = P.L0(draw(strengths))
    step = draw(separable_steps(shape))
    t = np.broadcast_to(np.asarray(step, dtype=np.float64), shape).ravel()
    vals = draw(near_kinks([[math.sqrt(2 * ti * p.strength)] for ti in t]))
    return p, torch.tensor(vals, dtype=torch.float64).reshape(shape), step


@st.composite
def mcp_case(draw, regime):
    gamma = draw(st.floats(0.1, 4.0))
    ratios = st.floats(0.05, 0.95) if regime == "firm" else st.floats(1.0, 3.0)
    shape = draw(small_shapes)
    step = draw(separable_steps(shape, elements=ratios)) * gamma
    p = P.MCP(draw(strengths), gamma)
    lam = p.strength
    t = np.broadcast_to(np.asarray(step, dtype=np.float64), shape).ravel()
    kinks = [[ti * lam, gamma * lam, lam * math.sqrt(ti * gamma)] for ti in t]
    return p, torch.tensor(draw(near_kinks(kinks)), dtype=torch.float64).reshape(shape), step


@SETTINGS
@given(l0_case(), st.integers(0, 2**32 - 1))
def test_l0_prox_is_grid_argmin(case, seed):
    p, v, step = case
    x = p.prox(v, step)
    t = full_step(p, v, step)
    # hard thresholding: each coordinate is kept whole or set to zero
    assert torch.all((x == v) | (x == 0))
    grid_check(p, v, t, x)
    check_variants(p, v, step, x)
    check_global_min_by_perturbation(p, v, t, x, np.random.default_rng(seed))


@pytest.mark.parametrize("regime", ["firm", "hard"])  # t < gamma, t >= gamma
@SETTINGS
@given(data=st.data())
def test_mcp_prox_is_grid_argmin(regime, data):
    p, v, step = data.draw(mcp_case(regime))
    x = p.prox(v, step)
    t = full_step(p, v, step)
    grid_check(p, v, t, x)
    check_variants(p, v, step, x)
    seed = data.draw(st.integers(0, 2**32 - 1))
    check_global_min_by_perturbation(p, v, t, x, np.random.default_rng(seed))


def test_mcp_prox_at_step_equal_gamma_and_mixed_steps():
    p = P.MCP(1.0, 2.0)
    v = torch.linspace(-3, 3, 61, dtype=torch.float64)
    for step in (2.0, torch.where(torch.arange(61) % 2 == 0, 0.5, 2.5).double()):
        x = p.prox(v, step)
        grid_check(p, v, full_step(p, v, step), x)
    # a large weight passes unbiased, a small one goes to zero
    assert p.prox(torch.tensor([2.5, 0.4]), 0.5).tolist() == [2.5, 0.0]


# --------------------------------------------------------------------------- 1. prox, groups


@st.composite
def group_case(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    how = draw(st.sampled_from(["index", "rows", "columns"] if ndim >= 2 else ["index"]))
    if how == "index":
        dim = draw(st.integers(-ndim, ndim - 1))
        groups = tuple(draw(st.lists(st.integers(0, 3), min_size=shape[dim], max_size=shape[dim])))
        kw, n = {"groups": groups, "dim": dim}, max(groups) + 1
    else:
        kw, n = {"groups": how}, shape[0 if how == "rows" else 1]
    kw["weights"] = draw(st.sampled_from(["sqrt_size", "none"]))
    if draw(st.booleans()):
        p = P.SparseGroupLasso(draw(strengths), draw(strengths), **kw)
    else:
        p = P.GroupLasso(draw(strengths), **kw)
    if draw(st.booleans()):
        step = draw(step_values)
    else:  # one step per group
        step = torch.tensor(draw(st.lists(step_values, min_size=n, max_size=n)), dtype=torch.float64)
    return p, draw(tensors(shape)), step


def check_group_optimality(p, v, step, x):
    """(v_g − x_g)/t_g ∈ ∂R_g(x_g) for each group g."""
    masks = np_group_masks(p, tuple(v.shape))
    weights = np_group_weights(p, masks)
    t = full_step(p, v, step)
    vn, xn = v.numpy(), x.numpy()
    l1, lam = (0.0, p.strength) if isinstance(p, P.GroupLasso) else (p.l1, p.group)
    for m, w in zip(masks, weights, strict=True):
        if not m.any():
            continue
        tg = t[m][0]
        vg, xg = vn[m], xn[m]
        if tg == 0:
            np.testing.assert_array_equal(xg, vg)
            continue
        r = (vg - xg) / tg
        norm_x = np.linalg.norm(xg)
        if norm_x == 0:
            # 0 ∈ l1·[-1, 1]^n + λw·B₂ − r: the distance from r to the l1 box is <= λw
            dist = np.linalg.norm(r - np.clip(r, -l1, l1))
            assert dist <= lam * w + TOL, (dist, lam * w)
        else:
            q = r - lam * w * xg / norm_x
            nz = xg != 0
            np.testing.assert_allclose(q[nz], l1 * np.sign(xg[nz]), rtol=0, atol=TOL)
            assert np.all(np.abs(q[~nz]) <= l1 + TOL)


@settings(max_examples=100, deadline=None)
@given(group_case(), st.integers(0, 2**32 - 1))
def test_group_prox_optimality(case, seed):
    p, v, step = case
    x = p.prox(v, step)
    check_group_optimality(p, v, step, x)
    check_variants(p, v, step, x)
    check_global_min_by_perturbation(p, v, full_step(p, v, step), x, np.random.default_rng(seed))


@pytest.mark.parametrize("cls", [P.GroupLasso, P.SparseGroupLasso])
@pytest.mark.parametrize(
    "groups", [{"groups": "rows"}, {"groups": "columns"}, {"groups": (0, 2, 0, 1), "dim": 1},
               {"groups": (1, 0, 1, 1), "dim": -2}]
)
@pytest.mark.parametrize("weights", ["sqrt_size", "none"])
@pytest.mark.parametrize("per_group", [False, True])
def test_group_prox_layouts(cls, groups, weights, per_group):
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(3, 4, 2, generator=gen, dtype=torch.float64)
    v[1] = 0.0  # a zero slice along dim 0
    p = cls(0.3, **groups, weights=weights) if cls is P.GroupLasso else cls(
        0.2, 0.3, **groups, weights=weights)
    n = len(np_group_masks(p, tuple(v.shape)))
    step = torch.linspace(0.2, 1.5, n, dtype=torch.float64) if per_group else 0.7
    x = p.prox(v, step)
    check_group_optimality(p, v, step, x)
    check_variants(p, v, step, x)
    check_global_min_by_perturbation(p, v, full_step(p, v, step), x, np.random.default_rng(1))


def test_group_prox_step_with_one_element():
    """A step tensor with a single element acts as a scalar step, also with index groups."""
    v = torch.randn(3, 2, dtype=torch.float64)
    for p in (P.GroupLasso(0.3, groups=(0, 0, 1), dim=0),
              P.SparseGroupLasso(0.1, 0.3, groups=(0, 0, 1), dim=0),
              P.SparseGroupLasso(0.1, 0.3, groups="rows")):
        for step in (torch.tensor(0.5, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)):
            torch.testing.assert_close(p.prox(v, step), p.prox(v, 0.5), rtol=0, atol=1e-15)


# --------------------------------------------------------------------------- 1. generic minimiser


@pytest.mark.parametrize(
    "p",
    [P.L1(0.3), P.L1L2(0.2, 0.4), P.GroupLasso(0.5, groups=(0, 1, 0, 1), dim=1),
     P.SparseGroupLasso(0.2, 0.4, groups="rows", weights="none")],
    ids=lambda p: type(p).__name__,
)
def test_convex_prox_not_beaten_by_numerical_minimiser(p):
    """A derivative-free minimiser (scipy Powell, float64) never finds a lower objective."""
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(3)
    v = torch.tensor(rng.standard_normal((2, 4)))
    t = 0.8
    x = p.prox(v, t).numpy()

    def f(z):
        return prox_objective(p, z.reshape(2, 4), v.numpy(), t)

    for x0 in (v.numpy().ravel(), np.zeros(8)):
        res = optimize.minimize(f, x0, method="Powell", options={"xtol": 1e-10, "ftol": 1e-14})
        assert f(x.ravel()) <= res.fun + 1e-8


@pytest.mark.parametrize("which", ["lasso", "elastic_net"])
def test_prox_gradient_fixed_point_of_sklearn_solution(which):
    """scikit-learn's Lasso / ElasticNet solution w* is a fixed point of the proximal
    gradient step with our penalty: w* = prox_{tR}(w* − t·∇f(w*)), f = 0.5·mean((y − Xw)²)."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    n, d = 60, 10
    X = rng.standard_normal((n, d))
    w_true = np.zeros(d)
    w_true[:3] = [2.0, -1.5, 0.7]
    y = X @ w_true + 0.1 * rng.standard_normal(n)
    alpha = 0.2
    if which == "lasso":
        est = linear_model.Lasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=100_000)
        p = P.L1(alpha)
    else:
        est = linear_model.ElasticNet(alpha=alpha, l1_ratio=0.6, fit_intercept=False, tol=1e-14,
                                      max_iter=100_000)
        p = P.L1L2.from_sklearn(alpha, 0.6)
    w = est.fit(X, y).coef_
    assert 0 < np.count_nonzero(w) < d  # a sparse solution: the test sees both branches
    t = 1.0 / np.linalg.eigvalsh(X.T @ X / n).max()
    grad = X.T @ (X @ w - y) / n
    w_next = p.prox(torch.tensor(w - t * grad), t).numpy()
    np.testing.assert_allclose(w_next, w, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(w_next == 0, w == 0)


# --------------------------------------------------------------------------- 2. values


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


VALUE_CASES = [
    (P.L1(0.1), (2, 2, 4)),
    (P.L2(0.3), (5,)),
    (P.L1L2(0.1, 0.2), (3, 4)),
    (P.L0(0.5), (4, 3)),
    (P.MCP(0.5, 1.5), (4, 5)),
    (P.MCP(2.0, 0.5), (6,)),
    (P.GroupLasso(0.2), (3, 4)),
    (P.GroupLasso(0.2, "columns", weights="none"), (3, 4, 2)),
    (P.GroupLasso(0.2, groups=(0, 2, 2), dim=-1), (2, 3)),
    (P.SparseGroupLasso(0.1, 0.3, groups=(1, 0, 1, 1), dim=0), (4, 3)),
    (P.SparseGroupLasso(0.1, 0.3, "in_channels"), (2, 3, 3, 3)),
    (P.Hoyer(0.4), (3, 4)),
    (P.Orthogonal(0.2), (3, 5)),
    (P.Orthogonal(0.2, "columns"), (5, 3)),
]


@pytest.mark.parametrize("p,shape", VALUE_CASES, ids=lambda c: getattr(c, "name", str(c)))
def test_value_matches_docstring_formula(p, shape):
    x = _x(*shape)
    if isinstance(p, P.L0):
        x[x.abs() < 0.5] = 0.0
    if isinstance(p, (P.GroupLasso, P.SparseGroupLasso)):
        x.select(0, 0).zero_()  # a zero group or part of one
    got = p.value(x)
    assert got.dtype == torch.float64 and got.ndim == 0
    np.testing.assert_allclose(got.item(), np_value(p, x.numpy()), rtol=1e-12)
    assert p(x).item() == got.item()  # __call__ is value


def test_keras_reference_values():
    d1 = torch.ones(2, 2, 4) * 3
    assert P.L1(0.1)(d1).item() == pytest.approx(4.8, rel=1e-6)
    assert P.L2(0.1)(d1).item() == pytest.approx(0.1 * 9 * 16, rel=1e-6)
    assert P.L1L2(0.1, 0.2)(d1).item() == pytest.approx(4.8 + 0.2 * 144, rel=1e-6)


def test_values_against_keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    x = _x(4, 3, seed=5).float()
    a = x.numpy()
    r = keras.regularizers
    pairs = [
        (r.L1(0.3), P.L1(0.3)),
        (r.L2(0.3), P.L2(0.3)),
        (r.L1L2(0.1, 0.2), P.L1L2(0.1, 0.2)),
        (r.OrthogonalRegularizer(0.2, mode="rows"), P.Orthogonal(0.2, "rows")),
        (r.OrthogonalRegularizer(0.2, mode="columns"), P.Orthogonal(0.2, "columns")),
    ]
    for kr, p in pairs:
        expected = float(keras.ops.convert_to_numpy(kr(keras.ops.convert_to_tensor(a))))
        assert p(x).item() == pytest.approx(expected, rel=1e-5), type(p).__name__


def test_mcp_value_branches():
    p = P.MCP(1.0, 2.0)  # flat at γλ²/2 = 1 beyond |x| = γλ = 2
    x = torch.tensor([0.0, 1.0, -2.0, 5.0, -7.0], dtype=torch.float64)
    assert p.value(x).item() == pytest.approx(0 + (1 - 1 / 4) + (2 - 1) + 1 + 1)


def test_hoyer_zero_and_scale_invariance():
    p = P.Hoyer(0.5)
    x = torch.zeros(3, 4, requires_grad=True)
    val = p(x)
    assert val.item() == 0.0
    val.backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad, torch.zeros(3, 4))
    y = _x(7)
    torch.testing.assert_close(p(3.0 * y), p(y))
    # a single non-zero coordinate is as concentrated as it gets: ‖x‖₁/‖x‖₂ = 1
    assert p(torch.tensor([0.0, -4.0, 0.0])).item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "p",
    [P.GroupLasso(0.3), P.GroupLasso(0.3, groups=(0, 0, 1), dim=0), P.SparseGroupLasso(0.1, 0.3),
     P.Orthogonal(0.2), P.Orthogonal(0.2, "columns"), P.Hoyer(0.3), P.L1(0.1), P.MCP(0.1)],
    ids=lambda p: f"{type(p).__name__}-{getattr(p, 'groups', getattr(p, 'mode', ''))}",
)
def test_gradient_finite_with_zero_groups(p):
    """Sparse tensors have zero rows and columns: the gradient there must not be NaN."""
    x = _x(3, 4)
    x[0] = 0.0
    x[:, 1] = 0.0
    x.requires_grad_(True)
    p(x).backward()
    assert torch.isfinite(x.grad).all()
    if isinstance(p, P.GroupLasso) and p.groups == "rows":
        # d/dx_g of λ·w·‖x_g‖ is λ·w·x_g/‖x_g‖ on non-zero groups, 0 on the zero one
        xd = x.detach().numpy()
        expected = np.zeros_like(xd)
        for i in range(1, 3):
            expected[i] = 0.3 * 2.0 * xd[i] / np.linalg.norm(xd[i])
        np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- 3. every registered penalty

EXAMPLES = {
    "l1": [P.L1(0.3)],
    "l2": [P.L2(0.2)],
    "l1l2": [P.L1L2(0.1, 0.2)],
    "l0": [P.L0(0.5)],
    "mcp": [P.MCP(0.4, 2.5)],
    "group_lasso": [P.GroupLasso(0.2, "columns", weights="none"),
                    P.GroupLasso(0.3, groups=(0, 1, 1, 0), dim=1)],
    "sparse_group_lasso": [P.SparseGroupLasso(0.1, 0.2, "rows"),
                           P.SparseGroupLasso(0.1, 0.2, groups=(0, 0, 1), dim=0, weights="none")],
    "hoyer": [P.Hoyer(0.3)],
    "orthogonal": [P.Orthogonal(0.2, "columns")],
}


def test_every_registered_penalty_has_test_examples():
    assert set(P.names()) <= set(EXAMPLES), "add an example of the new penalty to EXAMPLES"


@pytest.mark.parametrize("name", P.names())
def test_registered_penalty_contract(name):
    cls = type(P.get(name))
    assert cls.name == name
    for p in [P.get(name), *EXAMPLES.get(name, [])]:
        assert type(p) is cls
        cfg = p.get_config()
        assert cls.from_config(cfg) == p
        assert cls.from_config(json.loads(json.dumps(cfg))) == p
        assert P.get({"name": name, "config": cfg}) == p
        assert P.get({"class_name": name, "config": cfg}) == p
        assert P.get({"name": name, **cfg}) == p
        assert P.get(p) is p
        if not any(isinstance(getattr(p, f.name), tuple) for f in dataclasses.fields(p)):
            assert P.get(p.spec()) == p
        else:
            with pytest.raises(ValueError, match="get_config"):
                p.spec()
        assert isinstance(p.formula("W"), str) and "W" in p.formula("W")
        assert hash(p) == hash(cls.from_config(cfg))

        x = _x(3, 4, seed=2).float().requires_grad_(True)
        val = p.value(x)
        assert val.ndim == 0 and val.dtype == torch.float32 and val.grad_fn is not None
        val.backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        for dt in (torch.float16, torch.bfloat16):
            low = x.detach().to(dt)
            got = p.value(low)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, p.value(low.float()))

        if cls.proximable:
            v = x.detach()
            torch.testing.assert_close(p.prox(v, 0.0), v, rtol=0, atol=0)  # t = 0: identity


def test_get_names_aliases_and_specs():
    assert P.get("L1") == P.L1()
    assert P.get(" elastic-net ") == P.L1L2()
    assert P.get("ElasticNet:1e-5:1e-4") == P.L1L2(1e-5, 1e-4)
    assert P.get("OrthogonalRegularizer") == P.Orthogonal()
    assert P.get("l1:1e-4") == P.L1(1e-4)
    assert P.get("l1l2::0.3") == P.L1L2(0.0, 0.3)  # empty field keeps the default
    assert P.get("mcp:0.1:2") == P.MCP(0.1, 2.0)
    g = P.get("group_lasso:1e-3:columns")
    assert g == P.GroupLasso(1e-3, "columns")
    assert P.get("sparse_group_lasso:0.1:0.2:rows:1:none") == P.SparseGroupLasso(0.1, 0.2, weights="none")
    en = P.L1L2.from_sklearn(0.4, 0.25)
    assert en.l1 == pytest.approx(0.1) and en.l2 == pytest.approx(0.15)
    with pytest.raises(ValueError, match=r"l1_ratio=1.5"):
        P.L1L2.from_sklearn(0.4, 1.5)
    assert P.ElasticNet is P.L1L2


def test_strength_accepts_ints_and_scalar_tensors():
    assert P.L1(1).l1 == 1.0 and isinstance(P.L1(1).l1, float)
    p = P.L1(torch.tensor(0.5))
    assert p.l1 == 0.5 and isinstance(p.l1, float)


# --------------------------------------------------------------------------- 4. bad input


def _strength_fields():
    out = []
    for name in P.names():
        cls = type(P.get(name))
        out += [(cls, f.name) for f in dataclasses.fields(cls) if f.metadata.get("strength")]
    return out


@pytest.mark.parametrize("cls,field", _strength_fields(), ids=lambda c: getattr(c, "__name__", c))
@pytest.mark.parametrize(
    "bad,shown",
    [(-1.0, "-1.0"), (float("nan"), "nan"), (float("inf"), "inf"), ("0.1", "'0.1'"),
     (True, "True"), (None, "None"), (torch.ones(2), "tensor")],
)
def test_bad_strength(cls, field, bad, shown):
    if bad is None and cls.none_is_default:
        # Keras's L1, L2, L1L2 take their defaults for None (tests/test_penalties_keras.py).
        assert cls(**{field: None}) == cls()
        return
    with pytest.raises(ValueError) as info:
        cls(**{field: bad})
    msg = str(info.value)
    assert msg.startswith("Expected") and f"{field}={shown}" in msg


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as info:
        P.get("l3")
    msg = str(info.value)
    assert "name='l3'" in msg and all(n in msg for n in P.names())
    with pytest.raises(ValueError, match=r"name='grouplaso'.*Did you mean.*group_lasso"):
        P.get("grouplaso:0.1")


@pytest.mark.parametrize(
    "spec,shown",
    [("l1:abc", "l1='abc'"), ("mcp:0.1:big", "gamma='big'"), ("l1l2:1e-3:x", "l2='x'"),
     ("group_lasso:0.1:rows:one", "dim='one'")],
)
def test_spec_with_non_number(spec, shown):
    with pytest.raises(ValueError, match="Expected") as info:
        P.get(spec)
    assert shown in str(info.value)


def test_spec_with_too_many_fields_and_bad_values():
    with pytest.raises(ValueError, match=r"at most 1 values.*'l1:0.1:0.2'"):
        P.get("l1:0.1:0.2")
    with pytest.raises(ValueError, match=r"l1=-0.1"):
        P.get("l1:-0.1")
    with pytest.raises(ValueError, match=r"l1=nan"):
        P.get("l1:nan")
    with pytest.raises(ValueError, match=r"groups='diagonal'"):
        P.get("group_lasso:0.1:diagonal")


def test_bad_config_dicts_and_identifiers():
    with pytest.raises(ValueError, match=r"unknown keys: \['l3'\]"):
        P.L1.from_config({"l3": 0.1})
    with pytest.raises(ValueError, match="'name'"):
        P.get({"config": {"l1": 0.1}})
    with pytest.raises(ValueError, match="not both"):
        P.get({"name": "l1", "config": {"l1": 0.1}, "l1": 0.2})
    with pytest.raises(TypeError, match="Received: int"):
        P.get(3)


@pytest.mark.parametrize("cls", [P.GroupLasso, P.SparseGroupLasso])
def test_group_spec_that_does_not_fit(cls):
    p = cls(groups=(0, 1), dim=0)
    for call in (p.value, lambda x: p.prox(x, 0.1)):
        with pytest.raises(ValueError, match=r"2 indices.*shape=\(3, 2\)"):
            call(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"dim=2.*shape=\(2,\)"):
        cls(groups=(0, 1), dim=2).value(torch.zeros(2))
    with pytest.raises(ValueError, match=r"groups='rows'.*shape=\(5,\)"):
        cls(groups="rows").value(torch.zeros(5))
    with pytest.raises(ValueError, match=r"groups='columns'.*shape=\(5,\)"):
        cls(groups="columns").prox(torch.zeros(5), 0.1)
    with pytest.raises(ValueError, match=r"groups='diag'"):
        cls(groups="diag")
    with pytest.raises(ValueError, match=r"groups=\(0, -1\)"):
        cls(groups=(0, -1))
    with pytest.raises(ValueError, match=r"groups=\(\)"):
        cls(groups=())
    with pytest.raises(ValueError, match=r"groups=\['a'\]"):
        cls(groups=["a"])
    with pytest.raises(ValueError, match=r"dim=True"):
        cls(groups=(0, 1), dim=True)
    with pytest.raises(ValueError, match=r"weights='sqrt'"):
        cls(weights="sqrt")


def test_mcp_bad_gamma():
    for bad in (0.0, -1.0, float("nan"), float("inf"), "3", True):
        with pytest.raises(ValueError, match=r"gamma="):
            P.MCP(0.1, bad)


def test_orthogonal_bad_input():
    with pytest.raises(ValueError, match=r"mode='diag'"):
        P.Orthogonal(0.1, "diag")
    with pytest.raises(ValueError, match=r"rank-2.*shape=\(2, 3, 4\)"):
        P.Orthogonal(0.1)(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match=r"at least 2 rows.*shape=\(1, 4\)"):
        P.Orthogonal(0.1)(torch.ones(1, 4))


@pytest.mark.parametrize("name", P.names())
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_float_tensors_raise_type_error(name, dtype):
    p = P.get(name)
    x = torch.ones(3, 4, dtype=dtype)
    with pytest.raises(TypeError, match=str(dtype)):
        p.value(x)
    if p.proximable:
        with pytest.raises(TypeError, match=str(dtype)):
            p.prox(x, 0.1)
    with pytest.raises(TypeError, match="list"):
        p.value([[1.0, 2.0]])


@pytest.mark.parametrize("p", [P.Hoyer(0.1), P.Orthogonal(0.1)], ids=lambda p: type(p).__name__)
def test_prox_on_non_proximable_penalty(p):
    assert not p.proximable
    with pytest.raises(TypeError, match=type(p).__name__):
        p.prox(torch.ones(3, 4), 0.1)


@pytest.mark.parametrize("name", [n for n in P.names() if P.get(n).proximable])
def test_bad_step(name):
    p = P.get(name)
    v = torch.ones(3, 4)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"step={bad}"):
            p.prox(v, bad)
    with pytest.raises(TypeError, match="step"):
        p.prox(v, "0.1")
    with pytest.raises(TypeError, match="torch.int64"):
        p.prox(v, torch.ones(3, 4, dtype=torch.long))


@pytest.mark.parametrize("p", [P.GroupLasso(0.1), P.SparseGroupLasso(0.1, 0.1),
                               P.GroupLasso(0.1, groups=(0, 0, 1), dim=0)],
                         ids=lambda p: f"{type(p).__name__}-{p.groups}")
def test_per_coordinate_step_to_group_penalty(p):
    v = torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"one step per group.*shape \(3, 4\)"):
        p.prox(v, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"groups\).*shape \(4,\)"):
        p.prox(v, torch.ones(4) if p.groups != "columns" else torch.ones(3))


@pytest.mark.parametrize("name", [n for n in P.names() if P.get(n).separable])
def test_separable_step_must_broadcast_to_v(name):
    p = P.get(name)
    v = torch.ones(3)
    for bad in (torch.ones(1, 3), torch.ones(4), torch.ones(3, 1)):
        with pytest.raises(ValueError, match=r"shape of v, \(3,\).*step of shape " + re.escape(str(tuple(bad.shape)))):
            p.prox(v, bad)
    assert p.prox(v, torch.ones(1)).shape == (3,)
