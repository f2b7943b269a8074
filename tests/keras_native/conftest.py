"""Keras-native tests: run once per backend, each in its own process.

`make test` runs this folder under KERAS_BACKEND=torch (with the main suite),
then tensorflow and jax (`--confcutdir` keeps the torch-importing conftest of
tests/ out of those runs). Nothing here imports torch except the torch-parity
test on the torch backend.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()


@pytest.fixture(autouse=True)
def _float32_policy():
    # No keras.utils.set_random_seed: it imports TensorFlow on every backend (seconds);
    # the tests use constant initializers and numpy data instead.
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def lasso() -> tuple[np.ndarray, np.ndarray]:
    """A small sparse regression: 64 samples, 12 features, 3 of them informative."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12)).astype("float32")
    w = np.zeros(12, "float32")
    w[:3] = [1.5, -2.0, 1.0]
    y = (x @ w + 0.1 * rng.normal(size=64)).astype("float32")[:, None]
    return x, y


def dense_model(reg, init: float = 0.5, activity=None) -> keras.Model:
    """A linear model ``x @ W`` (12 → 1, no bias) with ``reg`` on its kernel."""
    return keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(1, use_bias=False, kernel_initializer=keras.initializers.Constant(init),
                           kernel_regularizer=reg, activity_regularizer=activity),
    ])


def mse_grad(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Gradient of Keras's "mse" loss ``mean((x w − y)²)`` for a (d, 1) kernel, in float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    return 2.0 * x.T @ (x @ w - y) / len(x)


def soft(v: np.ndarray, tau) -> np.ndarray:
    return np.sign(v) * np.maximum(np.abs(v) - tau, 0.0)


def batches(x: np.ndarray, y: np.ndarray, size: int, epochs: int):
    """The minibatches fit(shuffle=False) feeds, in order."""
    for _ in range(epochs):
        for i in range(0, len(x), size):
            yield x[i:i + size], y[i:i + size]
