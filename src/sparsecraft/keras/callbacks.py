"""TargetSparsity for Keras: a requested fraction of exact zeros at the end of ``fit()``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from ._control import LOG_BOUND
from .optimizers import ProximalOptimizer

__all__ = ["TargetSparsity", "find_proximal_optimizer"]

_RAMPS = ("cubic", "linear", "none")


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
    """Moves the strength of the prox terms so that sparsity follows a ramp to ``target``.

    The torch library's feedback law (``sparsecraft.TargetSparsity`` in
    forward–backward mode; in latent mode the torch controller now solves the
    multiplier at every update on the host, which this callback does not), run
    inside the train step by the model's
    :class:`~sparsecraft.keras.optimizers.ProximalOptimizer` (no host sync per
    step, also under ``jit_compile``). It measures the fraction of exact zeros
    of the variables whose regularizer makes zeros; in ``"latent"`` mode those
    hold ``prox(latent)``, so the zeros of the prox are counted, never those of
    the dense latent copy. At the end of training, :meth:`finalize` (run by
    default) makes sparsity equal ``round(target·numel)`` zeros: in latent mode
    by solving the strength multiplier on the latent copies (the λ path), else
    by zeroing the smallest magnitudes.

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
        finalize: run :meth:`finalize` at the end of ``fit()`` (default True).

    Attributes:
        history: one ``{"epoch", "measured", "target_now", "scale"}`` per epoch.
        final: :meth:`finalize`'s result once it ran.

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
        self.config = {"target": float(target), "start_step": start_step, "end_step": end_step,
                       "ramp": ramp, "initial": float(initial), "every": every,
                       "gain": float(gain), "drift": float(drift)}
        self.target = float(target)
        self.run_finalize = bool(finalize)
        self.history: list[dict[str, float]] = []
        self.final: dict[str, float] | None = None

    # -- callback hooks ----------------------------------------------------------------
    def on_train_begin(self, logs: dict | None = None) -> None:
        find_proximal_optimizer(self.model)._control = self.config

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        opt = find_proximal_optimizer(self.model)
        state = opt._control_state
        self.history.append({
            "epoch": float(epoch),
            "measured": float(ops.convert_to_numpy(state["measured"])),
            "target_now": float(ops.convert_to_numpy(state["target_now"])),
            "scale": float(np.exp(ops.convert_to_numpy(opt._log_scale))),
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
        return float(ops.convert_to_numpy(opt.count_zeros())) / max(self._numel(opt), 1)

    @staticmethod
    def _numel(opt: ProximalOptimizer) -> int:
        return sum(n for n, r in zip(opt._numel, opt._regs, strict=True) if r.makes_zeros)

    def finalize(self) -> dict[str, float]:
        """Make sparsity equal ``target`` (``round(target·numel)`` zeros); see the class doc.

        Returns:
            ``{"before", "after", "target", "scale_before", "scale_after", "latent"}``.
        """
        opt = find_proximal_optimizer(self.model)
        ks = [k for k, r in enumerate(opt._regs) if r.makes_zeros]
        variables = [opt._trainable_variables[opt._slots[k]] for k in ks]
        numel = self._numel(opt)
        wanted = round(self.target * numel)
        zeros = sum(int(np.sum(ops.convert_to_numpy(v) == 0)) for v in variables)
        log_scale = float(ops.convert_to_numpy(opt._log_scale))
        result = {"before": zeros / numel, "target": self.target, "scale_before": math.exp(log_scale),
                  "latent": 0.0}
        if zeros != wanted and opt.mode == "latent":
            gammas = [float(ops.convert_to_numpy(opt._gammas[k])) for k in ks]
            if all(g > 0 for g in gammas):
                log_scale = self._solve_latent(opt, ks, variables, gammas, wanted, log_scale)
                result["latent"] = 1.0
                zeros = sum(int(np.sum(ops.convert_to_numpy(v) == 0)) for v in variables)
        if zeros < wanted:
            self._cut_smallest(variables, wanted - zeros)
        after = sum(int(np.sum(ops.convert_to_numpy(v) == 0)) for v in variables)
        result.update(after=after / numel, scale_after=math.exp(log_scale))
        return result

    @staticmethod
    def _solve_latent(opt, ks, variables, gammas, wanted, log_scale) -> float:
        latents = [opt._latents[k] for k in ks]
        regs = [opt._regs[k] for k in ks]

        def prox_all(lm: float) -> tuple[int, list]:
            m = math.exp(lm)
            values = [ops.convert_to_numpy(r.prox(ops.convert_to_tensor(z), g * m))
                      for r, z, g in zip(regs, latents, gammas, strict=True)]
            return sum(int(np.sum(v == 0)) for v in values), values

        # Bracket [lo, hi] with zeros(lo) < wanted <= zeros(hi); zeros grow with the multiplier.
        lo = hi = log_scale
        step = 1.0
        while prox_all(lo)[0] >= wanted and lo > log_scale - 2 * LOG_BOUND:
            lo -= step
            step *= 2
        step = 1.0
        count_hi = prox_all(hi)[0]
        while count_hi < wanted and hi < log_scale + 2 * LOG_BOUND:
            hi += step
            step *= 2
            count_hi = prox_all(hi)[0]
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            c = prox_all(mid)[0]
            if c >= wanted:
                hi, count_hi = mid, c
            else:
                lo = mid
        chosen = hi if count_hi == wanted else lo  # a tie past wanted: stay below, cut the rest
        _, values = prox_all(chosen)
        for v, value in zip(variables, values, strict=True):
            v.assign(value)
        opt._log_scale.assign(chosen)
        return chosen

    @staticmethod
    def _cut_smallest(variables: list, need: int) -> None:
        arrays = [ops.convert_to_numpy(v) for v in variables]
        flat = np.concatenate([np.abs(a).ravel().astype(np.float64) for a in arrays])
        ranked = np.where(flat == 0, np.inf, flat)
        drop = np.zeros(flat.shape, bool)
        drop[np.argpartition(ranked, need - 1)[:need]] = True
        offset = 0
        for v, a in zip(variables, arrays, strict=True):
            mask = drop[offset: offset + a.size].reshape(a.shape)
            offset += a.size
            if mask.any():
                v.assign(np.where(mask, np.zeros_like(a), a))
