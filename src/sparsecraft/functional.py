"""Pure tensor math for sparsity: proximal operators with no state.

Every function here is the exact minimiser of a small problem,

    prox_{tR}(v) = argmin_x  R(x) + ||x - v||² / (2t),

written so that it can run in place (``out=v``) and cost about one memory pass
over the tensor. Penalties in :mod:`sparsecraft.penalties` call these; users may
call them directly.

Step sizes ``t`` may be a Python float or a tensor broadcastable to ``v``
(per-coordinate steps, as adaptive optimizers produce), unless a function says
otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "soft_threshold",
    "soft_threshold_",
    "hard_threshold",
    "firm_threshold",
    "shrink",
    "group_norms",
    "group_soft_threshold",
    "check_step",
]


def check_step(step: float | Tensor) -> float | Tensor:
    """Validate a prox step size: a finite, non-negative float or tensor.

    Tensor steps are checked only for floating dtype here; the values are
    checked where a host sync is already paid (the optimizer's validation).
    """
    if isinstance(step, Tensor):
        if not step.is_floating_point():
            raise TypeError(f"Expected a floating-point step tensor. Received: step.dtype={step.dtype}")
        return step
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        raise TypeError(f"Expected step to be a float or a tensor. Received: step={step!r}")
    step = float(step)
    if not math.isfinite(step) or step < 0:
        raise ValueError(f"Expected a finite step >= 0. Received: step={step}")
    return step


def soft_threshold(v: Tensor, threshold: float | Tensor, *, out: Tensor | None = None) -> Tensor:
    """Soft thresholding, the prox of ``τ·Σ|x|`` with step 1.

    ``soft_threshold(v, τ) = sign(v) · max(|v| − τ, 0) = argmin_x τ·Σ|x| + ||x − v||²/2``.

    Args:
        v: input tensor.
        threshold: ``τ >= 0``, a float or a tensor broadcastable to ``v``.
        out: where to write the result; ``out=v`` works in place (one pass for a
            float threshold). See :func:`soft_threshold_` for tensor thresholds
            without a temporary.
    """
    if not isinstance(threshold, Tensor):
        # softshrink refuses a threshold beyond v's dtype range (float16: 65504); any
        # threshold >= the largest finite value zeroes every finite v alike.
        tau = min(float(threshold), torch.finfo(v.dtype).max) if v.is_floating_point() else float(threshold)
        if out is None:
            return torch.nn.functional.softshrink(v, tau)
        # softshrink is a single elementwise kernel; aliasing out with v is safe.
        return torch._C._nn.softshrink(v, tau, out=out)
    if out is None:
        return v - torch.clamp(v, -threshold, threshold)
    if out is not v:
        out.copy_(v)
    return out.sub_(torch.clamp(out, -threshold, threshold))


def soft_threshold_(v: Tensor, workspace: Tensor) -> Tensor:
    """In-place soft thresholding of ``v`` by the thresholds held in ``workspace``.

    ``workspace`` (same shape as ``v``, values ``τ >= 0``) is overwritten: this
    is the optimizer's hot path, which owns the buffer and wants no temporary of
    ``v``'s size. Same result as :func:`soft_threshold`.
    """
    # w = sign(v)·τ; v' = v − w keeps its sign iff |v| > τ, so sign(w)·v' >= 0 marks
    # the survivors (τ = 0 keeps everything). sign(w)·v' is exact; w·v' would
    # underflow to -0 for tiny τ and let v = 0 become −τ.
    w = workspace
    torch.copysign(w, v, out=w)
    v.sub_(w)
    w.sign_().mul_(v)
    torch.heaviside(w, w.new_ones(()), out=w)
    return v.mul_(w)


def hard_threshold(v: Tensor, threshold: float | Tensor, *, out: Tensor | None = None) -> Tensor:
    """Hard thresholding: keep ``v`` where ``|v| > τ``, zero elsewhere.

    It is the prox of ``λ·‖x‖₀`` with step ``t`` for ``τ = sqrt(2·t·λ)``:
    ``argmin_x λ·#{x ≠ 0} + ||x − v||²/(2t)`` keeps ``v_i`` iff ``v_i²/(2t) > λ``.
    """
    keep = v.abs() > threshold
    if out is None:
        return v * keep
    if out is not v:
        out.copy_(v)
    return out.mul_(keep)


def shrink(v: Tensor, factor: float | Tensor, *, out: Tensor | None = None) -> Tensor:
    """Multiply by ``1 / (1 + factor)``: the prox of ``(factor/2)·Σx²`` with step 1."""
    if out is None:
        return v / (1.0 + factor)
    if out is not v:
        out.copy_(v)
    return out.div_(1.0 + factor)


def firm_threshold(v: Tensor, lam: float, gamma: float, step: float | Tensor) -> Tensor:
    """Prox of the minimax concave penalty (MCP) with strength ``λ`` and ``γ > 0``.

    MCP (Zhang 2010): ``p(x) = λ|x| − x²/(2γ)`` for ``|x| <= γλ``, else ``γλ²/2``.
    ``argmin_x p(x) + (x − v)²/(2t)`` is, for ``t < γ``, the firm threshold

        0                              if |v| <= tλ
        sign(v)(|v| − tλ)/(1 − t/γ)    if tλ < |v| <= γλ
        v                              if |v| > γλ

    and, for ``t >= γ`` (the inner problem is then concave), a hard threshold at
    ``λ·sqrt(tγ)``. Both branches are exact; ties at the boundary go to 0.
    """
    t = step if isinstance(step, Tensor) else torch.as_tensor(float(step), dtype=v.dtype, device=v.device)
    a = v.abs()
    firm = torch.where(
        a <= t * lam,
        torch.zeros_like(v),
        torch.where(a <= gamma * lam, torch.sign(v) * (a - t * lam) / (1.0 - t / gamma), v),
    )
    hard = torch.where(a > lam * torch.sqrt(t * gamma), v, torch.zeros_like(v))
    return torch.where(t < gamma, firm, hard)


def _group_layout(shape: Sequence[int], dim: int, index: Tensor | None) -> tuple[int, Tensor | None]:
    ndim = len(shape)
    if not -ndim <= dim < ndim:
        raise ValueError(
            f"Expected a group dimension within a tensor of {ndim} dims. Received: dim={dim}, shape={tuple(shape)}"
        )
    dim = dim % ndim
    if index is not None and index.numel() != shape[dim]:
        raise ValueError(
            f"Expected a group index with one entry per slice along dim {dim} ({shape[dim]} slices). "
            f"Received: index of length {index.numel()}, tensor shape={tuple(shape)}"
        )
    return dim, index


def _slice_sq_sums(v: Tensor, dim: int) -> Tensor:
    other = [d for d in range(v.ndim) if d != dim]
    # 16-bit squares overflow (float16: |x| > 256 gives inf, and the prox stops
    # shrinking) and keep 8 bits (bfloat16): square and sum them in float32.
    sq = (v.float() if v.dtype in (torch.float16, torch.bfloat16) else v).square()
    return sq.sum(dim=other) if other else sq


def group_norms(v: Tensor, dim: int, index: Tensor | None = None, n_groups: int | None = None) -> Tensor:
    """Euclidean norm of each group of ``v``.

    A group is a slice along ``dim`` (``dim=0``: rows of a Linear weight or
    output channels of a conv; ``dim=1``: columns or input channels), or, with
    ``index``, the union of the slices along ``dim`` that share an index value.

    Returns a 1-D tensor of length ``v.shape[dim]`` (slices) or ``n_groups``,
    in ``v``'s dtype, or in float32 for float16/bfloat16 ``v`` (where norms
    overflow or lose digits).
    """
    dim, index = _group_layout(v.shape, dim, index)
    sums = _slice_sq_sums(v, dim)
    if index is not None:
        n = int(n_groups) if n_groups is not None else int(index.max()) + 1
        sums = torch.zeros(n, dtype=sums.dtype, device=sums.device).index_add_(0, index, sums)
    # sqrt has an infinite derivative at 0: a zero group would turn the
    # gradient into NaN. Give it the zero subgradient instead.
    nonzero = sums > 0
    return torch.where(nonzero, sums, torch.ones_like(sums)).sqrt() * nonzero


def group_soft_threshold(
    v: Tensor,
    threshold: float | Tensor,
    dim: int,
    index: Tensor | None = None,
    n_groups: int | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Block soft thresholding, the prox of ``Σ_g τ_g·‖x_g‖₂`` with step 1.

    ``x_g = v_g · max(1 − τ_g / ‖v_g‖₂, 0)``: a group whose norm is at most
    its threshold becomes exactly zero, the others shrink toward zero.

    Args:
        v: input tensor.
        threshold: a float, or a 1-D tensor with one threshold per group.
        dim: the dimension whose slices form the groups (see :func:`group_norms`).
        index: optional 1-D integer tensor assigning each slice along ``dim`` to a group.
        n_groups: number of groups when ``index`` is given (default ``max + 1``).
        out: where to write the result; ``out=v`` works in place.
    """
    dim, index = _group_layout(v.shape, dim, index)
    norms = group_norms(v, dim, index, n_groups)
    # factor = max(1 - τ/‖v_g‖, 0); a zero group stays zero (no 0/0).
    factor = (1.0 - threshold / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp_min_(0.0)
    if index is not None:
        factor = factor[index]
    view = [1] * v.ndim
    view[dim] = -1
    factor = factor.reshape(view).to(v.dtype)
    if out is None:
        return v * factor
    if out is not v:
        out.copy_(v)
    return out.mul_(factor)
