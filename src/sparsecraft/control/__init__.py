"""Reach a requested sparsity in one training run: feedback on penalty strengths.

:class:`TargetSparsity` measures the fraction of exact zeros of the parameters
its prox terms apply to and moves the terms' strength multiplier
(:attr:`~sparsecraft.Term.scale`) until that fraction follows a ramp to the
target, then holds it. The zeros come from the prox of the penalty itself (the
λ path), not from a mask, so it serves every penalty whose prox makes zeros,
group lasso included. :func:`path` is the other way to choose a strength:
train over a list of strengths and look at the accuracy–sparsity trade-off.
"""

from __future__ import annotations

from ._path import PathResult, PathRow, path
from ._ramp import ramp_fraction
from ._target import TargetSparsity

__all__ = ["TargetSparsity", "ramp_fraction", "path", "PathResult", "PathRow"]
