"""The fine-tuning after the zeros are fixed: the average of the weights (``TargetSparsity(average=...)``)
and the learning-rate multiplier of adaptive optimizers (``fine_tune_scale``).

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

Adam's problem is the opposite: its step moves every coordinate by about
``lr`` whatever the gradient, so the 126 steps after the freeze of a digits
run move a survivor by at most 0.13 at lr 1e-3, and the network is still
improving when the run ends. ``fine_tune_scale`` multiplies the learning rate
of the fine-tuning; by default ``1/sqrt(1 − target)`` for adaptive optimizers:
the norm of an Adam step over ``n`` coordinates is about ``lr·sqrt(n)``, so
this keeps the step's norm over the survivors that of the dense network's
step. With the larger steps the last iterate is noisy, which the average then
removes (SWA's recipe: a large constant learning rate, then the average).
:meth:`FineTuning.lr_factor` is the same factor for the ramp and the hold, as
an opt-in LR schedule for runs too short for the sparse network.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..optim._proximal import adaptive, has_batchnorm
from ._select import _local
from ._state import integer, positive

__all__ = ["FineTuning", "IterateAverage"]


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
        params = self.params if count else []
        self.count = count
        self.values = [v.detach().to(_local(p).device, copy=True) for v, p in zip(values, params, strict=True)]


def _dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


class FineTuning:
    """``average``, ``fine_tune_scale`` and ``lr_factor`` of :class:`~sparsecraft.control.TargetSparsity` (a base class).

    Reads the controller's ``hold``, ``target``, ``_optimizer`` and ``_average``
    (an :class:`IterateAverage`, or None when ``average`` is off).
    """

    hold: str
    target: float
    freeze_step: int
    _optimizer: Any
    _average: IterateAverage | None
    average: bool | None
    fine_tune_scale: float | None

    def _check_fine_tuning(self, average: Any, fine_tune_scale: Any) -> None:
        """Check the two arguments (None: resolved by :meth:`_resolve_fine_tuning`)."""
        if average is not None and not isinstance(average, bool):
            raise TypeError(f"Expected average to be a bool or None. Received: average={average!r}")
        if fine_tune_scale is not None:
            fine_tune_scale = positive("fine_tune_scale", fine_tune_scale)
        for name, value, off in (("average", average, False), ("fine_tune_scale", fine_tune_scale, 1.0)):
            if value not in (None, off) and self.hold != "freeze":
                raise ValueError(
                    f"Expected hold='freeze' for {name}={value!r} (it acts on the fine-tuning after the "
                    f"zeros are fixed). Received: hold={self.hold!r}"
                )
        self.average, self.fine_tune_scale = average, fine_tune_scale

    def _resolve_fine_tuning(self) -> None:
        """The defaults of ``average`` and ``fine_tune_scale``, once the optimizer's mode is known."""
        if self.average is None:
            self.average = self._default_average()
        if self.fine_tune_scale is None:
            self.fine_tune_scale = self._default_fine_tune_scale()
        self._average = IterateAverage(self._trained()) if self.average else None

    def _fine_tuned_model(self) -> bool:
        """``hold="freeze"`` in latent mode on a model without BatchNorm: where the defaults are on."""
        if self.hold != "freeze" or self._optimizer is None or self._optimizer.mode != "latent":
            return False
        model = self._optimizer.regularizer.model
        return model is not None and not has_batchnorm(model)

    def _default_average(self) -> bool:
        """On with ``hold="freeze"`` in latent mode on a model without BatchNorm.

        Measured (docs/optim.md, fifth and sixth rounds; paired over seeds against
        the last weights): digits MLP with SGD at 99.7/99.8 % zeros +0.33/+0.39 point
        (10 and 20 seeds; 17 of 20 seeds gain or tie at 99.8 %), LSTM with SGD at
        90/95/98 % +1.6/+1.6/+0.5 (3 seeds), the transformer with SGD +0.0/+0.0/+0.1.
        Adaptive optimizers gain with the larger fine-tuning steps of
        :meth:`_default_fine_tune_scale` (alone the average was −0.06 on digits with
        AdamW at 99.7 %). On the BN-CNN averaging without recomputing BatchNorm's
        statistics lost 1–15 points.
        """
        return self._fine_tuned_model()

    def _default_fine_tune_scale(self) -> float:
        """``1/sqrt(1 − target)`` for adaptive optimizers where the average is on; 1 elsewhere.

        Measured (docs/optim.md, sixth round; digits AdamW at 99.7 %, paired against
        the last weights at the user's lr): the lr × 3 / 10 / 30 after the freeze
        +0.38 / +0.56 / +0.44; × 30 with the average +0.98, × 100 with it −1.71;
        ``1/sqrt(1 − target)`` (× 18.3) with the average **+0.93 ± 0.16** over 20 seeds
        (19 gain or tie); at 99 % (× 10) +0.09, at 99.9 % (× 31.6) +3.76; RMSprop and Adagrad at 99.7 % +1.45 and
        +1.42 (10 seeds). LSTM with AdamW at 90/95/98 %
        +2.5/−0.1/+2.2, the transformer +0.0/+1.6/+2.4 (3 seeds). SGD's step follows
        the gradient, which is not normalised: with the average, its lr × 0.3 / 2 / 4
        gave −0.02 / −0.20 / a diverged seed. The BN-CNN, whose zeros are fixed at the
        ramp's end with a third of the run left, lost with it (AdamW −0.5/−0.4/−6.3 at
        90/95/98 %).
        """
        if not self._fine_tuned_model() or not adaptive(self._optimizer):
            return 1.0
        return 1.0 / math.sqrt(1.0 - self.target)

    def lr_factor(self, step: int) -> float:
        """A learning-rate multiplier for short runs with an adaptive optimizer: ``(1 − s)^(−1/2)``.

        ``s`` is the ramp's sparsity after ``step`` optimizer steps (:meth:`target_at`;
        the target from ``end_step`` on). ``fine_tune_scale``'s argument, for the ramp
        and the hold: Adam moves every coordinate by about ``lr`` a step, so its
        step over the ``n`` weights the model shows has norm ``lr·sqrt(n)``, and as the
        ramp removes weights the shown network learns ``(1 − s)^(−1/2)`` times slower
        than the dense one did. This factor keeps the norm. With ``hold="freeze"`` it is
        1 from ``freeze_step`` on, where ``fine_tune_scale`` scales the frozen steps (its
        default is the same value for these optimizers on a model without BatchNorm:
        the learning rate does not jump at the freeze). Use it as an LR
        schedule, stepped after every optimizer step::

            sched = torch.optim.lr_scheduler.LambdaLR(opt, ctrl.lr_factor)

        Not a default: it pays where the run is too short for the sparse network to
        learn the task at the user's learning rate, and costs where the run is long
        enough (docs/optim.md, seventh round; AdamW, the mean over seeds against the
        defaults without it): the copy-task transformer in 3 epochs at 90/95/98 %
        zeros 100/99.98/99.96 % against 99.4/88.9/53.0 %; the LSTM in 8 epochs at
        50/90/95/98 % +8.6/+15.3/+9.9/+1.5 points; digits in 10 epochs at 99/99.7 %
        +14.4/+46.1; but digits in 60 epochs −1.0/−3.2 and the LSTM in 24 epochs
        +0.9/−9.4 at 90/98 %.

        Raises:
            ValueError: ``step`` is not an int >= 0, or the optimizer's step is not
                adaptive (SGD's step is the gradient, not normalised per coordinate, so
                its norm over the survivors is not ``lr·sqrt(n)``; its lr × 2 after the
                freeze lost 0.2 point on digits at 99.8 %, × 4 diverged a seed).
        """
        step = integer("step", step, minimum=0)
        if self._optimizer is not None and not adaptive(self._optimizer):
            raise ValueError(
                f"Expected an adaptive inner optimizer (Adam, AdamW, Adagrad, RMSprop) for lr_factor. "
                f"Received: {type(self._optimizer.inner).__name__}"
            )
        if self.hold == "freeze" and step >= self.freeze_step:
            return 1.0
        return 1.0 / math.sqrt(1.0 - self.target_at(step))

    def _trained(self) -> list[torch.Tensor]:
        """Every parameter the optimizer trains (weights and biases): what ``average`` averages."""
        return list({id(p): p for g in self._optimizer.param_groups for p in g["params"]}.values())

    def _follow_average(self, frozen: bool) -> None:
        """At every step: add the weights while the support is frozen, forget them once it is released."""
        if self._average is None:
            return
        if frozen:
            self._average.update()
        elif self._average.count:
            self._average.clear()  # the support was released: those steps were another network
