"""sparsecraft for Keras 3, on the TensorFlow, JAX and PyTorch backends.

Written with ``keras`` and ``keras.ops`` only: importing it does not import
torch. :mod:`~sparsecraft.keras.regularizers` (Keras's values, with a prox),
:class:`~sparsecraft.keras.optimizers.ProximalOptimizer` (exact zeros inside
``model.fit()``), :class:`~sparsecraft.keras.callbacks.TargetSparsity` (a
requested sparsity), :func:`sparsity` and :func:`explain` (reports).
"""

from __future__ import annotations

from . import callbacks, optimizers, regularizers
from ._report import Explanation, SparsityReport, explain, sparsity
from .callbacks import TargetSparsity
from .optimizers import ProximalOptimizer
from .regularizers import L1, L1L2, L2, GroupLasso, OrthogonalRegularizer

__all__ = [
    "callbacks",
    "optimizers",
    "regularizers",
    "ProximalOptimizer",
    "TargetSparsity",
    "L1",
    "L2",
    "L1L2",
    "GroupLasso",
    "OrthogonalRegularizer",
    "sparsity",
    "explain",
    "SparsityReport",
    "Explanation",
]
