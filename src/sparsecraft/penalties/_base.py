"""The Penalty base class: validated hyper-parameters, value, prox, config."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import functional as F

_REGISTRY: dict[str, type[Penalty]] = {}


def check_strength(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise naming the argument and the value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
            value = float(value)
        else:
            raise ValueError(
                f"Expected a non-negative finite float for `{name}`. Received: {name}={value!r}"
            )
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Expected a non-negative finite float for `{name}`. Received: {name}={value}")
    return value


def check_input(x: Any, who: str) -> Tensor:
    """A penalty takes floating tensors only; integer or boolean tensors carry no gradient."""
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected a torch.Tensor for {who}. Received: {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"Expected a floating-point tensor for {who} (penalties are defined on real values). "
            f"Received: dtype={x.dtype}; convert it with .float() first"
        )
    return x


@dataclasses.dataclass(frozen=True)
class Penalty:
    """A penalty ``R(x)``: an immutable value object.

    Subclasses declare their hyper-parameters as dataclass fields. A field whose
    metadata says ``strength`` is validated as a non-negative finite float.
    Where ``none_is_default`` (Keras's ``L1``, ``L2``, ``L1L2``), ``None``
    gives the field's default, as Keras does (``L1(None)`` is ``L1(0.01)``,
    ``L1L2(None)`` is ``L1L2(0, 0)``); elsewhere it is refused.

    Class attributes say what a penalty can do:

    * ``proximable``: ``prox`` exists in closed form.
    * ``separable``: ``prox`` accepts per-coordinate step tensors.
    * ``makes_zeros``: its prox sets coordinates (or groups) exactly to zero.
    """

    name: ClassVar[str] = ""
    symbolic: ClassVar[str] = ""
    proximable: ClassVar[bool] = False
    separable: ClassVar[bool] = False
    makes_zeros: ClassVar[bool] = False
    none_is_default: ClassVar[bool] = False

    def __init_subclass__(cls, register: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            cls.name = register
            _REGISTRY[register] = cls

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.metadata.get("strength"):
                value = getattr(self, f.name)
                if value is None and self.none_is_default:
                    # Keras: L1(None), L2(None) and L1L2(None) take the class defaults.
                    value = f.default
                object.__setattr__(self, f.name, check_strength(f.name, value))
        self._validate()

    def _validate(self) -> None:
        """Extra checks of a subclass (cross-field constraints)."""

    # -- value -------------------------------------------------------------------
    def value(self, x: Tensor) -> Tensor:
        """The penalty ``R(x)`` as a differentiable scalar tensor.

        Computed in at least float32 with autocast off (as tf.keras does for
        regularizers: float16 sums overflow).
        """
        x = check_input(x, f"{type(self).__name__}.value")
        with torch.autocast(x.device.type, enabled=False):
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            return self._value(x)

    __call__ = value

    def _value(self, x: Tensor) -> Tensor:
        raise TypeError(f"{type(self).__name__} defines no value")  # pragma: no cover

    # -- prox --------------------------------------------------------------------
    def prox(self, v: Tensor, step: float | Tensor, *, out: Tensor | None = None) -> Tensor:
        """``prox_{tR}(v) = argmin_x R(x) + ||x − v||² / (2t)``.

        Args:
            v: the point to project.
            step: ``t``; a float, or (for separable penalties) a tensor
                broadcastable to ``v``; group penalties take one step per group.
            out: where to write the result (``out=v`` is in place).
        """
        if not self.proximable:
            raise TypeError(
                f"Expected a penalty with a closed-form prox. Received: {type(self).__name__}, "
                f"which has none; add it to the loss instead"
            )
        check_input(v, f"{type(self).__name__}.prox")
        step = F.check_step(step)
        if isinstance(step, Tensor):
            if self.separable:
                # A step that broadcasts to a larger shape would change the result's shape.
                try:
                    fits = torch.broadcast_shapes(step.shape, v.shape) == v.shape
                except RuntimeError:
                    fits = False
                if not fits:
                    raise ValueError(
                        f"Expected a step broadcastable to the shape of v, {tuple(v.shape)}. "
                        f"Received: step of shape {tuple(step.shape)}"
                    )
            elif step.numel() == 1:
                step = step.reshape(())
            else:
                self._check_group_step(v, step)
        return self._prox(v, step, out, False)

    def prox_(self, v: Tensor, step: float | Tensor) -> Tensor:
        """In-place prox for optimizers: writes into ``v`` and may overwrite a tensor ``step``.

        This is the hot-path entry: it skips the checks of :meth:`prox` and lets
        separable penalties use the step buffer as their workspace.
        """
        return self._prox(v, step, v, True)

    def _prox(self, v: Tensor, step: float | Tensor, out: Tensor | None, owns_step: bool) -> Tensor:
        raise TypeError(f"{type(self).__name__} has no prox")  # pragma: no cover

    def _check_group_step(self, v: Tensor, step: Tensor) -> None:
        raise ValueError(
            f"Expected a scalar step for {type(self).__name__} (its prox is not separable). "
            f"Received: step of shape {tuple(step.shape)}"
        )

    # -- description ---------------------------------------------------------------
    def formula(self, symbol: str = "x") -> str:
        """The formula with this penalty's numbers filled in, e.g. ``0.1·Σ|W|``."""
        return self.symbolic.replace("x", symbol)

    def strengths(self) -> dict[str, float]:
        """The strength fields and their values."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("strength")
        }

    def get_config(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``type(self).from_config(cfg)`` rebuilds the penalty."""
        cfg = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            cfg[f.name] = list(v) if isinstance(v, tuple) else v
        return cfg

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Penalty:
        """Rebuild a penalty from :meth:`get_config`'s output."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - names
        if unknown:
            raise ValueError(
                f"Expected config keys among {sorted(names)} for {cls.__name__}. "
                f"Received unknown keys: {sorted(unknown)}"
            )
        return cls(**config)

    def spec(self) -> str:
        """The spec string form, e.g. ``"l1:0.0001"`` (see :func:`sparsecraft.penalties.get`)."""
        parts = [self.name]
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                raise ValueError(
                    f"Expected a penalty without explicit group indices for a spec string. "
                    f"Received: {f.name}={v!r}; use get_config() instead"
                )
            parts.append(repr(v) if isinstance(v, float) else str(v))
        return ":".join(parts)


def strength(default: float) -> Any:
    """A dataclass field holding a validated non-negative strength."""
    return dataclasses.field(default=default, metadata={"strength": True})


def fmt(x: float) -> str:
    """Numbers in formulas: short, exact enough to recompute by hand."""
    return f"{x:.4g}"
