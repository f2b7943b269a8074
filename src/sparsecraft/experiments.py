"""Training loops and the method comparison, written once for the demo, ``train`` and benchmarks.

Every method trains the same model on the same split with the same budget and
returns a :class:`RunResult`: test accuracy, exact-zero sparsity of the weight
matrices, non-zero parameter count, wall time and a per-epoch history.

Methods (what a user would pick to get a sparse network):

* ``dense``: no penalty, the reference accuracy.
* ``l1_loss``: Keras style, ``λ·Σ|W|`` added to the loss, then
  :func:`~sparsecraft.threshold` (the loss alone leaves no exact zero).
* ``magnitude``: one-shot global magnitude pruning (``torch.nn.utils.prune``)
  of the dense model, then fine-tuning with the mask fixed.
* ``gradual``: gradual magnitude pruning with the cubic schedule of Zhu & Gupta
  (2017), as TensorFlow Model Optimization's ``PolynomialDecay`` does it.
* ``prox``: :class:`~sparsecraft.ProximalOptimizer` with an L1 penalty.
* ``target``: prox plus :class:`~sparsecraft.TargetSparsity`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .datasets import Split, mlp
from .optim import ProximalOptimizer
from .regularizer import Regularizer

__all__ = ["RunResult", "train", "evaluate", "weight_names", "weight_sparsity", "make_optimizer"]

Callback = Callable[[int, dict[str, float]], None]


@dataclass
class RunResult:
    """What one training run produced."""

    method: str
    accuracy: float
    sparsity: float
    nonzero: int
    seconds: float
    model: nn.Module = field(repr=False)
    history: list[dict[str, float]] = field(default_factory=list, repr=False)
    config: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"method": self.method, "accuracy": self.accuracy, "sparsity": self.sparsity,
                "nonzero": self.nonzero, "seconds": self.seconds, **self.config}


def weight_names(model: nn.Module) -> list[str]:
    """Names of the weight matrices and kernels (ndim >= 2): what sparsity is measured over."""
    return [n for n, p in model.named_parameters() if p.ndim >= 2]


@torch.no_grad()
def weight_sparsity(model: nn.Module) -> tuple[float, int]:
    """Fraction of exact zeros over the weight matrices, and the non-zero count of all parameters."""
    zeros = numel = 0
    nonzero = 0
    for p in model.parameters():
        nz = int(torch.count_nonzero(p))
        nonzero += nz
        if p.ndim >= 2:
            zeros += p.numel() - nz
            numel += p.numel()
    return zeros / max(numel, 1), nonzero


@torch.no_grad()
def evaluate(model: nn.Module, data: Split) -> float:
    """Test accuracy (classification) or negative mean squared error (regression)."""
    model.eval()
    out = model(data.X_test)
    model.train()
    if data.task == "classification":
        return float((out.argmax(1) == data.y_test).float().mean())
    return -float(((out - data.y_test) ** 2).mean())


def make_optimizer(name: str, params: Any, lr: float | None = None) -> torch.optim.Optimizer:
    """``"sgd"`` (momentum 0.9, lr 0.05) or ``"adam"`` (lr 1e-3): the two optimizers the methods use."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05 if lr is None else lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3 if lr is None else lr)
    raise ValueError(f"Expected optimizer in ('sgd', 'adam'). Received: optimizer={name!r}")


def _loss_fn(data: Split) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if data.task == "classification":
        return nn.functional.cross_entropy
    return nn.functional.mse_loss


def train(
    model: nn.Module,
    data: Split,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int = 64,
    regularizer: Regularizer | None = None,
    controller: Any = None,
    seed: int = 0,
    after_step: Callable[[], None] | None = None,
    on_epoch: Callback | None = None,
) -> list[dict[str, float]]:
    """Minibatch training; returns the per-epoch history (loss, test metric, weight sparsity).

    ``regularizer.loss()`` is added to the data loss; ``controller.step()`` runs
    after each optimizer step; ``after_step`` too (masks of pruning methods).
    ``on_epoch(epoch, record)`` is called after each epoch (progress bars).
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"Expected epochs >= 1 and batch_size >= 1. Received: epochs={epochs}, batch_size={batch_size}")
    loss_fn = _loss_fn(data)
    g = torch.Generator().manual_seed(seed)
    n = data.n_train
    history = []
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(data.X_train[idx]), data.y_train[idx])
            if regularizer is not None:
                loss = loss + regularizer.loss()
            loss.backward()
            optimizer.step()
            if controller is not None:
                controller.step()
            if after_step is not None:
                after_step()
            total += float(loss.detach()) * len(idx)
        sparsity, nonzero = weight_sparsity(model)
        record = {"epoch": epoch + 1, "loss": total / n, "metric": evaluate(model, data),
                  "sparsity": sparsity, "nonzero": nonzero}
        if controller is not None:
            record.update(controller.record())
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
    return history


def _model(data: Split, hidden: tuple[int, ...], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    n_out = data.n_classes if data.n_classes is not None else data.y_train.shape[1]
    return mlp(data.n_features, hidden, n_out)


def _result(method: str, model: nn.Module, data: Split, t0: float, history, **config) -> RunResult:
    sparsity, nonzero = weight_sparsity(model)
    return RunResult(method, evaluate(model, data), sparsity, nonzero, time.perf_counter() - t0,
                     model, history, config)


def run_dense(data: Split, *, hidden=(256, 256), epochs=60, optimizer="sgd", seed=0, on_epoch=None) -> RunResult:
    t0 = time.perf_counter()
    model = _model(data, hidden, seed)
    h = train(model, data, make_optimizer(optimizer, model.parameters()), epochs=epochs, seed=seed, on_epoch=on_epoch)
    return _result("dense", model, data, t0, h, optimizer=optimizer)


def run_prox(data: Split, lam: float, *, hidden=(256, 256), epochs=60, optimizer="sgd", lr=None,
             mode="forward_backward", floor=0.1, penalty: Any = None, seed=0, on_epoch=None) -> RunResult:
    """L1 (or ``penalty``) on every weight matrix, applied by prox: exact zeros."""
    t0 = time.perf_counter()
    model = _model(data, hidden, seed)
    reg = Regularizer(model)
    reg.add_weight((nn.Linear, "weight"), penalty if penalty is not None else f"l1:{lam}")
    opt = ProximalOptimizer(make_optimizer(optimizer, model.parameters(), lr), reg, mode=mode, floor=floor)
    h = train(model, data, opt, epochs=epochs, regularizer=reg, seed=seed, on_epoch=on_epoch)
    return _result("prox", model, data, t0, h, optimizer=optimizer, lam=lam, mode=mode)
