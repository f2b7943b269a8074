"""Tests of sparsecraft.functional: each prox is checked by its optimality condition
(or a brute-force argmin), never by a second copy of its formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecraft import functional as F

SETTINGS = settings(max_examples=60, deadline=None)
TOL = 1e-9

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)
values = st.floats(-3.0, 3.0, allow_nan=False, width=64)


@st.composite
def tensors(draw, shape=None, lo=-3.0, hi=3.0):
    shape = draw(shapes) if shape is None else shape
    n = math.prod(shape)
    vals = draw(st.lists(st.floats(lo, hi, allow_nan=False, width=64), min_size=n, max_size=n))
    return torch.tensor(vals, dtype=torch.float64).reshape(shape)


@st.composite
def tensor_and_threshold(draw, per_coordinate):
    v = draw(tensors())
    if per_coordinate:
        tau = draw(tensors(shape=tuple(v.shape), lo=0.0, hi=2.0))
    else:
        tau = draw(st.floats(0.0, 2.0, width=64))
    return v, tau


def _as_array(x, shape):
    return np.broadcast_to(np.asarray(x, dtype=np.float64), shape)


def assert_l1_prox_optimal(v, x, tau):
    """x = argmin τ|x| + (x − v)²/2  iff  v − x ∈ τ·∂|x| (coordinate-wise)."""
    v, x = v.numpy(), x.numpy()
    tau = _as_array(tau, v.shape)
    g = v - x
    nz = x != 0
    np.testing.assert_allclose(g[nz], (tau * np.sign(x))[nz], rtol=0, atol=TOL)
    assert np.all(np.abs(g[~nz]) <= tau[~nz] + TOL)


# --------------------------------------------------------------------------- soft_threshold


@SETTINGS
@given(tensor_and_threshold(per_coordinate=False))
def test_soft_threshold_scalar_optimality(case):
    v, tau = case
    assert_l1_prox_optimal(v, F.soft_threshold(v, tau), tau)


@SETTINGS
@given(tensor_and_threshold(per_coordinate=True))
def test_soft_threshold_tensor_optimality(case):
    v, tau = case
    assert_l1_prox_optimal(v, F.soft_threshold(v, tau), tau)


@SETTINGS
@given(tensor_and_threshold(per_coordinate=True), st.booleans())
def test_soft_threshold_out_and_inplace_variant(case, scalar):
    v, tau = case
    if scalar:
        tau = float(tau.flatten()[0])
    expected = F.soft_threshold(v, tau)
    # out=v in place
    w = v.clone()
    res = F.soft_threshold(w, tau, out=w)
    assert res.data_ptr() == w.data_ptr()
    assert torch.equal(w, expected)
    # out= another buffer leaves v untouched
    buf = torch.empty_like(v)
    F.soft_threshold(v, tau, out=buf)
    assert torch.equal(buf, expected)
    # soft_threshold_: the workspace variant of the optimizer hot path
    w = v.clone()
    workspace = torch.full_like(v, tau) if scalar else tau.clone()
    res = F.soft_threshold_(w, workspace)
    assert res.data_ptr() == w.data_ptr()
    assert torch.equal(w, expected)


def test_soft_threshold_makes_exact_zeros_and_keeps_sign():
    v = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    x = F.soft_threshold(v, 1.0)
    assert x.tolist() == [-1.0, 0.0, 0.0, 0.0, 1.0]
    w = v.clone()
    F.soft_threshold_(w, torch.ones_like(w))
    assert w.tolist() == [-1.0, 0.0, 0.0, 0.0, 1.0]
    # a zero threshold keeps everything
    w = v.clone()
    F.soft_threshold_(w, torch.zeros_like(w))
    assert torch.equal(w, v)


# --------------------------------------------------------------------------- shrink


@SETTINGS
@given(tensor_and_threshold(per_coordinate=True), st.booleans())
def test_shrink_is_prox_of_half_squared_norm(case, scalar):
    v, factor = case
    if scalar:
        factor = float(factor.flatten()[0])
    x = F.shrink(v, factor)
    # gradient of (factor/2)·x² + (x − v)²/2 vanishes
    grad = _as_array(factor, v.shape) * x.numpy() + (x.numpy() - v.numpy())
    np.testing.assert_allclose(grad, 0.0, atol=TOL)
    w = v.clone()
    F.shrink(w, factor, out=w)
    assert torch.equal(w, x)


# --------------------------------------------------------------------------- hard / firm


def _grid_argmin_value(objective, v, lo=-3.5, hi=3.5, n=14001):
    grid = np.concatenate([np.linspace(lo, hi, n), [0.0, v]])
    return objective(grid).min()


@SETTINGS
@given(
    st.lists(values, min_size=1, max_size=8),
    st.floats(0.0, 2.0),
    st.floats(0.01, 2.0),
)
def test_hard_threshold_is_l0_prox_by_grid(vals, lam, t):
    v = torch.tensor(vals, dtype=torch.float64)
    x = F.hard_threshold(v, math.sqrt(2.0 * t * lam))

    def obj(z, vi):
        return lam * (z != 0) + (z - vi) ** 2 / (2.0 * t)

    for vi, xi in zip(v.tolist(), x.tolist(), strict=True):
        assert xi in (0.0, vi)
        best = _grid_argmin_value(lambda z, vi=vi: obj(z, vi), vi)
        assert obj(np.array(xi), vi) <= best + 1e-12


def _mcp_np(z, lam, gamma):
    a = np.abs(z)
    return np.where(a <= gamma * lam, lam * a - a**2 / (2 * gamma), gamma * lam**2 / 2)


@SETTINGS
@given(
    st.lists(values, min_size=1, max_size=8),
    st.floats(0.0, 2.0),
    st.floats(0.1, 4.0),
    st.floats(0.05, 3.0),
)
def test_firm_threshold_is_mcp_prox_by_grid(vals, lam, gamma, ratio):
    t = ratio * gamma  # ratio < 1: firm branch; ratio >= 1: hard branch
    v = torch.tensor(vals, dtype=torch.float64)
    x = F.firm_threshold(v, lam, gamma, t)
    for vi, xi in zip(v.tolist(), x.tolist(), strict=True):

        def obj(z, vi=vi):
            return _mcp_np(z, lam, gamma) + (z - vi) ** 2 / (2.0 * t)

        assert obj(np.array(xi)) <= _grid_argmin_value(obj, vi) + 1e-12


def test_firm_threshold_per_coordinate_step_mixes_both_regimes():
    v = torch.tensor([0.5, 1.5, 2.5, 0.5, 1.5, 2.5], dtype=torch.float64)
    t = torch.tensor([0.5, 0.5, 0.5, 3.0, 3.0, 3.0], dtype=torch.float64)
    lam, gamma = 1.0, 2.0
    x = F.firm_threshold(v, lam, gamma, t)
    for vi, ti, xi in zip(v.tolist(), t.tolist(), x.tolist(), strict=True):

        def obj(z, vi=vi, ti=ti):
            return _mcp_np(z, lam, gamma) + (z - vi) ** 2 / (2.0 * ti)

        assert obj(np.array(xi)) <= _grid_argmin_value(obj, vi) + 1e-12
    # the per-coordinate result equals the scalar-step result coordinate by coordinate
    for i in range(len(v)):
        xi = F.firm_threshold(v[i : i + 1], lam, gamma, float(t[i]))
        assert xi.item() == x[i].item()


# --------------------------------------------------------------------------- groups


@st.composite
def grouped(draw):
    """A tensor, a group dim, an optional index, and per-group thresholds."""
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple))
    v = draw(tensors(shape=shape))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    use_index = draw(st.booleans())
    d = dim % len(shape)
    if use_index:
        index = draw(st.lists(st.integers(0, 3), min_size=shape[d], max_size=shape[d]))
        n_groups = max(index) + 1
        index = torch.tensor(index)
    else:
        index, n_groups = None, shape[d]
    if draw(st.booleans()):
        tau = draw(st.floats(0.0, 3.0))
    else:
        tau = torch.tensor(
            draw(st.lists(st.floats(0.0, 3.0), min_size=n_groups, max_size=n_groups)),
            dtype=torch.float64,
        )
    return v, dim, index, n_groups, tau


def _group_masks(shape, dim, index, n_groups):
    """Boolean masks, one per group, built with numpy from the definition."""
    d = dim % len(shape)
    slice_ids = np.arange(shape[d]) if index is None else np.asarray(index)
    ids = np.broadcast_to(
        slice_ids.reshape([-1 if i == d else 1 for i in range(len(shape))]), shape
    )
    return [ids == g for g in range(n_groups)]


@SETTINGS
@given(grouped())
def test_group_norms_match_numpy(case):
    v, dim, index, n_groups, _ = case
    norms = F.group_norms(v, dim, index, n_groups if index is not None else None)
    expected = [np.linalg.norm(v.numpy()[m]) for m in _group_masks(v.shape, dim, index, n_groups)]
    np.testing.assert_allclose(norms.numpy(), expected, rtol=1e-12, atol=1e-15)


@SETTINGS
@given(grouped())
def test_group_soft_threshold_optimality(case):
    v, dim, index, n_groups, tau = case
    x = F.group_soft_threshold(v, tau, dim, index, n_groups)
    vn, xn = v.numpy(), x.numpy()
    taus = _as_array(tau, (n_groups,))
    for g, m in enumerate(_group_masks(v.shape, dim, index, n_groups)):
        vg, xg = vn[m], xn[m]
        norm_x = np.linalg.norm(xg)
        if norm_x == 0:
            # 0 ∈ τ‖·‖ subdifferential + (0 − v): ‖v_g‖ <= τ_g
            assert np.linalg.norm(vg) <= taus[g] + TOL
        else:
            np.testing.assert_allclose(vg - xg, taus[g] * xg / norm_x, rtol=0, atol=TOL)
    # in place and into another buffer give the same result
    w = v.clone()
    F.group_soft_threshold(w, tau, dim, index, n_groups, out=w)
    assert torch.equal(w, x)
    buf = torch.empty_like(v)
    F.group_soft_threshold(v, tau, dim, index, n_groups, out=buf)
    assert torch.equal(buf, x)


def test_group_soft_threshold_zero_group_and_zero_threshold():
    v = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    x = F.group_soft_threshold(v, 1.0, dim=0)
    assert x[0].tolist() == [0.0, 0.0]
    torch.testing.assert_close(x[1], torch.tensor([3.0, 4.0]) * (1 - 1 / 5))
    # zero threshold: identity, also for the zero group (no 0/0)
    assert torch.equal(F.group_soft_threshold(v, 0.0, dim=0), v)


def test_group_norms_gradient_finite_at_zero_group():
    v = torch.tensor([[0.0, 0.0], [3.0, 4.0]], requires_grad=True)
    F.group_norms(v, dim=0).sum().backward()
    assert torch.isfinite(v.grad).all()
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, 0.0], [0.6, 0.8]]))


def test_group_layout_errors():
    v = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"dim=2"):
        F.group_norms(v, dim=2)
    with pytest.raises(ValueError, match=r"length 2"):
        F.group_norms(v, dim=0, index=torch.tensor([0, 1]))


# --------------------------------------------------------------------------- check_step


def test_check_step_accepts_and_rejects():
    assert F.check_step(0) == 0.0 and isinstance(F.check_step(1), float)
    t = torch.ones(3)
    assert F.check_step(t) is t
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"Received: step=") as info:
            F.check_step(bad)
        assert str(float(bad)) in str(info.value)
    for bad in ("0.1", True, None):
        with pytest.raises(TypeError, match=r"step"):
            F.check_step(bad)
    with pytest.raises(TypeError, match=r"torch.int64"):
        F.check_step(torch.ones(3, dtype=torch.long))


@pytest.mark.parametrize("dtype,tiny", [(torch.float32, 1e-40), (torch.float64, 5e-324)])
def test_soft_threshold_inplace_with_subnormal_threshold(dtype, tiny):
    """τ·v' underflows for tiny τ: zeros must stay zeros, not become −τ."""
    v = torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=dtype)
    w = v.clone()
    F.soft_threshold_(w, torch.full_like(v, tiny))
    assert torch.equal(w, F.soft_threshold(v, tiny))
    assert w[:2].tolist() == [0.0, 0.0]
