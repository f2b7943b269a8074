"""DTensor plumbing for FSDP2-sharded parameters, used by Regularizer and ProximalOptimizer.

A separable prox runs on the local shard; a group prox whose groups span
shards all-reduces the per-slice squared sums first; a separable penalty's
value is summed over shards, any other penalty's value is computed on the
gathered parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import functional as F
from ..penalties import GroupLasso, Penalty, SparseGroupLasso


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _comm_device(group: Any) -> torch.device:
    """Where a small tensor must live to be all-reduced by ``group``'s backend."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


# -- DTensor plumbing (used by Regularizer and ProximalOptimizer) ------------------------------


def _is_dtensor(t: Any) -> bool:
    # Duck-typed, so that torch builds without torch.distributed.tensor still import us.
    return isinstance(t, Tensor) and hasattr(t, "device_mesh") and hasattr(t, "placements")


def is_sharded(t: Any) -> bool:
    """True for a DTensor with at least one ``Shard`` placement (an FSDP2 parameter)."""
    return _is_dtensor(t) and any(p.is_shard() for p in t.placements)


def _layout(t: Tensor) -> tuple[list[int], list[int]]:
    """Global offset of the local shard along each dim, and the mesh dims that shard ``t``.

    DTensor's ``Shard(d)`` splits like ``torch.chunk`` (the last shards may be
    shorter or empty); FSDP2 pads its buffers but exposes exactly these shards.
    """
    from torch.distributed.tensor import Shard

    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    offset = [0] * t.ndim
    size = list(t.shape)
    shard_dims = []
    for i, pl in enumerate(t.placements):
        if pl.is_partial():
            raise ValueError(
                f"Expected a DTensor with Shard or Replicate placements. Received: placements="
                f"{tuple(t.placements)}; redistribute it first"
            )
        if not pl.is_shard():
            continue
        if type(pl) is not Shard:
            raise ValueError(
                f"Expected plain Shard placements (as FSDP2 uses). Received: {pl!r}, whose "
                f"shards are not contiguous slices"
            )
        d = pl.dim % t.ndim
        n, c = mesh.size(i), coord[i]
        chunk = -(-size[d] // n)
        start = min(c * chunk, size[d])
        offset[d] += start
        size[d] = max(min(chunk, size[d] - start), 0)
        shard_dims.append(i)
    if tuple(size) != tuple(t.to_local().shape):
        raise ValueError(
            f"Expected local shards split as torch.chunk does. Received: local shape "
            f"{tuple(t.to_local().shape)}, computed {tuple(size)} for placements {tuple(t.placements)}"
        )
    return offset, shard_dims


def _replica_leader(t: Tensor) -> bool:
    """True on the ranks at coordinate 0 of every mesh dim where ``t`` is replicated."""
    coord = t.device_mesh.get_coordinate()
    return all(c == 0 for c, pl in zip(coord, t.placements, strict=True) if pl.is_replicate())


def _reduce_shards(vec: Tensor, t: Tensor) -> Tensor:
    """Sum ``vec`` in place over the mesh dims that shard ``t`` (not over its replicas)."""
    _, shard_dims = _layout(t)
    for i in shard_dims:
        dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=t.device_mesh.get_group(i))
    return vec


def _place(local_slices: Tensor, t: Tensor, dim: int, offset: list[int]) -> Tensor:
    """Per-slice values of the local shard along ``dim``, placed in a vector over all slices."""
    full = local_slices.new_zeros(t.shape[dim])
    full[offset[dim]: offset[dim] + local_slices.numel()] = local_slices
    return full


def top_k_mask(local: Tensor, k: int, t: Tensor) -> Tensor:
    """Where the ``k`` largest values of sharded ``t`` lie, as this rank's boolean shard.

    ``local``: one value >= 0 per element of this rank's shard of ``t`` (finite).
    The mask is the one a single process computes on the whole tensor, ties at
    the cut taken in index order: a radix selection on the values' bit patterns
    (for non-negative floats ordered like the values), one byte a round. Each
    round all-reduces a 256-bin histogram over the shards (4 rounds for float32
    and smaller, 8 for float64), then one all-gather of the tie counts.

    Raises:
        ValueError: ``t`` is sharded along more than one mesh dimension.
    """
    _, shard_dims = _layout(t)
    if len(shard_dims) != 1:
        raise ValueError(
            f"Expected a DTensor sharded along one mesh dimension (FSDP2). Received: placements "
            f"{tuple(t.placements)}"
        )
    group = t.device_mesh.get_group(shard_dims[0])
    flat = local.detach().reshape(-1)
    bits = flat.view(torch.int64) if flat.dtype == torch.float64 else flat.float().view(torch.int32)
    need, prefix = k, 0
    matched = torch.ones_like(bits, dtype=torch.bool)  # the elements whose higher bytes are the prefix
    for shift in range(bits.element_size() * 8 - 8, -1, -8):
        byte = (bits >> shift) & 0xFF
        hist = torch.bincount(byte[matched], minlength=256)
        dist.all_reduce(hist, op=dist.ReduceOp.SUM, group=group)
        above = 0
        counts = hist.tolist()
        b = 255
        while b > 0 and above + counts[b] < need:  # the byte of the need-th largest
            above += counts[b]
            b -= 1
        need -= above
        prefix |= b << shift
        matched &= byte == b
    keep = bits > prefix
    # ``need`` elements equal to the cut value go in too, in index order: shards are
    # contiguous slices in mesh order (``torch.chunk``), so ranks before this one go first.
    mine = torch.tensor([int(matched.sum())], dtype=torch.int64, device=hist.device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    coord = t.device_mesh.get_coordinate()[shard_dims[0]]
    take = min(max(need - sum(int(r) for r in rows[:coord]), 0), int(mine))
    if take:
        keep[torch.nonzero(matched).reshape(-1)[:take]] = True
    return keep.view(local.shape)


def local_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer state with its DTensors replaced by their local shards (for step rules)."""
    return {k: v.to_local() if _is_dtensor(v) else v for k, v in state.items()}


def mean(local: Tensor, t: Tensor) -> Tensor:
    """Mean over the whole sharded tensor ``t`` of values held per local element in ``local``."""
    s = local.sum(dtype=torch.float64 if local.dtype == torch.float64 else torch.float32).reshape(1)
    return (_reduce_shards(s, t) / max(t.numel(), 1)).reshape(()).to(local.dtype)


def slice_means(local: Tensor, t: Tensor, dim: int) -> Tensor:
    """Mean over each slice of ``t`` along ``dim`` (all slices) of per-element ``local`` values."""
    offset, _ = _layout(t)
    other = [k for k in range(local.ndim) if k != dim]
    sums = local.sum(dim=other) if other else local
    full = _reduce_shards(_place(sums, t, dim, offset), t)
    per_slice = t.numel() // max(t.shape[dim], 1)
    return full / max(per_slice, 1)


def penalty_value(penalty: Penalty, target: Tensor) -> Tensor:
    """``penalty(target)`` as a plain tensor, also for a DTensor target.

    A separable penalty is a sum over coordinates: it is computed on the local
    shard and summed over ranks (a scalar all-reduce whose backward gives each
    shard its own gradient). Any other penalty is computed on the gathered
    parameter (an all-gather; the gradient flows back to the local shard).
    Every rank must call it, as with any collective.
    """
    if not _is_dtensor(target):
        return penalty(target)
    from torch.distributed.tensor import DTensor, Partial, Replicate

    _layout(target)  # validates the placements
    if penalty.separable:
        v = penalty(target.to_local())
        placements = [Partial() if pl.is_shard() else Replicate() for pl in target.placements]
        return DTensor.from_local(v, target.device_mesh, placements, run_check=False).full_tensor()
    return penalty(target.full_tensor())


@torch.no_grad()
def prox_(penalty: Penalty, p: Tensor, step: float | Tensor) -> None:
    """In-place prox of ``penalty`` on a DTensor parameter ``p``, shard by shard.

    ``step`` is a float, a per-coordinate tensor of the local shard's shape
    (separable penalties), or one step per group (group penalties).
    """
    local = p.to_local()
    if penalty.separable:
        penalty.prox_(local, step)
        return
    if not isinstance(penalty, (GroupLasso, SparseGroupLasso)):
        raise TypeError(
            f"Expected a separable penalty or a GroupLasso/SparseGroupLasso for a sharded "
            f"parameter. Received: {type(penalty).__name__}, whose prox needs the whole tensor"
        )
    offset, _ = _layout(p)
    lay = _global_layout(penalty, p)
    strength = penalty.strength if isinstance(penalty, GroupLasso) else penalty.group
    view = [1] * local.ndim
    view[lay.dim] = -1
    lo, hi = offset[lay.dim], offset[lay.dim] + local.shape[lay.dim]
    if isinstance(penalty, SparseGroupLasso):
        s = step
        if isinstance(step, Tensor) and step.numel() > 1:
            s = (step[lay.index] if lay.index is not None else step)[lo:hi].reshape(view)
        F.soft_threshold(local, s * penalty.l1, out=local)
    norms = group_norms(penalty, p)
    # The block soft threshold of F.group_soft_threshold, with global group norms.
    thr = lay.weights * (step * strength)
    factor = (1.0 - thr / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp_min_(0.0)
    if lay.index is not None:
        factor = factor[lay.index]
    local.mul_(factor[lo:hi].reshape(view).to(local.dtype))


def _global_layout(penalty: Any, t: Tensor) -> Any:
    """The group layout of the whole tensor (group sizes and weights are global)."""
    return penalty.layout(t.to_local().new_empty(()).expand(t.shape))


@torch.no_grad()
def group_norms(penalty: Any, t: Tensor) -> Tensor:
    """Norms of the groups a group penalty (GroupLasso, SparseGroupLasso) defines on ``t``.

    For a sharded DTensor the per-slice squared sums of the local shard are
    summed over the ranks that hold the other shards (one all-reduce), so every
    rank gets the norms of the whole tensor; for a plain tensor it is
    :func:`sparsecraft.functional.group_norms` on the penalty's layout.
    """
    if not _is_dtensor(t):
        lay = penalty.layout(t)
        return F.group_norms(t.detach(), lay.dim, lay.index, lay.n_groups)
    local = t.to_local().detach()
    offset, _ = _layout(t)
    lay = _global_layout(penalty, t)
    # Squared sums per slice of the local shard (float32 for 16-bit), summed over shards.
    sums = _reduce_shards(_place(F._slice_sq_sums(local, lay.dim), t, lay.dim, offset), t)
    if lay.index is not None:
        sums = sums.new_zeros(lay.n_groups).index_add_(0, lay.index, sums)
    return sums.sqrt()
