"""sparsecraft under ``torch.distributed``: DDP replicas and FSDP2 (DTensor) shards.

What has to cross ranks, and nothing else:

* **Activity terms** are computed on each rank's local batch. DDP and FSDP2
  average gradients over ranks, so with equal local batches ``penalty(out)/B``
  already gives the global-batch gradient. :func:`sync_activity` makes it exact
  for unequal local batches and for ``reduction="sum"`` (one small all-reduce).
* **Counts** (zeros, elements) of sharded parameters are summed over ranks:
  :func:`all_reduce_counts`, :func:`count_zeros`, :func:`sparsity`.
* **Sharded parameters** (FSDP2 ``fully_shard``: DTensors sharded on dim 0) are
  handled by :class:`~sparsecraft.ProximalOptimizer` and
  :class:`~sparsecraft.Regularizer` through the helpers in ``_dtensor.py``: a separable prox runs on the local shard; a group prox whose groups
  span shards all-reduces the per-slice squared sums before thresholding; a
  separable penalty's value is summed over shards; any other penalty's value
  is computed on the gathered parameter.

Every function is a no-op (or a local computation) when ``torch.distributed``
is not initialised, so the same script runs on one process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..metrics import ParamRecord, SparsityReport
from ..metrics import sparsity as _local_sparsity
from ..metrics._counts import _check_tol, _zero_mask
from ..metrics._report import _named_tensors, _select
from ._dtensor import (  # noqa: F401 - the hot path calls them as distributed.<name>
    _comm_device,
    _global_layout,
    _initialized,
    _is_dtensor,
    _layout,
    _place,
    _reduce_shards,
    _replica_leader,
    group_norms,
    is_sharded,
    local_state,
    mean,
    penalty_value,
    prox_,
    slice_means,
    top_k_mask,
)

__all__ = [
    "all_reduce_counts",
    "check_same",
    "count_zeros",
    "gather_rows",
    "group_norms",
    "sparsity",
    "sync_activity",
]


# -- user-facing helpers -----------------------------------------------------------------------


def all_reduce_counts(zeros: Tensor, numel: Tensor, group: Any = None) -> tuple[Tensor, Tensor]:
    """Sum ``(zeros, numel)`` counts over the ranks of ``group`` (the default group if None).

    A no-op when ``torch.distributed`` is not initialised. Counts of local shards
    (``sparsecraft.metrics.count_zeros`` counts a DTensor on its local shard)
    become global counts. Counts of replicated tensors (DDP) are multiplied by
    the world size on both sides, so the ratio ``zeros / numel`` is unchanged;
    for a mix of sharded and replicated tensors use :func:`count_zeros`.

    Args:
        zeros: a 0-d integer tensor (on the backend's device: CPU for gloo, GPU for nccl).
        numel: a 0-d integer tensor on the same device.
        group: the process group.

    Returns:
        The summed ``(zeros, numel)``, new tensors of the inputs' dtype.
    """
    for name, t in (("zeros", zeros), ("numel", numel)):
        if not isinstance(t, Tensor) or t.numel() != 1:
            raise TypeError(f"Expected a one-element tensor for {name}. Received: {name}={t!r}")
    both = torch.stack([zeros.reshape(()), numel.reshape(()).to(zeros.dtype)])
    if _initialized():
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
    return both[0], both[1].to(numel.dtype)


def count_zeros(tensors: Tensor | Iterable[Tensor], tol: float = 0.0, group: Any = None) -> Tensor:
    """Global ``[zeros, numel]`` (int64) of tensors that may be sharded, replicated or both.

    Each element is counted once: a DTensor's local shard is summed over ranks
    (counted on the ranks at coordinate 0 of its replicated mesh dims), a plain
    tensor is taken as replicated and counted locally. DTensor meshes must
    span ``group``. One all-reduce when distributed; a local count otherwise.

    Args:
        tensors: a tensor or an iterable of tensors.
        tol: elements with ``|x| <= tol`` count as zeros.
        group: the process group.
    """
    tol = _check_tol(tol)
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    sharded: list[Tensor] = []
    replicated: list[Tensor] = []
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"Expected tensors. Received: tensors[{i}]={type(t).__name__}")
        if _is_dtensor(t):
            _layout(t)  # validates the placements
            if _replica_leader(t):
                sharded.append(t.to_local().detach())
        else:
            replicated.append(t.detach())
    device = _comm_device(group) if _initialized() else torch.device("cpu")
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    for t in sharded:
        counts += _counts(t, tol).to(device)
    if _initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    for t in replicated:
        counts += _counts(t, tol).to(device)
    return counts


def gather_rows(values: Tensor, group: Any = None) -> Tensor:
    """Every rank's ``values`` (a 1-D int64 tensor of one length on all ranks), stacked by rank.

    One ``all_gather`` when distributed (every rank must call it); ``values[None]``
    otherwise. The result is on the backend's communication device.

    Args:
        values: this rank's row.
        group: the process group.

    Returns:
        A ``[world_size, len(values)]`` tensor; row ``r`` is rank ``r``'s ``values``.
    """
    if not isinstance(values, Tensor) or values.ndim != 1:
        raise TypeError(f"Expected a 1-D tensor. Received: values={values!r}")
    if not _initialized():
        return values[None].clone()
    row = values.to(_comm_device(group))
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    return torch.stack(rows)


def _fingerprint(value: Any) -> int:
    """A 63-bit hash of ``repr(value)`` that is the same in every process (``hash()`` is salted)."""
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_same(fields: Mapping[str, Any], what: str, group: Any = None) -> None:
    """Raise on every rank unless every rank passes equal ``fields`` (compared by ``repr``).

    One small ``all_gather`` of one 63-bit hash per field: call it where every
    rank builds the object, before its first collective, so that ranks
    configured differently fail at once with a message instead of diverging
    or waiting for the process group's timeout. A no-op when not distributed.

    Args:
        fields: name -> value; every rank must pass the same names in the same order.
        what: what is being checked, for the message (e.g. ``"TargetSparsity settings"``).
        group: the process group.

    Raises:
        ValueError: on every rank, naming the first rank that differs from rank 0
            and the fields that differ.
    """
    if not _initialized():
        return
    names = list(fields)
    # The field names are hashed too: ranks that pass other names differ in the first entry.
    local = torch.tensor([_fingerprint(names)] + [_fingerprint(fields[n]) for n in names],
                         dtype=torch.int64)
    rows = gather_rows(local, group).cpu()
    for rank in range(1, rows.shape[0]):
        differ = [names[i - 1] if i else "field names" for i in range(rows.shape[1])
                  if rows[rank, i] != rows[0, i]]
        if differ:
            mine = dist.get_rank(group)
            raise ValueError(
                f"Expected the same {what} on every rank. Received: rank {rank} differs from rank 0 "
                f"in {differ} (this is rank {mine}); build it with the same arguments on every rank"
            )


def _counts(t: Tensor, tol: float) -> Tensor:
    return torch.stack([_zero_mask(t, tol).sum(), torch.tensor(t.numel(), device=t.device)])


def sync_activity(regularizer: Any, group: Any = None) -> None:
    """Make this rank's activity terms combine into the loss of the global batch.

    Call it after the forward and before ``regularizer.loss()``, once per
    forward, on every rank. DDP and FSDP2 average gradients over the ``W``
    ranks, so the loss each rank returns must be ``W`` times its share of the
    global loss. For an activity term of a penalty that sums over samples
    (L1, L2, L1L2, L0, MCP, row groups):

    * ``reduction="batch"``: global ``Σ_r R(out_r) / Σ_r B_r``, so rank ``r``'s
      captured values are scaled by ``W·B_r / Σ B`` (1 when batches are equal);
    * ``"mean"``: the same with element counts (samples have one shape);
    * ``"sum"``: global ``Σ_r R(out_r)``, scale ``W``.

    Penalties that do not sum over samples (Hoyer, Orthogonal, column groups
    of an activation) cannot be split over ranks without gathering the
    activations; scalar outputs are left as they are. Calls of a module within
    one forward are assumed to share a batch size. A no-op when not distributed.

    Args:
        regularizer: a :class:`~sparsecraft.Regularizer` whose model has just run forward.
        group: the process group the model's gradients are averaged over.
    """
    if not isinstance(getattr(regularizer, "terms", None), tuple):
        raise TypeError(f"Expected a sparsecraft.Regularizer. Received: {type(regularizer).__name__}")
    terms = [t for t in regularizer.terms if t.kind == "activity"]
    if not terms or not _initialized():
        return
    world = dist.get_world_size(group)
    device = _comm_device(group)
    local = [float(t.last_batch or 0) if t.captured and t.last_batch is not None else 0.0
             for t in terms]
    total = torch.tensor(local, dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    for term, b, b_all in zip(terms, local, total.tolist(), strict=True):  # one host sync
        if not term.captured or term.last_batch is None:
            continue
        if term.reduction == "sum":
            factor = float(world)
        else:
            factor = world * b / b_all if b_all > 0 else 0.0
        term.captured[:] = [v * factor for v in term.captured]


def sparsity(
    model_or_params: nn.Module | Tensor | Iterable[Any] | Mapping[str, Tensor],
    *,
    tol: float = 0.0,
    params: Any = None,
) -> SparsityReport:
    """:func:`sparsecraft.metrics.sparsity` with sharded parameters counted over all ranks.

    Every rank must call it (one all-reduce per sharded parameter). Replicated
    parameters (plain tensors, DDP) are counted locally. The report is the one
    a single process holding the full model would give (without FLOPs).

    Args:
        model_or_params: as :func:`sparsecraft.metrics.sparsity`.
        tol: tolerance for near-zeros and zero rows/columns.
        params: restrict to some parameters, as :func:`sparsecraft.metrics.sparsity`.

    A sharded parameter is reduced over the process groups of its own device mesh.
    """
    local = _local_sparsity(model_or_params, tol=tol, params=params)
    tensors = dict(_select(_named_tensors(model_or_params), params))
    rows = [
        _sharded_record(r.name, tensors[r.name], local.tol) if _is_dtensor(tensors.get(r.name)) else r
        for r in local.rows
    ]
    return SparsityReport(rows=rows, tol=local.tol, layers=None)


@torch.no_grad()
def _sharded_record(name: str, t: Tensor, tol: float) -> ParamRecord:
    local = t.to_local().detach()
    offset, _ = _layout(t)
    parts = [torch.stack([(local == 0).sum(), _zero_mask(local, tol).sum()])]
    if t.ndim >= 2:
        nz = ~_zero_mask(local, tol)
        for d in (0, 1):
            other = [k for k in range(local.ndim) if k != d]
            parts.append(_place(nz.sum(dim=other), t, d, offset))
    vec = _reduce_shards(torch.cat([p.to(torch.int64) for p in parts]), t)
    values = vec.tolist()  # one host sync
    zeros, near = values[0], values[1]
    numel = t.numel()
    zero_rows = zero_cols = None
    if t.ndim >= 2:
        n0 = t.shape[0]
        zero_rows = sum(1 for c in values[2:2 + n0] if c == 0)
        zero_cols = sum(1 for c in values[2 + n0:] if c == 0)
    return ParamRecord(
        name=name, shape=tuple(t.shape), numel=numel, zeros=zeros, near_zeros=near,
        density=(numel - zeros) / numel if numel else 1.0, zero_rows=zero_rows, zero_cols=zero_cols,
    )

