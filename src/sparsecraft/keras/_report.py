"""Reports for Keras models: :func:`sparsity` (exact zeros) and :func:`explain` (the terms)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from .._records import ParamRecord
from .._table import rich_table, text_table
from .regularizers import ProximalRegularizer

__all__ = ["SparsityReport", "Explanation", "sparsity", "explain"]


@dataclass(frozen=True)
class SparsityReport:
    """Result of :func:`sparsity`: one record per variable and totals."""

    rows: list[ParamRecord]
    tol: float = 0.0

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.rows)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def weight_sparsity(self) -> float:
        """Exact-zero fraction of the variables with ``ndim >= 2``."""
        n = sum(r.numel for r in self.rows if len(r.shape) >= 2)
        return sum(r.zeros for r in self.rows if len(r.shape) >= 2) / n if n else 0.0

    headers = ("parameter", "shape", "numel", "zeros", "sparsity", "zero rows", "zero cols")

    def _cells(self) -> list[list[str]]:
        return [[r.name, str(r.shape), str(r.numel), str(r.zeros), f"{r.sparsity:.2%}",
                 "-" if r.zero_rows is None else str(r.zero_rows),
                 "-" if r.zero_cols is None else str(r.zero_cols)] for r in self.rows]

    def __str__(self) -> str:
        footer = ["total", "", str(self.numel), str(self.zeros), f"{self.sparsity:.2%}", "", ""]
        return text_table(self.headers, self._cells(), footer)

    def __rich__(self):
        footer = ["total", "", str(self.numel), str(self.zeros), f"{self.sparsity:.2%}", "", ""]
        return rich_table("sparsecraft: sparsity", self.headers, self._cells(), footer)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [r.to_dict() for r in self.rows], "numel": self.numel, "zeros": self.zeros,
                "sparsity": self.sparsity, "tol": self.tol}


def _zero_slices(mask: np.ndarray, axis: int) -> int:
    other = tuple(i for i in range(mask.ndim) if i != axis)
    return int(np.all(mask, axis=other).sum())


def sparsity(model: keras.Model | keras.layers.Layer, tol: float = 0.0) -> SparsityReport:
    """Exact zeros of every variable of ``model`` (``model.weights``), as the torch library's report.

    ``zero_rows``/``zero_cols`` count all-zero slices along axes 0 and 1 (a
    Dense kernel is ``(in, out)``: its zero columns are dead output units).
    """
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"Expected a tolerance tol >= 0. Received: tol={tol!r}")
    rows = []
    for v in model.weights:
        a = ops.convert_to_numpy(v)
        near = np.abs(a) <= tol
        zeros = int(np.sum(a == 0))
        rows.append(ParamRecord(
            name=v.path, shape=tuple(a.shape), numel=int(a.size), zeros=zeros, near_zeros=int(near.sum()),
            density=(a.size - zeros) / a.size if a.size else 1.0,
            zero_rows=_zero_slices(near, 0) if a.ndim >= 2 else None,
            zero_cols=_zero_slices(near, 1) if a.ndim >= 2 else None,
        ))
    return SparsityReport(rows, float(tol))


class Explanation:
    """What a Keras model's regularizers compute, term by term (the torch library's table)."""

    headers = ("term", "where", "shape", "formula", "mode", "value")

    def __init__(self, rows: list[dict[str, Any]], total: float):
        self.rows = rows
        self.total = total

    def _cells(self) -> list[list[str]]:
        return [[r["term"], r["where"], "-" if r["shape"] is None else str(tuple(r["shape"])), r["formula"],
                 r["mode"], "-" if r["value"] is None else f"{r['value']:.6g}"] for r in self.rows]

    def __str__(self) -> str:
        return text_table(self.headers, self._cells(), ["total", "", "", "", "", f"{self.total:.6g}"])

    def __rich__(self):
        return rich_table("sparsecraft: regularization terms", self.headers, self._cells(),
                          ["total", "", "", "", "", f"{self.total:.6g}"])

    def to_dict(self) -> dict[str, Any]:
        return {"terms": self.rows, "total": self.total}


def _formula(reg: Any, symbol: str) -> str:
    if isinstance(reg, ProximalRegularizer):
        return reg.formula(symbol)
    try:
        cfg = reg.get_config()
    except (AttributeError, NotImplementedError):
        cfg = {}
    return f"{type(reg).__name__}({', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in cfg.items())})({symbol})"


def _value(reg: Any, x: Any) -> float:
    value = reg.value(x) if isinstance(reg, ProximalRegularizer) else reg(ops.convert_to_tensor(x))
    return float(ops.convert_to_numpy(value))


def explain(model: keras.Model, x: Any = None) -> Explanation:
    """A table of the model's regularization terms: where, shape, formula, mode (loss/prox), value.

    Weight terms come from each trainable variable's regularizer (or the one a
    :class:`~sparsecraft.keras.optimizers.ProximalOptimizer` applies by prox);
    activity terms from each layer's ``activity_regularizer``, evaluated on
    ``x`` when it is given (``penalty(output) / batch size``, as Keras), else
    shown without a value.
    """
    rows: list[dict[str, Any]] = []
    for v in model.trainable_weights:
        prox = getattr(v, "_sparsecraft_prox", None) if v.regularizer is None else None
        reg = prox or v.regularizer
        if reg is None:
            continue
        symbol = "b" if v.path.endswith("bias") else "W"
        rows.append({"term": f"weight:{v.path}", "kind": "weight", "where": v.path, "shape": tuple(v.shape),
                     "formula": _formula(reg, symbol), "mode": "prox" if prox is not None else "loss",
                     "value": _value(reg, v)})
    layers = [la for la in _layers(model) if getattr(la, "activity_regularizer", None) is not None]
    outputs = _layer_outputs(model, layers, x) if x is not None and layers else None
    for i, layer in enumerate(layers):
        reg = layer.activity_regularizer
        value, batch = None, "batch"
        if outputs is not None:
            out = ops.convert_to_numpy(outputs[i])
            batch = out.shape[0] if out.ndim else 1
            value = _value(reg, out) / batch if out.ndim and batch else (_value(reg, out) if not out.ndim else 0.0)
        rows.append({"term": f"activity:{layer.name}", "kind": "activity", "where": layer.name, "shape": None,
                     "formula": f"{_formula(reg, 'out')} / {batch}", "mode": "loss", "value": value})
    return Explanation(rows, sum(r["value"] for r in rows if r["value"] is not None))


def _layers(model: Any) -> list:
    out = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        out.extend(_layers(layer))
    return out


def _layer_outputs(model: keras.Model, layers: list, x: Any) -> list:
    try:
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        probe = keras.Model(inputs, [la.output for la in layers])
    except (AttributeError, ValueError) as e:
        raise ValueError(
            "Expected a Functional or Sequential model with known inputs to evaluate activity terms "
            f"on x. Received: {type(model).__name__} ({e}); call explain(model) without x"
        ) from None
    out = probe(x)
    return out if isinstance(out, (list, tuple)) else [out]
