"""Presentation: figures (matplotlib, PNG) and tables (rich). The only module besides cli.py that prints.

Figures take results, histories or models and write one PNG each:

* :func:`plot_training`: sparsity (measured and target) and the strength
  multiplier over training steps, with test accuracy when the history has it.
* :func:`plot_layer_density`: non-zero fraction of each parameter.
* :func:`plot_magnitudes`: histogram of weight magnitudes on a log axis, exact
  zeros counted apart (log(0) has no place on that axis).
* :func:`plot_mask`: a weight's zero/non-zero pattern as an image.
* :func:`plot_pareto`: accuracy against sparsity, one curve per method.

Matplotlib runs on its Agg backend (files only, no display needed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import torch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402
from torch import nn  # noqa: E402

from .metrics import SparsityReport, sparsity  # noqa: E402

__all__ = [
    "plot_training",
    "plot_layer_density",
    "plot_magnitudes",
    "plot_mask",
    "plot_pareto",
    "table",
    "print_table",
]

_DPI = 120


def _save(fig: Any, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _percent(decimals: int = 0) -> FuncFormatter:
    return FuncFormatter(lambda v, _pos: f"{100 * v:.{decimals}f} %")


def _sparsity_axis(ax: Any, values: Sequence[float]) -> None:
    """Logit axis when sparsity goes past 90 % (99 % and 99.9 % then stand apart), else linear."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    # A logit axis needs a value strictly inside (0, 1): a run with every weight zero has none.
    if finite and max(finite) > 0.9 and any(0 < v < 1 for v in finite):
        ax.set_yscale("logit", nonpositive="clip")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{100 * v:g} %"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _p: ""))
        lo = max(min(v for v in finite if v > 0) if any(v > 0 for v in finite) else 0.01, 0.01)
        # At most 90 %: with every value at 100 % (all weights zero) the lower limit would
        # be logit(1) = inf and matplotlib's tick locator overflows.
        lo = min(lo, 0.9)
        ax.set_ylim(lo, 1 - 0.5 * (1 - max(finite)) if max(finite) < 1 else 0.9999)
    else:
        ax.yaxis.set_major_formatter(_percent())
        ax.set_ylim(0, 1)


# --------------------------------------------------------------------------- training


def plot_training(history: Sequence[Mapping[str, float]], path: str | os.PathLike, *,
                  title: str | None = None) -> str:
    """Sparsity and strength over training: top panel sparsity, bottom panel the multiplier.

    Args:
        history: records with ``"step"`` or ``"epoch"``; sparsity from
            ``"measured"`` (a controller's count over its parameters) or
            ``"sparsity"``; optional ``"target_now"``, ``"scale"`` and
            ``"metric"`` (test accuracy, drawn on a right axis). Both
            :attr:`sparsecraft.TargetSparsity.history` (one record per update)
            and the per-epoch history of ``experiments.train`` fit.
        path: the PNG to write.
        title: the figure title.

    Returns:
        The path written.
    """
    return _save(_training_figure(history, title), path)


def _training_figure(history: Sequence[Mapping[str, float]], title: str | None) -> Any:
    if not history:
        raise ValueError("Expected a non-empty history. Received: history=[]")
    xkey = "step" if "step" in history[0] else "epoch" if "epoch" in history[0] else None
    xs = [r[xkey] for r in history] if xkey else list(range(1, len(history) + 1))
    skey = "measured" if "measured" in history[0] else "sparsity" if "sparsity" in history[0] else None
    if skey is None:
        raise ValueError(
            f"Expected records with 'measured' or 'sparsity'. Received keys: {sorted(history[0])}"
        )
    has_scale = "scale" in history[0]
    fig, axes = plt.subplots(2 if has_scale else 1, 1, figsize=(7.5, 6.0 if has_scale else 3.6),
                             sharex=True, squeeze=False)
    ax = axes[0][0]
    measured = [r[skey] for r in history]
    ax.plot(xs, measured, color="C0", lw=1.6, label="sparsity (measured)")
    values = list(measured)
    if "target_now" in history[0]:
        target = [r["target_now"] for r in history]
        values += target
        ax.plot(xs, target, color="k", ls="--", lw=1.2, label="target (ramp)")
    _sparsity_axis(ax, values)
    ax.set_ylabel("exact zeros")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if "metric" in history[0]:
        acc = ax.twinx()
        acc.plot(xs, [r["metric"] for r in history], color="C2", lw=1.2, label="test accuracy")
        acc.yaxis.set_major_formatter(_percent(1))
        acc.set_ylabel("test accuracy", color="C2")
        h2, l2 = acc.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="lower right", fontsize=9)
    if title:
        ax.set_title(title)
    if has_scale:
        ax2 = axes[1][0]
        ax2.plot(xs, [r["scale"] for r in history], color="C3", lw=1.4)
        ax2.set_yscale("log")
        ax2.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        ax2.yaxis.set_minor_formatter(FuncFormatter(lambda v, _p: ""))
        ax2.set_ylabel("strength multiplier\n(× initial λ, log)")
        ax2.grid(alpha=0.3, which="both")
    axes[-1][0].set_xlabel("optimizer step" if xkey == "step" else "epoch")
    return fig


# --------------------------------------------------------------------------- layers


def _report_of(model_or_report: nn.Module | SparsityReport | Any) -> SparsityReport:
    if isinstance(model_or_report, SparsityReport):
        return model_or_report
    return sparsity(model_or_report)


def plot_layer_density(model_or_report: nn.Module | SparsityReport, path: str | os.PathLike, *,
                       title: str | None = None) -> str:
    """One bar per parameter: its density (non-zeros / elements), log scale, with the counts written on.

    Args:
        model_or_report: a model (measured with :func:`sparsecraft.metrics.sparsity`)
            or a :class:`~sparsecraft.metrics.SparsityReport`.
        path: the PNG to write.
        title: the figure title (default: the overall density).
    """
    return _save(_density_figure(_report_of(model_or_report), title), path)


def _density_figure(report: SparsityReport, title: str | None) -> Any:
    rows = list(report.rows)
    if not rows:
        raise ValueError("Expected at least one parameter to plot. Received: an empty report")
    names = [r.name for r in rows]
    density = [max(r.density, 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * len(rows) + 2.5), 4.2))
    colors = ["C0" if len(r.shape) >= 2 else "C7" for r in rows]
    floor = 1e-4
    bars = ax.bar(range(len(rows)), [max(d, floor) for d in density], color=colors)
    ax.set_yscale("log")
    ax.set_ylim(floor, 1.6)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{100 * v:g} %"))
    ax.set_ylabel("density (non-zeros / elements, log)")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=9)
    for bar, r in zip(bars, rows, strict=True):
        ax.annotate(f"{r.numel - r.zeros:,}/{r.numel:,}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.grid(axis="y", alpha=0.3, which="both")
    total = 1.0 - report.sparsity
    ax.set_title(title or f"density per parameter (all: {100 * total:.2f} % non-zero; grey: vectors)")
    return fig


def plot_magnitudes(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                    params: Sequence[str] | None = None, bins: int = 60,
                    title: str | None = None) -> str:
    """Histogram of ``|w|`` on a log axis; exact zeros in a bar of their own at the left.

    Args:
        model: a model or a mapping name -> tensor.
        path: the PNG to write.
        params: parameter names to include (default: those with ``ndim >= 2``).
        bins: number of log-spaced bins for the non-zeros.
        title: the figure title.
    """
    return _save(_magnitude_figure(model, params, bins, title), path)


def _magnitude_figure(model: Any, params: Sequence[str] | None, bins: int, title: str | None) -> Any:
    named = dict(model.named_parameters()) if isinstance(model, nn.Module) else dict(model)
    if params is None:
        chosen = [t for t in named.values() if t.ndim >= 2]
    else:
        missing = [n for n in params if n not in named]
        if missing:
            raise ValueError(f"Expected parameter names of the model. Received: {missing}")
        chosen = [named[n] for n in params]
    if not chosen:
        raise ValueError("Expected at least one tensor to plot. Received: none selected")
    values = torch.cat([t.detach().float().abs().flatten().cpu() for t in chosen])
    zeros = int((values == 0).sum())
    nonzero = values[values > 0]
    # Own y axes: 99 % zeros would flatten the histogram of the survivors to nothing.
    fig, (ax0, ax) = plt.subplots(1, 2, figsize=(8.5, 4.0),
                                  gridspec_kw={"width_ratios": [1, 8], "wspace": 0.35})
    ax0.bar([0], [zeros], color="C3", width=0.6)
    ax0.set_xticks([0])
    ax0.set_xticklabels(["= 0"])
    ax0.set_xlim(-0.6, 0.6)
    ax0.set_ylabel("exact zeros")
    # Counts start at 0; with no zeros at all matplotlib would centre the axis on 0.
    ax0.set_ylim(0, max(zeros, 1) * 1.15)
    ax0.annotate(f"{zeros:,}", (0, zeros), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                 textcoords="offset points")
    if nonzero.numel():
        lo, hi = float(nonzero.min()), float(nonzero.max())
        if lo == hi:
            lo, hi = lo / 2, hi * 2
        edges = torch.logspace(math.log10(lo), math.log10(hi), bins + 1, dtype=torch.float64).tolist()
        # The rounded end points could leave the smallest or largest weight outside every bin.
        edges[0], edges[-1] = lo, hi
        ax.hist(nonzero.numpy(), bins=edges, color="C0")
        ax.set_xscale("log")
    ax.set_xlabel("|w| (non-zero weights, log scale)")
    ax.set_ylabel("non-zero weights per bin")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"weight magnitudes: {zeros:,} exact zeros, {nonzero.numel():,} non-zeros")
    return fig


def plot_mask(weight: torch.Tensor, path: str | os.PathLike, name: str = "weight", *,
              max_pixels: int = 512) -> str:
    """The zero/non-zero pattern of a weight as an image (dark = non-zero).

    Rows are output units (dim 0), columns everything else flattened. A side
    longer than ``max_pixels`` is shown in blocks, each pixel's shade being
    the fraction of non-zeros in its block.

    Args:
        weight: the tensor (1-D tensors are drawn as one row).
        path: the PNG to write.
        name: its name, for the title.
        max_pixels: the largest side drawn element by element.
    """
    return _save(_mask_figure(weight, name, max_pixels), path)


def _mask_figure(weight: torch.Tensor, name: str, max_pixels: int) -> Any:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"Expected a torch.Tensor. Received: weight={type(weight).__name__}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"Expected an int max_pixels >= 1. Received: max_pixels={max_pixels!r}")
    w = weight.detach().cpu()
    mat = w.reshape(1, -1) if w.ndim <= 1 else w.reshape(w.shape[0], -1)
    nz = (mat != 0).float()
    rows, cols = nz.shape
    fr, fc = max(1, math.ceil(rows / max_pixels)), max(1, math.ceil(cols / max_pixels))
    if fr > 1 or fc > 1:
        padded = torch.zeros(math.ceil(rows / fr) * fr, math.ceil(cols / fc) * fc)
        padded[:rows, :cols] = nz
        img = padded.reshape(padded.shape[0] // fr, fr, padded.shape[1] // fc, fc).mean(dim=(1, 3))
    else:
        img = nz
    aspect = img.shape[0] / img.shape[1]
    width = 7.0
    fig, ax = plt.subplots(figsize=(width, min(max(width * aspect, 1.8), 9.0)))
    im = ax.imshow(img.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    density = float(nz.mean()) if nz.numel() else 0.0
    block = f", {fr}×{fc} blocks" if fr > 1 or fc > 1 else ""
    ax.set_title(f"{name} {tuple(w.shape)}: {100 * density:.2f} % non-zero (dark){block}")
    ax.set_xlabel("input (dim 1…)")
    ax.set_ylabel("output (dim 0)")
    if fr > 1 or fc > 1:
        fig.colorbar(im, ax=ax, label="non-zero fraction in block", fraction=0.04)
    return fig


# --------------------------------------------------------------------------- trade-off


def _front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both sparsity and accuracy, by increasing sparsity."""
    pts = sorted(points, key=lambda p: (-p[0], -p[1]))
    front, best = [], -math.inf
    for s, a in pts:
        if a > best:
            front.append((s, a))
            best = a
    return sorted(front)


def plot_pareto(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike,
                dense_accuracy: float | None = None, *, title: str | None = None) -> str:
    """Accuracy against sparsity, one marker set per method, its Pareto front joined by a line.

    Args:
        curves: method name -> list of ``(sparsity, accuracy)`` (fractions).
        path: the PNG to write.
        dense_accuracy: drawn as a horizontal dashed line when given.
        title: the figure title.
    """
    return _save(_pareto_figure(curves, dense_accuracy, title), path)


def _pareto_figure(curves: Mapping[str, Sequence[tuple[float, float]]], dense_accuracy: float | None,
                   title: str | None) -> Any:
    if not curves or not any(curves.values()):
        raise ValueError("Expected at least one curve with points. Received: no points")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs_all = []
    for i, (name, pts) in enumerate(curves.items()):
        pts = [(float(s), float(a)) for s, a in pts]
        if not pts:
            continue
        xs_all += [s for s, _ in pts]
        color = f"C{i % 10}"
        ax.scatter([s for s, _ in pts], [a for _, a in pts], color=color, s=22, alpha=0.55)
        front = _front(pts)
        ax.plot([s for s, _ in front], [a for _, a in front], color=color, lw=1.6, marker="o", ms=4,
                label=name)
    if dense_accuracy is not None:
        ax.axhline(dense_accuracy, color="k", ls="--", lw=1.0, label=f"dense ({100 * dense_accuracy:.2f} %)")
    if max(xs_all) > 0.9 and min(xs_all) > 0:
        ax.set_xscale("logit", nonpositive="clip")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{100 * v:g} %"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _p: ""))
        ax.set_xlabel("sparsity (exact zeros, logit scale)")
    else:
        ax.xaxis.set_major_formatter(_percent())
        ax.set_xlabel("sparsity (exact zeros)")
    ax.yaxis.set_major_formatter(_percent(1))
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9, loc="lower left")
    ax.set_title(title or "accuracy vs sparsity (lines: Pareto fronts)")
    return fig


# --------------------------------------------------------------------------- tables


def _cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return "-"
    if fmt == "%":
        return f"{100 * float(value):.2f} %"
    if fmt:
        return format(value, fmt)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str | tuple[str, str, str | None]],
          title: str | None = None) -> Any:
    """A ``rich.table.Table`` of ``rows`` (built, not printed).

    Args:
        rows: records (dicts).
        columns: keys, or ``(key, header, format)`` triples; format ``"%"``
            shows a fraction as a percentage, any other string is a
            :func:`format` spec.
        title: the table title.
    """
    from rich.table import Table

    specs = [(c, c, None) if isinstance(c, str) else tuple(c) for c in columns]
    for spec in specs:
        if len(spec) != 3:
            raise ValueError(f"Expected a column key or a (key, header, format) triple. Received: {spec!r}")
    tab = Table(title=title)
    for _key, header, _fmt in specs:
        tab.add_column(header, justify="left" if _key == specs[0][0] else "right")
    for row in rows:
        tab.add_row(*(_cell(row.get(key), fmt) for key, _h, fmt in specs))
    return tab


def print_table(console: Any, rows: Sequence[Mapping[str, Any]],
                columns: Sequence[str | tuple[str, str, str | None]], title: str | None = None) -> None:
    """Print :func:`table` on a ``rich.console.Console``."""
    console.print(table(rows, columns, title))
