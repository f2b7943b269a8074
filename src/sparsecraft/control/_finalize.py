"""Exact final selection of a :class:`~sparsecraft.control.TargetSparsity`: make sparsity equal the target.

:class:`FinalSelection` holds the controller's counting of units (elements
or groups) and its :meth:`~FinalSelection.finalize`: the λ path on the
latent copies in latent mode, the smallest magnitudes elsewhere. Counts and
the ranking are global (:mod:`._select`): under FSDP2 every rank makes the
choice one process holding the whole model would make.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import distributed as _dist
from ..penalties import L1, L1L2
from ._density import _LOG_BOUND, DensityFloor
from ._select import Units, check_placements, count, element_units, kth_smallest, sizes, smallest

__all__ = ["FinalSelection"]


class FinalSelection(DensityFloor):
    """The final-selection part of :class:`~sparsecraft.control.TargetSparsity` (a base class)."""

    target: float
    _average: Any  # an IterateAverage with average=True, else None (TargetSparsity sets it)

    def _units_of(self, tensors: Sequence[Tensor]) -> list[Units]:
        """What is counted, per owner: magnitudes (elements) or global group norms (groups)."""
        if self.measure == "elements":
            return element_units(tensors)
        return [Units(_dist.group_norms(t.penalty, x).flatten(), False)
                for t, x in zip(self.terms, tensors, strict=True)]

    def _latent_zeros(self, view, log_m: float) -> tuple[int, list[Tensor]]:
        values = self._latent_values(view, log_m)
        units = self._units_of(values)
        return count(units, [u.values == 0 for u in units]), values

    def _zero_counter(self, view):
        """``log_m ↦`` zeros of the latent prox at multiplier ``exp(log_m)`` (for the bisections).

        L1 and L1L2 elements: the prox is zero exactly where ``|z| ≤ step·l1``, so the
        magnitudes are taken once and each count is one comparison per tensor (no copy
        of the weights, no prox; the controller bisects at every update). Other
        penalties and groups: the prox itself, as :meth:`finalize` shows it.
        """
        if self.measure != "elements" or not all(type(e[0].penalty) in (L1, L1L2) for e in view):
            return lambda log_m: self._latent_zeros(view, log_m)[0]
        units = element_units([entry[1] for entry in view])

        def zeros_at(log_m: float) -> int:
            masks = []
            for i, ((term, _z, gamma, gs), base, u) in enumerate(
                    zip(view, self._base_scales, units, strict=True)):
                threshold = gamma * base * math.exp(self._effective(i, log_m)) * gs * term.penalty.l1
                masks.append(u.values <= threshold)
            return count(units, masks)

        return zeros_at

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
        groups); zeros above the target are then left as they are. No tensor
        goes below ``min_density`` (a term's strength is capped in latent mode,
        its largest units are kept in the ranking), so the target may be missed
        from below (``"short"``). Under ``torch.distributed`` every rank must
        call it; counts and the ranking are over all ranks (FSDP2 shards
        included), so every rank picks what one process would. Call it once
        training is over.

        Returns:
            ``{"before", "after", "target", "zeroed", "revived", "largest_zeroed", "excess",
            "short", "scale_before", "scale_after", "latent", "averaged"}``: sparsity before
            and after, units set to zero and brought back, the largest magnitude
            (or group norm) set to zero, zeros above and below the target, the
            multiplier before and after, 1.0 if the latent path was used, and
            how many steps since the freeze the weights were averaged over
            (``average``; 0 when they were not).

        Raises:
            ValueError: for parameters sharded and replicated at once (HSDP).
        """
        owners = self._owners()
        check_placements(owners)
        # average=True: the weights become their average since the freeze (same zeros) first.
        averaged = self._average.write() if self._average is not None and self._optimizer.support_frozen else 0
        before_units = self._units_of(owners)
        zero_before = [u.values == 0 for u in before_units]
        numel = sum(sizes(before_units))
        zeros = count(before_units, zero_before)
        wanted = round(self.target * numel)
        scale_before = self.scale
        result = {"before": zeros / numel, "target": self.target, "scale_before": scale_before, "latent": 0.0,
                  "averaged": float(averaged)}
        if zeros != wanted:
            view = self._latent_view()
            if view is not None:
                zeros = self._finalize_latent(view, wanted)
                result["latent"] = 1.0
            if zeros < wanted:
                self._cut_smallest(wanted - zeros)
        if self._optimizer is not None and self._optimizer.support_frozen:
            self._optimizer.freeze_support()  # the frozen support follows the new zeros
        after_units = self._units_of(owners)
        after_zero = [u.values == 0 for u in after_units]
        zeroed = [a & ~z for a, z in zip(after_zero, zero_before, strict=True)]
        revived = [~a & z for a, z in zip(after_zero, zero_before, strict=True)]
        zeros_after = count(after_units, after_zero)
        result.update(after=zeros_after / numel, zeroed=float(count(after_units, zeroed)),
                      revived=float(count(after_units, revived)),
                      largest_zeroed=_largest(before_units, zeroed),
                      excess=float(max(zeros_after - wanted, 0)), short=float(max(wanted - zeros_after, 0)),
                      scale_after=self.scale)
        self._measured = result["after"]
        self._check_dead(self._per_owner(after_units, after_zero), sizes(after_units), "finalize()")
        return result

    def _per_owner(self, units: list[Units], masks: list[Tensor]) -> list[int]:
        return [count([u], [m]) for u, m in zip(units, masks, strict=True)]

    def _finalize_latent(self, view, wanted: int, slack: int = 0) -> int:
        """Set the multiplier whose prox of the latent copies has ``wanted`` zeros (or the most below).

        ``slack``: stop as soon as the count is within that many units of ``wanted``
        (the controller's tracking; :meth:`finalize` asks for the exact count).
        """
        self._term_caps = self._latent_caps(view, self._log_scale + 2 * _LOG_BOUND)
        zeros_at = self._zero_counter(view)
        lo = hi = self._log_scale
        count_lo = zeros_at(lo)
        # Bracket: [lo, hi] with zeros(lo) < wanted <= zeros(hi); zeros grow with the multiplier.
        step = 1.0
        while count_lo >= wanted and lo > self._log_scale - 2 * _LOG_BOUND:
            lo -= step
            step *= 2
            count_lo = zeros_at(lo)
        step = 1.0
        count_hi = zeros_at(hi)
        while count_hi < wanted and hi < self._log_scale + 2 * _LOG_BOUND:
            hi += step
            step *= 2
            count_hi = zeros_at(hi)
        chosen = None
        for _ in range(60):
            if slack and abs(count_hi - wanted) <= slack:
                chosen = hi  # tracking: close enough (the final selection bisects to the end)
                break
            mid = 0.5 * (lo + hi)
            c = zeros_at(mid)
            if c >= wanted:
                hi, count_hi = mid, c
            else:
                lo = mid
        if chosen is None:  # a tie that jumps past wanted: stay below, cut the rest
            chosen = hi if abs(count_hi - wanted) <= slack else lo
        zeros, values = self._latent_zeros(view, chosen)
        for (term, *_rest), v in zip(view, values, strict=True):
            self._optimizer._display(term.target, v)
        self._log_scale = chosen
        self._apply_scale()
        return zeros

    def _cut_smallest(self, need: int) -> None:
        """Zero the ``need`` smallest non-zero units over all ranks, keeping each tensor's minimum."""
        owners = self._owners()
        units = self._units_of(owners)
        keep = self._keep(sizes(units))
        candidates = []
        for u, k in zip(units, keep, strict=True):
            v = u.values.double()
            v = torch.where(v == 0, torch.full_like(v, math.inf), v)
            if k > 0:  # the k largest non-zero units of this tensor stay
                nonzero = count([u], [u.values != 0])
                if nonzero <= k:
                    v = torch.full_like(v, math.inf)
                else:
                    tau = kth_smallest([Units(v, u.sharded)], nonzero - k + 1)
                    v = torch.where(v >= tau, torch.full_like(v, math.inf), v)
            candidates.append(Units(v, u.sharded))
        available = count(candidates, [torch.isfinite(c.values) for c in candidates])
        masks = smallest(candidates, min(need, available))
        for i, (p, mask) in enumerate(zip(owners, masks, strict=True)):
            local = p.to_local() if _dist._is_dtensor(p) else p
            if self.measure == "elements":
                cut = mask.view(local.shape)
            else:
                lay = self.terms[i].penalty.layout(p) if not _dist._is_dtensor(p) else _dist._global_layout(
                    self.terms[i].penalty, p)
                per_slice = mask[lay.index] if lay.index is not None else mask
                if _dist._is_dtensor(p):  # this rank's slices of the global groups
                    start = _dist._layout(p)[0][lay.dim]
                    per_slice = per_slice[start: start + local.shape[lay.dim]]
                shape = [1] * local.ndim
                shape[lay.dim] = -1
                cut = per_slice.view(shape).expand_as(local)
            if self._optimizer is not None:  # latent mode: the latent copy is cut with it
                self._optimizer._cut(p, cut)
            else:
                local.masked_fill_(cut, 0.0)


def _largest(units: list[Units], masks: list[Tensor]) -> float:
    """The largest value selected by ``masks`` over all ranks (0.0 when none)."""
    local = max((float(u.values[m].max()) for u, m in zip(units, masks, strict=True) if bool(m.any())),
                default=0.0)
    if any(u.sharded for u in units) and _dist._initialized():
        import torch.distributed as dist

        t = torch.tensor([local], dtype=torch.float64, device=_dist._comm_device(None))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        local = float(t[0])
    return local
