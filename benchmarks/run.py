"""Run benchmark suites without the installed command: ``python benchmarks/run.py [--quick]``.

``--suite NAME`` picks one suite (default: all).

The same as ``sparsecraft bench``: each suite is ``benchmarks/<name>.py`` with
``run(quick: bool = False) -> dict``, writing ``benchmarks/results/<name>.json``;
a markdown table of the summaries goes to ``benchmarks/results/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sparsecraft.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--dir", str(Path(__file__).resolve().parent), *sys.argv[1:]]))
