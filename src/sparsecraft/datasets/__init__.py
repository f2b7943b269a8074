"""Embedded data sets with known structure; nothing is ever downloaded.

* :func:`digits`: scikit-learn's 8x8 handwritten digits (shipped with
  scikit-learn), a fixed stratified split standardised with train statistics.
* :func:`teacher_student`: Gaussian inputs labelled by a random *sparse*
  teacher MLP whose non-zero pattern is returned, so a student's learned
  pattern can be scored against the truth.
* :func:`superposition`: sparse features embedded in fewer dimensions (toy
  models of superposition, Elhage et al. 2022), with the true directions.

:func:`mlp` is the one model family shared by the data sets, the tests and
the experiments; :func:`load` dispatches on a name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._common import Split, mlp
from ._digits import digits
from ._superposition import superposition
from ._teacher import teacher_student

__all__ = ["Split", "digits", "load", "mlp", "superposition", "teacher_student"]


_LOADERS: dict[str, Callable[..., Split]] = {
    "digits": digits,
    "teacher": teacher_student,
    "superposition": superposition,
}


def load(name: str, **kw: Any) -> Split:
    """Builds a data set by name: ``"digits"``, ``"teacher"`` or ``"superposition"``.

    Args:
        name: The data set.
        **kw: Keyword arguments of :func:`digits`, :func:`teacher_student` or
            :func:`superposition`.

    Returns:
        The :class:`Split`.

    Raises:
        ValueError: If ``name`` is unknown (the message lists the known names).
    """
    if name not in _LOADERS:
        raise ValueError(f"Expected a data set name in {sorted(_LOADERS)}. Received: name={name!r}")
    return _LOADERS[name](**kw)
