"""torchao's prototype PAT (Pruning-Aware Training), the outside reference for the prox methods.

* ``pat``: ``PruneOptimizer`` with an elementwise lasso (``ProxLasso``) at a
  fixed λ: the same scheme as ``ProximalOptimizer(mode="latent")``.
* ``pat_target``: ``PruneOptimizer`` with its global sparsity constraint
  (``GlobalMinSparsityConstraint`` over single elements, a cubic
  ``min_sparsity_schedule``, then "healing" with the mask frozen): PAT's own
  way to a requested sparsity, compared with ``TargetSparsity``.

Optional: ``pip install 'sparsecraft[bench]'``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from ..datasets import Split
from ._methods import _check_fraction
from ._train import (
    Callback,
    RunResult,
    build_model,
    make_optimizer,
    matrices,
    result,
    steps_per_epoch,
    train,
)

__all__ = ["pat_available", "run_pat", "run_pat_target"]

Hidden = Sequence[int]


def _import_pat() -> Any:
    # torchao logs a warning per optional CUDA extension it cannot load on a CPU
    # machine; those lines say nothing about PAT, so they are muted during the import.
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        from torchao.prototype.pat.optim import PruneOptimizer
    except ImportError as err:
        raise ImportError(
            "run_pat needs torchao's prototype PAT: pip install 'sparsecraft[bench]'"
        ) from err
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return PruneOptimizer


def pat_available() -> bool:
    """Whether torchao's prototype PAT can be imported (the optional ``bench`` extra)."""
    try:
        _import_pat()
    except ImportError:
        return False
    return True


def run_pat(
    data: Split,
    lam: float,
    *,
    hidden: Hidden | None = None,
    model: str = "mlp",
    batch_size: int = 64,
    epochs: int = 60,
    optimizer: str = "sgd",
    lr: float | None = None,
    seed: int = 0,
    on_epoch: Callback | None = None,
) -> RunResult:
    """torchao's PAT: ``PruneOptimizer`` with an elementwise lasso on the weight matrices.

    Configured as its source describes: a parameter group with
    ``group_type="ElemGrouper"``, ``prox_type="ProxLasso"`` and ``reg_lambda``;
    biases in a plain group. PAT keeps latent weights updated by the base
    optimizer and shows ``prox(latent, γ·λ)`` with ``γ`` the summed learning
    rate, the same scheme as ``ProximalOptimizer(mode="latent")``.

    Raises:
        ImportError: If torchao is not installed.
    """
    prune_optimizer = _import_pat()
    t0 = time.perf_counter()
    net = build_model(data, hidden, seed, model)
    weights = [p for _, p in matrices(net)]
    chosen = {id(p) for p in weights}
    others = [p for p in net.parameters() if id(p) not in chosen]
    groups = [
        {
            "params": weights,
            "group_type": "ElemGrouper",
            "prox_type": "ProxLasso",
            "reg_lambda": lam,
        },
        {"params": others},
    ]
    opt = prune_optimizer(make_optimizer(optimizer, groups, lr), reg_lambda=lam)
    h = train(
        net, data, opt, epochs=epochs, batch_size=batch_size, seed=seed, on_epoch=on_epoch
    )
    return result("pat", net, data, t0, h, {"model": model, "optimizer": optimizer, "lam": lam, "seed": seed}
    )


def run_pat_target(
    data: Split,
    target: float,
    *,
    hidden: Hidden | None = None,
    model: str = "mlp",
    batch_size: int = 64,
    epochs: int = 60,
    optimizer: str = "sgd",
    lr: float | None = None,
    ramp_fraction: float = 2 / 3,
    seed: int = 0,
    on_epoch: Callback | None = None,
) -> RunResult:
    """torchao's PAT aiming at a sparsity: a global magnitude constraint on the latent weights.

    One parameter group holds every weight matrix (:func:`matrices`) with
    ``group_type="KElementGrouper"`` and ``k=1`` (each element its own group),
    ``prox_type="GlobalMinSparsityConstraint"`` (the smallest ``target``
    fraction of all elements, ranked jointly, are shown as zero; the latent
    weights keep training) and ``min_sparsity_schedule=True`` (PAT's cubic
    ramp from 0 to ``target``); at ``healing_start_step`` (the end of the
    first ``ramp_fraction`` of the steps, as for the other methods) the mask is
    frozen and the rest of training "heals" the survivors.

    Raises:
        ImportError: If torchao is not installed.
        ValueError: If ``target`` is outside (0, 1).
    """
    target = _check_fraction("target", target, allow_zero=False)
    prune_optimizer = _import_pat()
    t0 = time.perf_counter()
    net = build_model(data, hidden, seed, model)
    weights = [p for _, p in matrices(net)]
    chosen = {id(p) for p in weights}
    others = [p for p in net.parameters() if id(p) not in chosen]
    groups = [
        {
            "params": weights,
            "group_type": "KElementGrouper",
            "k": 1,
            "prox_type": "GlobalMinSparsityConstraint",
            "min_sparsity": target,
            "min_sparsity_schedule": True,
        },
        {"params": others},
    ]
    heal = max(2, round(ramp_fraction * epochs * steps_per_epoch(data, batch_size)))
    opt = prune_optimizer(make_optimizer(optimizer, groups, lr), healing_start_step=heal)
    h = train(
        net, data, opt, epochs=epochs, batch_size=batch_size, seed=seed, on_epoch=on_epoch
    )
    return result(
        "pat_target",
        net,
        data,
        t0,
        h,
        {"model": model, "optimizer": optimizer, "target": target, "seed": seed},
        {"healing_start_step": heal},
    )
