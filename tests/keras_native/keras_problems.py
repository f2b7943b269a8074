"""Shared problems and numpy references of the Keras-native tests (imported by name)."""

from __future__ import annotations

import keras
import numpy as np

BACKEND = keras.backend.backend()


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
