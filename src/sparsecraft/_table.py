"""Plain-text tables shared by the objects that describe themselves with ``str()``."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], footer: Sequence[str] | None = None) -> str:
    """Align ``rows`` under ``headers`` in columns, with a rule under the header."""
    body = [list(map(str, r)) for r in rows]
    if footer is not None:
        body.append(list(map(str, footer)))
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body[: len(rows)]]
    if footer is not None:
        out += ["  ".join("-" * w for w in widths), line(body[-1])]
    return "\n".join(out)


def rich_table(title: str | None, headers: Sequence[str], rows: Sequence[Sequence[str]], footer: Sequence[str] | None = None):
    """The same table as a ``rich.table.Table`` (built, never printed)."""
    from rich.table import Table

    table = Table(title=title, show_footer=footer is not None)
    for i, h in enumerate(headers):
        table.add_column(h, footer=str(footer[i]) if footer is not None else "",
                         justify="right" if i == len(headers) - 1 else "left")
    for r in rows:
        table.add_row(*map(str, r))
    return table
