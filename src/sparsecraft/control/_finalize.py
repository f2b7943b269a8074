"""Exact final selection of a :class:`~sparsecraft.control.TargetSparsity`: make sparsity equal the target.

:class:`FinalSelection` holds the controller's counting of units (elements
or groups) and its :meth:`~FinalSelection.finalize`: the λ path on the
latent copies in latent mode, the smallest magnitudes elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import functional as F
from ..optim import ProximalOptimizer
from ..regularizer import Term

# log(scale) is kept within ±_LOG_BOUND of its start: far enough for any real
# strength, near enough that a target the terms cannot reach stops growing it.
_LOG_BOUND = math.log(1e8)


class FinalSelection:
    """The final-selection part of :class:`~sparsecraft.control.TargetSparsity` (a base class).

    It reads the controller's state (declared below) and moves its multiplier
    through ``_log_scale`` and ``_apply_scale``.
    """

    terms: list[Term]
    measure: str
    target: float
    scale: float
    _params: list[Tensor]
    _optimizer: ProximalOptimizer | None
    _base_scales: list[float]
    _log_scale: float
    _apply_scale: Callable[[], None]

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
        if opt is None or opt.mode != "latent" or opt.support_frozen:
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
        # What the optimizer would show at this strength (the prox, or its relaxed form).
        show = self._optimizer._latent_display
        values = [show(term, z, gamma * base * m * gs)
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
        if self._optimizer is not None and self._optimizer.support_frozen:
            self._optimizer.freeze_support()  # the frozen support follows the new zeros
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
