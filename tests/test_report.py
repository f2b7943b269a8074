"""report.py: each figure draws the numbers it is given, files are real PNGs, tables print their rows."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from sparsecraft import report
from sparsecraft.metrics import sparsity


def sparse_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 5))
    with torch.no_grad():
        model[0].weight[model[0].weight.abs() < 0.2] = 0.0
        model[2].weight[:, :15] = 0.0
    return model


HISTORY = [{"step": float(s), "target_now": 0.99 * (1 - (1 - s / 100) ** 3), "measured": min(0.995, s / 95),
            "scale": 1.0 + s / 50} for s in range(1, 101)]


def test_files_are_pngs(tmp_path):
    model = sparse_model()
    paths = [
        report.plot_training(HISTORY, tmp_path / "a" / "training.png", title="t"),
        report.plot_layer_density(model, tmp_path / "density.png"),
        report.plot_magnitudes(model, tmp_path / "mags.png"),
        report.plot_mask(model[0].weight, tmp_path / "mask.png", "0.weight"),
        report.plot_pareto({"x": [(0.5, 0.9), (0.99, 0.95)]}, tmp_path / "pareto.png", dense_accuracy=0.97),
    ]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
        assert img[..., :3].std() > 0.05  # something is drawn


def test_training_figure_draws_the_history():
    fig = report._training_figure(HISTORY, "title")
    top, bottom = fig.axes[0], fig.axes[1]
    lines = {ln.get_label(): ln for ln in top.get_lines()}
    assert np.allclose(lines["sparsity (measured)"].get_ydata(), [r["measured"] for r in HISTORY])
    assert np.allclose(lines["target (ramp)"].get_xdata(), [r["step"] for r in HISTORY])
    assert top.get_yscale() == "logit"  # past 90 %: 99 % and 99.9 % must stand apart
    assert bottom.get_yscale() == "log" and np.allclose(bottom.get_lines()[0].get_ydata(),
                                                        [r["scale"] for r in HISTORY])
    assert bottom.get_xlabel() == "optimizer step"
    # per-epoch records of experiments.train: sparsity + accuracy on a right axis, linear below 90 %
    epochs = [{"epoch": e, "sparsity": e / 20, "metric": 0.9} for e in range(1, 11)]
    fig = report._training_figure(epochs, None)
    assert fig.axes[0].get_yscale() == "linear" and fig.axes[0].get_xlabel() == "epoch"
    assert any(ln.get_label() == "test accuracy" for ax in fig.axes for ln in ax.get_lines())
    with pytest.raises(ValueError, match="non-empty"):
        report._training_figure([], None)
    with pytest.raises(ValueError, match="measured"):
        report._training_figure([{"step": 1}], None)


def test_density_bars_match_counts():
    model = sparse_model()
    fig = report._density_figure(sparsity(model), None)
    heights = [b.get_height() for b in fig.axes[0].patches]
    expected = [max(float((p != 0).float().mean()), 1e-4) for p in model.parameters()]
    assert np.allclose(heights, expected)
    assert fig.axes[0].get_yscale() == "log"


def test_magnitudes_count_zeros_apart():
    model = sparse_model()
    fig = report._magnitude_figure(model, None, 30, None)
    zeros_ax, hist_ax = fig.axes
    w = torch.cat([model[0].weight.flatten(), model[2].weight.flatten()]).detach()
    assert zeros_ax.patches[0].get_height() == int((w == 0).sum())
    assert sum(p.get_height() for p in hist_ax.patches) == int((w != 0).sum())
    assert hist_ax.get_xscale() == "log"
    fig = report._magnitude_figure(model, ["2.weight"], 30, None)
    assert fig.axes[0].patches[0].get_height() == 15 * 5
    with pytest.raises(ValueError, match="names"):
        report._magnitude_figure(model, ["nope"], 30, None)


def test_mask_image_is_the_nonzero_pattern():
    w = torch.zeros(6, 9)
    w[1, 2] = w[4, 7] = -3.0
    img = report._mask_figure(w, "w", 512).axes[0].get_images()[0].get_array()
    assert np.array_equal(np.asarray(img), (w != 0).float().numpy())
    # blocks: 2x2 pooling of a 4x4 mask with one non-zero in the top-left block
    w = torch.zeros(4, 4)
    w[0, 1] = 1.0
    img = report._mask_figure(w, "w", 2).axes[0].get_images()[0].get_array()
    assert np.allclose(np.asarray(img), [[0.25, 0.0], [0.0, 0.0]])
    # conv kernels are shown as out x (in * kh * kw)
    img = report._mask_figure(torch.ones(3, 2, 2, 2), "k", 512).axes[0].get_images()[0].get_array()
    assert img.shape == (3, 8)
    with pytest.raises(TypeError, match="torch.Tensor"):
        report._mask_figure([[1.0]], "w", 512)


def test_pareto_front_line():
    pts = [(0.5, 0.90), (0.9, 0.95), (0.95, 0.93), (0.8, 0.80), (0.99, 0.85), (0.95, 0.96)]
    fig = report._pareto_figure({"m": pts}, 0.97, None)
    ax = fig.axes[0]
    line = next(ln for ln in ax.get_lines() if ln.get_label() == "m")
    front = sorted(p for p in pts if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts))
    assert list(zip(line.get_xdata(), line.get_ydata(), strict=True)) == front
    assert any("dense" in ln.get_label() for ln in ax.get_lines())
    assert ax.get_xscale() == "logit"
    with pytest.raises(ValueError, match="points"):
        report._pareto_figure({}, None, None)


def test_print_table_formats_columns():
    console = Console(record=True, width=100)
    rows = [{"method": "prox", "accuracy": 0.97111, "sparsity": 0.99, "nonzero": 845},
            {"method": "dense", "accuracy": 0.975, "sparsity": 0.0, "nonzero": None}]
    report.print_table(console, rows, ["method", ("accuracy", "acc", "%"), ("sparsity", "zeros", ".3f"),
                                       "nonzero"], "results")
    text = console.export_text()
    assert "results" in text and "97.11 %" in text and "0.990" in text and "845" in text
    assert text.count("-") >= 1  # a missing value is shown as "-"
    with pytest.raises(ValueError, match="triple"):
        report.table(rows, [("a", "b")])
