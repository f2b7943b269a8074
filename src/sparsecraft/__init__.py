"""sparsecraft: make tensors sparse in PyTorch, and show what it did.

Penalties with Keras's exact semantics (:mod:`sparsecraft.penalties`), bound to
weights, activations or tensors by a :class:`Regularizer`; minimised through
the loss or, for exact zeros, by a :class:`ProximalOptimizer`.
"""

from __future__ import annotations

from . import datasets, distributed, export, functional, metrics, penalties, select
from .control import TargetSparsity, path
from .export import compact, load, save, to_sparse
from .metrics import ActivationMonitor, SparsityReport, sparsity
from .optim import AdaptiveStep, ProximalOptimizer, register_step_rule, threshold
from .penalties import (
    L0,
    L1,
    L1L2,
    L2,
    MCP,
    ElasticNet,
    GroupLasso,
    Hoyer,
    Orthogonal,
    Penalty,
    SparseGroupLasso,
)
from .regularizer import Explanation, Regularizer, Term, regularize

__version__ = "0.1.0"

__all__ = [
    "datasets",
    "distributed",
    "metrics",
    "select",
    "ProximalOptimizer",
    "export",
    "compact",
    "to_sparse",
    "save",
    "load",
    "TargetSparsity",
    "path",
    "register_step_rule",
    "AdaptiveStep",
    "threshold",
    "sparsity",
    "SparsityReport",
    "ActivationMonitor",
    "functional",
    "penalties",
    "Penalty",
    "L1",
    "L2",
    "L1L2",
    "ElasticNet",
    "L0",
    "MCP",
    "GroupLasso",
    "SparseGroupLasso",
    "Hoyer",
    "Orthogonal",
    "Regularizer",
    "Term",
    "Explanation",
    "regularize",
]
