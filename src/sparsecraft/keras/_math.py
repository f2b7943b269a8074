"""Prox operators and zero counts written with ``keras.ops`` only (every backend).

Each function is the exact argmin of its docstring; the torch library's
:mod:`sparsecraft.functional` holds the same math for torch tensors.
"""

from __future__ import annotations

from typing import Any

from keras import ops

_HALF = ("float16", "bfloat16")


def dtype_of(x: Any) -> str:
    """The standardized dtype name of a tensor or variable (``"float32"``, …)."""
    import keras

    return keras.backend.standardize_dtype(x.dtype)


def at_least_float32(x: Any) -> Any:
    """``x`` as a tensor, with 16-bit floats raised to float32 (their sums overflow)."""
    x = ops.convert_to_tensor(x)
    return ops.cast(x, "float32") if dtype_of(x) in _HALF else x


def soft_threshold(v: Any, tau: Any) -> Any:
    """``sign(v)·max(|v| − τ, 0) = argmin_x τ·Σ|x| + ‖x − v‖²/2`` (τ scalar or per coordinate)."""
    return ops.sign(v) * ops.maximum(ops.abs(v) - tau, 0.0)


def shrink(v: Any, factor: Any) -> Any:
    """``v / (1 + factor)``: the prox of ``(factor/2)·Σx²`` with step 1."""
    return v / (1.0 + factor)


def other_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """Every axis of an ``ndim``-dim tensor but ``axis`` (the axes a group spans)."""
    return tuple(i for i in range(ndim) if i != axis % ndim)


def safe_norm(sumsq: Any) -> Any:
    """``sqrt(sumsq)`` with a zero (not NaN) gradient where ``sumsq`` is 0."""
    positive = sumsq > 0
    return ops.where(positive, ops.sqrt(ops.where(positive, sumsq, 1.0)), 0.0)


def group_soft_threshold(v: Any, tau: Any, axis: int) -> Any:
    """Block soft thresholding of the slices of ``v`` along ``axis``.

    ``x_g = v_g·max(1 − τ_g/‖v_g‖₂, 0) = argmin_x Σ_g τ_g‖x_g‖₂ + ‖x − v‖²/2``;
    ``τ`` broadcasts against the per-slice norms (kept dims).
    """
    norms = safe_norm(ops.sum(ops.square(v), axis=other_axes(len(v.shape), axis), keepdims=True))
    factor = ops.where(norms > 0, ops.maximum(1.0 - tau / ops.where(norms > 0, norms, 1.0), 0.0), 0.0)
    return v * factor


def count_zeros(x: Any) -> Any:
    """The number of exact zeros of ``x`` as a float32 scalar tensor (no host sync)."""
    return ops.sum(ops.cast(ops.equal(x, 0), "float32"))
