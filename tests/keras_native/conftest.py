"""Keras-native tests: run once per backend, each in its own process.

`make test` runs this folder under KERAS_BACKEND=torch (with the main suite),
then tensorflow and jax (`--confcutdir` keeps the torch-importing conftest of
tests/ out of those runs). Nothing here imports torch except the torch-parity
test on the torch backend.
"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _float32_policy():
    # No keras.utils.set_random_seed: it imports TensorFlow on every backend (seconds);
    # the tests use constant initializers and numpy data instead.
    yield
    import keras

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
