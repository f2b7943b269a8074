"""One training run from user-level choices: what ``sparsecraft train`` runs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import penalties as _penalties
from ..datasets import Split, default_model
from ..metrics import sparsity as sparsity_report
from ..optim import ProximalOptimizer
from ..regularizer import Regularizer
from ._autoencoder import Autoencoder, autoencoder_metrics
from ._compare import pattern_f1
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

__all__ = ["MODELS", "default_hidden", "run_spec"]

MODELS = ("mlp", "autoencoder", "cnn", "lstm", "gru", "transformer")
# Default widths of the sequence models (datasets.make_model): channels, state, (d_model, d_ff).
_WIDTHS = {"cnn": (32,), "lstm": (64,), "gru": (64,), "transformer": (64, 128)}
_APPLY = ("prox", "loss")


def default_hidden(data: Split, model: str = "mlp") -> tuple[int, ...]:
    """Default hidden widths: the digits MLP, the teacher's widths, a 2x-wide code, or
    the sequence model's own (CNN channels 32, LSTM/GRU state 64, transformer (64, 128))."""
    if model in _WIDTHS:
        return _WIDTHS[model]
    if model == "autoencoder" or data.name == "superposition":
        return (2 * int(data.meta.get("n_latent", data.n_features)),)
    if data.name == "teacher":
        teacher = data.meta["teacher"]
        return tuple(m.out_features for m in teacher if isinstance(m, nn.Linear))[:-1]
    return (256, 256)


def _describe(pen: Any) -> dict[str, Any] | None:
    return None if pen is None else {"name": pen.name, **pen.get_config()}


def _build(data: Split, model: str, hidden: tuple[int, ...], seed: int) -> nn.Module:
    if model != "autoencoder":
        return build_model(data, hidden, seed, model)
    if data.task != "regression" or tuple(data.y_train.shape[1:]) != (data.n_features,):
        raise ValueError(
            f"Expected an autoencoding data set (targets = inputs, e.g. superposition) for "
            f"model='autoencoder'. Received: data={data.name!r}"
        )
    if len(hidden) != 1:
        raise ValueError(
            f"Expected one hidden width for model='autoencoder'. Received: hidden={hidden}"
        )
    import torch

    torch.manual_seed(seed)
    return Autoencoder(data.n_features, hidden[0])


def run_spec(
    data: Split,
    *,
    model: str | None = None,
    hidden: Sequence[int] | None = None,
    penalty: Any = None,
    activity: Any = None,
    target: float | None = None,
    apply: str = "prox",
    optimizer: str = "sgd",
    lr: float | None = None,
    mode: str = "latent",
    epochs: int = 30,
    seed: int = 0,
    lr_factor: bool = False,
    on_epoch: Callback | None = None,
) -> RunResult:
    """Trains ``model`` on ``data`` with a weight penalty, an activity penalty and/or a target.

    Args:
        data: The split.
        model: ``"mlp"``, ``"autoencoder"`` (one hidden layer; autoencoding data
            only), ``"cnn"``, ``"lstm"``, ``"gru"`` (MNIST-1D) or ``"transformer"``
            (the copy task); default: the data set's
            (:func:`~sparsecraft.datasets.default_model`).
        hidden: Hidden widths (default: :func:`default_hidden`).
        penalty: Weight penalty on every weight matrix and kernel (ndim >= 2:
            Linear and conv weights, LSTM/GRU matrices, attention projections,
            embeddings; not biases or norm scales): a Penalty or a spec string
            (``"l1:1e-2"``, ``"group_lasso:1e-3:rows"``).
        activity: Activity penalty on every ``nn.ReLU`` module's output (Keras
            ``activity_regularizer``: ``penalty(out) / batch``), through the loss.
        target: A sparsity in (0, 1) for :class:`~sparsecraft.control.TargetSparsity`
            to reach by steering the weight penalty's strength (needs a prox
            penalty that makes zeros: L1, L1L2, L0, MCP, group lasso).
        apply: ``"prox"`` (weight terms with a prox are applied by
            :class:`~sparsecraft.ProximalOptimizer`: exact zeros) or ``"loss"``
            (added to the loss, as Keras does).
        optimizer, lr, mode, epochs, seed: Training settings (``mode``: the
            ProximalOptimizer mode).
        lr_factor: with ``target`` and Adam/AdamW, the learning rate follows
            :meth:`~sparsecraft.control.TargetSparsity.lr_factor` (an opt-in for
            runs too short for the sparse network).
        on_epoch: ``(epoch, record)`` after each epoch.

    Returns:
        A :class:`RunResult` whose details hold the sparsity report
        (``sparsity_report``), plus ``autoencoder`` scores on superposition
        data and ``pattern`` F1 on teacher–student data when the student has
        the teacher's shape; its ``explanation`` is the regularizer's table.

    Raises:
        ValueError: On an unknown model, apply mode, penalty spec, a target
            the penalties cannot reach, or ``lr_factor`` without a target or with SGD.
    """
    if model is None:
        model = default_model(data)
    if model not in MODELS:
        raise ValueError(f"Expected model in {MODELS}. Received: model={model!r}")
    if apply not in _APPLY:
        raise ValueError(f"Expected apply in {_APPLY}. Received: apply={apply!r}")
    if target is not None and (
        isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1
    ):
        raise ValueError(f"Expected target in (0, 1). Received: target={target!r}")
    if lr_factor and target is None:
        raise ValueError(
            "Expected a target with lr_factor=True (the factor follows the ramp to it). Received: target=None"
        )
    if target is not None and penalty is None:
        penalty = "l1:1e-2"
    weight_pen = _penalties.get(penalty) if penalty is not None else None
    activity_pen = _penalties.get(activity) if activity is not None else None
    hidden = tuple(hidden) if hidden is not None else default_hidden(data, model)

    t0 = time.perf_counter()
    net = _build(data, model, hidden, seed)
    reg = Regularizer(net)
    if weight_pen is not None:
        for name, _ in matrices(net):
            reg.add_weight(name, weight_pen)
    if activity_pen is not None:
        relus = [name for name, m in net.named_modules() if isinstance(m, nn.ReLU)]
        if not relus:
            raise ValueError(
                f"Expected nn.ReLU modules to put the activity penalty on. "
                f"Received: model={model!r}, which has none"
            )
        for name in relus:
            reg.add_activity(name, activity_pen)
    opt = make_optimizer(optimizer, net.parameters(), lr)
    if apply == "prox" and weight_pen is not None and weight_pen.proximable:
        opt = ProximalOptimizer(opt, reg, mode=mode)
    ctrl = None
    if target is not None:
        from ..control import TargetSparsity

        if not isinstance(opt, ProximalOptimizer):
            raise ValueError(
                f"Expected a weight penalty applied by prox for target={target}. Received: "
                f"penalty={penalty!r} with apply={apply!r}; "
                "a penalty in the loss makes no exact zeros"
            )
        end = max(1, round(2 / 3 * epochs * steps_per_epoch(data)))
        ctrl = TargetSparsity(opt, target=float(target), end_step=end)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ctrl.lr_factor) if lr_factor and ctrl is not None else None
    h = train(
        net,
        data,
        opt,
        epochs=epochs,
        regularizer=reg if reg.terms else None,
        controller=ctrl,
        seed=seed,
        after_step=sched.step if sched is not None else None,
        on_epoch=on_epoch,
    )
    details: dict[str, Any] = {}
    if ctrl is not None and hasattr(ctrl, "finalize"):
        details["finalize"] = ctrl.finalize()
    explanation = reg.explain()
    reg.remove()
    details["sparsity_report"] = sparsity_report(net).to_dict()
    if "features" in data.meta and isinstance(net, Autoencoder):
        details["autoencoder"] = autoencoder_metrics(net, data)
    if "teacher" in data.meta and model == "mlp" and hidden == default_hidden(data):
        details["pattern"] = pattern_f1(net, data)
    config = {
        "data": data.name,
        "model": model,
        "hidden": list(hidden),
        "penalty": _describe(weight_pen),
        "activity": _describe(activity_pen),
        "target": target,
        "apply": apply,
        "optimizer": optimizer,
        "lr": lr,
        "mode": mode,
        "epochs": epochs,
        "seed": seed,
        **({"lr_factor": True} if lr_factor else {}),
    }
    r = result("train", net, data, t0, h, config, details)
    r.explanation = explanation
    if ctrl is not None:
        r.artifacts["controller_history"] = list(ctrl.history)
    return r
