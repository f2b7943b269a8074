"""Separable penalties: each coordinate is penalised on its own."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from .. import functional as F
from ._base import Penalty, fmt, strength


@dataclasses.dataclass(frozen=True)
class L1(Penalty, register="l1"):
    """Lasso: ``R(x) = l1·Σ|x|`` (Keras ``L1``, default ``l1=0.01``, also for ``None``).

    prox: soft thresholding, ``sign(v)·max(|v| − t·l1, 0)``.
    """

    l1: float = strength(0.01)
    symbolic = "l1·Σ|x|"
    proximable = separable = makes_zeros = True
    none_is_default = True

    def _value(self, x: Tensor) -> Tensor:
        return self.l1 * x.abs().sum()

    def _prox(self, v, step, out, owns_step):
        if owns_step and isinstance(step, Tensor) and step.shape == v.shape:
            return F.soft_threshold_(v, step.mul_(self.l1))
        return F.soft_threshold(v, step * self.l1, out=out)

    def formula(self, symbol: str = "x") -> str:
        return f"{fmt(self.l1)}·Σ|{symbol}|"


@dataclasses.dataclass(frozen=True)
class L2(Penalty, register="l2"):
    """Ridge, Keras's convention (no ½): ``R(x) = l2·Σx²`` (default ``l2=0.01``, also for ``None``).

    prox: ``v / (1 + 2·t·l2)``. Shrinks, never makes zeros.
    """

    l2: float = strength(0.01)
    symbolic = "l2·Σx²"
    proximable = separable = True
    none_is_default = True

    def _value(self, x: Tensor) -> Tensor:
        return self.l2 * x.square().sum()

    def _prox(self, v, step, out, owns_step):
        if owns_step and isinstance(step, Tensor):
            return F.shrink(v, step.mul_(2.0 * self.l2), out=out)
        return F.shrink(v, 2.0 * self.l2 * step, out=out)

    def formula(self, symbol: str = "x") -> str:
        return f"{fmt(self.l2)}·Σ{symbol}²"


@dataclasses.dataclass(frozen=True)
class L1L2(Penalty, register="l1l2"):
    """Elastic net, Keras's convention: ``R(x) = l1·Σ|x| + l2·Σx²`` (defaults 0, 0 as Keras, also for ``None``).

    prox: ``soft_threshold(v, t·l1) / (1 + 2·t·l2)``.

    scikit-learn's ``ElasticNet(alpha, l1_ratio=ρ)`` minimises
    ``(1/2n)·‖y − Xw‖² + α·ρ·‖w‖₁ + ½·α·(1−ρ)·‖w‖²``; with the data term
    ``0.5·mean((y − Xw)²)`` that is ``L1L2(l1=α·ρ, l2=α·(1−ρ)/2)``,
    which :meth:`from_sklearn` builds.
    """

    l1: float = strength(0.0)
    l2: float = strength(0.0)
    symbolic = "l1·Σ|x| + l2·Σx²"
    proximable = separable = makes_zeros = True
    none_is_default = True

    @classmethod
    def from_sklearn(cls, alpha: float, l1_ratio: float = 0.5) -> L1L2:
        """The penalty matching scikit-learn's ``ElasticNet(alpha, l1_ratio)`` (see class doc)."""
        if not 0.0 <= float(l1_ratio) <= 1.0:
            raise ValueError(f"Expected l1_ratio in [0, 1]. Received: l1_ratio={l1_ratio}")
        return cls(l1=alpha * l1_ratio, l2=0.5 * alpha * (1.0 - l1_ratio))

    def _value(self, x: Tensor) -> Tensor:
        return self.l1 * x.abs().sum() + self.l2 * x.square().sum()

    def _prox(self, v, step, out, owns_step):
        res = F.soft_threshold(v, step * self.l1, out=out)
        return F.shrink(res, 2.0 * self.l2 * step, out=res)

    def formula(self, symbol: str = "x") -> str:
        return f"{fmt(self.l1)}·Σ|{symbol}| + {fmt(self.l2)}·Σ{symbol}²"


ElasticNet = L1L2


@dataclasses.dataclass(frozen=True)
class L0(Penalty, register="l0"):
    """Counting penalty: ``R(x) = strength·#{i : x_i ≠ 0}``.

    Its value has zero gradient almost everywhere: use it through a
    :class:`~sparsecraft.ProximalOptimizer`. prox: hard thresholding, keep
    ``v_i`` iff ``|v_i| > sqrt(2·t·strength)``.
    """

    strength: float = strength(0.01)
    symbolic = "strength·‖x‖₀"
    proximable = separable = makes_zeros = True

    def _value(self, x: Tensor) -> Tensor:
        # The count has no gradient; the zero-weighted sum keeps the value in the
        # autograd graph so that loss().backward() works with only L0 terms.
        return self.strength * torch.count_nonzero(x).to(x.dtype) + 0.0 * x.sum()

    def _prox(self, v, step, out, owns_step):
        if isinstance(step, Tensor):
            thr = torch.sqrt(2.0 * self.strength * step)
        else:
            thr = math.sqrt(2.0 * self.strength * step)
        return F.hard_threshold(v, thr, out=out)

    def formula(self, symbol: str = "x") -> str:
        return f"{fmt(self.strength)}·‖{symbol}‖₀"


@dataclasses.dataclass(frozen=True)
class MCP(Penalty, register="mcp"):
    """Minimax concave penalty (Zhang 2010), non-convex, unbiased for large weights.

    ``R(x) = Σ_i  λ|x_i| − x_i²/(2γ)  if |x_i| <= γλ,  else γλ²/2``, with
    ``λ = strength`` and ``γ = gamma > 0``. prox: the firm threshold (see
    :func:`sparsecraft.functional.firm_threshold`).
    """

    strength: float = strength(0.01)
    gamma: float = 3.0
    symbolic = "Σ MCP_{λ,γ}(x)"
    proximable = separable = makes_zeros = True

    def _validate(self) -> None:
        g = self.gamma
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g <= 0:
            raise ValueError(f"Expected a finite float gamma > 0. Received: gamma={g!r}")
        object.__setattr__(self, "gamma", float(g))

    def _value(self, x: Tensor) -> Tensor:
        lam, g = self.strength, self.gamma
        a = x.abs()
        inner = lam * a - a.square() / (2.0 * g)
        return torch.where(a <= g * lam, inner, torch.full_like(a, 0.5 * g * lam * lam)).sum()

    def _prox(self, v, step, out, owns_step):
        res = F.firm_threshold(v, self.strength, self.gamma, step)
        if out is None:
            return res
        return out.copy_(res)

    def formula(self, symbol: str = "x") -> str:
        return f"Σ MCP(λ={fmt(self.strength)}, γ={fmt(self.gamma)})({symbol})"
