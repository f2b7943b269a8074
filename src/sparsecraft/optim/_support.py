"""What the model shows in latent mode, and the frozen-support phase of a ProximalOptimizer.

Two measured fixes for adaptive optimizers and for the end of a sparsity ramp
(docs/optim.md, "What we tried for AdamW and BatchNorm"):

* **Relaxed display** (relaxed lasso, Meinshausen 2007). In latent mode the
  model normally shows ``prox(z, γ·λ)``: the survivors are shrunk by the
  threshold. With Adam the latent copy moves by at most about ``lr`` per step,
  so at a high sparsity the threshold is nearly as large as the survivors and
  the shown weights are a fraction of their latent values (digits, target
  0.99: 93.2 % accuracy vs 97.7 % dense). ``relaxed`` shows the latent values
  on the support the prox selects, ``z·[prox(z) ≠ 0]``: the same selection rule,
  no shrinkage bias (97.7 %). With SGD the latent copy outgrows the threshold
  and the shrinkage helps (hard display: 96.4 % vs 97.2 %), so it stays off there.
* **Frozen support** (the "healing" phase of torchao's PAT, the fine-tuning
  phase of gradual magnitude pruning). :meth:`freeze_support` fixes the zero
  pattern; from then on the inner optimizer trains the survivors with no
  penalty and no gradient reaches the zeros. :class:`~sparsecraft.control.TargetSparsity`
  calls it when its ramp ends. On a BatchNorm CNN the changing support kept
  BatchNorm's running statistics stale (76 % test accuracy in eval mode at 90 %
  zeros); with the support frozen for the last third 95.4 %. ``lr_scale``
  multiplies the learning rate of that fine-tuning (the controller's
  ``fine_tune_scale``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import distributed as _dist
from ..penalties import L1, L1L2
from ..regularizer import Term
from ._prox_step import _apply_prox
from ._rules import AdaptiveStep, _sgd

# The relaxed display of an adaptive optimizer keeps, within each tensor, the survivors
# with the largest |z|·(sqrt v + eps)^RANK_POWER (:meth:`_Support._rank_survivors`).
RANK_POWER = 0.5


class _Support:
    """Relaxed latent display and frozen support of :class:`ProximalOptimizer` (a base class).

    Reads the optimizer's ``relaxed``, ``inner``, ``_rule``, ``_terms``, ``_latent``,
    ``_gamma``, ``_versions``, ``_masks``, ``_group_cache`` and its step buffers
    (``_workspace``).
    """

    relaxed: bool
    inner: torch.optim.Optimizer
    _workspace: Any
    _terms: dict[Tensor, Term]
    _latent: dict[Tensor, Tensor]
    _gamma: dict[Tensor, float]
    _versions: dict[Tensor, int]
    _masks: dict[Tensor, Tensor]
    _lr_scale: float
    _group_cache: dict[Tensor, dict]

    def _show_latent(self, term: Term, p: Tensor, step: float) -> None:
        """Write the shown weights into ``p`` (which holds the latent copy): prox, or relaxed prox."""
        _apply_prox(term.penalty, p, step)
        if self.relaxed:
            self._relax(term, self._latent[p], p)

    @torch.no_grad()
    def _relax(self, term: Term, z: Tensor, shown: Tensor) -> Tensor:
        """Turn ``shown``, the prox of latent ``z``, into the relaxed display, in place.

        The latent values where the prox keeps a coordinate (or a group): no
        shrinkage; with an adaptive optimizer, which coordinates is
        :meth:`_rank_survivors`'s choice. The 0/1 mask goes to the shared step
        buffer: no allocation. Sharded (FSDP2) parameters: on the local shards.
        """
        x, zl = shown, z
        if _dist.is_sharded(shown):
            x, zl = shown.to_local(), z.to_local()
        keep = torch.ne(x, 0, out=self._workspace(x))
        self._rank_survivors(term, term.target, zl, keep)
        x.copy_(zl).mul_(keep)
        return shown

    @torch.no_grad()
    def _rank_survivors(self, term: Term, p: Tensor, z: Tensor, keep: Tensor) -> None:
        """Relaxed display under an adaptive optimizer: which survivors, within each tensor.

        ``keep`` (0/1, local shard of ``p``) is where the prox keeps a coordinate of
        ``z``. With an adaptive step rule (Adam, AdamW, Adagrad, RMSprop, a registered
        one) and an elementwise L1 or L1L2 term, the same number of coordinates is kept
        but the ones with the largest ``|z|·(sqrt v + eps)^RANK_POWER`` (``v``: the optimizer's
        second moment, ``eps`` its own): with the power ½, the geometric mean of the
        magnitude ``|z|`` and OBD's saliency with the Fisher diagonal, ``|z|·sqrt v``.
        Adam's latent copy moves about ``lr`` a step in the sign of the mean gradient,
        so ``|z|`` alone ranks by how consistent a coordinate's gradient was, not by how
        large it was. The count per tensor, and so the controller's sparsity, is
        unchanged. Measured (docs/optim.md, fourth round; docs/benchmarks.md): AdamW
        on digits at 99.7 % 96.02 against 95.09 % (10 seeds); at 98 % the LSTM 48.1
        against 38.5 % and the transformer 57.3 against 34.9 % (3 seeds). The power
        ¼ was 95.21 % on digits (20 seeds, against 95.73 % with ½); ``|z|·sqrt v``
        alone (power 1) was worse than ``|z|``.
        Cost: five memory passes for the score, the cut (:func:`_kth_smallest`)
        and two counts per tensor and step; on a 16.8 M-weight MLP on 2 CPU cores
        the ranking costs about 6× the latent prox, and the Adam step under the
        controller takes 1.5–1.6× the plain latent step (docs/benchmarks.md, overhead).
        A sharded (FSDP2) parameter is ranked over all its shards
        (:func:`sparsecraft.distributed.top_k_mask`): the zeros one process makes.
        """
        if self._rule is _sgd or type(term.penalty) not in (L1, L1L2):
            return
        sharded = _dist.is_sharded(p)
        k, n = _ones(keep), keep.numel()
        if sharded:  # the counts of the whole tensor (the same branch on every rank)
            k, n = _dist._reduce_shards(torch.tensor([k, n], device=keep.device), p).tolist()
        if k == 0 or k == n:
            return
        group = self._group_of(p)
        state = self.inner.state.get(p, {})
        if sharded:
            state = _dist.local_state(state)
        score = self._workspace(z, 1)
        step = self._rule(group, state, z, score)
        if not isinstance(step, AdaptiveStep):
            return  # no second moment yet (the first step), or a constant step
        # score = (sqrt v + eps)^a · |z|, with the optimizer's own eps (the denominator of
        # its step): coordinates that never had a gradient (or whose second moment is not
        # finite) rank by |z| below the others.
        score.nan_to_num_(nan=0.0, posinf=0.0).add_(step.eps / step.scale)
        score.pow_(RANK_POWER).mul_(z).abs_()
        if sharded:  # ranked over all shards, as one process ranks the whole tensor
            keep.copy_(_dist.top_k_mask(score, k, p))
            return
        flat = score.reshape(-1)
        cut = _kth_smallest(flat, n - k)  # k scores lie above it
        torch.gt(score, cut, out=keep)
        short = k - _ones(keep)
        if short > 0:  # ties at the cut (zeros of z or of v): fill up to k in index order
            ties = torch.nonzero(flat == cut).reshape(-1)[:short]
            keep.reshape(-1)[ties] = 1

    def _group_of(self, p: Tensor) -> dict:
        """The param group holding ``p`` (cached; rebuilt when the groups were replaced)."""
        cache = self._group_cache
        group = cache.get(p)
        if group is None or not any(group is g for g in self.inner.param_groups):
            cache.clear()
            cache.update({q: g for g in self.inner.param_groups for q in g["params"]})
            group = cache[p]
        return group

    @property
    def support_frozen(self) -> bool:
        """Whether :meth:`freeze_support` fixed the zero pattern."""
        return bool(self._masks)

    @torch.no_grad()
    def freeze_support(self, frozen: bool = True, *, lr_scale: float = 1.0) -> None:
        """Fix the zero pattern of the penalised parameters (or release it with ``frozen=False``).

        While frozen, a step is the inner optimizer's step on the weights the
        model shows, with the gradients of the zeros masked and the zeros
        re-imposed after it (momentum cannot revive them); the penalties are not
        applied: the survivors are trained without shrinkage, as the refit of the
        relaxed lasso. Released, latent mode restarts its latent copies from the
        weights (``γ = 0``), as for weights changed outside the optimizer.

        Args:
            frozen: True to fix the current zeros, False to release them.
            lr_scale: while frozen, every param group's learning rate is multiplied
                by it for the inner step (and restored after it, so schedulers and
                ``state_dict`` see the user's values). Released: back to 1.

        Raises:
            TypeError: ``frozen`` is not a bool.
            ValueError: ``lr_scale`` is not a finite number > 0, or is not 1 for an
                inner optimizer whose param groups have no ``lr``.
        """
        if not isinstance(frozen, bool):
            raise TypeError(f"Expected frozen to be a bool. Received: frozen={frozen!r}")
        if frozen:
            self._lr_scale = self._check_lr_scale(lr_scale)
            self._masks = {p: p.ne(0) for p in self._terms}
            return
        self._masks = {}
        self._lr_scale = 1.0
        for p, z in self._latent.items():
            z.copy_(p)
            self._gamma[p] = 0.0
            self._versions[p] = p._version

    def _frozen_step(self, closure: Any) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, keep in self._masks.items():
            if p.grad is not None:
                p.grad.mul_(keep)
        # The closure ran above: the gradients it made are the masked ones the inner step uses.
        scaled = self.inner.param_groups if self._lr_scale != 1.0 else []
        lrs = [g["lr"] for g in scaled]
        try:  # lr_scale: for this step only; schedulers and state_dict see the user's lr
            for g, lr in zip(scaled, lrs, strict=True):
                g["lr"] = lr * self._lr_scale
            self.inner.step()
        finally:
            for g, lr in zip(scaled, lrs, strict=True):
                g["lr"] = lr
        for p, keep in self._masks.items():
            p.mul_(keep)
            if p in self._versions:
                self._versions[p] = p._version
        return loss

    def _check_lr_scale(self, lr_scale: Any) -> float:
        ok = isinstance(lr_scale, (int, float)) and not isinstance(lr_scale, bool) \
            and math.isfinite(lr_scale) and lr_scale > 0
        if not ok:
            raise ValueError(f"Expected lr_scale as a finite number > 0. Received: lr_scale={lr_scale!r}")
        if lr_scale != 1 and not all("lr" in g for g in self.inner.param_groups):
            raise ValueError(
                f"Expected param groups with an 'lr' for lr_scale={lr_scale!r}. Received: "
                f"{type(self.inner).__name__} param groups with keys {sorted(self.inner.param_groups[0])}"
            )
        return float(lr_scale)

    def _support_state(self, index: dict[Tensor, int]) -> dict[int, Tensor]:
        return {index[p]: m.clone() for p, m in self._masks.items()}

    def _load_support(self, masks: Any, params: list[Tensor]) -> dict[Tensor, Tensor]:
        """The frozen masks of a state_dict, checked (raises before anything changes)."""
        if not isinstance(masks, dict):
            raise ValueError(f"Expected 'masks' as a dict of boolean tensors. Received: {type(masks).__name__}")
        out = {}
        for i, m in masks.items():
            ok = isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(params) \
                and params[i] in self._terms
            if not ok or not isinstance(m, Tensor) or m.dtype != torch.bool or m.shape != params[i].shape:
                raise ValueError(
                    "Expected 'masks' keyed by the indices of penalised parameters, boolean tensors of "
                    f"their shapes. Received: key {i!r} with "
                    f"{tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__}"
                )
            out[params[i]] = m.to(params[i].device, copy=True)
        return out


def _ones(keep: Tensor) -> int:
    """How many ones a 0/1 float mask holds: a sum (0.4 ms for 4.2 M float32 values on 2
    CPU cores, against 12 ms for ``count_nonzero``), exact while partial sums stay below
    float32's 2^24."""
    if keep.dtype == torch.float64 or keep.numel() < 1 << 24:
        return int(keep.sum())
    return int(torch.count_nonzero(keep))


def _kth_smallest(flat: Tensor, j: int, sample: int = 1 << 14, margin: float = 0.02) -> Tensor:
    """The ``j``-th smallest value (1-based) of the 1-D ``flat`` (no NaN), exactly.

    ``kthvalue`` copies and selects the whole tensor: 76 ms for 4.2 M float32
    values on 2 CPU cores, at every step of every penalised tensor. Here a
    strided sample of ``sample`` values brackets the ``j``-th smallest within
    ``margin`` of the ranks on either side (the standard deviation of the
    sample's quantile is at most 0.4 % of the ranks, so 2 % is five of them),
    and ``kthvalue`` runs on the values inside the bracket only. When the
    bracket reaches the top of the tensor (the survivors of a sparse tensor are
    its top few percent) one comparison makes it and its count gives the rank of
    its bottom: 16 ms there for 4.2 M values, against 21 ms with both bounds. A
    bracket that misses falls back to the whole tensor.
    """
    n = flat.numel()
    if n <= 16 * sample:
        return flat.kthvalue(j).values
    # An odd stride: with rows of a power-of-two length an even one would sample a few
    # columns only (an input feature's weights can all be small, or all large).
    part = flat[:: (n // sample) | 1].sort().values
    m = part.numel()
    q = j / n
    i_lo, i_hi = int((q - margin) * m), int((q + margin) * m)
    if i_lo > 0:
        inside = flat >= part[i_lo]
        below = n - int(torch.count_nonzero(inside))  # no NaN: the rest lies below the bracket
        if i_hi < m:
            inside &= flat <= part[i_hi]
    elif i_hi < m:
        inside, below = flat <= part[i_hi], 0
    else:
        return flat.kthvalue(j).values
    if below < j:
        values = flat[inside]
        if j - below <= values.numel():
            return values.kthvalue(j - below).values
    return flat.kthvalue(j).values
