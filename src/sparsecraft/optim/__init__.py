"""How penalties are minimised by prox: exact zeros with any torch optimizer.

:class:`ProximalOptimizer` wraps an optimizer. After the inner step it applies
the prox of every proximable weight term of a :class:`~sparsecraft.Regularizer`
with the step size the inner optimizer really used for each coordinate
(forward–backward splitting), or keeps a dense latent copy updated by the inner
optimizer and shows the model ``prox(latent, γ)`` with the accumulated step γ
(dual averaging, as in RDA, Xiao 2010, and torchao's prototype PAT).

Files, one concept each:

* ``_proximal.py``: :class:`ProximalOptimizer` (wrapping, binding, the step
  loop, state_dict).
* ``_prox_step.py``: the prox of one parameter with the optimizer's step size
  (floor guard, cache-blocked L1, dispatch to the fused kernel).
* ``_rules.py``: :class:`AdaptiveStep`, the built-in step rules and
  :func:`register_step_rule` (a new optimizer adapter touches this file only).
* ``_fused.py``: the opt-in compiled kernel (``fused=True``).
* ``_state.py``: the whole-state_dict check before ``load_state_dict`` loads
  anything (all or nothing).
* ``_threshold.py``: :func:`threshold`, hard zeros after training with the
  penalty in the loss.
"""

from __future__ import annotations

from ._prox_step import FLOOR_REFRESH
from ._proximal import ProximalOptimizer
from ._rules import AdaptiveStep, StepRule, register_step_rule
from ._threshold import threshold

__all__ = [
    "FLOOR_REFRESH",
    "AdaptiveStep",
    "ProximalOptimizer",
    "StepRule",
    "register_step_rule",
    "threshold",
]
