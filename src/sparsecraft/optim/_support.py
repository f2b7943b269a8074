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
  zeros); with the support frozen for the last third 95.4 %.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import distributed as _dist
from ..regularizer import Term
from ._prox_step import _apply_prox


class _Support:
    """Relaxed latent display and frozen support of :class:`ProximalOptimizer` (a base class).

    Reads the optimizer's ``relaxed``, ``inner``, ``_terms``, ``_latent``,
    ``_gamma``, ``_versions``, ``_masks`` and its step buffer (``_workspace``).
    """

    relaxed: bool
    inner: torch.optim.Optimizer
    _workspace: Any
    _terms: dict[Tensor, Term]
    _latent: dict[Tensor, Tensor]
    _gamma: dict[Tensor, float]
    _versions: dict[Tensor, int]
    _masks: dict[Tensor, Tensor]

    def _show_latent(self, term: Term, p: Tensor, step: float) -> None:
        """Write the shown weights into ``p`` (which holds the latent copy): prox, or relaxed prox."""
        _apply_prox(term.penalty, p, step)
        if self.relaxed:
            # The latent values where the prox keeps a coordinate (or a group): same support,
            # no shrinkage. The 0/1 mask goes to the shared step buffer: no allocation.
            # Sharded (FSDP2) parameters: elementwise on the local shards.
            x, z = p, self._latent[p]
            if _dist.is_sharded(p):
                x, z = p.to_local(), z.to_local()
            keep = torch.ne(x, 0, out=self._workspace(x))
            x.copy_(z).mul_(keep)

    def _latent_display(self, term: Term, z: Tensor, step: float) -> Tensor:
        """What the model would show for latent ``z`` at prox step ``step`` (out of place)."""
        shown = term.penalty.prox(z, step)
        return z * shown.ne(0) if self.relaxed else shown

    @property
    def support_frozen(self) -> bool:
        """Whether :meth:`freeze_support` fixed the zero pattern."""
        return bool(self._masks)

    @torch.no_grad()
    def freeze_support(self, frozen: bool = True) -> None:
        """Fix the zero pattern of the penalised parameters (or release it with ``frozen=False``).

        While frozen, a step is the inner optimizer's step on the weights the
        model shows, with the gradients of the zeros masked and the zeros
        re-imposed after it (momentum cannot revive them); the penalties are not
        applied: the survivors are trained without shrinkage, as the refit of the
        relaxed lasso. Released, latent mode restarts its latent copies from the
        weights (``γ = 0``), as for weights changed outside the optimizer.

        Args:
            frozen: True to fix the current zeros, False to release them.
        """
        if not isinstance(frozen, bool):
            raise TypeError(f"Expected frozen to be a bool. Received: frozen={frozen!r}")
        if frozen:
            self._masks = {p: p.ne(0) for p in self._terms}
            return
        self._masks = {}
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
        self.inner.step()
        for p, keep in self._masks.items():
            p.mul_(keep)
            if p in self._versions:
                self._versions[p] = p._version
        return loss

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
