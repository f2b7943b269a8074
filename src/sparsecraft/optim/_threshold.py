"""Hard thresholding after training: exact zeros for models whose penalty was in the loss."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def threshold(model: nn.Module, tol: float, params: str = "*") -> dict[str, dict[str, float]]:
    """Zero every weight with ``|w| <= tol``: for models trained with the penalty in the loss.

    An L1 penalty minimised by SGD or Adam leaves weights small, never zero;
    this makes them zero. Matching parameters are selected by a glob on their
    names. Returns, per parameter, how many values were zeroed, the zeros
    before and after, and the largest magnitude removed.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``tol`` is negative, NaN, infinite or not a number; ``params``
            matches no floating-point parameter. Nothing is changed then.
    """
    import fnmatch

    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected an nn.Module. Received: {type(model).__name__}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"Expected a finite tol >= 0. Received: tol={tol!r}")
    report = {}
    for name, p in model.named_parameters():
        if not fnmatch.fnmatchcase(name, params) or not p.is_floating_point():
            continue
        mask = p.abs() <= tol
        before = int((p == 0).sum())
        removed = float(p[mask].abs().max()) if bool(mask.any()) else 0.0
        p.masked_fill_(mask, 0.0)
        after = int(mask.sum())
        report[name] = {"numel": p.numel(), "zeros_before": before, "zeros_after": after,
                        "zeroed": after - before, "max_removed": removed}
    if not report:
        raise ValueError(f"Expected params={params!r} to match parameters of the model. Received: no match")
    return report
