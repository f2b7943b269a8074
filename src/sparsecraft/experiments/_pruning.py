"""Magnitude pruning, the usual way to a sparse network, as a baseline for the prox methods.

* ``magnitude``: one-shot global magnitude pruning (``torch.nn.utils.prune``)
  of the trained dense model, then fine-tuning with the mask fixed.
* ``gradual``: gradual magnitude pruning with the cubic schedule of Zhu & Gupta
  (2017), as TensorFlow Model Optimization's ``PolynomialDecay`` does it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from torch.nn.utils import prune

from ..datasets import Split
from ._methods import _check_fraction, _linears, run_dense
from ._train import (
    Callback,
    RunResult,
    build_model,
    evaluate,
    make_optimizer,
    result,
    steps_per_epoch,
    train,
)

__all__ = ["cubic_sparsity", "run_gradual", "run_magnitude"]

Hidden = Sequence[int]


def run_magnitude(
    data: Split,
    sparsity: float,
    *,
    hidden: Hidden = (256, 256),
    epochs: int = 60,
    finetune_epochs: int = 20,
    optimizer: str = "sgd",
    lr: float | None = None,
    seed: int = 0,
    dense: RunResult | None = None,
    on_epoch: Callback | None = None,
) -> RunResult:
    """One-shot global magnitude pruning of a trained dense model, then fine-tuning with the mask.

    The smallest ``sparsity`` fraction of all weight-matrix entries (one global
    ranking, ``torch.nn.utils.prune.global_unstructured`` with
    ``L1Unstructured``) is masked; the model is fine-tuned for
    ``finetune_epochs`` with the mask fixed; ``prune.remove`` then makes the
    zeros permanent. Pass ``dense`` (a :func:`run_dense` result, not modified)
    to reuse its training; its time is added to this run's.
    """
    sparsity = _check_fraction("sparsity", sparsity)
    if dense is None:
        dense = run_dense(data, hidden=hidden, epochs=epochs, optimizer=optimizer, lr=lr, seed=seed)
    t0 = time.perf_counter()
    model = copy.deepcopy(dense.model)
    targets = [(m, "weight") for m in _linears(model)]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    pruned_accuracy = evaluate(model, data)
    h = train(
        model,
        data,
        make_optimizer(optimizer, model.parameters(), lr),
        epochs=finetune_epochs,
        seed=seed + 1,
        on_epoch=on_epoch,
    )
    for m, name in targets:
        prune.remove(m, name)
    r = result(
        "magnitude",
        model,
        data,
        t0,
        h,
        {
            "optimizer": optimizer,
            "target": sparsity,
            "finetune_epochs": finetune_epochs,
            "seed": seed,
        },
        {
            "accuracy_after_pruning": pruned_accuracy,
            "dense_accuracy": dense.accuracy,
            "dense_seconds": dense.seconds,
        },
    )
    r.seconds += dense.seconds
    return r


def cubic_sparsity(
    step: int, final: float, end_step: int, initial: float = 0.0, start_step: int = 0
) -> float:
    """Zhu & Gupta's schedule ``s_t = s_f + (s_i − s_f)(1 − (t − t0)/(n·Δt))³``, then ``s_f``."""
    if step <= start_step:
        return initial
    progress = min((step - start_step) / max(end_step - start_step, 1), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


@torch.no_grad()
def _global_masks(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Keep-masks zeroing the ``round(sparsity·N)`` smallest magnitudes of all ``weights``."""
    flat = torch.cat([w.abs().flatten() for w in weights])
    keep = torch.ones_like(flat, dtype=torch.bool)
    k = round(sparsity * flat.numel())
    if k > 0:
        keep[torch.topk(flat, k, largest=False).indices] = False
    return [
        m.view_as(w) for m, w in zip(keep.split([w.numel() for w in weights]), weights, strict=True)
    ]


def run_gradual(
    data: Split,
    sparsity: float,
    *,
    hidden: Hidden = (256, 256),
    epochs: int = 60,
    optimizer: str = "sgd",
    lr: float | None = None,
    frequency: int = 10,
    ramp_fraction: float = 2 / 3,
    seed: int = 0,
    on_epoch: Callback | None = None,
) -> RunResult:
    """Gradual magnitude pruning from scratch (Zhu & Gupta 2017, "To prune, or not to prune").

    Sparsity follows :func:`cubic_sparsity` from 0 to ``sparsity`` over the
    first ``ramp_fraction`` of the steps; every ``frequency`` steps the masks
    are recomputed by one global magnitude ranking (tfmot's ``PolynomialDecay``
    with power 3 and ``frequency``). Masked weights get no gradient and are
    re-zeroed after every step; the rest of training fine-tunes the final mask.
    """
    sparsity = _check_fraction("sparsity", sparsity)
    if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
        raise ValueError(f"Expected frequency >= 1. Received: frequency={frequency!r}")
    ramp_fraction = float(ramp_fraction)
    if not 0 < ramp_fraction <= 1:
        raise ValueError(
            f"Expected ramp_fraction in (0, 1]. Received: ramp_fraction={ramp_fraction!r}"
        )
    t0 = time.perf_counter()
    model = build_model(data, tuple(hidden), seed)
    weights = [m.weight for m in _linears(model)]
    end = max(1, round(ramp_fraction * epochs * steps_per_epoch(data)))
    masks = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    hooks = [w.register_hook(lambda g, i=i: g * masks[i]) for i, w in enumerate(weights)]
    step = 0

    @torch.no_grad()
    def after_step() -> None:
        nonlocal step
        step += 1
        if step <= end and (step % frequency == 0 or step == end):
            masks[:] = _global_masks(weights, cubic_sparsity(step, sparsity, end))
        for w, m in zip(weights, masks, strict=True):
            w.mul_(m)

    h = train(
        model,
        data,
        make_optimizer(optimizer, model.parameters(), lr),
        epochs=epochs,
        seed=seed,
        after_step=after_step,
        on_epoch=on_epoch,
    )
    for hook in hooks:
        hook.remove()
    return result(
        "gradual",
        model,
        data,
        t0,
        h,
        {"optimizer": optimizer, "target": sparsity, "frequency": frequency, "seed": seed},
        {"ramp_steps": end},
    )
