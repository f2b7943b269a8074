"""Terms of a regularizer: one penalty bound to one place, and the table that explains them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import distributed as _dist
from ._table import rich_table, text_table
from .penalties import Penalty, check_strength


@dataclass(eq=False)
class Term:
    """One penalty bound to one place.

    Attributes:
        kind: ``"weight"``, ``"activity"`` or ``"tensor"``.
        where: the parameter or module name (``"tensor"`` for raw tensors).
        penalty: the :class:`~sparsecraft.penalties.Penalty`.
        target: the parameter, module or tensor it applies to.
        reduction: activity terms only: ``"batch"`` (divide by the batch size,
            Keras ≥ 3.14 and tf.keras), ``"sum"`` (Keras 3.0–3.13) or ``"mean"``
            (divide by the number of elements).
        scale: a multiplier on the penalty (``scale·R``); :class:`~sparsecraft.TargetSparsity`
            adjusts it. Prox steps use ``scale·t``, since ``prox_{t·(cR)} = prox_{(ct)·R}``.
        prox: True while a :class:`~sparsecraft.ProximalOptimizer` applies this
            term by prox; it then stays out of :meth:`Regularizer.loss`.
        aliases: weight terms: the other names of the same parameter in the model
            (a tied weight: ``out.weight`` is ``emb.weight``).
        part: activity terms: which part of the module's output (``output=``), or None
            for the first tensor.
    """

    kind: str
    where: str
    penalty: Penalty
    target: Any
    reduction: str = "batch"
    scale: float = 1.0
    prox: bool = False
    aliases: tuple[str, ...] = ()
    part: str | None = None
    captured: list[Tensor] = field(default_factory=list, repr=False)
    last_batch: int | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.where}"

    @property
    def where_text(self) -> str:
        """``where`` with the other names of a tied parameter, or the selected output part."""
        if self.aliases:
            return " = ".join((self.where, *self.aliases))
        if self.part is not None:
            return f"{self.where}[{self.part}]"
        return self.where

    @property
    def shape(self) -> tuple[int, ...] | None:
        if self.kind == "activity":
            return None
        return tuple(self.target.shape)

    def current(self) -> Tensor:
        """The term's differentiable value now (weight and tensor terms are recomputed)."""
        if self.kind == "activity":
            if not self.captured:
                return torch.zeros(())
            total = self.captured[0]
            for v in self.captured[1:]:
                total = total + v
            return self.scale * total
        # A sharded (FSDP2) parameter is summed over shards or gathered: see distributed/_dtensor.py.
        return self.scale * _dist.penalty_value(self.penalty, self.target)

    def _capture(self, outputs: list[tuple[Tensor, int | None]]) -> None:
        """Records one call: the sum over the selected tensors, each divided by its batch size.

        ``outputs`` are ``(tensor, batch_dim)`` pairs; ``batch_dim`` None means unbatched.
        One value per call, so ``Σ over n calls`` in :meth:`formula` counts calls.
        """
        total: Tensor | None = None
        for out, dim in outputs:
            if not out.is_floating_point():
                continue
            v = self._value(out, dim)
            total = v if total is None else total + v
        if total is not None:
            self.captured.append(total)

    def _value(self, out: Tensor, dim: int | None) -> Tensor:
        if out.ndim == 0:
            # Keras does not divide scalar outputs by a batch size.
            return self.penalty(out)
        batch = 1 if dim is None else out.shape[dim]
        self.last_batch = batch
        if batch == 0:
            # An empty batch gives 0, never 0/0 (tf.keras divide_no_nan, Keras >= 3.14).
            return out.sum() * 0.0
        v = self.penalty(out)
        if self.reduction == "batch":
            v = v / batch
        elif self.reduction == "mean":
            v = v / out.numel()
        return v

    def symbol(self) -> str:
        if self.kind == "weight":
            return "b" if self.where.split(".")[-1] == "bias" else "W"
        return "out" if self.kind == "activity" else "x"

    def formula(self) -> str:
        f = self.penalty.formula(self.symbol())
        if self.kind == "activity":
            if self.reduction == "batch":
                f = f"{f} / {self.last_batch if self.last_batch is not None else 'batch'}"
            elif self.reduction == "mean":
                f = f"{f} / numel"
            n = len(self.captured)
            if n > 1:
                f = f"Σ over {n} calls: {f}"
        if self.scale != 1.0:
            f = f"{self.scale:.4g} × ({f})"
        return f


def _get_scale(self: Term) -> float:
    return self._scale


def _set_scale(self: Term, value: Any) -> None:
    # Checked where it is set (by hand, by TargetSparsity, by Regularizer.load_state_dict):
    # a NaN, infinite or negative scale would reach the prox as a NaN or an anti-shrinking
    # step (sparsecraft issue 10, item 14).
    self._scale = check_strength("scale", value)


# A property installed after the dataclass is built: the generated __init__ (``scale=1.0``)
# and repr go through it, and every assignment is validated.
Term.scale = property(_get_scale, _set_scale, doc=(
    "A non-negative finite multiplier on the penalty; setting anything else raises ValueError."))


class Explanation:
    """What a regularizer computes, term by term: ``str()`` for text, rich for terminals."""

    headers = ("term", "where", "shape", "formula", "mode", "value")

    def __init__(self, rows: list[dict[str, Any]], total: float):
        self.rows = rows
        self.total = total

    def _cells(self) -> list[list[str]]:
        return [
            [r["term"], r["where"], "-" if r["shape"] is None else str(tuple(r["shape"])), r["formula"],
             r["mode"], f"{r['value']:.6g}"]
            for r in self.rows
        ]

    def _footer(self) -> list[str]:
        return ["total", "", "", "", "", f"{self.total:.6g}"]

    def __str__(self) -> str:
        return text_table(self.headers, self._cells(), self._footer())

    def __rich__(self):
        return rich_table("sparsecraft: regularization terms", self.headers, self._cells(), self._footer())

    def to_dict(self) -> dict[str, Any]:
        return {"terms": self.rows, "total": self.total}
