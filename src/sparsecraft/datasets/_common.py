"""What the data sets share: the :class:`Split` they return, argument checks, and the :func:`mlp` model family."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Split", "mlp"]


@dataclass
class Split:
    """A train/test split held as tensors.

    Attributes:
        X_train: Training inputs, float32 ``[n_train, n_features]`` (int64
            token ids ``[n_train, length]`` for a language task).
        y_train: Training targets: int64 class labels ``[n_train]`` for
            classification (``[n_train, length]`` next tokens for a language
            task, unpredictable ones marked ``IGNORE``), float32
            ``[n_train, n_outputs]`` for regression.
        X_test: Test inputs, float32.
        y_test: Test targets, same kind as ``y_train``.
        name: Data set name.
        n_features: Input dimension.
        n_classes: Number of classes, or ``None`` for regression.
        meta: Task-specific ground truth (see each constructor).
    """

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    n_features: int
    n_classes: int | None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return "regression" if self.n_classes is None else "classification"

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return self.X_train.shape[0]

    @property
    def n_test(self) -> int:
        """Number of test samples."""
        return self.X_test.shape[0]

    def __repr__(self) -> str:
        kind = f"{self.n_classes} classes" if self.n_classes is not None else "regression"
        return (
            f"Split(name={self.name!r}, n_train={self.n_train}, n_test={self.n_test}, "
            f"n_features={self.n_features}, {kind}, meta={sorted(self.meta)})"
        )


# --------------------------------------------------------------------------- validation


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Expected {name} to be a positive int. Received: {name}={value!r}")
    return value


def _fraction(name: str, value: Any, closed_right: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and 0 < value and (value <= 1 if closed_right else value < 1)
    if not ok:
        interval = "(0, 1]" if closed_right else "(0, 1)"
        raise ValueError(f"Expected {name} in {interval}. Received: {name}={value!r}")
    return float(value)


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected {name} to be an int. Received: {name}={value!r}")
    return value


def _hidden_sizes(hidden: Any) -> tuple[int, ...]:
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = (hidden,)
    if not isinstance(hidden, Sequence) or isinstance(hidden, str):
        raise TypeError(
            f"Expected hidden to be an int or a sequence of ints. Received: hidden={hidden!r}"
        )
    return tuple(_positive_int("hidden[i]", h) for h in hidden)


# --------------------------------------------------------------------------- model family


def mlp(n_in: int, hidden: int | Sequence[int], n_out: int) -> nn.Sequential:
    """A multilayer perceptron ``Linear, ReLU, ..., Linear`` (no final activation).

    Parameter names are ``"0.weight"``, ``"2.weight"``, ... (Linear layers at
    even indices), which is how :func:`teacher_student` names its masks. The
    digits model of the demo is ``mlp(64, (256, 256), 10)``.

    Args:
        n_in: Input features.
        hidden: Width of each hidden layer (an int for one layer, ``()`` for none).
        n_out: Outputs.

    Returns:
        The model, with PyTorch's default initialisation.

    Raises:
        ValueError: If a size is not a positive int.
    """
    sizes = [_positive_int("n_in", n_in), *_hidden_sizes(hidden), _positive_int("n_out", n_out)]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)
