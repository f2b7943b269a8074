"""The ``sparsecraft`` command: ``demo``, ``train`` and ``bench``.

This module only parses arguments, dispatches to :mod:`sparsecraft.experiments`
(training) and the benchmark suites, and presents results with rich and
:mod:`sparsecraft.report`. A bad flag or spec is one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

from ._bench import SUITES as SUITES
from ._demo import METHOD_NOTES as METHOD_NOTES
from ._main import DATASETS as DATASETS
from ._main import main
from ._present import RunProgress

__all__ = ["RunProgress", "main"]
