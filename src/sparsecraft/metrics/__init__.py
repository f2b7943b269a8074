"""Measurement: zeros in parameters, FLOPs of a forward pass, zeros in activations.

Nothing here prints: every function returns numbers or report objects, and
presentation (``rich`` tables, plain text) is produced on request.

Three tools:

* :func:`sparsity` counts exact zeros, near-zeros (``|x| <= tol``) and
  all-zero rows/columns of every parameter, and optionally the FLOPs of one
  forward pass before and after removing the zero rows/columns.
* :func:`flops` counts ``2 * MACs`` of the Linear and convolution layers of
  one forward pass.
* :class:`ActivationMonitor` accumulates zero fractions, per-sample L0 and
  dead units of module outputs with forward hooks, without keeping activations.

The raw counting is one function, :func:`count_zeros`, returning integers (or
a device tensor) that a distributed caller can all-reduce across ranks.
"""

from __future__ import annotations

from ._activations import ACTIVATION_TYPES, ActivationMonitor
from ._counts import count_zeros
from ._flops import LayerFlops, flops, layer_flops
from ._report import ParamRecord, SparsityReport, sparsity
from ._report import ParamSelector as ParamSelector  # type alias, importable as before

__all__ = [
    "ACTIVATION_TYPES",
    "ActivationMonitor",
    "LayerFlops",
    "ParamRecord",
    "SparsityReport",
    "count_zeros",
    "flops",
    "layer_flops",
    "sparsity",
]
