"""Reach a requested sparsity in one training run: feedback on penalty strengths.

:class:`TargetSparsity` measures the fraction of exact zeros of the parameters
its prox terms apply to and moves the terms' strength multiplier
(:attr:`~sparsecraft.Term.scale`) until that fraction follows a ramp to the
target, then holds it. The zeros come from the prox of the penalty itself (the
λ path), not from a mask, so it serves every penalty whose prox makes zeros,
group lasso included. :func:`path` is the other way to choose a strength:
train over a list of strengths and look at the accuracy–sparsity trade-off.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed as _dist
from . import functional as F
from . import penalties as _penalties
from .metrics import count_zeros
from .optim import ProximalOptimizer
from .regularizer import Regularizer, Term

__all__ = ["TargetSparsity", "ramp_fraction", "path", "PathResult", "PathRow"]

_RAMPS = ("cubic", "linear", "none")
_MEASURES = ("elements", "groups")
# log(scale) is kept within ±_LOG_BOUND of its start: far enough for any real
# strength, near enough that a target the terms cannot reach stops growing it.
_LOG_BOUND = math.log(1e8)


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


def _probe_makes_zeros(term: Term) -> bool:
    """Whether the term's prox zeros an all-ones tensor of its shape at a huge step.

    ``makes_zeros`` is a class property; a strength of 0 (``L1(0)``,
    ``L1L2(l1=0, l2=…)``) makes none, whatever the multiplier. float64, so
    that an L2 shrink by 1/(1 + 2·t·l2) cannot underflow to a false zero.
    """
    if not (term.penalty.proximable and term.penalty.makes_zeros):
        return False
    ones = torch.ones(term.target.shape, dtype=torch.float64)
    return bool((term.penalty.prox(ones, 1e30) == 0).any())


class TargetSparsity:
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

    Raises:
        ValueError: ``target`` outside (0, 1), a ramp that ends before it
            starts, terms that cannot make zeros, or nothing to control.
        TypeError: on arguments of the wrong type.

    Example:
        >>> opt = ProximalOptimizer(torch.optim.SGD(model.parameters(), 0.05), reg, mode="latent")
        >>> ctrl = TargetSparsity(opt, target=0.99, end_step=2 * n_steps // 3)
        >>> for x, y in batches:
        ...     ...; opt.step(); ctrl.step()
        >>> ctrl.finalize()   # optional: exactly 99 % zeros
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
        self.terms = self._choose_terms(optimizer_or_regularizer, terms)
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

        self._step = 0
        self._log_scale = 0.0
        self._last_error = 0.0
        self._drift = 0.0
        self._gain = self.gain
        self._measured: float | None = None
        self._target_now = self.initial
        self._saturated = False
        self.history: list[dict[str, float]] = []

    # -- choosing terms ----------------------------------------------------------------
    @staticmethod
    def _choose_terms(source: Any, terms: Iterable[Term | str] | None) -> list[Term]:
        if isinstance(source, ProximalOptimizer):
            reg = source.regularizer
            owned = {id(p) for g in source.param_groups for p in g["params"]}
            candidates = [t for t in reg.terms if t.prox and t.kind == "weight" and id(t.target) in owned]
        elif isinstance(source, Regularizer):
            reg = source
            candidates = [t for t in reg.terms if t.prox and t.kind == "weight"]
        else:
            raise TypeError(
                "Expected a sparsecraft.ProximalOptimizer or a Regularizer. "
                f"Received: {type(source).__name__}"
            )
        in_loss = [t.name for t in reg.terms if not t.prox]
        if terms is None:
            chosen = [t for t in candidates if _probe_makes_zeros(t)]
            if not chosen:
                why = []
                if in_loss:
                    why.append(
                        f"{in_loss} are minimised through the loss, which makes weights small but never "
                        f"exactly zero (wrap the optimizer: ProximalOptimizer(opt, reg))"
                    )
                no_zero = [f"{t.name} ({t.penalty.formula()})" for t in candidates]
                if no_zero:
                    why.append(f"the prox of {no_zero} makes no zeros (L2 only shrinks; a strength of 0 "
                               f"does nothing)")
                raise ValueError(
                    "Expected prox terms whose penalty makes exact zeros (L1, L1L2 with l1 > 0, L0, MCP, "
                    f"GroupLasso, SparseGroupLasso). Received: {'; '.join(why) or 'no terms'}; "
                    "no strength can reach a target sparsity"
                )
            return chosen
        chosen = []
        for item in terms:
            if isinstance(item, Term):
                matches = [t for t in reg.terms if t is item]
            elif isinstance(item, str):
                matches = [t for t in reg.terms if item in (t.name, t.where)]
            else:
                raise TypeError(f"Expected Term objects or term names. Received: {type(item).__name__}")
            if not matches:
                raise ValueError(
                    f"Expected terms of the regularizer. Received: {item!r}; its terms are "
                    f"{[t.name for t in reg.terms]}"
                )
            for t in matches:
                if t not in candidates:
                    raise ValueError(
                        f"Expected terms applied by a ProximalOptimizer (exact zeros). Received: {t.name} is "
                        f"minimised through the loss, which makes weights small but never exactly zero"
                    )
                if not _probe_makes_zeros(t):
                    raise ValueError(
                        f"Expected terms whose prox makes exact zeros. Received: {t.name} with "
                        f"{t.penalty.formula()}, which only shrinks; no strength reaches a target sparsity"
                    )
                if t not in chosen:
                    chosen.append(t)
        if not chosen:
            raise ValueError("Expected at least one term to control. Received: terms=[]")
        return chosen

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
        if t < self.start_step or ((t - self.start_step) % self.every and t != self.end_step):
            return
        target_now = self.target_at(t)
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

    # -- final selection ---------------------------------------------------------------
    def _units(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """What is counted, per controlled tensor: magnitudes (elements) or group norms (groups)."""
        if self.measure == "elements":
            return [t.detach().abs().flatten() for t in tensors]
        out = []
        for term, t in zip(self.terms, tensors, strict=True):
            lay = term.penalty.layout(t)
            out.append(F.group_norms(t.detach(), lay.dim, lay.index, lay.n_groups))
        return out

    def _owners(self) -> list[Tensor]:
        return self._params if self.measure == "elements" else [t.target for t in self.terms]

    def _latent_view(self) -> list[tuple[Term, Tensor, float, float]] | None:
        """(term, latent copy, accumulated step γ, group scale) per term in latent mode, else None."""
        opt = self._optimizer
        if opt is None or opt.mode != "latent":
            return None
        # ProximalOptimizer keeps the latent copies and γ privately; they are read, never written.
        latent, gamma = opt._latent, opt._gamma
        group_scale = {id(p): float(g.get("penalty_scale", 1.0)) for g in opt.param_groups for p in g["params"]}
        view = []
        for t in self.terms:
            if t.target not in latent or gamma.get(t.target, 0.0) <= 0:
                return None
            view.append((t, latent[t.target], gamma[t.target], group_scale.get(id(t.target), 1.0)))
        return view

    def _latent_zeros(self, view, m: float) -> tuple[int, list[Tensor]]:
        values = [term.penalty.prox(z, gamma * base * m * gs)
                  for (term, z, gamma, gs), base in zip(view, self._base_scales, strict=True)]
        return sum(int((u == 0).sum()) for u in self._units(values)), values

    @torch.no_grad()
    def finalize(self) -> dict[str, float]:
        """Exact final selection: make sparsity equal ``target`` (``round(target·numel)`` zeros).

        In latent mode (a controller built on the ProximalOptimizer) it is the
        λ path itself: the strength multiplier ``m`` is solved (bisection in
        log space) so that ``prox(latent, γ·λ·m)`` has exactly the wanted
        number of zeros, and the parameters are set to that prox; this works
        both ways (zeros above the target come back from the latent copy) and
        leaves the model what the prox optimizer would show at that strength.
        Elsewhere (forward–backward mode), or for what ties leave over, the
        smallest non-zero magnitudes over all controlled parameters are set to
        zero (one global ranking; with ``measure="groups"`` the smallest-norm
        groups); zeros above the target are then left as they are. Call it
        once training is over.

        Returns:
            ``{"before", "after", "target", "zeroed", "revived", "largest_zeroed", "excess",
            "scale_before", "scale_after", "latent"}``: sparsity before and
            after, elements (or groups) set to zero and brought back, the
            largest magnitude (or group norm) set to zero, zeros left above the
            target, the multiplier before and after, and 1.0 if the latent
            path was used.
        """
        owners = self._owners()
        before_units = self._units(owners)
        zero_before = [u == 0 for u in before_units]
        numel = sum(u.numel() for u in before_units)
        zeros = sum(int(z.sum()) for z in zero_before)
        wanted = round(self.target * numel)
        scale_before = self.scale
        result = {"before": zeros / numel, "target": self.target, "scale_before": scale_before, "latent": 0.0}
        if zeros != wanted:
            view = self._latent_view()
            if view is not None:
                zeros = self._finalize_latent(view, wanted)
                result["latent"] = 1.0
            if zeros < wanted:
                self._cut_smallest(wanted - zeros)
        after_units = self._units(owners)
        zeroed = [(a == 0) & ~z for a, z in zip(after_units, zero_before, strict=True)]
        revived = [(a != 0) & z for a, z in zip(after_units, zero_before, strict=True)]
        removed = [b[m] for b, m in zip(before_units, zeroed, strict=True) if bool(m.any())]
        zeros_after = sum(int((a == 0).sum()) for a in after_units)
        result.update(after=zeros_after / numel, zeroed=float(sum(int(m.sum()) for m in zeroed)),
                      revived=float(sum(int(m.sum()) for m in revived)),
                      largest_zeroed=float(torch.cat(removed).max()) if removed else 0.0,
                      excess=float(max(zeros_after - wanted, 0)), scale_after=self.scale)
        return result

    def _finalize_latent(self, view, wanted: int) -> int:
        """Set the multiplier whose prox of the latent copies has ``wanted`` zeros (or the most below)."""
        lo = hi = self._log_scale
        count, _ = self._latent_zeros(view, math.exp(lo))
        # Bracket: [lo, hi] with zeros(lo) < wanted <= zeros(hi); zeros grow with the multiplier.
        step = 1.0
        while count >= wanted and lo > self._log_scale - 2 * _LOG_BOUND:
            lo -= step
            step *= 2
            count, _ = self._latent_zeros(view, math.exp(lo))
        step = 1.0
        count_hi, _ = self._latent_zeros(view, math.exp(hi))
        while count_hi < wanted and hi < self._log_scale + 2 * _LOG_BOUND:
            hi += step
            step *= 2
            count_hi, _ = self._latent_zeros(view, math.exp(hi))
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            c, _ = self._latent_zeros(view, math.exp(mid))
            if c >= wanted:
                hi, count_hi = mid, c
            else:
                lo = mid
        chosen = hi if count_hi == wanted else lo  # a tie that jumps past wanted: stay below, cut the rest
        count, values = self._latent_zeros(view, math.exp(chosen))
        for (term, *_rest), v in zip(view, values, strict=True):
            term.target.copy_(v)
        self._log_scale = chosen
        self._apply_scale()
        return count

    def _cut_smallest(self, need: int) -> None:
        owners = self._owners()
        values = self._units(owners)
        flat = torch.cat([v.float().to(values[0].device) for v in values])
        ranked = torch.where(flat == 0, torch.full_like(flat, math.inf), flat)
        drop = torch.zeros_like(flat, dtype=torch.bool)
        drop[torch.topk(ranked, need, largest=False).indices] = True
        offset = 0
        for i, (p, v) in enumerate(zip(owners, values, strict=True)):
            mask = drop[offset: offset + v.numel()].to(p.device)
            offset += v.numel()
            if self.measure == "elements":
                p.masked_fill_(mask.view_as(p), 0.0)
            else:
                lay = self.terms[i].penalty.layout(p)
                per_slice = mask[lay.index] if lay.index is not None else mask
                view = [1] * p.ndim
                view[lay.dim] = -1
                p.masked_fill_(per_slice.view(view).expand_as(p), 0.0)

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
                       "gain": self.gain, "drift": self.drift,
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


# --------------------------------------------------------------------------- regularization path


@dataclass
class PathRow:
    """One strength of a regularization path, measured after its training."""

    strength: float
    accuracy: float
    sparsity: float
    loss: float
    nonzero: int
    seconds: float


@dataclass
class PathResult:
    """A regularization path: one :class:`PathRow` per strength, in training order.

    ``accuracy`` is the test accuracy (negative test MSE for regression),
    ``sparsity`` the fraction of exact zeros over the penalised parameters,
    ``loss`` the mean training loss of the last epoch (data loss; prox terms
    are not in it), ``nonzero`` the non-zero count of the penalised parameters.
    """

    rows: list[PathRow]
    penalty: str
    config: dict[str, Any] = field(default_factory=dict)

    def pareto(self) -> list[PathRow]:
        """The rows no other row beats on both accuracy and sparsity, by increasing sparsity."""
        front = [
            r for r in self.rows
            if not any((o.accuracy >= r.accuracy and o.sparsity >= r.sparsity)
                       and (o.accuracy > r.accuracy or o.sparsity > r.sparsity) for o in self.rows)
        ]
        return sorted(front, key=lambda r: (r.sparsity, -r.accuracy))

    def curve(self) -> list[tuple[float, float]]:
        """``(sparsity, accuracy)`` of every row, the input of :func:`sparsecraft.report.plot_pareto`."""
        return [(r.sparsity, r.accuracy) for r in self.rows]

    def table(self) -> Any:
        """A ``rich.table.Table`` of the rows (built, never printed); ``*`` marks the Pareto front."""
        from ._table import rich_table

        front = {id(r) for r in self.pareto()}
        cells = [[f"{r.strength:.4g}", f"{100 * r.accuracy:.2f} %", f"{100 * r.sparsity:.3f} %",
                  f"{r.loss:.4g}", str(r.nonzero), f"{r.seconds:.1f}", "*" if id(r) in front else ""]
                 for r in self.rows]
        return rich_table(f"regularization path ({self.penalty})",
                          ("strength", "accuracy", "sparsity", "loss", "non-zeros", "s", "pareto"), cells)

    def to_dict(self) -> dict[str, Any]:
        front = {id(r) for r in self.pareto()}
        return {"penalty": self.penalty, "config": dict(self.config),
                "rows": [{**asdict(r), "pareto": id(r) in front} for r in self.rows]}


def _penalty_for(penalty: str | Callable[[float], Any], strength: float) -> Any:
    if callable(penalty):
        return _penalties.get(penalty(strength))
    if not isinstance(penalty, str) or ":" in penalty:
        raise ValueError(
            f"Expected a penalty name (e.g. 'l1', 'group_lasso') or a callable strength -> Penalty. "
            f"Received: penalty={penalty!r}"
        )
    return _penalties.get(f"{penalty}:{strength!r}")


def path(
    make_model: Callable[[], nn.Module],
    data: Any,
    strengths: Sequence[float],
    *,
    epochs: int,
    optimizer: str = "sgd",
    lr: float | None = None,
    penalty: str | Callable[[float], Any] = "l1",
    params: Callable[[str, Tensor], bool] | None = None,
    warm_start: bool = True,
    mode: str = "latent",
    batch_size: int = 64,
    seed: int = 0,
    on_step: Callable[[int, PathRow], None] | None = None,
) -> PathResult:
    """Train over a list of strengths and record accuracy, sparsity and loss for each.

    Each strength trains ``epochs`` epochs with the penalty applied by a
    :class:`~sparsecraft.ProximalOptimizer` (exact zeros) through
    :func:`sparsecraft.experiments.train`. With ``warm_start`` one model is
    built and each strength starts from the previous strength's result (pass
    increasing strengths to go from dense to sparse, the usual continuation);
    otherwise ``make_model()`` builds a fresh model per strength (seed it
    inside ``make_model`` for comparable starts). Each strength gets a fresh
    optimizer.

    Args:
        make_model: builds the model (no arguments).
        data: a :class:`sparsecraft.datasets.Split`.
        strengths: the strengths, trained in this order (finite, >= 0).
        epochs: epochs per strength.
        optimizer: ``"sgd"`` (momentum 0.9, lr 0.05) or ``"adam"`` (lr 1e-3).
        lr: learning rate instead of the optimizer's default.
        penalty: a penalty name whose first field is its strength (``"l1"``,
            ``"group_lasso"``, ``"l0"``, ``"mcp"``) or a callable
            ``strength -> Penalty``.
        params: which parameters to penalise, ``(name, parameter) -> bool``;
            default: those with ``ndim >= 2`` (weight matrices and kernels).
        warm_start: continue from the previous strength's weights.
        mode: the prox mode, ``"latent"`` or ``"forward_backward"``.
        batch_size: minibatch size.
        seed: seed of the minibatch order.
        on_step: called as ``on_step(index, row)`` after each strength.

    Returns:
        A :class:`PathResult`; ``.pareto()`` gives the accuracy–sparsity front.

    Raises:
        ValueError: on an empty or invalid list of strengths, an unknown
            penalty or optimizer, or when no parameter is selected.
    """
    from . import experiments as _exp  # experiments imports this module: import at call time

    strengths = [float(_penalties.check_strength("strengths", s)) for s in strengths]
    if not strengths:
        raise ValueError("Expected at least one strength. Received: strengths=[]")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"Expected an int epochs >= 1. Received: epochs={epochs!r}")
    select = params if params is not None else (lambda name, p: p.ndim >= 2)
    spec = penalty if isinstance(penalty, str) else getattr(penalty, "__name__", "callable")
    rows: list[PathRow] = []
    model = make_model() if warm_start else None
    for i, strength in enumerate(strengths):
        t0 = time.perf_counter()
        if not warm_start:
            model = make_model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected make_model() to return an nn.Module. Received: {type(model).__name__}")
        chosen = [p for n, p in model.named_parameters() if select(n, p)]
        if not chosen:
            raise ValueError("Expected params to select at least one parameter. Received: none selected")
        reg = Regularizer(model)
        pen = _penalty_for(penalty, strength)
        for p in chosen:
            reg.add_weight(p, pen)
        opt = ProximalOptimizer(_exp.make_optimizer(optimizer, model.parameters(), lr), reg, mode=mode)
        history = _exp.train(model, data, opt, epochs=epochs, batch_size=batch_size, regularizer=reg,
                             seed=seed)
        zeros, numel = count_zeros(chosen)
        row = PathRow(strength=strength, accuracy=_exp.evaluate(model, data), sparsity=zeros / numel,
                      loss=float(history[-1]["loss"]), nonzero=numel - zeros,
                      seconds=time.perf_counter() - t0)
        reg.remove()
        rows.append(row)
        if on_step is not None:
            on_step(i, row)
    config = {"epochs": epochs, "optimizer": optimizer, "lr": lr, "mode": mode, "warm_start": warm_start,
              "batch_size": batch_size, "seed": seed}
    return PathResult(rows=rows, penalty=spec, config=config)
