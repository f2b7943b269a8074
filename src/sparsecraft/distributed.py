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
  :class:`~sparsecraft.Regularizer` through the helpers at the end of this
  module: a separable prox runs on the local shard; a group prox whose groups
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

from . import functional as F
from .metrics import ParamRecord, SparsityReport
from .metrics import sparsity as _local_sparsity
from .metrics._counts import _check_tol, _zero_mask
from .metrics._report import _named_tensors, _select
from .penalties import GroupLasso, Penalty, SparseGroupLasso

__all__ = [
    "all_reduce_counts",
    "check_same",
    "count_zeros",
    "gather_rows",
    "group_norms",
    "sparsity",
    "sync_activity",
]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _comm_device(group: Any) -> torch.device:
    """Where a small tensor must live to be all-reduced by ``group``'s backend."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


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
