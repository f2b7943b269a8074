"""The prox of one parameter after the inner step, with the step size the optimizer used.

:class:`_ProxStep` holds the per-parameter path of
:class:`~sparsecraft.optim.ProximalOptimizer` in forward–backward mode: a
float step (SGD and unknown optimizers), or a per-coordinate adaptive step
read from the optimizer state (Adam/AdamW, Adagrad, RMSprop) with the floor
guard, the cache-blocked L1 path and the opt-in fused kernel.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .. import distributed as _dist
from ..penalties import L1, L1L2, L2
from ..regularizer import Term
from ._fused import _compiled_kernel
from ._rules import _BUILTIN_RULES, AdaptiveStep, _sgd

_FUSABLE = (L1, L2, L1L2)
FLOOR_REFRESH = 10  # steps between two means of sqrt(v) for the floor's reference
BLOCK = 1 << 20  # elements per block of the unfused adaptive L1 prox (4 MiB in float32: in L3)


def _contiguous(p: Tensor, step: AdaptiveStep) -> bool:
    return p.is_contiguous() and step.moment.is_contiguous() and (
        step.centered is None or step.centered.is_contiguous())


class _ProxStep:
    """Per-parameter prox of :class:`~sparsecraft.optim.ProximalOptimizer` (a base class).

    Reads the optimizer's ``inner``, ``floor``, ``fused``, ``_rule``, ``_terms``,
    ``_workspaces``, ``_typical`` and ``_floor_steps``.

    A coordinate whose second moment is 0 (it never had a gradient) or not finite
    gets prox step 0 on every path (unfused, blocked, fused); the floor's reference
    is the mean of the finite ``sqrt(v)`` (others count as 0), never NaN or Inf.
    """

    def _workspace(self, p: Tensor, which: int = 0) -> Tensor:
        key = (p.dtype, p.device, which)
        buf = self._workspaces.get(key)
        if buf is None or buf.numel() < p.numel():
            # One buffer per dtype/device, sized to the largest parameter, reused by all.
            # Steps of 16-bit parameters are computed in float32: in float16 Adam's eps
            # (1e-8) underflows, lr/sqrt(v) becomes lr/0 = inf and the prox writes NaN.
            buf = torch.empty(max(t.numel() for t in self._terms if (t.dtype, t.device) == key[:2]),
                              dtype=_step_dtype(p.dtype), device=p.device)
            self._workspaces[key] = buf
        return buf[: p.numel()].view_as(p)

    def _mask(self, x: Tensor) -> Tensor:
        """A reused boolean buffer the size of ``x``: where the optimizer moved a coordinate."""
        key = ("moved", x.device)
        buf = self._workspaces.get(key)
        if buf is None or buf.numel() < x.numel():
            buf = torch.empty(max(t.numel() for t in self._terms if t.device == x.device),
                              dtype=torch.bool, device=x.device)
            self._workspaces[key] = buf
        return buf[: x.numel()].view_as(x)

    def _zero(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = ("zero", dtype, device)
        buf = self._workspaces.get(key)
        if buf is None:
            buf = self._workspaces[key] = torch.zeros((), dtype=dtype, device=device)
        return buf

    def _prox(self, term: Term, p: Tensor, group: dict, scale: float) -> None:
        if p.numel() == 0:
            return  # an empty parameter: nothing to threshold (issue 10, item 13)
        state = self.inner.state.get(p, {})
        # A sharded (FSDP2 DTensor) parameter: step rules see local shards; the means
        # below are taken over the whole parameter, as one process would.
        sharded = _dist.is_sharded(p)
        x = p.to_local() if sharded else p
        if sharded:
            state = _dist.local_state(state)
        pen = term.penalty
        if not sharded and self._rule in _BUILTIN_RULES and type(pen) in _FUSABLE:
            step = self._rule(group, state, x, None)
            if step is None or (self.fused and self._fused_prox(pen, p, step, scale)):
                return
            if type(pen) is L1 and _contiguous(p, step):
                self._blocked_l1(p, step, scale * pen.l1)
                return
        ws = self._workspace(x) if self._rule is not _sgd else None
        step = self._rule(group, state, x, ws)
        if step is None:
            return
        if isinstance(step, float):
            _apply_prox(pen, p, step * scale)
            return
        # Where the second moment is 0 the coordinate never had a gradient: the optimizer
        # did not move it, so the prox takes no step there either (an embedding row absent
        # from every batch so far; issue 10, item 6). A NaN or infinite sqrt(v) (a bad
        # gradient) gets no prox step either: the inner optimizer's damage is not widened.
        ref = None
        if self.floor > 0:
            # The floor is anchored to the largest typical sqrt(v) seen so far: when a
            # whole layer's gradients fade, its thresholds cannot grow without bound.
            # The mean is refreshed every FLOOR_REFRESH steps: it moves slowly, and
            # skipping it saves a pass over v.
            ref = self._typical.get(p)
            if self._refresh(p) or ref is None:
                ws.nan_to_num_(nan=0.0, posinf=0.0)  # they take no step either way (below)
                typical = _dist.mean(ws, p) if sharded else ws.mean()
                ref = _raised_reference(ref, typical)
                self._typical[p] = ref
        moved = torch.gt(ws, 0, out=self._mask(x))
        if ref is not None:
            ws.clamp_(min=ref * self.floor)
        ws.add_(step.eps / step.scale)
        coef = step.lr * scale / step.scale
        zero = self._zero(ws.dtype, ws.device)
        if type(pen) is L1:
            # τ = coef·l1/ws, then x − clamp(x, −τ, τ): five passes over two buffers
            # (Penalty.prox_ on one buffer needs six); the hot path of Adam + L1.
            tau = torch.div(torch.tensor(coef * pen.l1, dtype=ws.dtype, device=ws.device), ws, out=ws)
            tau = torch.where(moved, tau, zero, out=tau)
            neg = torch.neg(tau, out=self._workspace(x, 1))
            x.sub_(torch.clamp(x, min=neg, max=tau, out=neg))
            return
        lr = torch.tensor(coef, dtype=ws.dtype, device=ws.device)
        t = torch.div(lr, ws, out=ws)
        t = torch.where(moved, t, zero, out=t)
        if not pen.separable:
            # Group penalties need one step per group: the mean step of the group's
            # coordinates that the optimizer moved (0 if none), so that a dead unit's
            # coordinates neither inflate nor dilute the step of its group.
            lay = pen.layout(p)
            count = self._workspace(x, 1).copy_(moved)
            if sharded:
                t = _merge_groups(_dist.slice_means(t, p, lay.dim), lay)
                n = _merge_groups(_dist.slice_means(count, p, lay.dim), lay)
            else:
                t, n = _group_mean(t, lay), _group_mean(count, lay)
            t = torch.where(n > 0, t / n, 0.0)
        _apply_prox(pen, p, t)

    def _fused_prox(self, pen: Any, p: Tensor, step: AdaptiveStep, scale: float) -> bool:
        """The adaptive prox in one compiled kernel; False when it cannot run (then unfused)."""
        tensors = [p, step.moment] + ([step.centered] if step.centered is not None else [])
        if not all(t.is_contiguous() for t in tensors):
            return False
        l1 = pen.l1 if isinstance(pen, (L1, L1L2)) else 0.0
        l2 = pen.l2 if isinstance(pen, (L2, L1L2)) else 0.0
        dtype = _step_dtype(p.dtype)
        coef = step.lr * scale / step.scale
        scalars = torch.tensor([coef * l1, step.eps / step.scale, self.floor, 2.0 * l2 * coef],
                               dtype=dtype, device=p.device)
        moment = step.moment.view(-1)
        centered = None if step.centered is None else step.centered.view(-1)
        ref = self._typical.get(p)
        if ref is None:
            ref = torch.zeros((), dtype=dtype, device=p.device)  # mean sqrt(v) >= 0: max(0, mean) = mean
        refresh = self.floor > 0 and self._refresh(p, peek=True)
        try:
            new_ref = _compiled_kernel()(p.view(-1), moment, centered, ref, scalars, self.floor > 0,
                                         refresh, l2 > 0)
        except Exception as err:  # noqa: BLE001 - any compiler failure: warn once, run unfused
            self.fused = False
            warnings.warn(f"ProximalOptimizer(fused=True) could not compile its kernel ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); using the unfused prox.",
                          stacklevel=3)
            return False
        if self.floor > 0:
            self._refresh(p)
            self._typical[p] = new_ref
        return True

    def _blocked_l1(self, p: Tensor, step: AdaptiveStep, strength: float) -> None:
        """Adaptive L1 prox in blocks of BLOCK elements: the step buffers stay in cache.

        The same arithmetic as the whole-tensor path below; from memory it reads
        ``v`` and ``w`` and writes ``w`` once (nine cache-resident passes per
        block instead of nine passes over the tensor). Coordinates with ``v = 0``
        are left as they are through a 0/1 factor on the shrinkage (one pass
        more; a ``torch.where`` costs three times as much here). A NaN ``v`` makes
        a NaN shrinkage, but only where the built-in optimizers (the only ones on
        this path) have already written a NaN weight.
        """
        x, v = p.view(-1), step.moment.view(-1)
        c = None if step.centered is None else step.centered.view(-1)
        n = x.numel()
        size = min(n, BLOCK)
        dtype = _step_dtype(p.dtype)
        a, b = self._block(size, dtype, p.device, 0), self._block(size, dtype, p.device, 1)
        ones = self._block(size, dtype, p.device, 2)  # 1 where the optimizer moved, else 0

        def root(i: int, m: int) -> Tensor:
            r = a[:m]
            if c is None:
                return torch.sqrt(v[i:i + m], out=r)
            return torch.addcmul(v[i:i + m], c[i:i + m], c[i:i + m], value=-1, out=r).sqrt_()

        low = None
        if self.floor > 0:
            ref = self._typical.get(p)
            if self._refresh(p) or ref is None:
                total = torch.zeros((), dtype=dtype, device=p.device)
                for i in range(0, n, size):
                    # Non-finite roots (bad gradients) count as 0: the reference stays finite.
                    total += root(i, min(size, n - i)).nan_to_num_(nan=0.0, posinf=0.0).sum()
                ref = _raised_reference(ref, total / n)
                self._typical[p] = ref
            low = ref * self.floor
        if step.lr * strength == 0:
            return  # no shrinkage (and no 0/0 where v = 0 and eps = 0)
        coef = torch.tensor(step.lr * strength / step.scale, dtype=dtype, device=p.device)
        eps = step.eps / step.scale
        for i in range(0, n, size):
            m = min(size, n - i)
            tau = root(i, m)
            moved = torch.gt(tau, 0, out=ones[:m])  # no step where v is 0
            if low is not None:
                tau.clamp_(min=low)
            tau = torch.div(coef, tau.add_(eps), out=tau)
            neg = torch.neg(tau, out=b[:m])
            xi = x[i:i + m]
            xi.addcmul_(torch.clamp(xi, min=neg, max=tau, out=neg), moved, value=-1)

    def _block(self, size: int, dtype: torch.dtype, device: torch.device, which: int) -> Tensor:
        key = ("block", dtype, device, which)
        buf = self._workspaces.get(key)
        if buf is None or buf.numel() < size:
            buf = torch.empty(size, dtype=dtype, device=device)
            self._workspaces[key] = buf
        return buf

    def _refresh(self, p: Tensor, peek: bool = False) -> bool:
        """Whether this step takes a fresh mean for the floor (counts the step unless ``peek``)."""
        n = self._floor_steps.get(p, 0)
        if not peek:
            self._floor_steps[p] = n + 1
        return n % FLOOR_REFRESH == 0


def _raised_reference(ref: Tensor | None, typical: Tensor) -> Tensor:
    """The floor's new reference ``max(ref, typical)``; a non-finite mean leaves it unchanged.

    A NaN or Inf would otherwise stay in the running maximum (and in ``state_dict()``)
    for good: NaN weights everywhere, or an infinite floor that switches the prox off
    (issue 10, item 2). No host sync: the guard is a scalar tensor operation.
    """
    typical = torch.nan_to_num(typical, nan=0.0, posinf=0.0, neginf=0.0)
    return typical if ref is None else torch.maximum(ref, typical)


def _step_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _apply_prox(pen: Any, p: Tensor, step: float | Tensor) -> None:
    if _dist.is_sharded(p):
        _dist.prox_(pen, p, step)
    else:
        pen.prox_(p, step)


def _group_mean(step: Tensor, lay: Any) -> Tensor:
    other = [d for d in range(step.ndim) if d != lay.dim]
    return _merge_groups(step.mean(dim=other) if other else step, lay)


def _merge_groups(per_slice: Tensor, lay: Any) -> Tensor:
    """Per-group mean of per-slice mean steps (slices of one tensor have one size)."""
    if lay.index is None:
        return per_slice
    sums = torch.zeros(lay.n_groups, dtype=per_slice.dtype, device=per_slice.device)
    sums.index_add_(0, lay.index, per_slice)
    counts = torch.bincount(lay.index, minlength=lay.n_groups).clamp_min(1)
    return sums / counts
