"""``python -m sparsecraft.cli``: the ``sparsecraft`` command."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
