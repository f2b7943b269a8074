"""Zero counting: the one comparison every other count in the package derives from.

Also the small validation and naming helpers shared by the other metrics modules.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["count_zeros"]


def _check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        # A tensor here is usually inputs passed as tol: name its shape, never print it whole.
        got = (f"a Tensor of shape {tuple(tol.shape)}" if isinstance(tol, torch.Tensor)
               else f"tol={tol!r}"[:80])
        raise TypeError(f"Expected tol to be a float. Received: {got}")
    tol = float(tol)
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"Expected tol to be a finite float >= 0. Received: tol={tol!r}")
    return tol


def _unknown_name_error(kind: str, name: str, known: Iterable[str]) -> ValueError:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Close names: {close}." if close else ""
    shown = known if len(known) <= 20 else known[:20] + ["..."]
    return ValueError(
        f"Expected the name of a {kind} of the model ({shown}).{hint} Received: name={name!r}"
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    # A DTensor is counted on its local shard; the caller all-reduces the counts.
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def count_zeros(
    tensors: torch.Tensor | Iterable[torch.Tensor],
    tol: float = 0.0,
    as_tensor: bool = False,
) -> tuple[int, int] | torch.Tensor:
    """Counts elements with ``|x| <= tol`` and all elements of some tensors.

    This is the one place where zeros are counted; every other count in this
    package derives from it or from the same comparison. A distributed caller
    counts its local shards with ``as_tensor=True`` and all-reduces the result
    (``torch.distributed.all_reduce(counts)``, SUM). A ``DTensor`` is counted
    on its local shard (``to_local()``), so sharded parameters must be summed
    across ranks and replicated ones must not.

    Args:
        tensors: A tensor or an iterable of tensors.
        tol: Elements with ``|x| <= tol`` count as zeros; ``0.0`` counts exact
            zeros only. NaN is never counted as zero.
        as_tensor: If true, return an int64 tensor ``[zeros, numel]`` on the
            device of the first tensor (no host synchronisation); otherwise a
            tuple of Python ints.

    Returns:
        ``(zeros, numel)`` as ints, or an int64 tensor of shape ``[2]``.

    Raises:
        TypeError: If an element is not a tensor.
        ValueError: If ``tol`` is negative or not finite.
    """
    tol = _check_tol(tol)
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    zeros: torch.Tensor | None = None
    numel = 0
    device = torch.device("cpu")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Expected tensors. Received: tensors[{i}]={type(t).__name__}")
        t = _local(t).detach()
        z = _zero_mask(t, tol).sum()
        if zeros is None:
            zeros, device = z, t.device
        else:
            zeros = zeros + z.to(device)
        numel += t.numel()
    if zeros is None:
        zeros = torch.zeros((), dtype=torch.int64, device=device)
    if as_tensor:
        return torch.stack([zeros.to(torch.int64), torch.tensor(numel, device=device)])
    return int(zeros), numel


def _zero_mask(t: torch.Tensor, tol: float) -> torch.Tensor:
    return t == 0 if tol == 0.0 else t.abs() <= tol


def _fraction(num: int, den: int) -> float:
    return num / den if den else 0.0
