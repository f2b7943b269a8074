"""The sparsity controller's law in ``keras.ops``, run inside the train step.

The torch library's feedback law (``StrengthLaw._feedback`` in
src/sparsecraft/control/_law.py, which the torch ``TargetSparsity`` uses in
forward–backward mode; its latent mode solves the multiplier on the host
instead): every ``every`` steps the measured
density ``d`` is compared with the ramp's ``d*`` and the log multiplier of the
zero-making prox terms moves by ``k·e + v`` with ``e = clip(log(d/d*), ±1)``;
the gain ``k`` shrinks by 0.7 on a sign change of ``e`` (down to ``gain/5``)
and grows by 5 % while it keeps it; the trend ``v`` keeps 0.99 of itself
(0.5 when it disagrees with ``e``) plus ``drift·k·e``, clipped to ±0.5.
It runs in the graph (no host sync under ``jit_compile``): its state lives in
optimizer variables, each update is masked by ``where(due, new, old)``. With
``hold="freeze"`` it stops at ``freeze_step``, where :mod:`._freeze` makes the
count exact and fixes the zeros.
"""

from __future__ import annotations

import math
from typing import Any

from keras import ops

from . import _freeze

# log(multiplier) stays within ±LOG_BOUND, as in the torch controller.
LOG_BOUND = math.log(1e8)
_NAMES = ("last_error", "gain_now", "trend", "measured", "target_now")


def create_state(optimizer: Any) -> dict[str, Any]:
    """The controller's scalar variables on ``optimizer`` (created at build, used once configured)."""
    return {
        n: optimizer.add_variable((), initializer="zeros", dtype="float32", name=f"control_{n}")
        for n in _NAMES
    }


def ramp_at(config: dict[str, Any], t: Any) -> Any:
    """The ramp's sparsity at step ``t`` (a float32 tensor), as ``TargetSparsity.target_at``."""
    start, end = float(config["start_step"]), float(config["end_step"])
    initial, target, ramp = config["initial"], config["target"], config["ramp"]
    p = ops.clip((t - start) / (end - start), 0.0, 1.0)
    if ramp == "cubic":
        frac = 1.0 - (1.0 - p) ** 3
    elif ramp == "linear":
        frac = p
    elif ramp == "none":
        return ops.convert_to_tensor(target, "float32") + 0.0 * t
    else:
        frac = ops.clip(ops.cast(ramp(p), "float32"), 0.0, 1.0)  # a callable on keras tensors
    return ops.where(t <= start, initial, initial + (target - initial) * frac)


def update(optimizer: Any, config: dict[str, Any]) -> None:
    """One controller step after the prox; a no-op (masked) when the step is not due."""
    state = optimizer._control_state
    numel = float(sum(n for n, r in zip(optimizer._numel, optimizer._regs, strict=True) if r.makes_zeros))
    if numel == 0:
        return
    t = ops.cast(optimizer.iterations, "float32")
    start, end, every = float(config["start_step"]), float(config["end_step"]), float(config["every"])
    due = ops.logical_and(
        t >= start, ops.logical_or(ops.equal(ops.mod(t - start, every), 0.0), ops.equal(t, end))
    )
    due = ops.logical_and(due, ops.convert_to_tensor(optimizer._frozen) <= 0)  # fixed zeros: nothing to steer
    target_now = ramp_at(config, t)
    measured = optimizer.count_zeros() / numel
    floor = 0.5 / numel  # half an element: log density stays finite at 100 % zeros
    error = ops.log(ops.maximum(1.0 - measured, floor)) - ops.log(ops.maximum(1.0 - target_now, floor))
    error = ops.clip(error, -1.0, 1.0)
    last, trend = ops.convert_to_tensor(state["last_error"]), ops.convert_to_tensor(state["trend"])
    gain_now = ops.convert_to_tensor(state["gain_now"])
    gain0 = config["gain"]
    gain = ops.where(gain_now > 0, gain_now, gain0)  # 0: not started yet
    sign = error * last
    gain = ops.where(sign < 0, ops.maximum(gain * 0.7, gain0 * 0.2),
                     ops.where(sign > 0, ops.minimum(gain * 1.05, 1.0), gain))
    keep = ops.where(error * trend < 0, 0.5, 0.99)
    new_trend = ops.clip(keep * trend + config["drift"] * gain * error, -0.5, 0.5)
    log_scale = ops.clip(ops.convert_to_tensor(optimizer._log_scale) + gain * error + new_trend, -LOG_BOUND, LOG_BOUND)
    for var, new in ((optimizer._log_scale, log_scale), (state["last_error"], error),
                     (state["gain_now"], gain), (state["trend"], new_trend),
                     (state["measured"], measured), (state["target_now"], target_now)):
        var.assign(ops.where(due, ops.cast(new, "float32"), ops.convert_to_tensor(var)))
    if config.get("hold") == "freeze":
        _freeze.at_step(optimizer, config)
