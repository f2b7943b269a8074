"""sparsecraft.keras.regularizers against keras.regularizers, and their prox."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops
from keras_problems import BACKEND

from sparsecraft.keras import regularizers as R

PAIRS = [
    (lambda: R.L1(0.3), lambda: keras.regularizers.L1(0.3)),
    (lambda: R.L1(), lambda: keras.regularizers.L1()),
    (lambda: R.L2(0.2), lambda: keras.regularizers.L2(0.2)),
    (lambda: R.L1L2(0.1, 0.05), lambda: keras.regularizers.L1L2(0.1, 0.05)),
    (lambda: R.L1L2(l2=0.05), lambda: keras.regularizers.L1L2(l2=0.05)),
    (lambda: R.OrthogonalRegularizer(0.4, "columns"), lambda: keras.regularizers.OrthogonalRegularizer(0.4, "columns")),
    (lambda: R.OrthogonalRegularizer(), lambda: keras.regularizers.OrthogonalRegularizer()),
]
IDS = ["l1", "l1_default", "l2", "l1l2", "l1l2_l2_only", "orth_columns", "orth_default"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=IDS)
def test_values_equal_keras(ours, theirs, dtype) -> None:
    x = ops.convert_to_tensor(np.random.default_rng(1).normal(size=(6, 5)), dtype=dtype)
    if BACKEND == "tensorflow" and dtype == "float64" and isinstance(theirs(), keras.regularizers.OrthogonalRegularizer):
        # Keras's class multiplies a float32 factor by float64 there and fails; compare in float32.
        theirs_value = ops.convert_to_numpy(theirs()(ops.cast(x, "float32")))
        assert ops.convert_to_numpy(ours()(x)) == pytest.approx(float(theirs_value), rel=1e-6)
        return
    a, b = ops.convert_to_numpy(ours()(x)), ops.convert_to_numpy(theirs()(x))
    assert a.dtype == b.dtype
    assert a == b


def test_none_gives_keras_defaults() -> None:
    x = ops.convert_to_tensor(np.arange(6.0).reshape(2, 3), "float32")
    for name in ("L1", "L2", "L1L2"):
        ours, theirs = getattr(R, name)(None), getattr(keras.regularizers, name)(None)
        assert ops.convert_to_numpy(ours(x)) == ops.convert_to_numpy(theirs(x))


def test_half_precision_sums_in_float32_where_keras_overflows() -> None:
    x = ops.ones((256, 256), dtype="float16") * 3
    assert np.isinf(ops.convert_to_numpy(keras.regularizers.L1(0.1)(x)))
    ours = ops.convert_to_numpy(R.L1(0.1)(x))
    assert ours.dtype == np.float32
    assert ours == pytest.approx(0.1 * 3 * 256 * 256, rel=1e-6)


def test_in_layers_model_losses_equal_keras() -> None:
    def model(kernel, bias, activity):
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(
            3, kernel_initializer="ones", bias_initializer="ones", kernel_regularizer=kernel,
            bias_regularizer=bias, activity_regularizer=activity)])

    x = np.full((2, 4), 3.0, "float32")
    ours = model(R.L1(0.1), R.L2(0.2), R.L1L2(0.1, 0.01))
    theirs = model(keras.regularizers.L1(0.1), keras.regularizers.L2(0.2), keras.regularizers.L1L2(0.1, 0.01))
    ours(x)
    theirs(x)
    a = sorted(float(ops.convert_to_numpy(v)) for v in ours.losses)
    b = sorted(float(ops.convert_to_numpy(v)) for v in theirs.losses)
    assert len(a) == 3
    assert a == b


def test_seed_tensor_value() -> None:
    d1 = ops.ones((2, 2, 4)) * 3
    assert float(ops.convert_to_numpy(R.L1(0.1)(d1))) == pytest.approx(4.8, rel=1e-6)


@pytest.mark.parametrize("identifier", ["l1", "L1", "l2", "l1l2", "l1_l2", "group_lasso", "orthogonal_regularizer"])
def test_get_names_match_keras_defaults(identifier) -> None:
    reg = R.get(identifier)
    assert isinstance(reg, R.ProximalRegularizer)
    keras_name = {"l1_l2": "l1l2", "group_lasso": None}.get(identifier, identifier)
    if keras_name is not None:
        x = ops.convert_to_tensor(np.random.default_rng(2).normal(size=(4, 3)), "float32")
        theirs = keras.regularizers.get(keras_name)
        assert ops.convert_to_numpy(reg(x)) == ops.convert_to_numpy(theirs(x))


@pytest.mark.parametrize("make", [lambda: R.L1(0.3), lambda: R.L2(0.2), lambda: R.L1L2(0.1, 0.2),
                                  lambda: R.GroupLasso(0.3, axis=0, weights="none"),
                                  lambda: R.OrthogonalRegularizer(0.2, "columns")])
def test_serialization_round_trips_and_get_reads_dicts(make) -> None:
    reg = make()
    cfg = keras.regularizers.serialize(reg)
    assert cfg["registered_name"] == f"sparsecraft>{type(reg).__name__}"
    assert keras.regularizers.deserialize(cfg) == reg
    assert R.get(cfg) == reg
    assert R.get(reg) is reg
    assert R.get(None) is None


def test_get_converts_keras_regularizers_and_their_dicts() -> None:
    assert R.get(keras.regularizers.L1L2(0.1, 0.2)) == R.L1L2(0.1, 0.2)
    assert R.get(keras.regularizers.serialize(keras.regularizers.L2(0.25))) == R.L2(0.25)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, kernel_regularizer=R.GroupLasso(0.5))])
    entry = model.get_config()["layers"][-1]["config"]["kernel_regularizer"]
    assert R.get(entry) == R.GroupLasso(0.5)
    restored = keras.Sequential.from_config(model.get_config())
    assert restored.layers[-1].kernel_regularizer == R.GroupLasso(0.5)


def test_bad_values_raise_keras_style() -> None:
    with pytest.raises(ValueError, match="Received: l1=-1"):
        R.L1(-1.0)
    with pytest.raises(ValueError, match="nan"):
        R.L2(float("nan"))
    with pytest.raises(ValueError, match="Received: name='l3'"):
        R.get("l3")
    with pytest.raises(ValueError, match="Received: factor=None"):
        R.OrthogonalRegularizer(None)  # as Keras's: only L1, L2, L1L2 take defaults for None
    with pytest.raises(ValueError, match="weights"):
        R.GroupLasso(weights="size")
    with pytest.raises(TypeError, match="closed-form prox"):
        R.OrthogonalRegularizer().prox(ops.ones((2, 2)), 0.1)


@pytest.mark.parametrize(("l1", "l2"), [(0.7, 0.0), (0.0, 0.4), (0.5, 0.3)], ids=["l1", "l2", "l1l2"])
def test_separable_prox_is_the_grid_argmin(l1, l2) -> None:
    reg = R.L1L2(l1, l2) if l1 and l2 else (R.L1(l1) if l1 else R.L2(l2))
    t = 0.8
    v = np.array([-1.3, -0.2, 0.0, 0.35, 2.0], "float32")
    got = ops.convert_to_numpy(reg.prox(ops.convert_to_tensor(v), t))
    grid = np.linspace(-3, 3, 600001)[:, None]  # argmin_x l1|x| + l2·x² + (x − v)²/(2t), per coordinate
    objective = l1 * np.abs(grid) + l2 * grid**2 + (grid - v.astype(np.float64)) ** 2 / (2 * t)
    np.testing.assert_allclose(got, grid[np.argmin(objective, axis=0), 0], atol=2e-5)
    assert np.sum(got == 0) == (3 if l1 else 1)


def test_group_prox_meets_the_optimality_condition() -> None:
    reg, t = R.GroupLasso(0.6, axis=-1), 0.5
    v = (np.random.default_rng(3).normal(size=(4, 5)) * np.array([0.1, 1.0, 0.05, 2.0, 0.3])).astype("float32")
    x = ops.convert_to_numpy(reg.prox(ops.convert_to_tensor(v), t))
    thr = t * 0.6 * np.sqrt(4)
    for g in range(5):
        vg, xg = v[:, g], x[:, g]
        if np.linalg.norm(vg) <= thr:
            assert np.all(xg == 0)
        else:  # x − v + t·∂R(x) = 0 with ∂R(x) = strength·√|g|·x/‖x‖
            np.testing.assert_allclose(xg - vg + thr * xg / np.linalg.norm(xg), 0, atol=1e-5)
    assert np.sum(np.all(x == 0, axis=0)) >= 1
    assert np.sum(np.all(x != 0, axis=0)) >= 1


def test_group_lasso_value_and_per_coordinate_step() -> None:
    reg = R.GroupLasso(0.5, axis=0)
    x = np.arange(6.0).reshape(2, 3)
    expected = 0.5 * np.sqrt(3) * np.linalg.norm(x, axis=1).sum()
    assert float(ops.convert_to_numpy(reg(ops.convert_to_tensor(x)))) == pytest.approx(expected)
    step = np.array([[0.1, 0.2, 0.3], [1.0, 1.0, 1.0]])
    got = ops.convert_to_numpy(reg.prox(ops.convert_to_tensor(x), ops.convert_to_tensor(step)))
    want = ops.convert_to_numpy(reg.prox(ops.convert_to_tensor(x), ops.convert_to_tensor(step.mean(1, keepdims=True))))
    np.testing.assert_allclose(got, want)
