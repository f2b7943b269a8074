"""What ``sparsecraft demo`` computes: the reference case and the five-way comparison plan."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..penalties import L1
from ..regularizer import regularize

__all__ = ["DEMO_EPOCHS", "demo_plan", "reference_case"]

# The demo trains as long as the benchmarks (60 epochs) but one seed and one
# setting per method; `--quick` is a smoke test of a few seconds.
DEMO_EPOCHS = {"full": 60, "quick": 2}


def reference_case(seed: int = 0) -> dict[str, Any]:
    """The three Keras-exact uses of ``L1(0.1)``: a tensor, a kernel and an activity.

    Returns:
        ``{"tensor": {"value", "formula"}, "kernel": {"value", "formula",
        "explanation"}, "activity": {...}}``; the explanations are the
        regularizers' :class:`~sparsecraft.Explanation` tables.
    """
    torch.manual_seed(seed)
    x = torch.ones(2, 2, 4) * 3
    pen = L1(0.1)
    kernel_layer = nn.Linear(4, 3)
    kernel = regularize(kernel_layer, weight=pen)
    activity_layer = nn.Linear(4, 3)
    activity = regularize(activity_layer, activity=pen)
    batch = torch.randn(2, 4)
    with torch.no_grad():
        out = activity_layer(batch)
    cases = {
        "tensor": {
            "value": float(pen(x)),
            "formula": "0.1 · Σ|x| over 16 entries of 3 = 0.1 · 48",
            "explanation": None,
        },
        "kernel": {
            "value": float(kernel.value()),
            "formula": "0.1 · Σ|W| over the 3x4 kernel",
            "explanation": kernel.explain(),
        },
        "activity": {
            "value": float(activity.value()),
            "formula": f"0.1 · Σ|Wx + b| / batch of {out.shape[0]}",
            "explanation": activity.explain(),
        },
    }
    kernel.remove()
    activity.remove()
    return cases


def demo_plan(quick: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """The five methods of the demo, each at the setting the weights benchmark found best.

    Best means the highest sparsity within 1 point of dense accuracy on digits,
    mean of 3 seeds (docs/benchmarks.md); the demo trains seed 0 only.
    ``quick`` uses a tiny network so that the whole demo runs in seconds.
    """
    plan: list[tuple[str, dict[str, Any]]] = [
        ("dense", {}),
        ("l1_loss", {"lam": 1e-3, "tol": 0.08}),
        ("magnitude", {"sparsity": 0.95, "finetune_epochs": 20}),
        ("gradual", {"sparsity": 0.995}),
        ("target", {"target": 0.997}),
    ]
    if quick:
        plan = [
            (
                name,
                {**kw, "hidden": (32,)} | ({"finetune_epochs": 1} if name == "magnitude" else {}),
            )
            for name, kw in plan
        ]
    return plan
