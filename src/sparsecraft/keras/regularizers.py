"""Keras regularizers with Keras's values and a prox: ``L1``, ``L2``, ``L1L2``, ``GroupLasso``.

Each class is a ``keras.regularizers.Regularizer``: pass it as
``kernel_regularizer=``, ``bias_regularizer=`` or ``activity_regularizer=``
and Keras adds its value to ``model.losses`` as it would its own. Its value
equals Keras's (``keras.regularizers.L1``, ``L2``, ``L1L2``,
``OrthogonalRegularizer``) for float32 and float64 inputs; 16-bit inputs are
summed in float32, where Keras sums in the input dtype (float16 overflows to
``inf`` for a 256×256 tensor of 3s under ``L1(0.1)``), so there the values
differ. A :class:`~sparsecraft.keras.optimizers.ProximalOptimizer` applies
the weight regularizers that have a prox by their prox (exact zeros) and takes
them out of ``model.losses``.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import keras
import numpy as np
from keras import ops

from ._math import (
    at_least_float32,
    group_soft_threshold,
    other_axes,
    safe_norm,
    shrink,
    soft_threshold,
)

__all__ = [
    "ProximalRegularizer",
    "L1",
    "L2",
    "L1L2",
    "GroupLasso",
    "OrthogonalRegularizer",
    "get",
    "serialize",
    "deserialize",
]

# keras.SymbolicScope is public; its module's in_symbolic_scope() is what Keras's layers ask.
_in_symbolic_scope = importlib.import_module(keras.SymbolicScope.__module__).in_symbolic_scope
_PACKAGE = "sparsecraft"
_register = keras.saving.register_keras_serializable(package=_PACKAGE)


def _strength(name: str, value: Any, default: float | None = None) -> float:
    """A non-negative finite float; ``None`` gives ``default`` where Keras does (L1, L2, L1L2)."""
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"Expected a non-negative finite float for `{name}`. Received: {name}={value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Expected a non-negative finite float for `{name}`. Received: {name}={value}")
    return value


def _fmt(x: float) -> str:
    return f"{x:.4g}"


class ProximalRegularizer(keras.regularizers.Regularizer):
    """Base class: a Keras regularizer that may carry a closed-form prox.

    Class attributes: ``proximable`` (``prox`` exists), ``separable`` (``prox``
    takes a step per coordinate), ``makes_zeros`` (its prox gives exact zeros).
    """

    proximable = False
    separable = False
    makes_zeros = False

    def __call__(self, x: Any) -> Any:
        if isinstance(x, keras.Variable) and not _in_symbolic_scope():
            # Read by ProximalOptimizer when it is built inside the first traced train step
            # (TensorFlow builds optimizers lazily): that loss already holds this term.
            # Symbolic passes (Keras's shape inference before fit) compute no real loss.
            x._sparsecraft_in_loss = True
        return self.value(x)

    def value(self, x: Any) -> Any:
        """The penalty ``R(x)``, a scalar tensor (float32 for 16-bit inputs, else ``x``'s dtype)."""
        return self._value(at_least_float32(x))

    def _value(self, x: Any) -> Any:
        raise TypeError(f"{type(self).__name__} defines no value")  # pragma: no cover

    def prox(self, v: Any, step: Any) -> Any:
        """``prox_{tR}(v) = argmin_x R(x) + ‖x − v‖²/(2t)``; ``step`` = ``t``, a scalar or per coordinate."""
        if not self.proximable:
            raise TypeError(
                f"Expected a regularizer with a closed-form prox. Received: {type(self).__name__}, "
                f"which has none; leave it in the loss"
            )
        return self._prox(v, step)

    def _prox(self, v: Any, step: Any) -> Any:
        raise TypeError(f"{type(self).__name__} has no prox")  # pragma: no cover

    def gradient(self, x: Any) -> Any:
        """The gradient autodiff gives for :meth:`value` (0 where ``|x|`` has a kink at 0)."""
        raise TypeError(f"{type(self).__name__} defines no gradient")  # pragma: no cover

    def formula(self, symbol: str = "x") -> str:
        """The formula with this regularizer's numbers, e.g. ``0.1·Σ|W|``."""
        raise TypeError(f"{type(self).__name__} defines no formula")  # pragma: no cover

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.get_config() == self.get_config()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.get_config().items()))))


@_register
class L1(ProximalRegularizer):
    """Lasso: ``R(x) = l1·Σ|x|`` (Keras ``L1``; default ``l1=0.01``, also for ``None``).

    prox: soft thresholding, ``sign(v)·max(|v| − t·l1, 0)``. The value uses
    ``l1`` rounded to float32, as Keras stores it.
    """

    proximable = separable = makes_zeros = True

    def __init__(self, l1: float | None = 0.01):
        self.l1 = _strength("l1", l1, 0.01)

    def _value(self, x):
        l1 = ops.cast(np.float32(self.l1), x.dtype)
        return l1 * ops.sum(ops.abs(x))

    def _prox(self, v, step):
        return soft_threshold(v, step * self.l1)

    def gradient(self, x):
        return ops.cast(np.float32(self.l1), x.dtype) * ops.sign(x)

    def formula(self, symbol: str = "x") -> str:
        return f"{_fmt(self.l1)}·Σ|{symbol}|"

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1}


@_register
class L2(ProximalRegularizer):
    """Ridge, Keras's convention (no ½): ``R(x) = l2·Σx²`` (default ``l2=0.01``, also for ``None``).

    prox: ``v / (1 + 2·t·l2)``. Shrinks, never makes zeros.
    """

    proximable = separable = True

    def __init__(self, l2: float | None = 0.01):
        self.l2 = _strength("l2", l2, 0.01)

    def _value(self, x):
        return ops.cast(self.l2, x.dtype) * ops.sum(ops.square(x))

    def _prox(self, v, step):
        return shrink(v, 2.0 * self.l2 * step)

    def gradient(self, x):
        return ops.cast(2.0 * self.l2, x.dtype) * x

    def formula(self, symbol: str = "x") -> str:
        return f"{_fmt(self.l2)}·Σ{symbol}²"

    def get_config(self) -> dict[str, Any]:
        return {"l2": self.l2}


@_register
class L1L2(ProximalRegularizer):
    """Elastic net, Keras's convention: ``R(x) = l1·Σ|x| + l2·Σx²`` (defaults 0 and 0, also for ``None``).

    prox: ``soft_threshold(v, t·l1) / (1 + 2·t·l2)``.
    """

    proximable = separable = makes_zeros = True

    def __init__(self, l1: float | None = 0.0, l2: float | None = 0.0):
        self.l1 = _strength("l1", l1, 0.0)
        self.l2 = _strength("l2", l2, 0.0)

    def _value(self, x):
        # Keras adds only the non-zero parts (same value; same float rounding).
        total = ops.convert_to_tensor(0.0, dtype=x.dtype)
        if self.l1 != 0.0:
            total = total + ops.cast(self.l1, x.dtype) * ops.sum(ops.abs(x))
        if self.l2 != 0.0:
            total = total + ops.cast(self.l2, x.dtype) * ops.sum(ops.square(x))
        return total

    def _prox(self, v, step):
        return shrink(soft_threshold(v, step * self.l1), 2.0 * self.l2 * step)

    def gradient(self, x):
        return ops.cast(self.l1, x.dtype) * ops.sign(x) + ops.cast(2.0 * self.l2, x.dtype) * x

    def formula(self, symbol: str = "x") -> str:
        return f"{_fmt(self.l1)}·Σ|{symbol}| + {_fmt(self.l2)}·Σ{symbol}²"

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1, "l2": self.l2}


_WEIGHTS = ("sqrt_size", "none")


@_register
class GroupLasso(ProximalRegularizer):
    """Group lasso (Yuan & Lin 2006): ``R(x) = strength·Σ_g w_g·‖x_g‖₂``.

    A group is one slice of ``x`` along ``axis``: the default ``axis=-1`` makes
    each output unit of a ``Dense`` kernel ``(in, out)`` (each output channel of
    a ``Conv2D`` kernel ``(kh, kw, in, out)``) a group, like ``groups="rows"``
    of the torch library's ``GroupLasso`` on a torch weight ``(out, in)``.
    ``w_g = sqrt(|g|)`` (``weights="sqrt_size"``, default) or 1 (``"none"``).

    prox: block soft thresholding, ``x_g = v_g·max(1 − t·strength·w_g/‖v_g‖₂, 0)``;
    with a per-coordinate step (Adam), ``t`` of a group is the mean of its steps.
    """

    proximable = makes_zeros = True

    def __init__(self, strength: float = 0.01, axis: int = -1, weights: str = "sqrt_size"):
        self.strength = _strength("strength", strength)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"Expected an int axis. Received: axis={axis!r}")
        if weights not in _WEIGHTS:
            raise ValueError(f"Expected weights in {_WEIGHTS}. Received: weights={weights!r}")
        self.axis = axis
        self.weights = weights

    def _check(self, x) -> tuple[int, ...]:
        ndim = len(x.shape)
        if ndim < 1 or not -ndim <= self.axis < ndim:
            raise ValueError(
                f"Expected a tensor with axis {self.axis} for GroupLasso. Received: shape={tuple(x.shape)}"
            )
        return other_axes(ndim, self.axis)

    def _group_weight(self, x) -> float:
        size = int(np.prod([x.shape[i] for i in self._check(x)]))
        return math.sqrt(size) if self.weights == "sqrt_size" else 1.0

    def _value(self, x):
        norms = safe_norm(ops.sum(ops.square(x), axis=self._check(x)))
        return ops.cast(self.strength * self._group_weight(x), x.dtype) * ops.sum(norms)

    def _prox(self, v, step):
        axes = self._check(v)
        if len(getattr(step, "shape", ())) > 0:
            step = ops.mean(step, axis=axes, keepdims=True)  # one step per group
        return group_soft_threshold(v, step * (self.strength * self._group_weight(v)), self.axis)

    def gradient(self, x):
        norms = safe_norm(ops.sum(ops.square(x), axis=self._check(x), keepdims=True))
        unit = ops.where(norms > 0, x / ops.where(norms > 0, norms, 1.0), 0.0)
        return ops.cast(self.strength * self._group_weight(x), x.dtype) * unit

    def formula(self, symbol: str = "x") -> str:
        w = "√|g|·" if self.weights == "sqrt_size" else ""
        return f"{_fmt(self.strength)}·Σ_g {w}‖{symbol}_g‖₂ (slices along axis {self.axis})"

    def get_config(self) -> dict[str, Any]:
        return {"strength": self.strength, "axis": self.axis, "weights": self.weights}


@_register
class OrthogonalRegularizer(ProximalRegularizer):
    """Keras's ``OrthogonalRegularizer`` (value only; no closed-form prox).

    ``R(x) = factor·0.5·Σ|off-diagonal of the Gram matrix of the L2-normalised
    rows (or columns)| / (n(n−1)/2)``, for a rank-2 ``x`` (default ``factor=0.01``,
    ``mode="rows"``). The same operations as Keras's class, with ``factor``
    cast to the input's dtype (Keras's fails on float64 under TensorFlow).
    """

    def __init__(self, factor: float = 0.01, mode: str = "rows"):
        self.factor = _strength("factor", factor)
        if mode not in ("rows", "columns"):
            raise ValueError(f"Expected mode in ('rows', 'columns'). Received: mode={mode!r}")
        self.mode = mode

    def _value(self, x):
        if len(x.shape) != 2:
            raise ValueError(f"Expected a rank-2 input for OrthogonalRegularizer. Received: shape={tuple(x.shape)}")
        if self.mode == "rows":
            x = ops.normalize(x, axis=1)
            product, size = ops.matmul(x, ops.transpose(x)), x.shape[0]
        else:
            x = ops.normalize(x, axis=0)
            product, size = ops.matmul(ops.transpose(x), x), x.shape[1]
        off_diagonal = product * (1.0 - ops.eye(size, dtype=x.dtype))
        pairs = size * (size - 1.0) / 2.0
        factor = ops.cast(np.float32(self.factor), x.dtype)  # Keras keeps factor as a float32 tensor
        return factor * 0.5 * ops.sum(ops.absolute(off_diagonal)) / pairs

    def formula(self, symbol: str = "x") -> str:
        return f"{_fmt(self.factor)}·0.5·Σ|offdiag({symbol}̂{symbol}̂ᵀ)| / pairs ({self.mode})"

    def get_config(self) -> dict[str, Any]:
        return {"factor": self.factor, "mode": self.mode}


_CLASSES: dict[str, type[ProximalRegularizer]] = {
    "l1": L1,
    "l2": L2,
    "l1l2": L1L2,
    "l1_l2": L1L2,
    "elastic_net": L1L2,
    "group_lasso": GroupLasso,
    "grouplasso": GroupLasso,
    "orthogonal_regularizer": OrthogonalRegularizer,
    "orthogonalregularizer": OrthogonalRegularizer,
    "orthogonal": OrthogonalRegularizer,
}


def _lookup(name: str) -> type[ProximalRegularizer]:
    key = name.split(">")[-1].strip().lower().replace("-", "_")
    if key not in _CLASSES:
        raise ValueError(
            f"Expected a regularizer name among {sorted(_CLASSES)}. Received: name={name!r}"
        )
    return _CLASSES[key]


def serialize(regularizer: ProximalRegularizer) -> dict[str, Any]:
    """Keras's serialized form (``keras.regularizers.serialize``)."""
    return keras.regularizers.serialize(regularizer)


def deserialize(config: dict[str, Any]) -> ProximalRegularizer:
    """Rebuild a regularizer from :func:`serialize`'s output, Keras's own, or a layer config entry."""
    return get(config)


def get(identifier: Any) -> ProximalRegularizer | None:
    """A sparsecraft regularizer from a name, a config dict, a Keras regularizer or an instance.

    * ``None`` gives ``None`` (as ``keras.regularizers.get``);
    * an instance of this module is returned as is; Keras's ``L1``, ``L2``,
      ``L1L2``, ``OrthogonalRegularizer`` become this module's class with the
      same config;
    * names: ``"l1"``, ``"l2"``, ``"l1l2"`` or ``"l1_l2"`` (defaults 0 and 0,
      as ``keras.regularizers.get("l1l2")``), ``"group_lasso"``,
      ``"orthogonal_regularizer"``, or the class names;
    * dicts: ``keras.regularizers.serialize(...)`` output (Keras's classes or
      these), a layer config's ``kernel_regularizer`` entry, or
      ``{"class_name": ..., "config": {...}}``.

    Raises:
        ValueError: an unknown name or bad values.
        TypeError: anything else.
    """
    if identifier is None or isinstance(identifier, ProximalRegularizer):
        return identifier
    if isinstance(identifier, keras.regularizers.Regularizer):
        name = type(identifier).__name__
        if name not in ("L1", "L2", "L1L2", "OrthogonalRegularizer"):
            raise TypeError(f"Expected a Keras L1, L2, L1L2 or OrthogonalRegularizer. Received: {name}")
        return _lookup(name).from_config(identifier.get_config())
    if isinstance(identifier, str):
        return _lookup(identifier)()
    if isinstance(identifier, dict):
        name = identifier.get("class_name", identifier.get("name"))
        if not isinstance(name, str):
            raise ValueError(f"Expected a config dict with a 'class_name' key. Received: {identifier!r}")
        config = identifier.get("config", {})
        if not isinstance(config, dict):
            raise ValueError(f"Expected a dict under 'config'. Received: {identifier!r}")
        return _lookup(name).from_config(dict(config))
    raise TypeError(
        f"Expected a regularizer, a name or a config dict. Received: {type(identifier).__name__}"
    )
