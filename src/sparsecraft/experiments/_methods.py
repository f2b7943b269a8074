"""The ways of making a network sparse, each trained the same way and measured the same way.

* ``dense``: no penalty, the reference accuracy.
* ``l1_loss``: Keras style, ``λ·Σ|W|`` added to the loss, then
  :func:`~sparsecraft.optim.threshold` (the loss alone leaves no exact zero).
* ``magnitude`` and ``gradual``: magnitude pruning, in :mod:`._pruning`.
* ``prox``: :class:`~sparsecraft.ProximalOptimizer` with an L1 penalty.
* ``target``: prox plus :class:`~sparsecraft.control.TargetSparsity`.
* ``pat`` and ``pat_target``: torchao's prototype PAT, in :mod:`._pat`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..datasets import Split
from ..optim import ProximalOptimizer, threshold
from ..penalties import L1
from ..regularizer import Regularizer
from ._train import (
    Callback,
    RunResult,
    build_model,
    evaluate,
    make_optimizer,
    matrices,
    result,
    steps_per_epoch,
    train,
    weight_sparsity,
)

__all__ = [
    "run_dense",
    "run_l1_loss",
    "run_l1_loss_thresholds",
    "run_prox",
    "run_target",
]

Hidden = Sequence[int]


def _check_fraction(name: str, value: Any, *, allow_zero: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (0 <= value < 1) or (value == 0 and not allow_zero):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"Expected {name} in {interval}. Received: {name}={value!r}")
    return float(value)


def _penalise_matrices(reg: Regularizer, net: nn.Module, penalty: Any) -> None:
    """``penalty`` on every weight matrix and kernel of ``net`` (:func:`matrices`), one term each."""
    for name, _ in matrices(net):
        reg.add_weight(name, penalty)


def run_dense(
    data: Split,
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
    """No penalty: the accuracy every sparse method is compared with."""
    t0 = time.perf_counter()
    net = build_model(data, hidden, seed, model)
    h = train(
        net,
        data,
        make_optimizer(optimizer, net.parameters(), lr),
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        on_epoch=on_epoch,
    )
    return result("dense", net, data, t0, h, {"model": model, "optimizer": optimizer, "seed": seed})


def run_prox(
    data: Split,
    lam: float,
    *,
    hidden: Hidden | None = None,
    model: str = "mlp",
    batch_size: int = 64,
    epochs: int = 60,
    optimizer: str = "sgd",
    lr: float | None = None,
    mode: str = "forward_backward",
    floor: float = 0.1,
    penalty: Any = None,
    seed: int = 0,
    on_epoch: Callback | None = None,
) -> RunResult:
    """L1 (or ``penalty``) on every weight matrix, applied by prox: exact zeros during training."""
    t0 = time.perf_counter()
    net = build_model(data, hidden, seed, model)
    reg = Regularizer(net)
    _penalise_matrices(reg, net, penalty if penalty is not None else L1(lam))
    opt = ProximalOptimizer(
        make_optimizer(optimizer, net.parameters(), lr), reg, mode=mode, floor=floor
    )
    h = train(
        net,
        data,
        opt,
        epochs=epochs,
        batch_size=batch_size,
        regularizer=reg,
        seed=seed,
        on_epoch=on_epoch,
    )
    reg.remove()
    return result(
        "prox", net, data, t0, h, {"model": model, "optimizer": optimizer, "lam": lam, "mode": mode, "seed": seed}
    )


def run_l1_loss_thresholds(
    data: Split,
    lam: float,
    tols: Sequence[float],
    *,
    hidden: Hidden | None = None,
    model: str = "mlp",
    batch_size: int = 64,
    epochs: int = 60,
    optimizer: str = "sgd",
    lr: float | None = None,
    seed: int = 0,
    on_epoch: Callback | None = None,
) -> list[RunResult]:
    """One Keras-style training (``λ·Σ|W|`` in the loss), then one thresholded copy per ``tol``.

    The details of each result hold the exact zeros and the accuracy before
    thresholding (no weight is ever exactly zero after SGD/Adam on the loss)
    and the fraction of weights with ``|w| <= tol``.
    """
    if not tols:
        raise ValueError(f"Expected at least one threshold. Received: tols={tols!r}")
    t0 = time.perf_counter()
    net = build_model(data, hidden, seed, model)
    reg = Regularizer(net)
    _penalise_matrices(reg, net, L1(lam))
    h = train(
        net,
        data,
        make_optimizer(optimizer, net.parameters(), lr),
        epochs=epochs,
        batch_size=batch_size,
        regularizer=reg,
        seed=seed,
        on_epoch=on_epoch,
    )
    reg.remove()
    trained = time.perf_counter() - t0
    before_sparsity, _ = weight_sparsity(net)
    before_accuracy = evaluate(net, data)
    out = []
    for tol in tols:
        t1 = time.perf_counter()
        copy_ = copy.deepcopy(net)
        report: dict[str, dict[str, float]] = {}
        for name, _ in matrices(copy_):
            report.update(threshold(copy_, tol, params=name))
        r = result(
            "l1_loss",
            copy_,
            data,
            t1,
            h,
            {"model": model, "optimizer": optimizer, "lam": lam, "tol": tol, "seed": seed},
            {
                "sparsity_before_threshold": before_sparsity,
                "accuracy_before_threshold": before_accuracy,
                "max_removed": max(v["max_removed"] for v in report.values()),
            },
        )
        r.seconds += trained
        r.artifacts["model_before_threshold"] = net
        out.append(r)
    return out


def run_l1_loss(
    data: Split,
    lam: float,
    *,
    tol: float = 1e-3,
    hidden: Hidden | None = None,
    model: str = "mlp",
    batch_size: int = 64,
    epochs: int = 60,
    optimizer: str = "sgd",
    lr: float | None = None,
    seed: int = 0,
    on_epoch: Callback | None = None,
) -> RunResult:
    """L1 in the loss (Keras's ``kernel_regularizer``), then every ``|w| <= tol`` set to zero."""
    return run_l1_loss_thresholds(
        data,
        lam,
        (tol,),
        hidden=hidden,
        model=model,
        batch_size=batch_size,
        epochs=epochs,
        optimizer=optimizer,
        lr=lr,
        seed=seed,
        on_epoch=on_epoch,
    )[0]


def run_target(
    data: Split,
    target: float,
    *,
    hidden: Hidden | None = None,
    model: str = "mlp",
    batch_size: int = 64,
    epochs: int = 60,
    optimizer: str = "sgd",
    lr: float | None = None,
    mode: str = "auto",
    lam: float = 1e-2,
    ramp_fraction: float = 2 / 3,
    hold: str | None = None,
    freeze_fraction: float | None = None,
    relaxed: bool | None = None,
    average: bool | None = None,
    fine_tune_scale: float | None = None,
    lr_factor: bool = False,
    finalize: bool = True,
    seed: int = 0,
    on_epoch: Callback | None = None,
) -> RunResult:
    """Prox L1 whose strength :class:`~sparsecraft.control.TargetSparsity` steers to ``target``.

    The controller ramps sparsity from 0 to ``target`` (cubic) over the first
    ``ramp_fraction`` of the steps; by default (``hold="freeze"``) it then
    holds the target, fixes the zeros at the controller's default freeze step
    (0.9 of the run with the default ramp; the ramp's end on a model with
    BatchNorm) or at ``freeze_fraction`` of the run, and the survivors train
    without shrinkage for the rest (``hold="track"``: it keeps steering the
    strength). ``mode="auto"`` is the
    library's default: latent prox under the controller, shown relaxed (no
    shrinkage) for Adam/AdamW; ``relaxed`` overrides that choice (passed to
    :class:`~sparsecraft.ProximalOptimizer`). ``average`` and ``fine_tune_scale``
    are the controller's (None: on a model without BatchNorm, the average of the
    weights since the freeze, written by ``finalize``, and for Adam/AdamW the
    learning rate × ``1/sqrt(1 − target)`` after the freeze). ``lr_factor``: the
    learning rate follows :meth:`~sparsecraft.control.TargetSparsity.lr_factor`
    (an opt-in ``LambdaLR`` for short runs with adaptive optimizers). ``lam`` is only
    the starting strength. With
    ``finalize`` the controller's exact final selection runs at the end (the
    sparsity before it is in the details).
    """
    from ..control import TargetSparsity

    target = _check_fraction("target", target, allow_zero=False)
    t0 = time.perf_counter()
    net = build_model(data, hidden, seed, model)
    reg = Regularizer(net)
    _penalise_matrices(reg, net, L1(lam))
    opt = ProximalOptimizer(make_optimizer(optimizer, net.parameters(), lr), reg, mode=mode,
                            relaxed=relaxed)
    end = max(1, round(ramp_fraction * epochs * steps_per_epoch(data, batch_size)))
    total = epochs * steps_per_epoch(data, batch_size)
    freeze = None if freeze_fraction is None else max(end, round(freeze_fraction * total))
    ctrl = TargetSparsity(opt, target=target, end_step=end, start_step=0, ramp="cubic", hold=hold,
                          freeze_step=freeze, average=average, fine_tune_scale=fine_tune_scale)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ctrl.lr_factor) if lr_factor else None
    h = train(
        net,
        data,
        opt,
        epochs=epochs,
        batch_size=batch_size,
        regularizer=reg,
        controller=ctrl,
        seed=seed,
        after_step=sched.step if sched is not None else None,
        on_epoch=on_epoch,
    )
    details: dict[str, Any] = {
        "sparsity_before_finalize": weight_sparsity(net)[0],
        "accuracy_before_finalize": evaluate(net, data),
        "final_scale": ctrl.scale,
        # Where the controller itself landed: before the selection at the freeze, or now.
        "controller_sparsity": (ctrl.final_selection or {}).get("before", weight_sparsity(net)[0]),
    }
    if finalize and hasattr(ctrl, "finalize"):
        fin = ctrl.finalize()
        details["finalize_zeroed"] = fin.get("zeroed", 0.0)
    reg.remove()
    r = result(
        "target",
        net,
        data,
        t0,
        h,
        {
            "model": model,
            "optimizer": optimizer,
            "target": target,
            "mode": mode,
            "lam": lam,
            "hold": ctrl.hold,
            "seed": seed,
            # only when given: a knob of sweeps (compare/summarize) next to the default
            **({"freeze_fraction": freeze_fraction} if freeze_fraction is not None else {}),
            **({"relaxed": relaxed} if relaxed is not None else {}),
            **({"average": average} if average is not None else {}),
            **({"fine_tune_scale": fine_tune_scale} if fine_tune_scale is not None else {}),
            **({"lr_factor": True} if lr_factor else {}),
        },
        details,
    )
    r.artifacts["controller_history"] = list(ctrl.history)
    return r
