"""Export: smaller dense models, sparse (CSR) inference and safe model files.

* :func:`compact` removes zero units/channels and returns a smaller dense model
  with the same outputs, plus a :class:`CompactReport`.
* :func:`to_sparse` replaces ``Linear`` layers by :class:`SparseLinear` and
  ``Conv1d``/``Conv2d`` by :class:`SparseConv` (CSR weight) where measuring
  shows it is faster, plus a :class:`SparseReport`.
* :func:`save` / :func:`load` write and read models as safetensors files with
  a JSON structure header and a checksum; loading never executes code.

The user guide with measured numbers is ``docs/export.md``.
"""

from __future__ import annotations

from sparsecraft.export._compact import CompactReport, LayerChange, compact
from sparsecraft.export._io import load, save
from sparsecraft.export._sparse import SparseChoice, SparseLinear, SparseReport, to_sparse
from sparsecraft.export._sparse_conv import SparseConv
from sparsecraft.export._transformer import CompactEncoderLayer

__all__ = [
    "CompactEncoderLayer",
    "CompactReport",
    "LayerChange",
    "SparseChoice",
    "SparseConv",
    "SparseLinear",
    "SparseReport",
    "compact",
    "load",
    "save",
    "to_sparse",
]
