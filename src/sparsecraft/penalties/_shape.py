"""Penalties on the shape of a tensor's values, with no closed-form prox (value only)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ._base import Penalty, fmt, strength


@dataclasses.dataclass(frozen=True)
class Hoyer(Penalty, register="hoyer"):
    """Hoyer's sparsity measure (Hoyer 2004; DeepHoyer, Yang et al. 2020): ``R(x) = strength·‖x‖₁/‖x‖₂``.

    Scale-invariant: it rewards concentration, not smallness. ``R(0) = 0``.
    Value only (add it to the loss).
    """

    strength: float = strength(0.01)
    symbolic = "strength·‖x‖₁/‖x‖₂"

    def _value(self, x: Tensor) -> Tensor:
        sq = x.square().sum()
        # At x = 0 both norms vanish; define R(0) = 0 with a zero gradient, never NaN.
        safe = torch.where(sq > 0, sq, torch.ones_like(sq))
        return torch.where(sq > 0, self.strength * x.abs().sum() / safe.sqrt(), torch.zeros_like(sq))

    def formula(self, symbol: str = "x") -> str:
        return f"{fmt(self.strength)}·‖{symbol}‖₁/‖{symbol}‖₂"


@dataclasses.dataclass(frozen=True)
class Orthogonal(Penalty, register="orthogonal"):
    """Keras's ``OrthogonalRegularizer``: decorrelates rows (or columns) of a rank-2 tensor.

    ``R(x) = factor·0.5·Σ_{i≠j} |⟨x̂_i, x̂_j⟩| / (n(n−1)/2)`` with ``x̂_i`` the
    L2-normalised rows (``mode="rows"``, n = number of rows) or columns.
    Value only. Note the layout: Keras's Dense kernel is ``(in, out)``, torch's
    ``nn.Linear.weight`` is ``(out, in)``, so Keras ``mode="rows"`` on a kernel is
    ``mode="columns"`` on the torch weight.
    """

    factor: float = strength(0.01)
    mode: str = "rows"
    symbolic = "factor·0.5·Σ_{i≠j}|⟨x̂_i,x̂_j⟩| / (n(n−1)/2)"

    def _validate(self) -> None:
        if self.mode not in ("rows", "columns"):
            raise ValueError(f"Expected mode in ('rows', 'columns'). Received: mode={self.mode!r}")

    def _value(self, x: Tensor) -> Tensor:
        if x.ndim != 2:
            raise ValueError(f"Expected a rank-2 tensor for Orthogonal. Received: shape={tuple(x.shape)}")
        v = x if self.mode == "rows" else x.T
        n = v.shape[0]
        if n < 2:
            raise ValueError(
                f"Expected at least 2 {self.mode} for Orthogonal (it compares pairs). "
                f"Received: shape={tuple(x.shape)}"
            )
        # Keras normalises with x·min(rsqrt(Σx²), 1/ε), ε = 1e-7. rsqrt(max(Σx², ε²)) is the
        # same number, and its gradient stays finite at a zero row (sparse weights have
        # them), where clamping rsqrt's output gives 0·inf = NaN.
        inv = torch.rsqrt(v.square().sum(dim=1, keepdim=True).clamp(min=1e-14))
        u = v * inv
        gram = u @ u.T
        off = gram - torch.diag_embed(torch.diagonal(gram))
        return self.factor * 0.5 * off.abs().sum() / (n * (n - 1) / 2.0)

    def formula(self, symbol: str = "x") -> str:
        return f"{fmt(self.factor)}·0.5·Σ_i≠j|⟨{symbol}̂_i,{symbol}̂_j⟩|/(n(n−1)/2) ({self.mode})"
