"""Real architectures: sparsecraft against magnitude pruning and PAT on a BN-CNN, an LSTM and a transformer.

Per model (the MNIST-1D 1-D CNN with BatchNorm, the MNIST-1D LSTM, the
tied-embedding causal transformer on the copy language), per optimizer
(SGD+momentum 0.9 and AdamW with PyTorch's defaults, each with the model's
learning rate below) and per requested fraction of exact zeros over the weight
matrices (50/90/95/98 %), 3 seeds each (10 for the transformer, whose runs are
short and bimodal), every method trains the same model
with the same data order, batch and learning rate for the same number of
epochs ``E``:

* ``target``: sparsecraft's plain path, ``ProximalOptimizer(opt, reg)`` with
  L1 on every weight matrix and its default mode, ``TargetSparsity(opt,
  target, end_step)`` ramping over the first 2/3 of the steps, then
  ``finalize()`` (``experiments.run_target``);
* ``magnitude``: one-shot global magnitude pruning + fine-tuning with the same
  total budget: dense for ``E − F`` epochs, prune, fine-tune ``F = E/3``;
* ``gradual``: gradual global magnitude pruning, cubic schedule over the first
  2/3 of the steps, masks recomputed every 10 steps (Zhu & Gupta 2017);
* ``pat_target``: torchao's PAT with its global sparsity constraint, cubic
  ``min_sparsity_schedule`` and healing over the last 1/3 (``run_pat_target``);
  left out where torchao is not installed.

``dense`` (``E`` epochs) is the reference. Metric: test accuracy (the copy
language: per-token accuracy and cross-entropy on the copied half). The runs
go to two worker processes with one thread each. Sized to finish in about 25
minutes on 2 cores: the LSTM and the transformer get fewer epochs than they
need to converge (the numbers compare methods at one budget; they are not the
models' best). The CNN trains 30 epochs, issue 12's setting (batch 100, ~12k
weights, 3x32 channels; 10 before the fourth round), the LSTM 8
(hidden 64, MNIST-1D read as 10 patches of 4 values, batch 100), the
transformer 3 (d_model 64, 2 layers, 4 heads, d_ff 128; 2,048 training
sentences of the copy language with 8 tokens to copy, batch 64).

Two parts run on their own and add a column to the main run's rows:
``--part relaxed-sgd`` (``target`` with ``relaxed=True`` under SGD) and
``--part lr-factor`` (``target`` under AdamW with
``TargetSparsity.lr_factor`` as the LR schedule, the opt-in for short runs).

Writes ``benchmarks/results/architectures.json`` (not with ``--quick``).
Run ``python benchmarks/architectures.py [--quick] [--part PART]`` or
``sparsecraft bench --suite architectures``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from sparsecraft import datasets, experiments

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "architectures.json"

MODELS = {
    "cnn": {"data": "mnist1d", "epochs": 30, "batch_size": 100, "lr": {"sgd": 0.05, "adamw": 3e-3}},
    "lstm": {"data": "mnist1d", "epochs": 8, "batch_size": 100, "lr": {"sgd": 0.3, "adamw": 1e-2}},
    "transformer": {
        "data": "copy",
        "data_kw": {"n_train": 2048, "n_test": 512},
        "epochs": 3,
        "batch_size": 64,
        "lr": {"sgd": 0.1, "adamw": 3e-3},
        # A run takes 2–3 s and a seed either learns the copy or does not (bimodal): the
        # suite's three seeds made a row a draw (seeds 0–19 at 98 % zeros with SGD:
        # one-shot magnitude 99.9 % on seeds 0–2, 96.0 % over all twenty).
        "seeds": tuple(range(10)),
    },
}
FULL = {
    "seeds": (0, 1, 2),
    "targets": (0.5, 0.9, 0.95, 0.98),
    "optimizers": ("sgd", "adamw"),
    "models": MODELS,
    "workers": 2,
}
QUICK = {
    "seeds": (0,),
    "targets": (0.9,),
    "optimizers": ("sgd", "adamw"),
    "models": {
        name: {**spec, "epochs": 1, "data_kw": {**spec.get("data_kw", {}), "n_train": 256}, "seeds": (0,)}
        if name == "transformer"
        else {**spec, "epochs": 1}
        for name, spec in MODELS.items()
    },
    "workers": 2,
}
METHODS = ("target", "magnitude", "gradual", "pat_target")
# sparsecraft's plain path with relaxed=True (no shrinkage of the survivors) under SGD, where
# the default keeps the soft threshold: a part of its own (``--part relaxed-sgd``), added to the
# rows of the main run.
RELAXED = "target_relaxed"
# sparsecraft's plain path with TargetSparsity.lr_factor as the LR schedule under AdamW (opt-in
# for short runs: these budgets are short), a part of its own (``--part lr-factor``).
LR_FACTOR = "target_lr_factor"
EXTRA = (RELAXED, LR_FACTOR)


def _seeds(cfg: dict[str, Any], spec: dict[str, Any]) -> tuple[int, ...]:
    """A model's seeds: its own where it names them (the transformer), else the suite's."""
    return tuple(spec.get("seeds", cfg["seeds"]))


def _load(spec: dict[str, Any]) -> datasets.Split:
    return datasets.load(spec["data"], **spec.get("data_kw", {}))


def _rows(results: list[experiments.RunResult], data: datasets.Split) -> list[dict[str, Any]]:
    """JSON rows of a worker's results, with the test loss (cross-entropy) of each model."""
    rows = []
    for r in results:
        row = {
            k: v for k, v in r.row().items() if isinstance(v, (int, float, str, bool, type(None)))
        }
        row["test_loss"] = experiments.evaluate_loss(r.model, data)
        rows.append(row)
    return rows


def _jobs(cfg: dict[str, Any], pat: bool) -> list[tuple[str, str, list, int, dict]]:
    """``(label, data name, plan, seed, common)`` for ``experiments.compare``."""
    jobs = []
    for model, spec in cfg["models"].items():
        epochs = spec["epochs"]
        finetune = max(1, epochs // 3)
        for optimizer in cfg["optimizers"]:
            common = {
                "model": model,
                "optimizer": optimizer,
                "lr": spec["lr"][optimizer],
                "batch_size": spec["batch_size"],
                "epochs": epochs,
            }
            for seed in _seeds(cfg, spec):
                # One job per method keeps the jobs of similar length; magnitude's four
                # targets share one dense training of E − F epochs (compare caches it).
                plans = [[("dense", {})]]
                plans.append(
                    [
                        (
                            "magnitude",
                            {
                                "sparsity": t,
                                "epochs": max(1, epochs - finetune),
                                "finetune_epochs": finetune,
                            },
                        )
                        for t in cfg["targets"]
                    ]
                )
                for method in METHODS[:-1] if not pat else METHODS:
                    if method == "magnitude":
                        continue
                    knob = "target" if method in ("target", "pat_target") else "sparsity"
                    plans += [[(method, {knob: t})] for t in cfg["targets"]]
                for plan in plans:
                    label = f"{model}/{optimizer}/seed {seed}: {plan[0][0]}"
                    jobs.append((label, spec["data"], plan, seed, common))
    # Seed by seed (a run cut short still has every model and method), the longest first.
    cost = {"lstm": 3, "cnn": 2, "transformer": 1}
    jobs.sort(key=lambda j: (j[3], -cost.get(j[4]["model"], 1) * len(j[2])))
    return jobs


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _summary(rows: list[dict[str, Any]], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (model, optimizer, target): each method's mean accuracy (and loss) over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        target = r.get("target")
        method = _method(r)
        groups.setdefault((r["model"], r["optimizer"], method, target), []).append(r)
    table = []
    for model in cfg["models"]:
        for optimizer in cfg["optimizers"]:
            for target in cfg["targets"]:
                # "zeros": the requested fraction ("target" is the method of that name)
                row: dict[str, Any] = {"model": model, "optimizer": optimizer, "zeros": target}
                for method in ("dense", *METHODS, *EXTRA):
                    key = (model, optimizer, method, None if method == "dense" else target)
                    rs = groups.get(key, [])
                    if not rs:
                        continue
                    row[method], row[f"{method}_std"] = _mean_std([r["accuracy"] for r in rs])
                    row[f"{method}_sparsity"] = statistics.fmean(r["sparsity"] for r in rs)
                    if model == "transformer":
                        row[f"{method}_loss"] = statistics.fmean(r["test_loss"] for r in rs)
                rivals = [row[m] for m in ("magnitude", "gradual") if m in row]
                if "target" in row and rivals:
                    row["target_minus_best_magnitude"] = row["target"] - max(rivals)
                table.append(row)
    return table


def _compact(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The console table: accuracy % per method (mean of seeds)."""
    out = []
    for r in table:
        row = {"model": r["model"], "opt": r["optimizer"], "zeros": f"{100 * r['zeros']:g} %"}
        for m in ("dense", *METHODS, *EXTRA):
            row[m] = f"{100 * r[m]:.1f}" if m in r else "-"
        out.append(row)
    return out


def _markdown(table: list[dict[str, Any]]) -> str:
    """The docs/benchmarks.md table: accuracy % (mean of seeds), loss for the transformer."""
    cols = ["dense", *METHODS] + [m for m in EXTRA if any(m in r for r in table)]
    lines = [
        "| model | opt | zeros | " + " | ".join(cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for r in table:
        cells = []
        for c in cols:
            if c not in r:
                cells.append("—")
                continue
            cell = f"{100 * r[c]:.1f}"
            if f"{c}_loss" in r:
                cell += f" ({r[f'{c}_loss']:.2f})"
            best = max(r.get(m, -1.0) for m in (*METHODS, *EXTRA))
            cells.append(f"**{cell}**" if c != "dense" and r[c] == best else cell)
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {100 * r['zeros']:g} % | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


# The parts: --part NAME -> (its column, the optimizer, the run_target argument set to True).
PARTS = {"relaxed-sgd": (RELAXED, "sgd", "relaxed"), "lr-factor": (LR_FACTOR, "adamw", "lr_factor")}


def _part_jobs(cfg: dict[str, Any], part: str) -> list[tuple[str, str, list, int, dict]]:
    """A part's runs: ``target`` with its argument set to True, every model/seed/target."""
    column, optimizer, knob = PARTS[part]
    jobs = []
    for model, spec in cfg["models"].items():
        common = {"model": model, "optimizer": optimizer, "lr": spec["lr"][optimizer],
                  "batch_size": spec["batch_size"], "epochs": spec["epochs"]}
        for seed in _seeds(cfg, spec):
            for t in cfg["targets"]:
                plan = [("target", {"target": t, knob: True})]
                jobs.append((f"{model}/{optimizer}/seed {seed}: {column} {t}", spec["data"], plan, seed, common))
    return jobs


def _method(r: dict[str, Any]) -> str:
    """A run's column: the method, or the part (relaxed, lr_factor) it belongs to."""
    return RELAXED if r.get("relaxed") else LR_FACTOR if r.get("lr_factor") else r["method"]


def run(quick: bool = False, part: str = "main") -> dict:
    """Runs the suite (or one of its parts), writes ``results/architectures.json``."""
    cfg = QUICK if quick else FULL
    t0 = time.perf_counter()
    pat = experiments.pat_available()
    splits = {spec["data"]: _load(spec) for spec in cfg["models"].values()}
    rows: list[dict[str, Any]] = []
    if part in PARTS:
        jobs = _part_jobs(cfg, part)
        column = PARTS[part][0]
        if not quick and RESULTS.exists():  # keep the other rows, replace this part's
            rows = [r for r in json.loads(RESULTS.read_text())["runs"] if _method(r) != column]
    else:
        jobs = _jobs(cfg, pat)
    out: dict[str, Any] = {}
    # Library functions only cross the process boundary (this file is not importable by
    # name in a worker); fork after torch has started threads can hang, so spawn.
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        cfg["workers"], mp_context=ctx, initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        futures = {
            pool.submit(experiments.compare, splits[name], plan, (seed,), **common): (label, name)
            for label, name, plan, seed, common in jobs
        }
        for i, done in enumerate(as_completed(futures), 1):
            label, name = futures[done]
            rows += _rows(done.result(), splits[name])
            print(f"[{i}/{len(jobs)}] {label} ({time.perf_counter() - t0:.0f} s)", flush=True)
            out = _results(rows, cfg, quick, pat, t0)
            if not quick:  # a smoke run never replaces the results of a real one
                _write(out)  # after every job: a run stopped early keeps what it measured
    return out


def _write(out: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2, default=str) + "\n")
    tmp.replace(RESULTS)


def _expected_runs(cfg: dict[str, Any], pat: bool) -> int:
    methods = len(METHODS) if pat else len(METHODS) - 1
    per_seed = 1 + methods * len(cfg["targets"])
    seeds = sum(len(_seeds(cfg, spec)) for spec in cfg["models"].values())
    return len(cfg["optimizers"]) * seeds * per_seed


def _results(
    rows: list[dict[str, Any]], cfg: dict[str, Any], quick: bool, pat: bool, t0: float
) -> dict[str, Any]:
    table = _summary(rows, cfg)
    return {
        "suite": "architectures",
        "quick": quick,
        "complete": sum(_method(r) not in EXTRA for r in rows) == _expected_runs(cfg, pat),
        "machine": {
            "cpus": os.cpu_count(),
            "workers": cfg["workers"],
            "torch_threads_per_worker": 1,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "settings": {k: v for k, v in cfg.items()},
        "pat": pat,
        "summary": _compact(table),
        "table": table,
        "markdown": _markdown(table),
        "runs": rows,
        "seconds": time.perf_counter() - t0,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=("main", *PARTS), default="main",
                        help="relaxed-sgd: only sparsecraft with relaxed=True under SGD; lr-factor: only "
                             "sparsecraft with TargetSparsity.lr_factor under AdamW; added to the main "
                             "run's results")
    args = parser.parse_args()
    result = run(quick=args.quick, part=args.part)
    print(result["markdown"])
    print(f"{result['seconds']:.0f} s")
