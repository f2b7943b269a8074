"""Regularization path: train over a list of strengths and look at the accuracy–sparsity trade-off."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from .. import penalties as _penalties
from ..metrics import count_zeros
from ..optim import ProximalOptimizer
from ..regularizer import Regularizer

__all__ = ["path", "PathResult", "PathRow"]


@dataclass
class PathRow:
    """One strength of a regularization path, measured after its training."""

    strength: float
    accuracy: float
    sparsity: float
    loss: float
    nonzero: int
    seconds: float


@dataclass
class PathResult:
    """A regularization path: one :class:`PathRow` per strength, in training order.

    ``accuracy`` is the test accuracy (negative test MSE for regression),
    ``sparsity`` the fraction of exact zeros over the penalised parameters,
    ``loss`` the mean training loss of the last epoch (data loss; prox terms
    are not in it), ``nonzero`` the non-zero count of the penalised parameters.
    """

    rows: list[PathRow]
    penalty: str
    config: dict[str, Any] = field(default_factory=dict)

    def pareto(self) -> list[PathRow]:
        """The rows no other row beats on both accuracy and sparsity, by increasing sparsity."""
        front = [
            r for r in self.rows
            if not any((o.accuracy >= r.accuracy and o.sparsity >= r.sparsity)
                       and (o.accuracy > r.accuracy or o.sparsity > r.sparsity) for o in self.rows)
        ]
        return sorted(front, key=lambda r: (r.sparsity, -r.accuracy))

    def curve(self) -> list[tuple[float, float]]:
        """``(sparsity, accuracy)`` of every row, the input of :func:`sparsecraft.report.plot_pareto`."""
        return [(r.sparsity, r.accuracy) for r in self.rows]

    def table(self) -> Any:
        """A ``rich.table.Table`` of the rows (built, never printed); ``*`` marks the Pareto front."""
        from .._table import rich_table

        front = {id(r) for r in self.pareto()}
        cells = [[f"{r.strength:.4g}", f"{100 * r.accuracy:.2f} %", f"{100 * r.sparsity:.3f} %",
                  f"{r.loss:.4g}", str(r.nonzero), f"{r.seconds:.1f}", "*" if id(r) in front else ""]
                 for r in self.rows]
        return rich_table(f"regularization path ({self.penalty})",
                          ("strength", "accuracy", "sparsity", "loss", "non-zeros", "s", "pareto"), cells)

    def to_dict(self) -> dict[str, Any]:
        front = {id(r) for r in self.pareto()}
        return {"penalty": self.penalty, "config": dict(self.config),
                "rows": [{**asdict(r), "pareto": id(r) in front} for r in self.rows]}


def _penalty_for(penalty: str | Callable[[float], Any], strength: float) -> Any:
    if callable(penalty):
        return _penalties.get(penalty(strength))
    if not isinstance(penalty, str) or ":" in penalty:
        raise ValueError(
            f"Expected a penalty name (e.g. 'l1', 'group_lasso') or a callable strength -> Penalty. "
            f"Received: penalty={penalty!r}"
        )
    return _penalties.get(f"{penalty}:{strength!r}")


def path(
    make_model: Callable[[], nn.Module],
    data: Any,
    strengths: Sequence[float],
    *,
    epochs: int,
    optimizer: str = "sgd",
    lr: float | None = None,
    penalty: str | Callable[[float], Any] = "l1",
    params: Callable[[str, Tensor], bool] | None = None,
    warm_start: bool = True,
    mode: str = "latent",
    batch_size: int = 64,
    seed: int = 0,
    on_step: Callable[[int, PathRow], None] | None = None,
) -> PathResult:
    """Train over a list of strengths and record accuracy, sparsity and loss for each.

    Each strength trains ``epochs`` epochs with the penalty applied by a
    :class:`~sparsecraft.ProximalOptimizer` (exact zeros) through
    :func:`sparsecraft.experiments.train`. With ``warm_start`` one model is
    built and each strength starts from the previous strength's result (pass
    increasing strengths to go from dense to sparse, the usual continuation);
    otherwise ``make_model()`` builds a fresh model per strength (seed it
    inside ``make_model`` for comparable starts). Each strength gets a fresh
    optimizer.

    Args:
        make_model: builds the model (no arguments).
        data: a :class:`sparsecraft.datasets.Split`.
        strengths: the strengths, trained in this order (finite, >= 0).
        epochs: epochs per strength.
        optimizer: ``"sgd"`` (momentum 0.9, lr 0.05) or ``"adam"`` (lr 1e-3).
        lr: learning rate instead of the optimizer's default.
        penalty: a penalty name whose first field is its strength (``"l1"``,
            ``"group_lasso"``, ``"l0"``, ``"mcp"``) or a callable
            ``strength -> Penalty``.
        params: which parameters to penalise, ``(name, parameter) -> bool``;
            default: those with ``ndim >= 2`` (weight matrices and kernels).
        warm_start: continue from the previous strength's weights.
        mode: the prox mode, ``"latent"`` or ``"forward_backward"``.
        batch_size: minibatch size.
        seed: seed of the minibatch order.
        on_step: called as ``on_step(index, row)`` after each strength.

    Returns:
        A :class:`PathResult`; ``.pareto()`` gives the accuracy–sparsity front.

    Raises:
        ValueError: on an empty or invalid list of strengths, an unknown
            penalty or optimizer, or when no parameter is selected.
    """
    from .. import experiments as _exp  # experiments imports this module: import at call time

    strengths = [float(_penalties.check_strength("strengths", s)) for s in strengths]
    if not strengths:
        raise ValueError("Expected at least one strength. Received: strengths=[]")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"Expected an int epochs >= 1. Received: epochs={epochs!r}")
    select = params if params is not None else (lambda name, p: p.ndim >= 2)
    spec = penalty if isinstance(penalty, str) else getattr(penalty, "__name__", "callable")
    rows: list[PathRow] = []
    model = make_model() if warm_start else None
    for i, strength in enumerate(strengths):
        t0 = time.perf_counter()
        if not warm_start:
            model = make_model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected make_model() to return an nn.Module. Received: {type(model).__name__}")
        chosen = [p for n, p in model.named_parameters() if select(n, p)]
        if not chosen:
            raise ValueError("Expected params to select at least one parameter. Received: none selected")
        reg = Regularizer(model)
        pen = _penalty_for(penalty, strength)
        for p in chosen:
            reg.add_weight(p, pen)
        opt = ProximalOptimizer(_exp.make_optimizer(optimizer, model.parameters(), lr), reg, mode=mode)
        history = _exp.train(model, data, opt, epochs=epochs, batch_size=batch_size, regularizer=reg,
                             seed=seed)
        zeros, numel = count_zeros(chosen)
        row = PathRow(strength=strength, accuracy=_exp.evaluate(model, data), sparsity=zeros / numel,
                      loss=float(history[-1]["loss"]), nonzero=numel - zeros,
                      seconds=time.perf_counter() - t0)
        reg.remove()
        rows.append(row)
        if on_step is not None:
            on_step(i, row)
    config = {"epochs": epochs, "optimizer": optimizer, "lr": lr, "mode": mode, "warm_start": warm_start,
              "batch_size": batch_size, "seed": seed}
    return PathResult(rows=rows, penalty=spec, config=config)
