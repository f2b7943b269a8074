"""Fuzzing the inputs users type: every input works or raises a documented exception.

Documented: ``ValueError`` (bad values), ``TypeError`` (bad types),
``FloatingPointError`` (``Regularizer.loss()`` on a non-finite term). Never
another exception, a hang, or a NaN returned for finite inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsecraft as sc
from sparsecraft import penalties as P
from sparsecraft.optim import ProximalOptimizer

DOCUMENTED = (ValueError, TypeError, FloatingPointError)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
NAMES = P.names()

# -- strategies ------------------------------------------------------------------------------

weird_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 0.0, -0.0, 1e-300, 1e300, -1, True, False]),
)
anything = st.one_of(
    weird_numbers, st.none(), st.text(max_size=8), st.lists(st.integers(-3, 5), max_size=4),
    st.just(torch.tensor(0.5)), st.just(torch.tensor([1.0, 2.0])), st.just(torch.tensor(2)),
)
spec_token = st.one_of(
    st.sampled_from(["", "rows", "columns", "in_channels", "nan", "inf", "-1", "1e400", "0,1", "x",
                     "sqrt_size", "none", " 0.1", "1e-3", "0", "3", "-0.0", "1_000"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-5, 5).map(str),
    st.text(max_size=6),
)
group_spec = st.one_of(
    st.sampled_from(["rows", "columns", "out_channels", "in_channels", "diagonal", ""]),
    st.lists(st.integers(min_value=-2, max_value=6), min_size=0, max_size=7),
    st.lists(st.integers(min_value=0, max_value=10**13), min_size=1, max_size=3),
    st.just((2**70,)),
    st.none(), st.integers(0, 3), st.lists(st.floats(0, 3), min_size=1, max_size=3),
)


@st.composite
def tensors(draw, min_dims: int = 0, max_dims: int = 4):
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=min_dims, max_size=max_dims))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([0.0, 1e-6, 1e-3, 1.0, 30.0, 200.0]))
    x = torch.randn(shape, generator=g) * scale
    if x.numel() and draw(st.booleans()):
        x = x * (torch.rand(shape, generator=g) > 0.5)  # exact zeros, whole rows sometimes
    return x.to(dtype)


def penalties():
    """Valid penalties of every registered class, with drawn hyper-parameters."""
    strength = st.sampled_from([0.0, 1e-4, 0.1, 1.0, 7.5])
    return st.one_of(
        st.builds(P.L1, strength), st.builds(P.L2, strength), st.builds(P.L1L2, strength, strength),
        st.builds(P.L0, strength), st.builds(P.MCP, strength, st.sampled_from([0.5, 3.0, 100.0])),
        st.builds(P.GroupLasso, strength, st.sampled_from(["rows", "columns"]),
                  weights=st.sampled_from(["sqrt_size", "none"])),
        st.builds(P.SparseGroupLasso, strength, strength, st.sampled_from(["rows", "columns"])),
        st.builds(P.Hoyer, strength), st.builds(P.Orthogonal, strength, st.sampled_from(["rows", "columns"])),
        st.builds(lambda s, n, d: P.GroupLasso(s, groups=tuple(i % max(n // 2, 1) for i in range(n)), dim=d),
                  strength, st.integers(1, 5), st.integers(-2, 1)),
    )


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.float()).all())


# -- building penalties ------------------------------------------------------------------------


@FUZZ
@given(name=st.one_of(st.sampled_from(NAMES + ["elastic_net", "L1", "group-lasso"]), st.text(max_size=12)),
       args=st.lists(spec_token, max_size=5))
def test_spec_strings_build_a_penalty_or_raise_value_error(name, args):
    spec = ":".join([name, *args])
    try:
        pen = P.get(spec)
    except ValueError:
        return
    assert isinstance(pen, P.Penalty)
    for v in pen.strengths().values():
        assert math.isfinite(v) and v >= 0
    # A built penalty round-trips through its config.
    assert type(pen).from_config(pen.get_config()) == pen


@FUZZ
@given(cls=st.sampled_from([P._base._REGISTRY[n] for n in NAMES]),
       kwargs=st.dictionaries(st.sampled_from(["l1", "l2", "strength", "group", "gamma", "factor", "mode",
                                               "groups", "dim", "weights", "bogus"]),
                              st.one_of(anything, group_spec), max_size=4))
def test_constructors_validate_every_argument(cls, kwargs):
    try:
        pen = cls(**kwargs)
    except DOCUMENTED:
        return
    for v in pen.strengths().values():
        assert isinstance(v, float) and math.isfinite(v) and v >= 0


@FUZZ
@given(identifier=st.one_of(anything, st.dictionaries(st.sampled_from(["name", "class_name", "config", "l1", "x"]),
                                                      st.one_of(anything, st.sampled_from(NAMES)), max_size=3)))
def test_get_takes_anything_without_crashing(identifier):
    try:
        pen = P.get(identifier)
    except DOCUMENTED:
        return
    assert isinstance(pen, P.Penalty)


@FUZZ
@example(groups=[10**13], dim=0, x=torch.ones(1, 2), sparse=False, fit=False)
@example(groups=[0, 2**40], dim=1, x=torch.ones(3, 2), sparse=True, fit=False)
@example(groups=(2**70,), dim=0, x=torch.ones(1, 2), sparse=False, fit=False)
@given(groups=group_spec, dim=st.one_of(st.integers(-4, 4), st.just(True), st.just(1.5)),
       x=tensors(max_dims=3), sparse=st.booleans(), fit=st.booleans())
def test_group_specs_work_or_raise_value_error(groups, dim, x, sparse, fit):
    cls = P.SparseGroupLasso if sparse else P.GroupLasso
    try:
        pen = cls(groups=groups, dim=dim)
    except DOCUMENTED:
        return
    if fit and not isinstance(pen.groups, str) and x.ndim and -x.ndim <= pen.dim < x.ndim:
        # Give the tensor one slice per group index along dim, so the spec applies.
        shape = list(x.shape)
        shape[pen.dim] = len(pen.groups)
        x = torch.randn(shape).to(x.dtype)
    try:
        value = pen.value(x)
    except ValueError:  # the spec does not fit this tensor's shape
        return
    assert _finite(value)
    out = pen.prox(x, 0.1)
    assert out.shape == x.shape and out.dtype == x.dtype and _finite(out)


# -- values and proxes on drawn tensors --------------------------------------------------------


@FUZZ
@given(pen=penalties(), x=tensors())
def test_values_are_finite_float_scalars_or_value_error(pen, x):
    try:
        v = pen.value(x)
    except ValueError:
        return
    assert v.ndim == 0
    assert v.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert _finite(v), f"{pen} on {x.dtype} {tuple(x.shape)}: {v}"
    assert float(v) >= 0  # every penalty here is non-negative


@FUZZ
@given(pen=penalties().filter(lambda p: p.proximable), x=tensors(),
       step=st.one_of(st.sampled_from([0.0, 1e-3, 0.5, 10.0]), st.floats(allow_nan=True, allow_infinity=True)))
def test_prox_is_finite_shrinks_and_keeps_signs(pen, x, step):
    try:
        out = pen.prox(x, step)
    except DOCUMENTED:
        # Only a bad step, or a group spec that does not fit the shape, is refused.
        assert not (math.isfinite(step) and step >= 0) or not pen.separable
        return
    assert out.shape == x.shape and out.dtype == x.dtype
    assert _finite(out)
    xf, of = x.double(), out.double()
    assert bool((of.abs() <= xf.abs() * (1 + 1e-6) + 1e-30).all())  # every prox here shrinks
    assert bool((of * xf >= 0).all())  # and never flips a sign


@FUZZ
@given(pen=penalties().filter(lambda p: p.proximable and p.separable), x=tensors(min_dims=1),
       step_shape=st.lists(st.integers(0, 5), max_size=4), step_dtype=st.sampled_from(FLOAT_DTYPES + [torch.int64]))
def test_tensor_steps_broadcast_or_raise(pen, x, step_shape, step_dtype):
    step = torch.rand(step_shape).to(step_dtype)
    try:
        out = pen.prox(x, step)
    except DOCUMENTED:
        return
    assert out.shape == x.shape and _finite(out)


# -- the regularizer ---------------------------------------------------------------------------

selectors = st.one_of(
    st.text(max_size=10), st.sampled_from(["*", "*.weight", "0.weight", "0", "2.bias", "[", "**", "0.*", ""]),
    st.sampled_from([nn.Linear, nn.Conv2d, nn.ReLU, int, object]),
    st.tuples(st.sampled_from(["0", "*", "2", "x", ""]), st.sampled_from(["weight", "bias", "nope"])),
    st.integers(), st.none(), st.floats(), st.just(torch.zeros(2)), st.just(nn.Parameter(torch.zeros(2))),
)


@FUZZ
@given(selector=selectors, pen=penalties(), seed=st.integers(0, 100))
def test_selectors_select_or_raise_and_loss_is_finite(selector, pen, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    reg = sc.Regularizer(model)
    try:
        terms = reg.add_weight(selector, pen)
    except DOCUMENTED:
        assert reg.terms == ()
        return
    assert terms and all(t.target in set(model.parameters()) for t in terms)
    try:
        loss = reg.loss()
    except ValueError:  # the penalty does not fit the selected parameter's shape
        return
    assert _finite(loss)


@FUZZ
@given(pen=penalties(), module=st.sampled_from(["0", "1", "2", "", "3", "nope"]),
       reduction=st.sampled_from(["batch", "sum", "mean", "avg", ""]), batch=st.integers(0, 4),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_activity_terms_are_finite_for_every_batch_size(pen, module, reduction, batch, dtype):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(dtype)
    reg = sc.Regularizer(model)
    try:
        reg.add_activity(module, pen, reduction=reduction)
    except DOCUMENTED:
        return
    try:
        model(torch.randn(batch, 3, dtype=dtype))
        loss = reg.loss()
    except ValueError:  # e.g. Orthogonal on fewer than 2 rows
        return
    assert _finite(loss)


@FUZZ
@given(bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]), where=st.integers(0, 5))
def test_non_finite_weights_raise_floating_point_error(bad, where):
    model = nn.Sequential(nn.Linear(3, 2))
    reg = sc.Regularizer(model)
    reg.add_weight("0.weight", sc.L1(0.1))
    with torch.no_grad():
        model[0].weight.view(-1)[where] = bad
    with pytest.raises(FloatingPointError, match="0.weight"):
        reg.loss()


@FUZZ
@given(pen=penalties().filter(lambda p: p.proximable), lr=st.sampled_from([0.0, 1e-3, 0.1, 1.0]),
       inner=st.sampled_from(["sgd", "adam", "adagrad", "rmsprop"]), mode=st.sampled_from(["forward_backward", "latent"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 50))
def test_prox_optimizer_steps_stay_finite(pen, lr, inner, mode, dtype, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)
    reg = sc.Regularizer(model)
    try:
        reg.add_weight("0.weight", pen)
        reg.value()
    except ValueError:
        return
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9),
            "adam": lambda p: torch.optim.Adam(p, lr=lr),
            "adagrad": lambda p: torch.optim.Adagrad(p, lr=lr),
            "rmsprop": lambda p: torch.optim.RMSprop(p, lr=lr)}[inner]
    opt = ProximalOptimizer(make(model.parameters()), reg, mode=mode)
    x = torch.randn(8, 4).to(dtype)
    x[:, 0] = 0  # a dead input: zero gradients in a column
    for _ in range(3):
        opt.zero_grad()
        (model(x).float().square().mean() + reg.loss()).backward()
        opt.step()
    for p in model.parameters():
        assert _finite(p), f"{pen} {inner} {mode} {dtype}"


def test_fuzz_strategies_cover_every_registered_penalty():
    drawn = set()

    @settings(max_examples=300, deadline=None)
    @given(pen=penalties())
    def collect(pen):
        drawn.add(type(pen).name)

    collect()
    assert drawn == set(NAMES)
