"""The average of the weights over the fine-tuning after the zeros are fixed (``TargetSparsity(average=...)``).

After :meth:`~sparsecraft.ProximalOptimizer.freeze_support` the survivors of a
very sparse network train with the user's learning rate, which was chosen for
the dense network. On the digits MLP at 99.8 % zeros (169 weights) with SGD
lr 0.05, momentum 0.9, the test accuracy then jumps between 94.4 % and 97.1 %
from one epoch to the next: the last iterate is a random draw from that
spread. The average of the iterates since the freeze is not (the idea of SWA,
Izmailov et al. 2018, restricted to the fine-tuning; the zeros are zero in
every iterate, so they stay zero in the average).

The weights: the k-th iterate after the freeze counts ``k`` times (polynomial-
decay averaging with η = 1, Shamir & Zhang 2013), so the first steps after the
cut weigh little and no window length has to be chosen. The running form is
``a ← a + 2/(n + 1)·(w − a)`` for the n-th iterate after the freeze.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import distributed as _dist

__all__ = ["IterateAverage"]


def _local(p: Tensor) -> Tensor:
    """This rank's part of ``p`` (an FSDP2 shard) or ``p`` itself."""
    return p.to_local() if _dist._is_dtensor(p) else p


class IterateAverage:
    """The weighted average of ``params`` over the calls of :meth:`update` (elementwise, no communication).

    The average is kept in float32 for half-precision parameters; a copy of every
    parameter (of this rank's shard under FSDP2) is the memory it costs.
    """

    def __init__(self, params: list[Tensor]):
        self.params = params
        self.count = 0  # iterates since the freeze, the freeze's own included (weight 0)
        self.values: list[Tensor] = []

    @torch.no_grad()
    def update(self) -> None:
        """Add the parameters as they are now (the first call starts the average)."""
        if self.count == 0:
            self.values = [_local(p).detach().to(_dtype(p), copy=True) for p in self.params]
        else:
            weight = 2.0 / (self.count + 1)  # the iterate k steps after the freeze weighs k
            for a, p in zip(self.values, self.params, strict=True):
                a.lerp_(_local(p).detach().to(a.dtype), weight)
        self.count += 1

    @torch.no_grad()
    def write(self) -> int:
        """Set the parameters to the average and start over; returns how many iterates it held."""
        n = self.count
        if n:
            for a, p in zip(self.values, self.params, strict=True):
                _local(p).copy_(a)
        self.clear()
        return n

    def clear(self) -> None:
        """Forget the iterates (the support was released: they belong to another network)."""
        self.count, self.values = 0, []

    def state(self) -> dict[str, Any]:
        return {"count": self.count, "values": [a.clone() for a in self.values]}

    def load(self, state: Any) -> None:
        """Restore :meth:`state`, checked against the parameters first (all or nothing).

        Raises:
            ValueError: not a dict with ``count`` and ``values``, or values that do not
                match the parameters (number, shape, dtype).
        """
        if not isinstance(state, dict) or set(state) != {"count", "values"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"Expected an average state with keys ['count', 'values']. Received: {got}")
        count, values = state["count"], state["values"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"Expected an int average count >= 0. Received: count={count!r}")
        want = [(tuple(_local(p).shape), _dtype(p)) for p in self.params] if count else []
        got = [(tuple(v.shape), v.dtype) if isinstance(v, Tensor) else type(v).__name__
               for v in values] if isinstance(values, (list, tuple)) else type(values).__name__
        if got != want:
            raise ValueError(
                f"Expected average values matching the optimizer's parameters (shape, dtype): {want}. "
                f"Received: {got}"
            )
        self.count = count
        self.values = [v.detach().to(_local(p).device, copy=True) for v, p in zip(values, self.params if count else [], strict=True)]


def _dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
