"""Parameter sparsity: :func:`sparsity` and its :class:`SparsityReport`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._records import ParamRecord
from ._counts import _check_tol, _fraction, _local, _unknown_name_error, _zero_mask, count_zeros
from ._flops import LayerFlops, layer_flops

__all__ = ["ParamRecord", "ParamSelector", "SparsityReport", "sparsity"]


@dataclass(frozen=True)
class SparsityReport:
    """Result of :func:`sparsity`: per-parameter records, totals and FLOPs.

    Attributes:
        rows: One :class:`ParamRecord` per parameter, in model order.
        tol: The tolerance used for ``near_zeros`` and zero rows/columns.
        layers: Per-layer FLOPs when ``example_inputs`` was given, else ``None``.
    """

    rows: list[ParamRecord]
    tol: float = 0.0
    layers: list[LayerFlops] | None = None

    @property
    def numel(self) -> int:
        """Total number of parameter elements (also the parameter count)."""
        return sum(r.numel for r in self.rows)

    @property
    def zeros(self) -> int:
        """Total exact zeros."""
        return sum(r.zeros for r in self.rows)

    @property
    def near_zeros(self) -> int:
        """Total elements with ``|x| <= tol``."""
        return sum(r.near_zeros for r in self.rows)

    @property
    def sparsity(self) -> float:
        """Exact-zero fraction over all parameters (0.0 when there are none)."""
        return _fraction(self.zeros, self.numel)

    @property
    def near_sparsity(self) -> float:
        """Fraction with ``|x| <= tol`` over all parameters."""
        return _fraction(self.near_zeros, self.numel)

    @property
    def weight_numel(self) -> int:
        """Elements of the parameters with ``ndim >= 2`` ("weights")."""
        return sum(r.numel for r in self.rows if len(r.shape) >= 2)

    @property
    def weight_zeros(self) -> int:
        """Exact zeros of the parameters with ``ndim >= 2``."""
        return sum(r.zeros for r in self.rows if len(r.shape) >= 2)

    @property
    def weight_sparsity(self) -> float:
        """Exact-zero fraction of the parameters with ``ndim >= 2``."""
        return _fraction(self.weight_zeros, self.weight_numel)

    @property
    def n_params(self) -> int:
        """Total parameter count (same as ``numel``)."""
        return self.numel

    @property
    def n_nonzero(self) -> int:
        """Parameters that are not exactly zero."""
        return self.numel - self.zeros

    @property
    def flops(self) -> int | None:
        """Dense ``2 * MACs`` of the example forward pass, or ``None``."""
        return None if self.layers is None else sum(r.flops for r in self.layers)

    @property
    def flops_structured(self) -> int | None:
        """``2 * MACs`` after removing all-zero rows/columns per layer, or ``None``."""
        return None if self.layers is None else sum(r.flops_structured for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the totals, the records and the FLOPs."""
        return {
            "tol": self.tol,
            "numel": self.numel,
            "zeros": self.zeros,
            "near_zeros": self.near_zeros,
            "sparsity": self.sparsity,
            "near_sparsity": self.near_sparsity,
            "weight_numel": self.weight_numel,
            "weight_zeros": self.weight_zeros,
            "weight_sparsity": self.weight_sparsity,
            "n_params": self.n_params,
            "n_nonzero": self.n_nonzero,
            "flops": self.flops,
            "flops_structured": self.flops_structured,
            "params": [r.to_dict() for r in self.rows],
            "layers": None
            if self.layers is None
            else [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "flops": r.flops,
                    "flops_structured": r.flops_structured,
                }
                for r in self.layers
            ],
        }

    def _cells(self) -> tuple[list[str], list[list[str]], list[str]]:
        header = ["parameter", "shape", "numel", "zeros"]
        if self.tol > 0:
            header.append(f"|x|<={self.tol:g}")
        header += ["density", "zero rows", "zero cols"]

        def line(name, shape, numel, zeros, near, density, zr, zc) -> list[str]:
            cells = [name, shape, f"{numel:,}", f"{zeros:,}"]
            if self.tol > 0:
                cells.append(f"{near:,}")
            return cells + [f"{density:.2%}", zr, zc]

        body = [
            line(
                r.name,
                "x".join(map(str, r.shape)) or "()",
                r.numel,
                r.zeros,
                r.near_zeros,
                r.density,
                "-" if r.zero_rows is None else f"{r.zero_rows}/{r.shape[0]}",
                "-" if r.zero_cols is None else f"{r.zero_cols}/{r.shape[1]}",
            )
            for r in self.rows
        ]
        total = line(
            "total",
            "",
            self.numel,
            self.zeros,
            self.near_zeros,
            1.0 - self.sparsity if self.numel else 1.0,
            "",
            "",
        )
        return header, body, total

    def _summary(self) -> str:
        text = (
            f"sparsity {self.sparsity:.2%} ({self.zeros:,} of {self.numel:,} exact zeros), "
            f"weights {self.weight_sparsity:.2%}"
        )
        if self.layers is not None:
            text += (
                f"; FLOPs {self.flops:,} dense, {self.flops_structured:,} without zero rows/cols"
            )
        return text

    def table(self) -> Any:
        """The per-parameter table as a ``rich.table.Table`` (not printed)."""
        from rich.table import Table

        header, body, total = self._cells()
        table = Table(title="Parameter sparsity", caption=self._summary(), show_footer=True)
        for i, (name, foot) in enumerate(zip(header, total, strict=True)):
            table.add_column(name, footer=foot, justify="left" if i < 2 else "right")
        for cells in body:
            table.add_row(*cells)
        return table

    def __str__(self) -> str:
        header, body, total = self._cells()
        lines = [header, *body, total]
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]

        def fmt(row: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()

        rule = "-" * len(fmt(header))
        return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(total), self._summary()])


ParamSelector = Iterable[str] | Callable[[str, torch.Tensor], bool]


def _named_tensors(model_or_params: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(model_or_params, nn.Module):
        return list(model_or_params.named_parameters())
    if isinstance(model_or_params, torch.Tensor):
        return [("tensor", model_or_params)]
    if isinstance(model_or_params, Mapping):
        items = list(model_or_params.items())
    elif isinstance(model_or_params, Iterable) and not isinstance(model_or_params, str):
        items = list(model_or_params)
    else:
        raise TypeError(
            "Expected an nn.Module, a tensor, or an iterable of (name, tensor). "
            f"Received: model_or_params={type(model_or_params).__name__}"
        )
    named = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            named.append((str(i), item))
        elif (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)
        ):
            named.append(item)
        else:
            raise TypeError(
                "Expected (name, tensor) pairs or tensors. "
                f"Received: model_or_params[{i}]={type(item).__name__}"
            )
    return named


def _select(named: list[tuple[str, torch.Tensor]], params: Any) -> list[tuple[str, torch.Tensor]]:
    if params is None:
        return named
    if callable(params):
        return [(n, t) for n, t in named if params(n, t)]
    if isinstance(params, str):
        params = [params]
    wanted = list(params)
    known = [n for n, _ in named]
    for name in wanted:
        if not isinstance(name, str):
            raise TypeError(f"Expected parameter names (str). Received: params item={name!r}")
        if name not in known:
            raise _unknown_name_error("parameter", name, known)
    keep = set(wanted)
    return [(n, t) for n, t in named if n in keep]


def _record(name: str, t: torch.Tensor, tol: float) -> ParamRecord:
    t = _local(t).detach()
    counts = [count_zeros(t, 0.0, as_tensor=True), count_zeros(t, tol, as_tensor=True)[:1]]
    if t.ndim >= 2:
        nz = ~_zero_mask(t, tol)
        rows = (~nz.flatten(1).any(1)).sum()
        cols = (~nz.transpose(0, 1).flatten(1).any(1)).sum()
        counts.append(torch.stack([rows, cols]).to(counts[0].device))
    values = torch.cat(counts).tolist()  # one host sync per parameter
    zeros, numel, near = values[0], values[1], values[2]
    return ParamRecord(
        name=name,
        shape=tuple(t.shape),
        numel=numel,
        zeros=zeros,
        near_zeros=near,
        density=(numel - zeros) / numel if numel else 1.0,
        zero_rows=values[3] if t.ndim >= 2 else None,
        zero_cols=values[4] if t.ndim >= 2 else None,
    )


def sparsity(
    model_or_params: nn.Module | torch.Tensor | Iterable[Any] | Mapping[str, torch.Tensor],
    example_inputs: Any = None,
    *,
    tol: float = 0.0,
    params: ParamSelector | None = None,
) -> SparsityReport:
    """Measures the zeros of a model's parameters (or of any named tensors).

    For every selected parameter: shape, numel, exact zeros, elements with
    ``|x| <= tol``, density ``= nonzeros / numel``, and for ``ndim >= 2``
    the all-zero rows (slices along dim 0: output units, conv output
    channels) and columns (slices along dim 1: input features, input
    channels), where "zero" means ``|x| <= tol``. Totals are on the report.

    ``sparsity(model, example_inputs)`` reads its inputs as
    ``compact(model, example_inputs)`` does, and ``report.flops`` equals the
    compact report's ``flops_before``.

    Args:
        model_or_params: An ``nn.Module`` (its ``named_parameters()``, shared
            parameters once), a tensor, a mapping name -> tensor (e.g. a
            ``state_dict``), or an iterable of ``(name, tensor)`` pairs or of
            tensors (named by position).
        example_inputs: If given (a tensor, tuple/list of positional inputs or
            dict of keyword inputs), ``model`` is run once to count the FLOPs of
            its Linear/Conv layers for that batch, dense and without all-zero
            rows/columns (see :func:`layer_flops`). Requires an ``nn.Module``.
        tol: Keyword-only. Tolerance for near-zeros and zero rows/columns;
            ``0.0`` means exact.
        params: Restrict to some parameters: a list of names, or a callable
            ``(name, tensor) -> bool``.

    Returns:
        A :class:`SparsityReport`.

    Raises:
        TypeError: On inputs of the wrong type.
        ValueError: If ``tol`` is negative or not finite, or a name in
            ``params`` is not a parameter (the error lists close names).
    """
    tol = _check_tol(tol)
    if example_inputs is not None and not isinstance(model_or_params, nn.Module):
        raise TypeError(
            "Expected an nn.Module when example_inputs is given. "
            f"Received: model_or_params={type(model_or_params).__name__}"
        )
    named = _select(_named_tensors(model_or_params), params)
    records = [_record(n, t, tol) for n, t in named]
    layers = None
    if example_inputs is not None:
        layers = layer_flops(model_or_params, example_inputs, tol)
    return SparsityReport(rows=records, tol=tol, layers=layers)
