"""The shared training loop and what every run reports (:class:`RunResult`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..datasets import IGNORE, Split, make_model
from ..regularizer import Regularizer

__all__ = [
    "RunResult",
    "build_model",
    "evaluate",
    "make_optimizer",
    "matrices",
    "evaluate_loss",
    "train",
    "weight_names",
    "weight_sparsity",
]

Callback = Callable[[int, dict[str, float]], None]

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass
class RunResult:
    """What one training run produced.

    Attributes:
        method: The method name (``"dense"``, ``"prox"``, ...).
        accuracy: Test accuracy (classification) or minus the test MSE.
        sparsity: Fraction of exact zeros over the weight matrices (ndim >= 2).
        nonzero: Non-zero parameters, biases included.
        seconds: Wall time of the whole method (a reused dense training included).
        model: The trained model.
        history: One record per epoch (loss, metric, sparsity, ...).
        config: The knobs the method ran with (λ, target, optimizer, seed, ...).
        details: Other measurements of the method (e.g. sparsity before thresholding).
        explanation: The regularizer's :class:`~sparsecraft.Explanation` at the end, where
            the run had one worth showing (:func:`run_spec`).
        artifacts: Objects for figures, left out of :meth:`row` (e.g. the model
            before thresholding, a controller's per-step history).
    """

    method: str
    accuracy: float
    sparsity: float
    nonzero: int
    seconds: float
    model: nn.Module = field(repr=False)
    history: list[dict[str, float]] = field(default_factory=list, repr=False)
    config: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    explanation: Any = field(default=None, repr=False)
    artifacts: dict[str, Any] = field(default_factory=dict, repr=False)

    def row(self) -> dict[str, Any]:
        """A flat JSON-ready dict: the numbers, the knobs and the details."""
        return {
            "method": self.method,
            "accuracy": self.accuracy,
            "sparsity": self.sparsity,
            "nonzero": self.nonzero,
            "seconds": self.seconds,
            **self.config,
            **self.details,
        }


def _effective(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter as the forward sees it.

    ``torch.nn.utils.prune`` replaces ``weight`` by a ``weight_orig`` parameter
    and a ``weight_mask`` buffer; the forward uses their product, so that is
    what is counted (the dense ``weight_orig`` would show no zeros).
    """
    seen: set[int] = set()
    for mname, module in model.named_modules():
        buffers = dict(module.named_buffers(recurse=False))
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # a tied weight (head.weight = embed.weight) counts once
                continue
            seen.add(id(p))
            name = f"{mname}.{pname}" if mname else pname
            if pname.endswith("_orig") and f"{pname[:-5]}_mask" in buffers:
                yield name[:-5], p.detach() * buffers[f"{pname[:-5]}_mask"]
            else:
                yield name, p.detach()


def weight_names(model: nn.Module) -> list[str]:
    """Names of the weight matrices and kernels (ndim >= 2): what sparsity is measured over."""
    return [n for n, p in _effective(model) if p.ndim >= 2]


@torch.no_grad()
def weight_sparsity(model: nn.Module) -> tuple[float, int]:
    """Fraction of exact zeros over the weight matrices, and the non-zero count of all parameters.

    Pruning masks of ``torch.nn.utils.prune`` are taken into account.
    """
    zeros = numel = nonzero = 0
    for _, p in _effective(model):
        nz = int(torch.count_nonzero(p))
        nonzero += nz
        if p.ndim >= 2:
            zeros += p.numel() - nz
            numel += p.numel()
    return zeros / max(numel, 1), nonzero


@torch.no_grad()
def _measure(model: nn.Module, data: Split) -> tuple[float, float]:
    """``(metric, loss)`` on the test split in one forward (see :func:`evaluate`)."""
    was_training = model.training
    model.eval()
    out = model(data.X_test)
    model.train(was_training)
    loss = float(_loss_fn(data)(out, data.y_test))
    if data.task == "classification":
        # Sequence targets [n, T] mark unpredictable positions with IGNORE; only the rest count.
        pred = out.argmax(-1)
        keep = data.y_test != IGNORE
        return float((pred == data.y_test)[keep].float().mean()), loss
    return -float(((out - data.y_test) ** 2).mean()), loss


def evaluate(model: nn.Module, data: Split) -> float:
    """Test accuracy (classification) or minus the test mean squared error (regression).

    For sequence models (logits ``[n, T, classes]``, targets ``[n, T]``) the
    accuracy is per token over the targets that are not
    :data:`~sparsecraft.datasets.IGNORE`.
    """
    return _measure(model, data)[0]


def evaluate_loss(model: nn.Module, data: Split) -> float:
    """The loss of :func:`train` on the test split: cross-entropy (per token over the
    non-IGNORE targets for sequences; ``exp`` of it is the perplexity) or the MSE."""
    return _measure(model, data)[1]


def make_optimizer(name: str, params: Any, lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizers of the methods, with PyTorch's defaults except where noted.

    ``"sgd"`` (momentum 0.9, lr 0.05), ``"adam"`` (lr 1e-3) or ``"adamw"``
    (lr 1e-3, PyTorch's weight decay 0.01).

    Raises:
        ValueError: On another name.
    """
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05 if lr is None else lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3 if lr is None else lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3 if lr is None else lr)
    raise ValueError(
        f"Expected optimizer in {OPTIMIZERS}. Received: optimizer={name!r}"
    )


def build_model(
    data: Split, hidden: Sequence[int] | None = None, seed: int = 0, model: str = "mlp"
) -> nn.Module:
    """The model the methods train, seeded with ``seed``: :func:`~sparsecraft.datasets.make_model`.

    ``model="mlp"`` is ``mlp(n_features, hidden, n_out)`` (``None``: the
    digits widths ``(256, 256)``); ``"cnn"``, ``"lstm"``, ``"gru"``
    (MNIST-1D) and ``"transformer"`` (the copy task) read ``hidden`` as their
    widths (``None``: their defaults).
    """
    torch.manual_seed(seed)
    return make_model(model, data, None if hidden is None else tuple(hidden))


def matrices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weight matrices and kernels (ndim >= 2) a method penalises or prunes, by name.

    For an MLP these are the ``nn.Linear`` weights; for a CNN the conv
    kernels and the classifier; for an LSTM ``weight_ih``/``weight_hh``; for
    the transformer the attention projections, the FFN, the position
    embedding and the token embedding, which a tied head shares (listed once,
    as ``named_parameters`` does). Norm scales and biases are left out.
    """
    return [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]


def steps_per_epoch(data: Split, batch_size: int = 64) -> int:
    """Optimizer steps in one epoch of :func:`train`."""
    return -(-data.n_train // batch_size)


def _sequence_cross_entropy(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # logits [n, T, classes] against targets [n, T]; IGNORE targets are skipped.
    return nn.functional.cross_entropy(out.flatten(0, -2), target.flatten(), ignore_index=IGNORE)


def _loss_fn(data: Split) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if data.task == "classification":
        return _sequence_cross_entropy if data.y_train.ndim == 2 else nn.functional.cross_entropy
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
    """Minibatch training; returns the per-epoch history (loss, test metric and loss, sparsity).

    ``regularizer.loss()`` is added to the data loss; ``controller.step()`` runs
    after each optimizer step and ``controller.record()`` is merged into each
    epoch's record; ``after_step`` runs after each step too (masks of pruning
    methods). ``on_epoch(epoch, record)`` is called after each epoch (progress bars).

    Raises:
        ValueError: If ``epochs`` or ``batch_size`` is below 1.
        FloatingPointError: If a batch loss or, at the end of an epoch, a parameter is NaN
            or infinite (the run diverged). A non-finite loss is caught before its
            backward and step, so the weights are those of the last finite step.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(
            "Expected epochs >= 1 and batch_size >= 1. "
            f"Received: epochs={epochs}, batch_size={batch_size}"
        )
    loss_fn = _loss_fn(data)
    g = torch.Generator().manual_seed(seed)
    n = data.n_train
    history = []
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(data.X_train[idx]), data.y_train[idx])
            if regularizer is not None:
                loss = loss + regularizer.loss()
            value = float(loss.detach())  # the one host sync of a step
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"Expected a finite loss. Received: loss={value} at epoch {epoch + 1}, "
                    f"batch {i // batch_size + 1}; training diverged (lower the learning rate)"
                )
            loss.backward()
            optimizer.step()
            if controller is not None:
                controller.step()
            if after_step is not None:
                after_step()
            total += value * len(idx)
        _check_finite(model, epoch)
        sparsity, nonzero = weight_sparsity(model)
        metric, test_loss = _measure(model, data)
        record = {
            "epoch": epoch + 1,
            "loss": total / n,
            "metric": metric,
            "test_loss": test_loss,
            "sparsity": sparsity,
            "nonzero": nonzero,
        }
        if controller is not None:
            record.update(controller.record())
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
    return history


@torch.no_grad()
def _check_finite(model: nn.Module, epoch: int) -> None:
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise FloatingPointError(
            f"Expected finite parameters. Received: NaN or infinite values in {bad} after "
            f"epoch {epoch + 1}; training diverged (lower the learning rate)"
        )


def result(
    method: str,
    model: nn.Module,
    data: Split,
    t0: float,
    history: list[dict[str, float]],
    config: dict[str, Any],
    details: dict[str, Any] | None = None,
) -> RunResult:
    """Measures ``model`` on ``data`` and packs a :class:`RunResult` (time since ``t0``)."""
    sparsity, nonzero = weight_sparsity(model)
    return RunResult(
        method,
        evaluate(model, data),
        sparsity,
        nonzero,
        time.perf_counter() - t0,
        model,
        history,
        config,
        details or {},
    )
