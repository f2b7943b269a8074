"""Step rules: the prox step size each inner optimizer class really used.

A new optimizer adapter touches this file only: write a rule and register it
with :func:`register_step_rule`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


# A step rule returns the prox step the inner optimizer used for ``p``: a float
# (the same for every coordinate); an AdaptiveStep after writing the square root
# of the optimizer's second-moment estimate into ``ws`` (the step is then
# ``lr / (scale·ws + eps)`` per coordinate); or None before the optimizer has
# state for ``p``. The built-in rules also name the state tensors they read
# (``moment``, ``centered``) and skip the write when ``ws`` is None: the fused
# kernel reads the optimizer state directly.
class AdaptiveStep(NamedTuple):
    lr: float
    scale: float
    eps: float
    moment: Tensor | None = None  # ws = sqrt(moment − centered²)
    centered: Tensor | None = None


StepRule = Callable[[dict, dict, Tensor, Tensor], "float | AdaptiveStep | None"]
_RULES: dict[type, StepRule] = {}


def register_step_rule(optimizer_type: type, rule: StepRule) -> None:
    """Teach :class:`ProximalOptimizer` the step size of another optimizer class.

    ``rule(group, state, param, workspace)`` returns a float step, or writes
    ``sqrt(second moment)`` into ``workspace`` and returns
    ``AdaptiveStep(lr, scale, eps)`` (step ``lr / (scale·workspace + eps)``), or
    None before the optimizer has state for ``param``.
    """
    if not isinstance(optimizer_type, type):
        raise TypeError(f"Expected an optimizer class. Received: {optimizer_type!r}")
    _RULES[optimizer_type] = rule


def _lr(group: dict) -> float:
    if "lr" not in group:
        raise ValueError(f"Expected a param group with an 'lr' (the prox step). Received keys: {sorted(group)}")
    lr = float(group["lr"])
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"Expected a finite learning rate >= 0 for the prox step. Received: lr={lr}")
    return lr


def _penalty_scale(group: dict) -> float:
    scale = group.get("penalty_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < math.inf:
        raise ValueError(f"Expected a finite penalty_scale >= 0 in the param group. Received: penalty_scale={scale!r}")
    return float(scale)


def _sgd(group, state, p, ws):
    return _lr(group)


def _adam(group, state, p, ws):
    v = state.get("max_exp_avg_sq") if group.get("amsgrad") else state.get("exp_avg_sq")
    if v is None or "step" not in state:
        return None
    bc2 = 1.0 - group["betas"][1] ** float(state["step"])
    if ws is not None:
        torch.sqrt(v, out=ws)
    return AdaptiveStep(_lr(group), 1.0 / math.sqrt(bc2), group["eps"], v)


def _adagrad(group, state, p, ws):
    if "sum" not in state:
        return None
    clr = _lr(group) / (1.0 + (float(state["step"]) - 1.0) * group["lr_decay"])
    if ws is not None:
        torch.sqrt(state["sum"], out=ws)
    return AdaptiveStep(clr, 1.0, group["eps"], state["sum"])


def _rmsprop(group, state, p, ws):
    if "square_avg" not in state:
        return None
    centered = state["grad_avg"] if group.get("centered") else None
    if ws is not None and centered is not None:
        torch.addcmul(state["square_avg"], centered, centered, value=-1, out=ws)
        ws.sqrt_()
    elif ws is not None:
        torch.sqrt(state["square_avg"], out=ws)
    return AdaptiveStep(_lr(group), 1.0, group["eps"], state["square_avg"], centered)


register_step_rule(torch.optim.SGD, _sgd)
for _t in (torch.optim.Adam, torch.optim.AdamW):
    register_step_rule(_t, _adam)
register_step_rule(torch.optim.Adagrad, _adagrad)
register_step_rule(torch.optim.RMSprop, _rmsprop)
_BUILTIN_RULES = (_adam, _adagrad, _rmsprop)


def _rule_for(optimizer: torch.optim.Optimizer) -> tuple[StepRule, bool]:
    for cls in type(optimizer).__mro__:
        if cls in _RULES:
            return _RULES[cls], True
    return _sgd, False

