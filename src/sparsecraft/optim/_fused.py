"""The opt-in compiled kernel of ``ProximalOptimizer(fused=True)``.

One ``torch.compile`` kernel applies the adaptive prox of L1, L2 and L1L2
terms: it reads the optimizer state and the weights once and writes the
weights once. It is compiled on first use and shared by every optimizer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

_KERNEL: Callable[..., Tensor] | None = None


def _adaptive_prox_kernel(x: Tensor, moment: Tensor, centered: Tensor | None, ref: Tensor,
                          scalars: Tensor, use_floor: bool, refresh: bool, has_l2: bool) -> Tensor:
    """``x ← soft_threshold(x, l1·t) / (1 + 2·l2·t)``, ``t = coef / (max(sqrt(v), floor·ref) + eps)``.

    ``t = 0`` where ``sqrt(v)`` is 0 or not finite.

    The same arithmetic as the unfused path (``ProximalOptimizer._prox``), written
    for ``torch.compile`` to fuse into one pass that reads ``v`` and ``x`` and
    writes ``x`` (plus a pass for the floor's mean on ``refresh`` steps).
    Scalars travel as a tensor (``[coef·l1, eps, floor, 2·l2·coef]``) so that
    a changing ``lr`` or bias correction does not recompile. Returns the
    floor's reference.
    """
    coef_l1, eps, floor, two_l2_coef = scalars.unbind()
    v = moment if centered is None else torch.addcmul(moment, centered, centered, value=-1)
    root = torch.sqrt(v.to(scalars.dtype))
    # No prox step where v is 0 (never a gradient) or not finite, as on the unfused path.
    moved = root > 0
    new_ref = ref
    if use_floor:
        if refresh:
            # Non-finite roots count as 0 in the mean: the reference never becomes NaN or Inf.
            typical = torch.nan_to_num(root, nan=0.0, posinf=0.0).mean()
            new_ref = torch.maximum(ref, torch.nan_to_num(typical, nan=0.0, posinf=0.0))
        root = torch.maximum(root, new_ref * floor)
    denom = root + eps
    tau = torch.where(moved, coef_l1 / denom, 0.0)
    xs = x.to(scalars.dtype)
    out = xs - torch.clamp(xs, -tau, tau)
    if has_l2:
        out = out / (1 + torch.where(moved, two_l2_coef / denom, 0.0))
    x.copy_(out)
    return new_ref


def _compiled_kernel() -> Callable[..., Tensor]:
    global _KERNEL
    if _KERNEL is None:
        # dynamic: one compiled kernel for every parameter size (the inputs are flat).
        _KERNEL = torch.compile(_adaptive_prox_kernel, dynamic=True, fullgraph=True)
    return _KERNEL
