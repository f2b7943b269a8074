"""Zero counts of one tensor: :class:`ParamRecord`, shared by the torch and the Keras reports.

It imports neither torch nor keras, so ``sparsecraft.keras`` can use it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ParamRecord"]


@dataclass(frozen=True)
class ParamRecord:
    """Zero counts of one parameter.

    Attributes:
        name: Parameter name.
        shape: Parameter shape.
        numel: Number of elements.
        zeros: Exact zeros.
        near_zeros: Elements with ``|x| <= tol`` (equals ``zeros`` when tol is 0).
        density: ``(numel - zeros) / numel`` (1.0 for an empty tensor).
        zero_rows: For ``ndim >= 2``, all-zero slices along dim 0 (output units,
            conv output channels), using ``|x| <= tol``; ``None`` otherwise.
        zero_cols: For ``ndim >= 2``, all-zero slices along dim 1 (input
            features, conv input channels), using ``|x| <= tol``; ``None`` otherwise.
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    near_zeros: int
    density: float
    zero_rows: int | None
    zero_cols: int | None

    @property
    def sparsity(self) -> float:
        """Exact-zero fraction ``zeros / numel`` (0.0 for an empty tensor)."""
        return self.zeros / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the record."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "numel": self.numel,
            "zeros": self.zeros,
            "near_zeros": self.near_zeros,
            "density": self.density,
            "sparsity": self.sparsity,
            "zero_rows": self.zero_rows,
            "zero_cols": self.zero_cols,
        }
