"""sparsecraft: make tensors sparse in PyTorch, and show what it did.

Penalties with Keras's exact semantics (:mod:`sparsecraft.penalties`), bound to
weights, activations or tensors by a :class:`Regularizer`; minimised through
the loss or, for exact zeros, by a :class:`ProximalOptimizer`.

The public names are loaded on first access (PEP 562 module ``__getattr__``):
``import sparsecraft.keras`` must not import torch (the Keras package runs on
the TensorFlow and JAX backends too), and Python runs this file before any
subpackage. ``sc.L1``, ``from sparsecraft import L1`` and ``dir(sc)`` work as
with eager imports.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the submodule that defines it (None: the name is the submodule itself).
_LAZY: dict[str, str | None] = {
    "datasets": None,
    "distributed": None,
    "export": None,
    "functional": None,
    "metrics": None,
    "penalties": None,
    "select": None,
    "control": None,
    "optim": None,
    "regularizer": None,
    "TargetSparsity": "control",
    "path": "control",
    "compact": "export",
    "load": "export",
    "save": "export",
    "to_sparse": "export",
    "ActivationMonitor": "metrics",
    "SparsityReport": "metrics",
    "sparsity": "metrics",
    "AdaptiveStep": "optim",
    "ProximalOptimizer": "optim",
    "register_step_rule": "optim",
    "threshold": "optim",
    "L0": "penalties",
    "L1": "penalties",
    "L1L2": "penalties",
    "L2": "penalties",
    "MCP": "penalties",
    "ElasticNet": "penalties",
    "GroupLasso": "penalties",
    "Hoyer": "penalties",
    "Orthogonal": "penalties",
    "Penalty": "penalties",
    "SparseGroupLasso": "penalties",
    "Explanation": "regularizer",
    "Regularizer": "regularizer",
    "Term": "regularizer",
    "regularize": "regularizer",
}

__all__ = [
    "datasets",
    "distributed",
    "metrics",
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
    "select",
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


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'sparsecraft' has no attribute {name!r}")
    home = _LAZY[name]
    module = importlib.import_module(f".{home or name}", __name__)
    value = module if home is None else getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
