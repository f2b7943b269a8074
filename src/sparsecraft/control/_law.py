"""How :class:`~sparsecraft.control.TargetSparsity` moves the strength at an update.

Latent mode: solve the multiplier on the latent copies (:meth:`StrengthLaw._track`).
Forward–backward mode or a Regularizer: the feedback law on the log density
(:meth:`StrengthLaw._feedback`). The equations and the measurements that chose
them are in the class doc of TargetSparsity and docs/control.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch

from ._density import _LOG_BOUND

__all__ = ["StrengthLaw"]


class StrengthLaw:
    """The update laws of :class:`~sparsecraft.control.TargetSparsity` (a base class).

    Reads the controller's settings and counts (declared below); writes its
    multiplier state (``_log_scale``, gain, trend, ``_saturated``), its last
    measurement and ``history``.
    """

    gain: float
    drift: float
    history: list[dict[str, float]]
    _step: int
    _numel: int
    _gain: float
    _drift: float
    _last_error: float
    _log_scale: float
    _saturated: bool
    _measured: float | None
    _target_now: float
    scale: float
    _global_counts: Callable[..., tuple[list[int], list[int]]]
    _check_dead: Callable[[Sequence[int], Sequence[int], str], None]
    _hold_minimum: Callable[[Sequence[int], Sequence[int]], None]
    _apply_scale: Callable[[], None]
    _finalize_latent: Callable[..., int]

    def _feedback(self, t: int, target_now: float) -> None:
        """Forward–backward mode, or a Regularizer: one step of the feedback law at update ``t``."""
        zeros, sizes = self._global_counts()
        measured = sum(zeros) / max(sum(sizes), 1)
        self._check_dead(zeros, sizes, f"step {t}")
        floor = 0.5 / self._numel  # half an element: log density stays finite at 100 % zeros
        error = math.log(max(1.0 - measured, floor)) - math.log(max(1.0 - target_now, floor))
        error = min(max(error, -1.0), 1.0)
        # The sensitivity d log(density) / d log(scale) is unknown and ranges over 0.5-10
        # (digits at 50 % vs a sparse teacher at 90 %): a fixed gain either lags or
        # oscillates with period 2. The gain shrinks on every sign change of the error
        # and grows while the error keeps its sign (as Rprop adapts its steps).
        if error * self._last_error < 0:
            self._gain = max(self._gain * 0.7, self.gain * 0.2)
        elif error * self._last_error > 0:
            self._gain = min(self._gain * 1.05, 1.0)
        k = self._gain
        # The trend is kept only while the error agrees with it: once it pushes past the
        # target it halves (anti-windup), else it would hold the multiplier on a wrong course.
        keep = 0.5 if error * self._drift < 0 else 0.99
        self._drift = min(max(keep * self._drift + self.drift * k * error, -0.5), 0.5)
        log_scale = self._log_scale + k * error + self._drift
        clipped = min(max(log_scale, -_LOG_BOUND), _LOG_BOUND)
        saturated = clipped != log_scale and error > 0
        if saturated and not self._saturated:
            warnings.warn(
                f"TargetSparsity: the strength multiplier reached {math.exp(clipped):.3g} and sparsity is "
                f"{measured:.4f} < {target_now:.4f}; the terms cannot reach the target",
                stacklevel=3,
            )
        self._saturated = saturated
        self._log_scale = clipped
        self._last_error = error
        self._settle(t, target_now, zeros, sizes)

    @torch.no_grad()
    def _track(self, view, target_now: float) -> None:
        """Latent mode: set the multiplier whose prox of the latent copies gives the ramp's sparsity now.

        The latent copies give the sparsity at any strength without a step (as
        :meth:`finalize` uses them), so every update solves the multiplier (bisection
        in log space, to within 1 % of the non-zeros the ramp leaves and 0.05 point) instead of
        nudging it by feedback. The feedback loop lagged where a run has few updates
        or the sensitivity of sparsity to strength changes fast: a 3-epoch transformer
        with AdamW at 95 % zeros, 38.3 % accuracy with feedback and 66.4 % solved at
        every update; the BN-CNN with AdamW at 90/95/98 %, 81.3/69.8/47.0 against
        83.3/73.1/48.8 (2 seeds; docs/optim.md). Before, only the first update was
        solved (on digits with Adam, ``L1(1e-2)`` needed a multiplier of 21, and the
        feedback had left 2.7 % zeros where the ramp asked 25.7 %).
        """
        wanted = round(target_now * self._numel)
        # Close enough: 1 % of the non-zeros left, and never more than 0.05 point of sparsity
        # (the controller's landing criterion, issue 4: within 0.1 point before finalize()).
        slack = int(min(0.01 * (self._numel - wanted), 0.0005 * self._numel))
        zeros = self._finalize_latent(view, wanted, slack=slack)
        if zeros < wanted - slack and not self._saturated:
            warnings.warn(
                f"TargetSparsity: no strength multiplier within a factor 1e16 of the current one gives "
                f"{target_now:.4f} zeros (at most {zeros / self._numel:.4f}); the terms cannot reach the target",
                stacklevel=3,
            )
        self._saturated = zeros < wanted - slack
        self._last_error = 0.0
        zeros_per, sizes = self._global_counts()
        self._check_dead(zeros_per, sizes, f"step {self._step}")
        self._settle(self._step, target_now, zeros_per, sizes)

    def _settle(self, t: int, target_now: float, zeros: Sequence[int], sizes: Sequence[int]) -> None:
        """After an update: keep every tensor's minimum density, apply the strengths, record."""
        self._measured = sum(zeros) / max(sum(sizes), 1)
        self._target_now = target_now
        self._hold_minimum(zeros, sizes)
        self._apply_scale()
        self.history.append(
            {"step": float(t), "target_now": target_now, "measured": self._measured, "scale": self.scale}
        )
