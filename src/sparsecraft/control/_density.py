"""No dead tensor: the per-tensor minimum density of a :class:`~sparsecraft.control.TargetSparsity`.

A global target counts zeros over all controlled tensors together, so one
tensor can end with no non-zero at all (a layer that passes nothing on: the
model is dead while the count is right). :class:`DensityFloor` warns once
per tensor when that happens, and with ``min_density > 0`` keeps at least
``ceil(min_density · units)`` non-zero units in every controlled tensor, as
pruning tools offer (e.g. a per-layer minimum, or a sparsity cap per layer as in
torch.ao's ``WeightNormSparsifier`` configs). In latent mode that is a cap on
each term's strength multiplier: the largest ``m`` at which
``prox(latent, γ·λ·m)`` keeps the minimum (found by bisection, as the λ path
of :meth:`finalize`); in forward–backward mode the tensor's own strength is
halved at every update while it is below its minimum.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import distributed as _dist
from ..optim import ProximalOptimizer
from ..optim._prox_step import _apply_prox
from ..regularizer import Term

# log(scale) is kept within ±_LOG_BOUND of its start: far enough for any real
# strength, near enough that a target the terms cannot reach stops growing it.
_LOG_BOUND = math.log(1e8)


class DensityFloor:
    """Per-tensor minimum density and dead-tensor warnings (a base class of the controller).

    It reads the controller's state (declared below) and writes only the
    per-term caps and offsets on the strength multiplier.
    """

    terms: list[Term]
    measure: str
    min_density: float
    every: int
    scale: float
    _params: list[Tensor]
    _optimizer: ProximalOptimizer | None
    _base_scales: list[float]
    _log_scale: float
    _term_caps: list[float | None]
    _term_offsets: list[float]
    _dead: set[int]
    _measured: float | None
    _apply_scale: Callable[[], None]

    def _owners(self) -> list[Tensor]:
        """The tensors counted: unique parameters (elements) or each term's target (groups)."""
        return self._params if self.measure == "elements" else [t.target for t in self.terms]

    def _owner_names(self) -> list[str]:
        if self.measure == "groups":
            return [t.where for t in self.terms]
        return [next(t.where for t in self.terms if t.target is p) for p in self._params]

    def _term_owner(self) -> list[int]:
        """Index of each term's tensor among :meth:`_owners`."""
        if self.measure == "groups":
            return list(range(len(self.terms)))
        ids = [id(p) for p in self._params]
        return [ids.index(id(t.target)) for t in self.terms]

    def _keep(self, sizes: Sequence[int]) -> list[int]:
        """Non-zero units each tensor keeps: ``ceil(min_density · units)`` (0 when off)."""
        if self.min_density <= 0:
            return [0] * len(sizes)
        # The product is rounded first: 0.1 * 30 is 3.0000000000000004 in floats.
        return [math.ceil(round(self.min_density * n, 9)) for n in sizes]

    # -- dead tensors ----------------------------------------------------------------------
    def _check_dead(self, zeros: Sequence[int], sizes: Sequence[int], when: str) -> None:
        """Warn once per tensor that has become all zero."""
        names = self._owner_names()
        for i, (z, n) in enumerate(zip(zeros, sizes, strict=True)):
            if n > 0 and z == n and i not in self._dead:
                self._dead.add(i)
                unit = "elements" if self.measure == "elements" else "groups"
                warnings.warn(
                    f"TargetSparsity: {names[i]} is all zero ({n} {unit}) at {when}: the layer it "
                    f"belongs to passes nothing on, whatever the overall sparsity says; pass "
                    f"min_density= (e.g. 0.01) to keep a share of every tensor",
                    UserWarning,
                    stacklevel=3,
                )

    # -- latent mode -----------------------------------------------------------------------
    def _latent_view(self, ahead: int = 0) -> list[tuple[Term, Tensor, float, float]] | None:
        """(term, latent copy, accumulated step γ, group scale) per term in latent mode, else None.

        Args:
            ahead: steps to look ahead: γ is taken as it will be after that many more
                steps at the group's current ``lr`` (the latent copies as they are now).
        """
        opt = self._optimizer
        if opt is None or opt.mode != "latent" or opt.support_frozen:
            return None  # a frozen support (hold="freeze") is no longer the prox of the latent
        if len({id(t.target) for t in self.terms}) != len(self.terms):
            return None  # two terms on one tensor: prox(latent) of each alone is not the weight
        # ProximalOptimizer keeps the latent copies and γ privately; they are read, never written.
        latent, gamma = opt._latent, opt._gamma
        group_scale = {id(p): float(g.get("penalty_scale", 1.0)) for g in opt.param_groups for p in g["params"]}
        lr = {id(p): float(g["lr"]) for g in opt.param_groups for p in g["params"]} if ahead else {}
        view = []
        for t in self.terms:
            if t.target not in latent or gamma.get(t.target, 0.0) <= 0:
                return None
            step = gamma[t.target] + ahead * lr.get(id(t.target), 0.0)
            view.append((t, latent[t.target], step, group_scale.get(id(t.target), 1.0)))
        return view

    def _effective(self, i: int, log_m: float) -> float:
        cap = self._term_caps[i]
        return (log_m if cap is None else min(log_m, cap)) + self._term_offsets[i]

    def _latent_value(self, entry, base: float, log_scale: float) -> Tensor:
        """``prox(latent, γ·λ·scale)`` of one term: what its weight is at that multiplier
        (with a ``relaxed`` optimizer: the latent on that prox's support, as it shows it)."""
        term, z, gamma, gs = entry
        value = z.clone()
        _apply_prox(term.penalty, value, gamma * base * math.exp(log_scale) * gs)
        if self._optimizer is not None and self._optimizer.relaxed:
            value = self._optimizer._relax(term, z, value)
        return value

    def _latent_values(self, view, log_m: float) -> list[Tensor]:
        return [self._latent_value(entry, base, self._effective(i, log_m))
                for i, (entry, base) in enumerate(zip(view, self._base_scales, strict=True))]

    def _latent_caps(self, view, log_high: float) -> list[float | None]:
        """Per term: the largest log multiplier whose prox keeps the minimum (None: none needed).

        ``log_high``: the largest multiplier that will be tried; a term that keeps its
        minimum there needs no cap.
        """
        if self.min_density <= 0:
            return [None] * len(self.terms)
        caps: list[float | None] = []
        for entry, base in zip(view, self._base_scales, strict=True):
            keep = self._keep([self._unit_count(entry[0])])[0]

            def nonzero(log_s: float, entry=entry, base=base) -> int:
                return self._nonzero_units(entry[0], self._latent_value(entry, base, log_s))

            if nonzero(log_high) >= keep:
                caps.append(None)
                continue
            lo = self._log_scale
            step = 1.0
            while nonzero(lo) < keep and lo > self._log_scale - 4 * _LOG_BOUND:
                lo -= step
                step *= 2
            hi = log_high
            for _ in range(50):
                mid = 0.5 * (lo + hi)
                if nonzero(mid) >= keep:
                    lo = mid
                else:
                    hi = mid
            caps.append(lo)
        return caps

    def _unit_count(self, term: Term) -> int:
        """Units of a term's tensor over all ranks: elements, or groups of its penalty."""
        t = term.target
        if self.measure == "elements":
            return t.numel()  # a DTensor's numel() is the global one
        lay = _dist._global_layout(term.penalty, t) if _dist._is_dtensor(t) else term.penalty.layout(t)
        return int(lay.n_groups)

    def _nonzero_units(self, term: Term, value: Tensor) -> int:
        from ._select import Units, count, element_units

        if self.measure == "elements":
            units = element_units([value])
        else:
            units = [Units(_dist.group_norms(term.penalty, value).flatten(), False)]
        return count(units, [u.values != 0 for u in units])

    @torch.no_grad()
    def _hold_minimum(self, zeros: Sequence[int], sizes: Sequence[int]) -> None:
        """At an update: keep every tensor at its minimum density from the next step on."""
        if self.min_density <= 0:
            return
        view = self._latent_view()
        if view is not None:
            # The caps must hold until the next update, not only now: γ grows by lr at every
            # step (dual averaging), so the shown threshold γ·λ·m grows with a fixed m. A cap
            # solved at today's γ sits exactly at the minimum's last unit, and the next step
            # cut it (head.weight of the Embedding+LSTM test went all zero two steps after an
            # update). Solved at the γ of the next update, it keeps the minimum there too.
            self._term_caps = self._latent_caps(self._latent_view(ahead=self.every), self._log_scale)
            # The weights now are what the prox shows at the new strengths (as the next step
            # would with a zero gradient), so every tensor holds its minimum from this update on.
            for i, (entry, base) in enumerate(zip(view, self._base_scales, strict=True)):
                self._optimizer._display(
                    entry[0].target, self._latent_value(entry, base, self._effective(i, self._log_scale)))
            return
        keep = self._keep(sizes)
        owner = self._term_owner()
        for i in range(len(self.terms)):
            j = owner[i]
            if sizes[j] - zeros[j] < keep[j]:
                self._term_offsets[i] = max(self._term_offsets[i] - math.log(2.0), -2 * _LOG_BOUND)
            else:  # back towards the common multiplier
                self._term_offsets[i] = min(self._term_offsets[i] + math.log(1.1), 0.0)

