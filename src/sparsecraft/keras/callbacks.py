"""TargetSparsity for Keras: a requested fraction of exact zeros, fixed at ``freeze_step`` or at the end of ``fit()``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from . import _display, _fine_tune, _freeze
from .optimizers import ProximalOptimizer

__all__ = ["TargetSparsity", "find_proximal_optimizer"]

_RAMPS = ("cubic", "linear", "none")
_HOLDS = ("freeze", "track")
# With hold="freeze" in latent mode: the share of the ramp's length the target is held, prox
# on, before the zeros are fixed (the torch controller's _HOLD_SHARE, docs/optim.md third round).
_HOLD_SHARE = 0.35


def find_proximal_optimizer(model: keras.Model) -> ProximalOptimizer:
    """The model's ProximalOptimizer, also inside a LossScaleOptimizer (mixed precision)."""
    opt = getattr(model, "optimizer", None)
    while opt is not None and not isinstance(opt, ProximalOptimizer) and hasattr(opt, "inner_optimizer"):
        opt = opt.inner_optimizer
    if not isinstance(opt, ProximalOptimizer):
        raise ValueError(
            "Expected a model compiled with sparsecraft.keras.optimizers.ProximalOptimizer. "
            f"Received: optimizer={type(getattr(model, 'optimizer', None)).__name__}"
        )
    return opt


class TargetSparsity(keras.callbacks.Callback):
    """Moves the strength of the prox terms so that sparsity follows a ramp to ``target``, then holds it.

    The torch library's feedback law (``sparsecraft.TargetSparsity`` in
    forward–backward mode; in latent mode the torch controller now solves the
    multiplier at every update on the host, which this callback does not), run
    inside the train step by the model's
    :class:`~sparsecraft.keras.optimizers.ProximalOptimizer` (no host sync per
    step, also under ``jit_compile``). It measures the fraction of exact zeros
    of the variables whose regularizer makes zeros; in ``"latent"`` mode those
    hold ``prox(latent)`` or its relaxed display (the optimizer's ``relaxed``;
    the same count per variable), so the zeros of the prox are counted, never
    those of the dense latent copy. With ``relaxed=None`` the callback turns the
    relaxed display on for adaptive optimizers, as the torch controller does.

    The exact count, ``round(target·numel)`` zeros, is made by a selection: in
    latent mode the strength multiplier is solved on the latent copies (the λ
    path, bisection in log space), then what ties remain are cut by magnitude;
    in forward–backward mode the smallest magnitudes are cut. With
    ``hold="freeze"`` it runs inside the train step at ``freeze_step``, which
    then fixes the support: the zeros stay exactly zero and the survivors train
    without the penalty for the rest of the run
    (:meth:`~sparsecraft.keras.optimizers.ProximalOptimizer.freeze_support`).
    With ``hold="track"`` the controller holds the target to the end of
    ``fit()``, where :meth:`finalize` makes the selection.

    Args:
        target: the sparsity to reach, in (0, 1).
        end_step: the optimizer step where the ramp reaches ``target``.
        start_step: where the ramp starts (from ``initial``).
        ramp: ``"cubic"`` (default), ``"linear"``, ``"none"``, or a callable of
            the progress ``p`` (a keras tensor in [0, 1]) written with ``keras.ops``.
        initial: the sparsity the ramp starts from (default 0).
        every: update every this many steps (default: about 200 updates over the ramp).
        gain: initial gain on the log multiplier (default 0.1).
        drift: gain of the trend term relative to the gain (default 0.1).
        finalize: run :meth:`finalize` at the end of ``fit()`` (default True;
            after a freeze it changes nothing and reports the freeze's selection).
        hold: ``"freeze"`` (default) or ``"track"``, as in the torch controller.
        freeze_step: with ``hold="freeze"``, the optimizer step after which the
            zeros are fixed (>= ``end_step``). Default, set at the start of
            ``fit()``: in latent mode ``end_step + round(0.35·(end_step −
            start_step))`` (a ramp over the first 2/3 of a run freezes at 0.9 of
            it), ``end_step`` in forward–backward mode (its zeros cannot come back
            at the selection) and on a model with BatchNormalization — the torch
            controller's defaults. A run that ends before it is finalized at the
            end of ``fit()``, as with ``"track"``.
        average: with ``hold="freeze"``, keep the average of every trainable
            variable over the steps after the freeze (the k-th step after it
            weighs k) and let :meth:`finalize` set the model to it at the end of
            ``fit()``; the zeros stay zero. Default (None, set at the start of
            ``fit()``): on in latent mode on a model without BatchNormalization
            (whose running statistics belong to the last weights). One float32
            copy of the trainable variables (optimizer variables), made only where on.
        fine_tune_scale: with ``hold="freeze"``, the multiplier of the inner
            optimizer's learning rate inside each step after the freeze (the
            user's rate or schedule is not changed). Default (None):
            ``1/sqrt(1 − target)`` for Adam, AdamW, Adagrad and RMSprop where
            ``average`` defaults to on, 1 elsewhere (SGD included). Both are the
            torch controller's, with its defaults (measured there: docs/optim.md,
            fifth and sixth rounds; here: docs/keras.md).

    Attributes:
        history: one ``{"epoch", "measured", "target_now", "scale", "frozen"}`` per epoch.
        final: :meth:`finalize`'s result once it ran.

    Raises:
        ValueError: a bad argument (each message names what it expected).

    Pass it to the ``fit()`` call that trains after ``compile()`` (the train
    step reads its settings when it is traced).
    """

    def __init__(
        self,
        target: float,
        end_step: int,
        start_step: int = 0,
        ramp: str | Callable[[Any], Any] = "cubic",
        *,
        initial: float = 0.0,
        every: int | None = None,
        gain: float = 0.1,
        drift: float = 0.1,
        finalize: bool = True,
        hold: str = "freeze",
        freeze_step: int | None = None,
        average: bool | None = None,
        fine_tune_scale: float | None = None,
    ):
        super().__init__()
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
            raise ValueError(f"Expected target in (0, 1) (a fraction of zeros). Received: target={target!r}")
        for name, v, lo in (("start_step", start_step, 0), ("end_step", end_step, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"Expected an int {name} >= {lo}. Received: {name}={v!r}")
        if end_step <= start_step:
            raise ValueError(
                f"Expected a ramp that ends after it starts (end_step > start_step). "
                f"Received: start_step={start_step}, end_step={end_step}"
            )
        if not callable(ramp) and ramp not in _RAMPS:
            raise ValueError(f"Expected ramp in {_RAMPS} or a callable. Received: ramp={ramp!r}")
        if isinstance(initial, bool) or not isinstance(initial, (int, float)) or not 0 <= initial < 1:
            raise ValueError(f"Expected initial sparsity in [0, 1). Received: initial={initial!r}")
        if every is None:
            every = max(1, round((end_step - start_step) / 200))
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Expected an int every >= 1. Received: every={every!r}")
        for name, v in (("gain", gain), ("drift", drift)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Expected a finite {name} >= 0. Received: {name}={v!r}")
        if gain == 0:
            raise ValueError(f"Expected gain > 0 (the integral part moves the strength). Received: gain={gain}")
        if hold not in _HOLDS:
            raise ValueError(f"Expected hold in {_HOLDS}. Received: hold={hold!r}")
        if freeze_step is not None:
            if hold != "freeze":
                raise ValueError(
                    f"Expected freeze_step only with hold='freeze' (the step where the zeros are fixed). "
                    f"Received: hold={hold!r}, freeze_step={freeze_step!r}"
                )
            if isinstance(freeze_step, bool) or not isinstance(freeze_step, int) or freeze_step < end_step:
                raise ValueError(
                    f"Expected an int freeze_step >= end_step={end_step} (the target is reached first). "
                    f"Received: freeze_step={freeze_step!r}"
                )
        if average is not None and not isinstance(average, bool):
            raise ValueError(f"Expected average to be a bool or None. Received: average={average!r}")
        if fine_tune_scale is not None and (
                isinstance(fine_tune_scale, bool) or not isinstance(fine_tune_scale, (int, float))
                or not math.isfinite(fine_tune_scale) or fine_tune_scale <= 0):
            raise ValueError(
                f"Expected fine_tune_scale as a finite number > 0 or None. Received: fine_tune_scale={fine_tune_scale!r}"
            )
        for name, v, off in (("average", average, False), ("fine_tune_scale", fine_tune_scale, 1.0)):
            if v not in (None, off) and hold != "freeze":
                raise ValueError(
                    f"Expected hold='freeze' for {name}={v!r} (it acts on the fine-tuning after the zeros "
                    f"are fixed). Received: hold={hold!r}"
                )
        self.config = {"target": float(target), "start_step": start_step, "end_step": end_step,
                       "ramp": ramp, "initial": float(initial), "every": every,
                       "gain": float(gain), "drift": float(drift), "hold": hold, "freeze_step": freeze_step}
        self.target = float(target)
        self.hold = hold
        self.freeze_step = freeze_step  # None: resolved at the start of fit() (the optimizer's mode)
        self._requested = (average, None if fine_tune_scale is None else float(fine_tune_scale))
        self.average = average  # None: resolved at the start of fit(), as the two below
        self.fine_tune_scale = self._requested[1]
        self.run_finalize = bool(finalize)
        self.history: list[dict[str, float]] = []
        self.final: dict[str, float] | None = None

    def _default_freeze_step(self, model: keras.Model, opt: ProximalOptimizer) -> int:
        """Latent mode: ``end_step`` plus 35 % of the ramp; ``end_step`` in forward–backward mode or with BatchNorm.

        The torch controller's rule (``TargetSparsity._default_freeze_step``, measured
        in docs/optim.md, third round): holding the target with the prox on before
        fixing the zeros helped the latent mode, except on a model with BatchNorm.
        """
        end, start = self.config["end_step"], self.config["start_step"]
        if opt.mode != "latent" or _has_batchnorm(model):
            return end
        return end + round(_HOLD_SHARE * (end - start))

    # -- callback hooks ----------------------------------------------------------------
    def on_train_begin(self, logs: dict | None = None) -> None:
        opt = find_proximal_optimizer(self.model)
        if self.hold == "freeze" and self.config["freeze_step"] is None:
            self.freeze_step = self._default_freeze_step(self.model, opt)
        self.config["freeze_step"] = self.freeze_step
        average, scale = _fine_tune.defaults(opt, self.hold, self.target, _has_batchnorm(self.model))
        self.average = average if self._requested[0] is None else self._requested[0]
        self.fine_tune_scale = scale if self._requested[1] is None else self._requested[1]
        self.config["average"], self.config["fine_tune_scale"] = self.average, self.fine_tune_scale
        if self.average and opt.built:
            _fine_tune.create_average(opt)  # else at build, which reads opt._control
        opt._host_step = None  # eager torch: the host's step count and flag are read again at the first step
        opt._host_frozen = None
        # relaxed=None: SGD's display is relaxed on a sequence model without BatchNorm (torch's rule).
        opt._unshrunk_model = _display.sequence_model(_layers(self.model)) and not _has_batchnorm(self.model)
        opt._control = self.config

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        opt = find_proximal_optimizer(self.model)
        state = opt._control_state
        self.history.append({
            "epoch": float(epoch),
            "measured": float(ops.convert_to_numpy(state["measured"])),
            "target_now": float(ops.convert_to_numpy(state["target_now"])),
            "scale": float(np.exp(ops.convert_to_numpy(opt._log_scale))),
            "frozen": float(ops.convert_to_numpy(opt._frozen)),
        })
        if logs is not None:
            logs["sparsity"] = self.history[-1]["measured"]

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.run_finalize:
            self.final = self.finalize()

    # -- final selection ---------------------------------------------------------------
    def measured(self) -> float:
        """The sparsity now: exact zeros over the controlled variables (one host sync)."""
        opt = find_proximal_optimizer(self.model)
        return float(ops.convert_to_numpy(opt.count_zeros())) / max(_freeze.numel(opt), 1)

    def finalize(self) -> dict[str, float]:
        """Make sparsity equal ``target`` (``round(target·numel)`` zeros); see the class doc.

        With the support already fixed (``hold="freeze"`` after ``freeze_step``,
        or ``freeze_support()``) it changes the zeros no more: with ``average``
        it sets the model to the average of its weights since the freeze (and
        starts that average over), then reports the freeze's selection
        (``before``, ``scale_before``, ``latent``, ``frozen_at``) and the
        sparsity now (``after``).

        Returns:
            ``{"before", "after", "target", "scale_before", "scale_after", "latent", "frozen_at",
            "averaged"}`` (``frozen_at``: the step of the freeze, -1 without one;
            ``averaged``: how many steps after the freeze the written average held, 0 without one).
        """
        opt = find_proximal_optimizer(self.model)
        if not opt.built or _freeze.numel(opt) == 0:
            raise ValueError(
                "Expected a trained model with a variable whose regularizer makes zeros (L1, L1L2, "
                f"GroupLasso). Received: {_freeze.numel(opt) if opt.built else 0} such elements"
            )
        scalar = lambda v: float(ops.convert_to_numpy(v))  # noqa: E731
        if opt.support_frozen:
            averaged = _fine_tune.write_average(opt) if self.average else 0
            return {"before": scalar(opt._before_freeze), "after": self.measured(), "target": self.target,
                    "scale_before": scalar(opt._scale_before_freeze), "scale_after": scalar(opt.strength_scale()),
                    "latent": scalar(opt._latent_freeze), "frozen_at": scalar(opt._frozen_at),
                    "averaged": float(averaged)}
        scale_before = scalar(opt.strength_scale())
        chosen = _freeze.select(opt, self.target)
        for k, value in zip(_freeze.zero_making(opt), chosen["values"], strict=True):
            opt._trainable_variables[opt._slots[k]].assign(value)
        opt._log_scale.assign(chosen["log_scale"])
        return {"before": scalar(chosen["before"]), "after": scalar(chosen["after"]), "target": self.target,
                "scale_before": scale_before, "scale_after": scalar(opt.strength_scale()),
                "latent": scalar(chosen["latent"]), "frozen_at": -1.0, "averaged": 0.0}


def _layers(model: keras.Model) -> list:
    """Every layer of ``model``, nested models included."""
    out = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        out.extend(_layers(layer))
    return out


def _has_batchnorm(model: keras.Model) -> bool:
    return any(isinstance(layer, keras.layers.BatchNormalization) for layer in _layers(model))
