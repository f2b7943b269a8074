"""Benchmark of what a penalty costs per training step on a 4 x 2048^2 MLP (16.8 M weights).

Batch 256, MSE to random targets, ``torch.set_num_threads(2)`` (and 1, see
below). Two measurements:

``steps``: median wall time of one full step (zero_grad, forward, backward,
optimizer step), cases interleaved:

* ``sgd`` / ``adam``: no penalty (SGD lr 1e-3 momentum 0.9; Adam lr 1e-4);
* ``l1_naive``: ``λ·sum(p.abs().sum() for p in weights)`` added to the loss;
* ``l1_loss``: the same penalty through ``sparsecraft.Regularizer.loss()``;
* ``prox_sgd`` / ``prox_adam``: ``ProximalOptimizer`` around SGD / Adam
  (forward-backward), ``prox_sgd_latent`` / ``prox_adam_latent`` (latent mode),
  ``prox_adam_relaxed`` (latent, ``relaxed=True``: the display ``TargetSparsity``
  gives Adam, survivors ranked within each tensor by ``|z|·v^¼``),
  ``prox_adam_fused`` (``fused=True``, when ``torch.compile`` works here).
  For these the prox part (``opt.step()`` minus the inner ``step()``) is timed too.

``prox_only``: the prox part alone, timed directly: ``opt.step()`` with the
inner step replaced by a no-op, from a real Adam/SGD state; ``average_update``,
the running average ``TargetSparsity(average=True)`` keeps after the freeze
(one ``lerp_`` of every parameter per step); and the reference pass, one
memory pass over the weights, ``torch._foreach_mul_(w, 1.0)``.
``--baseline FILE`` times the ``ProximalOptimizer`` of another version of
``optim.py`` the same way (before/after comparisons).

Issue 3's targets: prox with SGD <= 1.2x the reference pass and <= 2 % of a
step; prox with Adam <= 3x the reference pass and <= 5 % of a step.

Why 1 thread too: on a machine shared with other jobs, two OpenMP threads on
two busy cores wait on each other, and every kernel slows down several times
(measured here: the reference pass 7 ms with 1 thread, 64 ms with 2, at load
4.8). The JSON records the load average so that a reader can tell.

Writes ``benchmarks/results/overhead.json``. Run ``python benchmarks/overhead.py``
(``--quick`` for a small model, few repeats and no file). Nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from sparsecraft import optim as _optim
from sparsecraft.control._average import IterateAverage
from sparsecraft.regularizer import Regularizer

BATCH = 256
LAYERS = 4
LAM = 1e-5
RESULTS = Path(__file__).resolve().parent / "results" / "overhead.json"


def _model(size: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(LAYERS):
        layers.append(nn.Linear(size, size))
        if i < LAYERS - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _weights(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.ndim >= 2]


def _inner(model: nn.Module, optimizer: str) -> torch.optim.Optimizer:
    if optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=1e-4)


def _prox_opt(module: ModuleType, model: nn.Module, optimizer: str, mode: str, fused: bool,
              relaxed: bool = False):
    reg = Regularizer(model)
    reg.add_weight(nn.Linear, f"l1:{LAM}")
    kwargs = {"fused": True} if fused else {}
    if relaxed:
        kwargs["relaxed"] = True
    return module.ProximalOptimizer(_inner(model, optimizer), reg, mode=mode, **kwargs), reg


class _Step:
    """One full training step of one case; records the prox part when there is one."""

    def __init__(self, size: int, x: torch.Tensor, y: torch.Tensor, optimizer: str,
                 penalty: str | None, mode: str = "forward_backward", fused: bool = False,
                 relaxed: bool = False):
        self.model = _model(size)
        self.x, self.y, self.penalty = x, y, penalty
        self.reg: Regularizer | None = None
        self.inner_s: list[float] = []
        self.outer_s: list[float] = []
        if penalty == "prox":
            self.opt, self.reg = _prox_opt(_optim, self.model, optimizer, mode, fused, relaxed)
            inner = self.opt.inner
            step = inner.step

            def timed_inner(*args, **kw):
                t0 = time.perf_counter()
                out = step(*args, **kw)
                self.inner_s.append(time.perf_counter() - t0)
                return out

            inner.step = timed_inner
        else:
            self.opt = _inner(self.model, optimizer)
            if penalty == "loss":
                self.reg = Regularizer(self.model)
                self.reg.add_weight(nn.Linear, f"l1:{LAM}")
        self.weights = _weights(self.model)

    def __call__(self) -> None:
        self.opt.zero_grad()
        loss = nn.functional.mse_loss(self.model(self.x), self.y)
        if self.penalty == "naive":
            loss = loss + LAM * sum(p.abs().sum() for p in self.weights)
        elif self.reg is not None:
            loss = loss + self.reg.loss()
        loss.backward()
        t0 = time.perf_counter()
        self.opt.step()
        self.outer_s.append(time.perf_counter() - t0)

    def prox_ms(self, skip: int) -> float:
        parts = [o - i for o, i in zip(self.outer_s[skip:], self.inner_s[skip:], strict=True)]
        return round(statistics.median(parts) * 1e3, 3)


def _prox_only(module: ModuleType, size: int, optimizer: str, mode: str, fused: bool,
               relaxed: bool = False) -> Callable[[], None]:
    """``opt.step()`` with a no-op inner step, from the state of two real steps."""
    model = _model(size)
    opt, _ = _prox_opt(module, model, optimizer, mode, fused, relaxed)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        opt.step()
    opt.inner.step = lambda closure=None: None
    return opt.step


def _median_ms(fns: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        # Interleaved, so that a slow phase of a shared machine hits every case alike.
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)
    return {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}


def _fused_available() -> bool:
    """Whether ProximalOptimizer(fused=True) compiles here (it needs a C++ compiler on CPU)."""
    import warnings

    m = nn.Linear(8, 8)
    reg = Regularizer(m)
    reg.add_weight(m, "l1:1e-3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = _optim.ProximalOptimizer(torch.optim.Adam(m.parameters()), reg, fused=True)
        m(torch.randn(2, 8)).sum().backward()
        opt.step()
    return opt.fused


def _load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("sparsecraft._optim_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # relative imports resolve in the sparsecraft package
    return module


def _one_setting(size: int, threads: int, quick: bool, fused: bool, baseline: ModuleType | None) -> dict:
    torch.set_num_threads(threads)
    repeats, warmup = (3, 2) if quick else (15, 3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, size, generator=gen)
    y = torch.randn(BATCH, size, generator=gen)
    specs: dict[str, tuple] = {
        "sgd": ("sgd", None), "l1_naive": ("sgd", "naive"), "l1_loss": ("sgd", "loss"),
        "prox_sgd": ("sgd", "prox"), "prox_sgd_latent": ("sgd", "prox", "latent"),
        "adam": ("adam", None), "prox_adam": ("adam", "prox"),
        "prox_adam_latent": ("adam", "prox", "latent"),
        "prox_adam_relaxed": ("adam", "prox", "latent", False, True),
    }
    if fused:
        specs["prox_adam_fused"] = ("adam", "prox", "forward_backward", True)
    load = os.getloadavg()[0]
    steps = {k: _Step(size, x, y, *v) for k, v in specs.items()}
    step_ms = _median_ms(steps, repeats, warmup)
    diff_ms = {k: s.prox_ms(warmup) for k, s in steps.items() if s.inner_s}
    del steps

    ref_weights = [w.detach() for w in _weights(_model(size))]
    only: dict[str, Callable[[], None]] = {"reference": lambda: torch._foreach_mul_(ref_weights, 1.0)}
    for name, (opt, mode, fz) in {"prox_sgd": ("sgd", "forward_backward", False),
                                  "prox_adam": ("adam", "forward_backward", False),
                                  "prox_sgd_latent": ("sgd", "latent", False),
                                  "prox_adam_latent": ("adam", "latent", False)}.items():
        only[name] = _prox_only(_optim, size, opt, mode, fz)
    only["prox_adam_relaxed"] = _prox_only(_optim, size, "adam", "latent", False, relaxed=True)
    # TargetSparsity(average=...) after the freeze: one running-average update of every
    # parameter per step (SGD's default; finalize() writes the average).
    average = IterateAverage([p.detach() for p in _model(size).parameters()])
    average.update()
    only["average_update"] = average.update
    if fused:
        only["prox_adam_fused"] = _prox_only(_optim, size, "adam", "forward_backward", True)
    if baseline is not None:
        only["baseline_prox_sgd"] = _prox_only(baseline, size, "sgd", "forward_backward", False)
        only["baseline_prox_adam"] = _prox_only(baseline, size, "adam", "forward_backward", False)
    prox_ms = _median_ms(only, 3 * repeats, warmup)
    ref = prox_ms["reference"]
    ratios = {
        k: {"prox_ms": v, "x_reference": round(v / ref, 2),
            "pct_of_step": round(100 * v / step_ms["adam" if "adam" in k else "sgd"], 2),
            "from_step_difference_ms": diff_ms.get(k)}
        for k, v in prox_ms.items() if k != "reference"
    }
    return {"threads": threads, "loadavg_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
            "step_ms": step_ms, "reference_ms": ref, "prox": ratios,
            "targets": {
                "prox_sgd <= 1.2x reference": ratios["prox_sgd"]["x_reference"] <= 1.2,
                "prox_sgd <= 2% of a step": ratios["prox_sgd"]["pct_of_step"] <= 2.0,
                "prox_adam <= 3x reference": ratios["prox_adam"]["x_reference"] <= 3.0,
                "prox_adam <= 5% of a step": ratios["prox_adam"]["pct_of_step"] <= 5.0,
                **({"prox_adam_fused <= 3x reference": ratios["prox_adam_fused"]["x_reference"] <= 3.0,
                    "prox_adam_fused <= 5% of a step": ratios["prox_adam_fused"]["pct_of_step"] <= 5.0}
                   if fused else {}),
            }}


def run(quick: bool = False, threads: tuple[int, ...] = (2, 1), baseline: str | None = None) -> dict:
    """Runs the benchmark, writes ``benchmarks/results/overhead.json`` and returns the results.

    Args:
        quick: A 4 x 512^2 model and few repeats (a smoke run); nothing is written.
        threads: torch thread counts to run with (2 is the issue's setting).
        baseline: path of another ``optim.py`` whose prox part is timed alongside.

    Returns:
        The results dict (also written as JSON unless ``quick``).
    """
    saved = torch.get_num_threads()
    size = 512 if quick else 2048
    try:
        fused = _fused_available()
        base = _load(baseline) if baseline else None
        settings = [_one_setting(size, t, quick, fused, base) for t in threads]
    finally:
        torch.set_num_threads(saved)
    results = {
        "benchmark": f"penalty overhead per training step, {LAYERS} x {size}^2 Linear MLP, batch {BATCH}",
        "command": "python benchmarks/overhead.py" + (" --quick" if quick else "")
                   + (f" --baseline {baseline}" if baseline else ""),
        "quick": quick,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__},
        "weights": LAYERS * size * size, "lam": LAM, "fused_available": fused,
        "settings": settings,
    }
    if not quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few repeats, nothing written")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch thread counts")
    parser.add_argument("--baseline", help="another optim.py to time alongside (before/after)")
    args = parser.parse_args()
    out = run(quick=args.quick, threads=tuple(args.threads), baseline=args.baseline)
    for s in out["settings"]:
        print(f"--- {s['threads']} thread(s), load average {s['loadavg_1min']}")
        for key, ms in s["step_ms"].items():
            print(f"{key:>18}: step {ms:9.3f} ms")
        print(f"{'reference':>18}: {s['reference_ms']:9.3f} ms")
        for key, r in s["prox"].items():
            print(f"{key:>18}: prox part {r['prox_ms']:8.3f} ms = {r['x_reference']:6.2f}x reference, "
                  f"{r['pct_of_step']:6.2f}% of a step (step difference: {r['from_step_difference_ms']})")
        print(json.dumps(s["targets"], indent=2))
