"""The ramp a :class:`~sparsecraft.control.TargetSparsity` follows from the initial sparsity to the target."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["ramp_fraction"]

_RAMPS = ("cubic", "linear", "none")


def ramp_fraction(ramp: str | Callable[[float], float], progress: float) -> float:
    """How far from the initial sparsity to the target a ramp is at ``progress`` in [0, 1].

    ``"cubic"``: ``1 − (1 − p)³``, the schedule of gradual pruning (Zhu & Gupta
    2017; tfmot's ``PolynomialDecay`` with power 3), fast at first and gentle
    near the target, so that ``s_t = s_f + (s_i − s_f)(1 − p)³``.
    ``"linear"``: ``p``. ``"none"``: 1 (the target from the first step).
    A callable maps ``p`` to a fraction in [0, 1].
    """
    p = min(max(float(progress), 0.0), 1.0)
    if callable(ramp):
        f = float(ramp(p))
        if not 0.0 <= f <= 1.0 or math.isnan(f):
            raise ValueError(f"Expected a ramp returning a fraction in [0, 1]. Received: ramp({p})={f}")
        return f
    if ramp == "cubic":
        return 1.0 - (1.0 - p) ** 3
    if ramp == "linear":
        return p
    if ramp == "none":
        return 1.0
    raise ValueError(f"Expected ramp in {_RAMPS} or a callable. Received: ramp={ramp!r}")
