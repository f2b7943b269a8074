"""The README's examples run as written, and print what the README shows."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch
from torch import nn

import sparsecraft as sc

README = (Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)


def test_reference_case_prints_the_table_the_readme_shows():
    (i, code), = [(i, c) for i, (lang, c) in enumerate(BLOCKS) if lang == "python" and "explain()" in c]
    lang, shown = BLOCKS[i + 1]
    assert lang == ""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue().strip() == shown.strip()


def test_controller_and_export_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippet saves model.safetensors in the working folder
    code = next(c for lang, c in BLOCKS if lang == "python" and "TargetSparsity" in c)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    reg = sc.Regularizer(model)
    reg.add_weight((nn.Linear, "weight"), sc.L1(1e-2))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    total_steps = 30
    ns = {"sc": sc, "torch": torch, "model": model, "reg": reg, "total_steps": total_steps,
          "example_inputs": x[:4]}
    # The snippet builds the optimizer and controller; the loop stands for "train as usual".
    setup, rest = code.split("# ... after every opt.step(): ctrl.step()")
    exec(setup, ns)
    for _ in range(total_steps):
        ns["opt"].zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + reg.loss()
        loss.backward()
        ns["opt"].step()
        ns["ctrl"].step()
    with contextlib.redirect_stdout(io.StringIO()):
        exec(rest, ns)
    with torch.no_grad():
        torch.testing.assert_close(ns["small"](x), model(x), rtol=1e-5, atol=1e-5)
    assert abs(sc.sparsity(model, params=lambda n, p: p.ndim >= 2).sparsity - 0.99) < 0.02
    assert sc.load("model.safetensors") is not None
