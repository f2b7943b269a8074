"""What the command shows: the console, progress bars and tables (printed through :mod:`sparsecraft.report`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, width=None if sys.stdout.isatty() else 120)


class RunProgress:
    """Rich progress bars for :func:`sparsecraft.experiments.compare` (one bar per run, by epoch).

    Use as a context manager; pass :meth:`start` as ``on_run_start`` and
    :meth:`epoch` as ``on_epoch``. Bars go to stderr.
    """

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=_console(stderr=True),
        )
        self._task: Any = None

    def __enter__(self) -> RunProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            # A failed run shows its one-line error, not half-drawn bars.
            for task in self._progress.tasks:
                self._progress.update(task.id, visible=False)
        self._progress.__exit__(exc_type, exc, tb)

    def start(self, label: str, seed: int, epochs: int) -> None:
        """A new bar of ``epochs`` steps for the run ``label`` (seed ``seed``)."""
        if self._task is not None:
            self._progress.update(self._task, visible=True)
        self._task = self._progress.add_task(f"{label} (seed {seed})", total=epochs, info="")

    def epoch(self, epoch: int, record: dict[str, float]) -> None:
        """Advance the current bar and show the epoch's metric and sparsity."""
        if self._task is None:
            self.start("run", 0, epoch + 1)
        info = []
        if "metric" in record:
            info.append(f"metric {record['metric']:.4f}")
        if "sparsity" in record:
            info.append(f"zeros {100 * record['sparsity']:.2f}%")
        self._progress.update(self._task, completed=epoch + 1, info="  ".join(info))


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _print_table(
    console: Any, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    from .. import report

    records = [dict(zip(headers, map(str, r), strict=True)) for r in rows]
    report.print_table(console, records, list(headers), title=title)


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
