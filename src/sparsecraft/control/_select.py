"""Counting and ranking a controller's units (elements or groups) over all ranks.

A :class:`Units` is one controlled tensor's magnitudes (``|w|`` per element)
or group norms, as this rank holds them: the whole tensor (one process, DDP
replicas, group norms that :func:`sparsecraft.distributed.group_norms` made
global) or this rank's shard of an FSDP2 parameter (``sharded``: counts are
summed over ranks). Every function here gives every rank the same answer, and
the one a single process holding the whole model would give; each is a
collective as soon as one unit is sharded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .. import distributed as _dist

# float64 bit patterns of non-negative numbers are ordered like the numbers: +inf is the largest.
_INF_BITS = 0x7FF0000000000000


@dataclass
class Units:
    """One tensor's units: ``values`` (1-D, >= 0) and whether they are one rank's shard."""

    values: Tensor
    sharded: bool


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _dist._is_dtensor(t) else t


def element_units(tensors: Sequence[Tensor]) -> list[Units]:
    """``|w|`` of each tensor (its local shard for an FSDP2 parameter)."""
    return [Units(_local(t).detach().abs().flatten(), _dist.is_sharded(t)) for t in tensors]


def check_placements(tensors: Sequence[Tensor]) -> None:
    """Refuse DTensors both sharded and replicated (HSDP): ranks would count a shard twice."""
    for t in tensors:
        if _dist.is_sharded(t) and any(p.is_replicate() for p in t.placements):
            raise ValueError(
                "Expected parameters sharded over every rank (FSDP2 on a 1-D mesh) or replicated "
                f"(DDP). Received: placements {tuple(t.placements)}; finalize() does not rank "
                "shards that are also replicated (HSDP)"
            )


def _sum_sharded(local: Tensor, any_sharded: bool) -> Tensor:
    if any_sharded and _dist._initialized():
        local = local.to(_dist._comm_device(None))
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
    return local.cpu()


def count(units: Sequence[Units], masks: Sequence[Tensor]) -> int:
    """How many units are selected by ``masks`` (one bool tensor per unit), over all ranks."""
    rep = torch.zeros((), dtype=torch.int64)
    shard = torch.zeros(1, dtype=torch.int64)
    for u, m in zip(units, masks, strict=True):
        n = m.sum().cpu()
        if u.sharded:
            shard += n
        else:
            rep += n
    return int(rep) + int(_sum_sharded(shard, any(u.sharded for u in units))[0])


def sizes(units: Sequence[Units]) -> list[int]:
    """Each tensor's number of units over all ranks."""
    local = torch.tensor([u.values.numel() if u.sharded else 0 for u in units], dtype=torch.int64)
    total = _sum_sharded(local, any(u.sharded for u in units))
    return [int(t) if u.sharded else u.values.numel() for t, u in zip(total, units, strict=True)]


def kth_smallest(units: Sequence[Units], k: int) -> float:
    """The ``k``-th smallest value (1-based) of all units together, over all ranks.

    Whole tensors: one ``kthvalue``. With shards, a bisection on the float64
    bit pattern (63 steps, one all-reduce of one integer each) finds the
    smallest value with at least ``k`` values at or below it, exactly.
    """
    if not any(u.sharded for u in units):
        flat = torch.cat([u.values.double().cpu() for u in units])
        return float(torch.kthvalue(flat, k).values)
    bits = [u.values.double().view(torch.int64) for u in units]
    lo, hi = 0, _INF_BITS  # count(<= hi) >= k; the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if count(units, [b <= mid for b in bits]) >= k:
            hi = mid
        else:
            lo = mid + 1
    return float(torch.tensor(lo, dtype=torch.int64).view(torch.float64))


def smallest(units: Sequence[Units], k: int) -> list[Tensor]:
    """Masks of the ``k`` smallest values over all ranks (``k`` at most the number of units).

    Values equal to the ``k``-th smallest are taken in a fixed order: whole
    tensors first (in order, the same on every rank), then shards by rank.
    """
    if k <= 0:
        return [torch.zeros_like(u.values, dtype=torch.bool) for u in units]
    tau = kth_smallest(units, k)
    below = [u.values.double() < tau for u in units]
    ties = [u.values.double() == tau for u in units]
    left = k - count(units, below)
    masks = []
    for u, b, t in zip(units, below, ties, strict=True):
        if u.sharded:
            masks.append(b)
            continue
        take = min(left, int(t.sum()))
        masks.append(b | _first(t, take))
        left -= take
    shard_ties = [int(t.sum()) for u, t in zip(units, ties, strict=True) if u.sharded]
    if shard_ties:
        mine = sum(shard_ties)
        if _dist._initialized():
            per_rank = _dist.gather_rows(torch.tensor([mine], dtype=torch.int64))[:, 0].tolist()
            before = sum(per_rank[: dist.get_rank()])
        else:
            before = 0
        take = min(max(left - before, 0), mine)
        for i, (u, t) in enumerate(zip(units, ties, strict=True)):
            if u.sharded:
                n = min(take, int(t.sum()))
                masks[i] = masks[i] | _first(t, n)
                take -= n
    return masks


def _first(mask: Tensor, n: int) -> Tensor:
    """The first ``n`` set entries of ``mask``."""
    out = torch.zeros_like(mask)
    if n > 0:
        out[mask.nonzero().flatten()[:n]] = True
    return out
