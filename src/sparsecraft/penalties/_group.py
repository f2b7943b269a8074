"""Group penalties: whole rows, columns, channels or index-defined groups go to zero together."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import functional as F
from ._base import Penalty, fmt, strength

_NAMED_GROUPS = {"rows": 0, "out_channels": 0, "columns": 1, "in_channels": 1}
_WEIGHTS = ("sqrt_size", "none")
_MAX_GROUP_INDEX = 2**16  # group labels above the number of slices are allowed up to this


class GroupLayout(NamedTuple):
    """How a tensor splits into groups: slices along ``dim``, merged by ``index``."""

    dim: int
    index: Tensor | None
    n_groups: int
    weights: Tensor  # one weight per group


@functools.lru_cache(maxsize=64)
def _index_tensor(groups: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(groups, dtype=torch.long, device=device)


class _Grouped:
    """Shared group handling for GroupLasso and SparseGroupLasso (fields: groups, dim, weights)."""

    groups: Any
    dim: int
    weights: str

    def _validate_groups(self) -> None:
        g = self.groups
        if isinstance(g, str):
            if g not in _NAMED_GROUPS:
                raise ValueError(
                    f"Expected groups to be one of {sorted(_NAMED_GROUPS)} or a sequence of group "
                    f"indices. Received: groups={g!r}"
                )
        else:
            try:
                g = tuple(int(i) for i in g)
            except (TypeError, ValueError):
                raise ValueError(
                    f"Expected groups to be a name or a sequence of non-negative ints. Received: groups={g!r}"
                ) from None
            if not g or min(g) < 0:
                raise ValueError(f"Expected non-negative group indices. Received: groups={self.groups!r}")
            limit = max(len(g), _MAX_GROUP_INDEX)
            if max(g) >= limit:
                # Labels may leave groups empty, but every per-group buffer is sized by the
                # largest label: groups=(10**12,) would ask for terabytes.
                raise ValueError(
                    f"Expected group indices below {limit} (the number of slices, or "
                    f"{_MAX_GROUP_INDEX}). Received: max(groups)={max(g)}"
                )
            object.__setattr__(self, "groups", g)
            if isinstance(self.dim, bool) or not isinstance(self.dim, int):
                raise ValueError(f"Expected an int dim. Received: dim={self.dim!r}")
        if self.weights not in _WEIGHTS:
            raise ValueError(f"Expected weights in {_WEIGHTS}. Received: weights={self.weights!r}")

    def layout(self, x: Tensor) -> GroupLayout:
        """The groups of ``x``; raises ``ValueError`` if the spec does not fit its shape."""
        # sqrt(|g|) in float32 for a float64 tensor would shift every threshold by ~1e-8.
        wdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if isinstance(self.groups, str):
            dim = _NAMED_GROUPS[self.groups]
            if x.ndim < 2:
                raise ValueError(
                    f"Expected a tensor with at least 2 dims for groups={self.groups!r}. "
                    f"Received: shape={tuple(x.shape)}"
                )
            n = x.shape[dim]
            size = x.numel() // max(n, 1)
            sizes = torch.full((n,), float(size), dtype=wdtype, device=x.device)
            index = None
        else:
            if not -x.ndim <= self.dim < x.ndim:
                raise ValueError(
                    f"Expected dim within the tensor's {x.ndim} dims. Received: dim={self.dim}, "
                    f"shape={tuple(x.shape)}"
                )
            dim = self.dim % x.ndim
            if len(self.groups) != x.shape[dim]:
                raise ValueError(
                    f"Expected one group index per slice along dim {dim} ({x.shape[dim]} slices). "
                    f"Received: {len(self.groups)} indices for shape={tuple(x.shape)}"
                )
            index = _index_tensor(self.groups, x.device)
            n = max(self.groups) + 1
            per_slice = x.numel() // max(x.shape[dim], 1)
            sizes = torch.bincount(index, minlength=n).to(wdtype) * per_slice
        w = sizes.sqrt() if self.weights == "sqrt_size" else torch.ones_like(sizes)
        return GroupLayout(dim, index, n, w.to(x.dtype))

    def _group_value(self, x: Tensor, lay: GroupLayout) -> Tensor:
        return (lay.weights * F.group_norms(x, lay.dim, lay.index, lay.n_groups)).sum()

    def _check_group_step(self, v: Tensor, step: Tensor) -> None:
        n = self.layout(v).n_groups
        if step.ndim != 1 or step.numel() != n:
            raise ValueError(
                f"Expected a scalar step or one step per group ({n} groups) for "
                f"{type(self).__name__}. Received: step of shape {tuple(step.shape)}"
            )

    def _groups_text(self) -> str:
        if isinstance(self.groups, str):
            return self.groups
        return f"{max(self.groups) + 1} groups along dim {self.dim}"


def _per_slice(step: float | Tensor, lay: GroupLayout, ndim: int) -> float | Tensor:
    """Broadcast a per-group step to the tensor's slices along the group dim."""
    if not isinstance(step, Tensor):
        return step
    if step.numel() == 1:
        # one step for all groups, whatever its shape (indexing it by group would fail)
        return step.reshape(())
    s = step[lay.index] if lay.index is not None else step
    view = [1] * ndim
    view[lay.dim] = -1
    return s.reshape(view)


@dataclasses.dataclass(frozen=True)
class GroupLasso(_Grouped, Penalty, register="group_lasso"):
    """Group lasso (Yuan & Lin 2006): ``R(x) = strength·Σ_g w_g·‖x_g‖₂``.

    Groups are ``"rows"`` (= ``"out_channels"``, slices along dim 0: output
    units of a Linear, filters of a conv), ``"columns"`` (= ``"in_channels"``,
    slices along dim 1), or a sequence giving a group index to each slice along
    ``dim``. Weights ``w_g = sqrt(|g|)`` by default (``weights="sqrt_size"``, the
    usual choice, so that large groups are not favoured), or 1 (``"none"``).

    prox: block soft thresholding, ``x_g = v_g·max(1 − t·strength·w_g/‖v_g‖₂, 0)``.
    """

    strength: float = strength(0.01)
    groups: Any = "rows"
    dim: int = 1
    weights: str = "sqrt_size"
    symbolic = "strength·Σ_g w_g‖x_g‖₂"
    proximable = makes_zeros = True

    def _validate(self) -> None:
        self._validate_groups()

    def _value(self, x: Tensor) -> Tensor:
        return self.strength * self._group_value(x, self.layout(x))

    def _prox(self, v, step, out, owns_step):
        lay = self.layout(v)
        thr = lay.weights * (step * self.strength)
        return F.group_soft_threshold(v, thr, lay.dim, lay.index, lay.n_groups, out=out)

    def formula(self, symbol: str = "x") -> str:
        w = "√|g|·" if self.weights == "sqrt_size" else ""
        return f"{fmt(self.strength)}·Σ_g {w}‖{symbol}_g‖₂ ({self._groups_text()})"


@dataclasses.dataclass(frozen=True)
class SparseGroupLasso(_Grouped, Penalty, register="sparse_group_lasso"):
    """Sparse group lasso (Simon et al. 2013): ``R(x) = l1·Σ|x| + group·Σ_g w_g·‖x_g‖₂``.

    Zeros both whole groups and single coordinates inside surviving groups.
    Groups and weights as in :class:`GroupLasso`.

    prox: soft thresholding by ``t·l1``, then block soft thresholding by
    ``t·group·w_g`` — the exact prox of the sum for these two penalties.
    """

    l1: float = strength(0.01)
    group: float = strength(0.01)
    groups: Any = "rows"
    dim: int = 1
    weights: str = "sqrt_size"
    symbolic = "l1·Σ|x| + group·Σ_g w_g‖x_g‖₂"
    proximable = makes_zeros = True

    def _validate(self) -> None:
        self._validate_groups()

    def _value(self, x: Tensor) -> Tensor:
        return self.l1 * x.abs().sum() + self.group * self._group_value(x, self.layout(x))

    def _prox(self, v, step, out, owns_step):
        lay = self.layout(v)
        res = F.soft_threshold(v, _per_slice(step, lay, v.ndim) * self.l1, out=out)
        thr = lay.weights * (step * self.group)
        return F.group_soft_threshold(res, thr, lay.dim, lay.index, lay.n_groups, out=res)

    def formula(self, symbol: str = "x") -> str:
        w = "√|g|·" if self.weights == "sqrt_size" else ""
        return (
            f"{fmt(self.l1)}·Σ|{symbol}| + {fmt(self.group)}·Σ_g {w}‖{symbol}_g‖₂ "
            f"({self._groups_text()})"
        )
