"""Magnitude pruning, the usual way to a sparse network, as a baseline for the prox methods.

* ``magnitude``: one-shot global magnitude pruning (the global ranking of
  ``torch.nn.utils.prune.global_unstructured``) of the trained dense model,
  then fine-tuning with the mask fixed.
* ``gradual``: gradual magnitude pruning with the cubic schedule of Zhu & Gupta
  (2017), as TensorFlow Model Optimization's ``PolynomialDecay`` does it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch

from ..datasets import Split
from ._methods import _check_fraction, run_dense
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
)

__all__ = ["cubic_sparsity", "run_gradual", "run_magnitude"]

Hidden = Sequence[int]


class _Masks:
    """Keep-masks on a model's weight matrices, held through training.

    A masked weight gets no gradient (a hook multiplies it by the mask) and is
    set to zero again after every step (weight decay or momentum would move
    it). Masks live beside the parameters instead of re-parametrising them as
    ``torch.nn.utils.prune`` does: a tied weight (an embedding that is also the
    output head) stays one parameter, and LSTM/GRU weights stay the tensors
    their fused kernel reads.
    """

    def __init__(self, weights: list[torch.Tensor]):
        self.weights = weights
        self.masks = [torch.ones_like(w, dtype=torch.bool) for w in weights]
        self._hooks = [w.register_hook(lambda g, i=i: g * self.masks[i]) for i, w in enumerate(weights)]

    @torch.no_grad()
    def apply(self) -> None:
        for w, m in zip(self.weights, self.masks, strict=True):
            w.mul_(m)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def run_magnitude(
    data: Split,
    sparsity: float,
    *,
    hidden: Hidden | None = None,
    model: str = "mlp",
    batch_size: int = 64,
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
    ranking over :func:`matrices`, what ``torch.nn.utils.prune.global_unstructured``
    with ``L1Unstructured`` selects) is zeroed; the model is fine-tuned for
    ``finetune_epochs`` with the mask fixed (masked weights get no gradient and
    stay zero). Pass ``dense`` (a :func:`run_dense` result, not modified) to
    reuse its training; its time is added to this run's.
    """
    sparsity = _check_fraction("sparsity", sparsity)
    if dense is None:
        dense = run_dense(
            data,
            hidden=hidden,
            model=model,
            batch_size=batch_size,
            epochs=epochs,
            optimizer=optimizer,
            lr=lr,
            seed=seed,
        )
    t0 = time.perf_counter()
    net = copy.deepcopy(dense.model)
    held = _Masks([p for _, p in matrices(net)])
    held.masks[:] = _global_masks(held.weights, sparsity)
    held.apply()
    pruned_accuracy = evaluate(net, data)
    h = train(
        net,
        data,
        make_optimizer(optimizer, net.parameters(), lr),
        epochs=finetune_epochs,
        batch_size=batch_size,
        seed=seed + 1,
        after_step=held.apply,
        on_epoch=on_epoch,
    )
    held.remove()
    r = result(
        "magnitude",
        net,
        data,
        t0,
        h,
        {
            "model": model,
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
    hidden: Hidden | None = None,
    model: str = "mlp",
    batch_size: int = 64,
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
    net = build_model(data, hidden, seed, model)
    held = _Masks([p for _, p in matrices(net)])
    end = max(1, round(ramp_fraction * epochs * steps_per_epoch(data, batch_size)))
    step = 0

    def after_step() -> None:
        nonlocal step
        step += 1
        if step <= end and (step % frequency == 0 or step == end):
            held.masks[:] = _global_masks(held.weights, cubic_sparsity(step, sparsity, end))
        held.apply()

    h = train(
        net,
        data,
        make_optimizer(optimizer, net.parameters(), lr),
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        after_step=after_step,
        on_epoch=on_epoch,
    )
    held.remove()
    return result(
        "gradual",
        net,
        data,
        t0,
        h,
        {
            "model": model,
            "optimizer": optimizer,
            "target": sparsity,
            "frequency": frequency,
            "seed": seed,
        },
        {"ramp_steps": end},
    )
