"""The sparsity controller: :class:`TargetSparsity` moves prox term strengths along a ramp to a target."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .. import distributed as _dist
from ..metrics import count_zeros
from ..optim import ProximalOptimizer
from ..regularizer import Regularizer, Term
from ._finalize import _LOG_BOUND, FinalSelection
from ._ramp import _RAMPS, ramp_fraction
from ._terms import choose_terms

__all__ = ["TargetSparsity"]

_MEASURES = ("elements", "groups")
_HOLDS = ("freeze", "track")


class TargetSparsity(FinalSelection):
    """Adjusts the strength of prox terms during training so that sparsity follows a ramp to ``target``.

    What it measures: the fraction of exact zeros (``== 0``, counted by
    :func:`sparsecraft.metrics.count_zeros`) over the parameters of the
    controlled terms (``measure="elements"``), or the fraction of all-zero
    groups of their group penalties (``measure="groups"``). Only those
    parameters count: biases or layers without a controlled term do not.

    How: every ``every`` steps it compares the measured density ``d = 1 −
    sparsity`` with the ramp's density ``d* = 1 − s_t`` and moves the common
    strength multiplier ``m`` of the terms in log space::

        e = log(d / d*)                 clipped to [−1, 1]
        v ← c·v + drift·k·e             (the trend of log m, clipped to ±0.5)
        log m ← log m + k·e + v

    Errors in log density weigh 50 % → 51 % like 99 % → 99.02 %. The gain
    ``k`` starts at ``gain``, shrinks by 0.7 whenever the error changes sign
    (down to ``gain/5``) and grows by 5 % while it keeps it: how strongly
    sparsity answers to the strength differs by an order of magnitude between
    models and sparsity levels. ``v`` follows the slow trend the strength must
    have to hold a sparsity while training goes on (in latent mode a weight is
    zero roughly while its mean gradient is below ``λ·m``, and that mean drifts);
    without it the controller lags behind the trend. ``c`` is 0.99, or 0.5 when
    the error disagrees with the trend (the trend overshot).
    Each term's :attr:`~sparsecraft.Term.scale` is its initial scale times
    ``m``; the prox uses step·scale, so a larger ``m`` makes more zeros.
    Before ``start_step`` the terms keep their initial strength; after
    ``end_step`` the target is held.

    Prox modes: in ``"latent"`` mode the zeros are recomputed from a dense
    latent copy at every step, so sparsity answers to ``m`` at once and the
    controller lands on the target within a few elements (docs/control.md). In
    ``"forward_backward"`` mode weights that cross zero flicker in and out of
    the count, so the measured sparsity is noisy and the final value is only
    near the target; :meth:`finalize` then makes it exact from below.

    Args:
        optimizer_or_regularizer: a :class:`~sparsecraft.ProximalOptimizer`,
            or a :class:`~sparsecraft.Regularizer` whose terms a
            ProximalOptimizer applies. Penalties minimised through the loss
            give no exact zeros and are refused.
        target: the sparsity to reach, in (0, 1).
        end_step: the step (count of :meth:`step` calls) where the ramp
            reaches ``target``.
        start_step: where the ramp starts (from ``initial``).
        ramp: ``"cubic"`` (default), ``"linear"``, ``"none"`` or a callable
            (see :func:`ramp_fraction`).
        terms: the terms to control (Term objects, or names/``where`` strings);
            default: every prox term whose penalty makes zeros.
        measure: ``"elements"`` or ``"groups"`` (group penalties only).
        initial: the sparsity the ramp starts from (default 0).
        every: measure and update every this many steps (one host sync each);
            default: about 200 updates over the ramp.
        gain: initial gain ``k`` per update on the log multiplier (> 0).
        drift: gain of the trend term relative to ``k`` (0 turns it off).
        hold: what happens once the ramp reaches ``target`` at ``end_step``.
            ``"freeze"`` (default with a ProximalOptimizer): :meth:`finalize`
            makes the sparsity exact, then the optimizer's zero pattern is
            fixed (:meth:`~sparsecraft.ProximalOptimizer.freeze_support`) and
            the survivors train without shrinkage for the rest of the run (the
            fine-tuning phase of gradual pruning; measured: docs/optim.md).
            ``"track"`` (the only choice on a Regularizer): keep moving the
            strength to hold the target.
        freeze_step: with ``hold="freeze"``, the step at which the zeros are
            fixed (default: ``end_step``); between ``end_step`` and it the
            controller holds the target as with ``"track"``.

    A ProximalOptimizer built with the default ``mode="auto"`` switches to the
    latent mode when the controller is built (the controlled path that measured
    best for SGD and Adam/AdamW).

    Raises:
        ValueError: ``target`` outside (0, 1), a ramp that ends before it
            starts, terms that cannot make zeros, or nothing to control.
        TypeError: on arguments of the wrong type.

    Example:
        >>> opt = ProximalOptimizer(torch.optim.AdamW(model.parameters(), 1e-3), reg)
        >>> ctrl = TargetSparsity(opt, target=0.99, end_step=2 * n_steps // 3)
        >>> for x, y in batches:
        ...     ...; opt.step(); ctrl.step()
        >>> ctrl.finalize()   # exactly 99 % zeros (already so with the default hold="freeze")
    """

    def __init__(
        self,
        optimizer_or_regularizer: ProximalOptimizer | Regularizer,
        target: float,
        end_step: int,
        start_step: int = 0,
        ramp: str | Callable[[float], float] = "cubic",
        terms: Iterable[Term | str] | None = None,
        measure: str = "elements",
        *,
        initial: float = 0.0,
        every: int | None = None,
        gain: float = 0.1,
        drift: float = 0.1,
        hold: str | None = None,
        freeze_step: int | None = None,
    ):
        self.target = _fraction_open("target", target)
        if isinstance(initial, bool) or not isinstance(initial, (int, float)) or not 0 <= initial < 1:
            raise ValueError(f"Expected initial sparsity in [0, 1). Received: initial={initial!r}")
        self.initial = float(initial)
        self.start_step = _int("start_step", start_step, minimum=0)
        self.end_step = _int("end_step", end_step, minimum=0)
        if self.end_step <= self.start_step:
            raise ValueError(
                f"Expected a ramp that ends after it starts (end_step > start_step). "
                f"Received: start_step={self.start_step}, end_step={self.end_step}"
            )
        if not callable(ramp) and ramp not in _RAMPS:
            raise ValueError(f"Expected ramp in {_RAMPS} or a callable. Received: ramp={ramp!r}")
        self.ramp = ramp
        if measure not in _MEASURES:
            raise ValueError(f"Expected measure in {_MEASURES}. Received: measure={measure!r}")
        self.measure = measure
        if every is None:
            every = max(1, round((self.end_step - self.start_step) / 200))
        self.every = _int("every", every, minimum=1)
        for name, v in (("gain", gain), ("drift", drift)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Expected a finite {name} >= 0. Received: {name}={v!r}")
        if gain == 0:
            raise ValueError(f"Expected gain > 0 (the integral part moves the strength). Received: gain={gain}")
        self.gain, self.drift = float(gain), float(drift)

        self._optimizer = optimizer_or_regularizer if isinstance(optimizer_or_regularizer, ProximalOptimizer) \
            else None
        if hold is not None and hold not in _HOLDS:
            raise ValueError(f"Expected hold in {_HOLDS}. Received: hold={hold!r}")
        if hold == "freeze" and self._optimizer is None:
            raise ValueError(
                "Expected a ProximalOptimizer for hold='freeze' (it fixes the optimizer's zeros). "
                "Received: a Regularizer; pass the ProximalOptimizer, or hold='track'"
            )
        self.hold = hold or ("freeze" if self._optimizer is not None else "track")
        self.freeze_step = self.end_step if freeze_step is None else _int("freeze_step", freeze_step,
                                                                           minimum=self.end_step)
        self.terms = choose_terms(optimizer_or_regularizer, terms)
        self._base_scales = [t.scale for t in self.terms]
        self._params = list({id(t.target): t.target for t in self.terms}.values())
        if measure == "groups":
            bad = [t.name for t in self.terms if not hasattr(t.penalty, "layout")]
            if bad:
                raise ValueError(
                    f"Expected group penalties (GroupLasso, SparseGroupLasso) for measure='groups'. "
                    f"Received: {bad} without groups; use measure='elements'"
                )
        self._numel = int(self._measure()[1])
        if self._numel == 0:
            raise ValueError("Expected controlled parameters with at least one element. Received: 0 elements")
        if self._optimizer is not None:
            self._optimizer._steer()  # mode "auto": the latent mode from here on
        self.final_selection: dict[str, float] | None = None

        self._step = 0
        self._log_scale = 0.0
        self._last_error = 0.0
        self._drift = 0.0
        self._gain = self.gain
        self._measured: float | None = None
        self._target_now = self.initial
        self._saturated = False
        self.history: list[dict[str, float]] = []

    # -- measuring ---------------------------------------------------------------------
    @torch.no_grad()
    def _measure(self) -> Tensor:
        """``[zeros, numel]`` (int64, on the parameters' device, no host sync) over what is controlled.

        The one place the controller counts: a distributed caller counts its
        local shards here and all-reduces (SUM) the result.
        """
        if self.measure == "elements":
            counts = count_zeros(self._params, as_tensor=True)
        else:
            # Norms of whole groups, also when a sharded (FSDP2) parameter splits them.
            norms = [_dist.group_norms(t.penalty, t.target) for t in self.terms]
            counts = count_zeros(norms, as_tensor=True)
        # Every rank counts over all ranks, so every rank sets the same strength (sharded
        # parameters: global counts; replicas, DDP: both counts × world size, same ratio).
        zeros, numel = _dist.all_reduce_counts(counts[0], counts[1])
        return torch.stack([zeros, numel])

    def measured(self) -> float:
        """The sparsity now: fraction of exact zeros (or of all-zero groups). One host sync."""
        zeros, numel = self._measure().tolist()
        return zeros / max(numel, 1)

    def target_at(self, step: int) -> float:
        """The ramp's sparsity at ``step``."""
        if step <= self.start_step:
            return self.initial if self.ramp != "none" else self.target
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        return self.initial + (self.target - self.initial) * ramp_fraction(self.ramp, progress)

    @property
    def scale(self) -> float:
        """The multiplier applied to every controlled term's initial scale."""
        return math.exp(self._log_scale)

    @property
    def steps(self) -> int:
        """How many times :meth:`step` has been called."""
        return self._step

    # -- control -----------------------------------------------------------------------
    def step(self) -> None:
        """Call after every optimizer step; measures and updates every ``every`` steps."""
        self._step += 1
        t = self._step
        if self._optimizer is not None and self._optimizer.support_frozen:
            return  # hold="freeze" after end_step: the zeros are fixed, nothing to steer
        if t == self.freeze_step and self.hold == "freeze":
            # Exact count, then a fixed support: the survivors train without shrinkage (and
            # BatchNorm's running statistics follow one network, not a changing one).
            self.final_selection = self.finalize()
            self._optimizer.freeze_support()
            return
        if t < self.start_step or ((t - self.start_step) % self.every and t != self.end_step):
            return
        target_now = self.target_at(t)
        if self._measured is None and target_now > 0:
            self._calibrate(target_now)
        measured = self.measured()
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
                stacklevel=2,
            )
        self._saturated = saturated
        self._log_scale = clipped
        self._last_error = error
        self._measured = measured
        self._target_now = target_now
        self._apply_scale()
        self.history.append(
            {"step": float(t), "target_now": target_now, "measured": measured, "scale": self.scale}
        )

    @torch.no_grad()
    def _calibrate(self, target_now: float) -> None:
        """Latent mode, first update: solve for the multiplier that gives the ramp's sparsity now.

        The starting strength is a guess: on digits with Adam, ``L1(1e-2)`` needed a
        multiplier of 21 to follow the ramp, and the controller, whose steps in log
        density are tiny while sparsity is low, lagged (2.7 % zeros where the ramp
        asked 25.7 %), then pruned 40 % of the weights in 80 steps to catch up. The
        latent copies give the sparsity at any strength without a step (as
        :meth:`finalize` uses them), so the first update sets it exactly.
        """
        view = self._latent_view()
        if view is not None:
            self._finalize_latent(view, round(target_now * self._numel))

    def _apply_scale(self) -> None:
        m = self.scale
        for term, base in zip(self.terms, self._base_scales, strict=True):
            term.scale = base * m

    def record(self) -> dict[str, float]:
        """The state for a per-epoch history: target now, sparsity now (measured afresh), multiplier."""
        return {
            "target_now": self.target_at(self._step),
            "measured": self.measured(),
            "scale": self.scale,
            "saturated": float(self._saturated),
        }

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step count, multiplier, controller memory and settings."""
        return {
            "step": self._step,
            "log_scale": self._log_scale,
            "last_error": self._last_error,
            "gain_now": self._gain,
            "trend": self._drift,
            "measured": self._measured,
            "target_now": self._target_now,
            "saturated": self._saturated,
            "base_scales": list(self._base_scales),
            "config": {"target": self.target, "start_step": self.start_step, "end_step": self.end_step,
                       "initial": self.initial, "measure": self.measure, "every": self.every,
                       "gain": self.gain, "drift": self.drift, "hold": self.hold,
                       "freeze_step": self.freeze_step,
                       "ramp": self.ramp if isinstance(self.ramp, str) else "callable"},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the controlled terms get their scales back."""
        keys = {"step", "log_scale", "last_error", "gain_now", "trend", "measured", "target_now", "saturated", "base_scales",
                "config"}
        if not isinstance(state_dict, dict) or set(state_dict) != keys:
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"Expected a TargetSparsity state_dict with keys {sorted(keys)}. Received: {got}")
        if len(state_dict["base_scales"]) != len(self.terms):
            raise ValueError(
                f"Expected a state_dict for {len(self.terms)} controlled terms. "
                f"Received: one for {len(state_dict['base_scales'])}"
            )
        cfg = state_dict["config"]
        self.target, self.start_step, self.end_step = cfg["target"], cfg["start_step"], cfg["end_step"]
        self.initial, self.every = cfg["initial"], cfg["every"]
        self.gain, self.drift = cfg["gain"], cfg["drift"]
        self.hold = cfg.get("hold", self.hold)
        self.freeze_step = cfg.get("freeze_step", self.freeze_step)
        if cfg["ramp"] != "callable":
            self.ramp = cfg["ramp"]
        self._step = int(state_dict["step"])
        self._log_scale = float(state_dict["log_scale"])
        self._last_error = float(state_dict["last_error"])
        self._gain = float(state_dict["gain_now"])
        self._drift = float(state_dict["trend"])
        self._measured = state_dict["measured"]
        self._target_now = float(state_dict["target_now"])
        self._saturated = bool(state_dict["saturated"])
        self._base_scales = [float(s) for s in state_dict["base_scales"]]
        self._apply_scale()

    def __repr__(self) -> str:
        return (f"TargetSparsity(target={self.target}, {len(self.terms)} terms, measure={self.measure!r}, "
                f"step {self._step}/{self.end_step}, scale={self.scale:.4g})")


def _fraction_open(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"Expected {name} in (0, 1) (a fraction of zeros). Received: {name}={value!r}")
    return float(value)


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected an int {name} >= {minimum}. Received: {name}={value!r}")
    return value
