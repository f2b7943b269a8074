"""Activity sparsity: sparse autoencoders on the superposition task, scored on the true features.

A one-hidden-layer autoencoder (32 → 128 → 32, ReLU) is trained with Adam on
``datasets.superposition()`` (64 features, each active with probability
0.05, embedded in 32 dimensions) four ways, each knob on a grid, 3 seeds:

* ``l1``: L1 activity penalty on the code (``Regularizer.add_activity``,
  Keras's ``activity_regularizer``);
* ``l1_unit``: the same with unit-norm decoder columns after each step;
* ``l1_weighted``: ``‖x − x̂‖² + λ Σᵢ fᵢ(x)·‖W_dec,i‖₂`` (Anthropic 2024);
* ``topk``: a TopK activation, no penalty (Gao et al. 2024).

Scores: fraction of true features recovered (best cosine > 0.9 with a
decoder column), mean L0 of the code, fraction of variance unexplained (FVU)
and dead latents, on the test split. The reported row per kind is the
setting with the most features recovered (then the lowest FVU).

Writes ``benchmarks/results/activity.json`` (not with ``--quick``). Run
``python benchmarks/activity.py [--quick]`` or ``sparsecraft bench --suite activity``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from sparsecraft import datasets, experiments
from sparsecraft.cli import RunProgress

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "activity.json"

FULL = {
    "seeds": (0, 1, 2),
    "epochs": 20,
    "latents": 128,
    "grid": {
        "l1": {"lam": (0.1, 0.3, 1.0)},
        "l1_unit": {"lam": (0.1, 0.3, 1.0)},
        "l1_weighted": {"lam": (0.1, 0.2, 0.3)},
        "topk": {"k": (3, 4, 6)},
    },
}
QUICK = {
    "seeds": (0,),
    "epochs": 2,
    "latents": 32,
    "grid": {
        "l1": {"lam": (0.3,)},
        "l1_unit": {"lam": (0.3,)},
        "l1_weighted": {"lam": (0.2,)},
        "topk": {"k": (4,)},
    },
}
METRICS = ("recovered", "mean_cosine", "l0", "fvu", "dead")


def run(quick: bool = False) -> dict:
    """Runs the suite, writes ``benchmarks/results/activity.json`` and returns the results."""
    cfg = QUICK if quick else FULL
    torch.set_num_threads(1)  # small models: one thread is fastest, and the machine is shared
    t0 = time.perf_counter()
    data = datasets.superposition(n_train=4096 if quick else 16384, n_test=1024 if quick else 4096)
    runs = []
    with RunProgress() as progress:
        for kind, grid in cfg["grid"].items():
            ((knob, values),) = grid.items()
            for value in values:
                for seed in cfg["seeds"]:
                    progress.start(f"{kind} {knob}={value:g}", seed, cfg["epochs"])
                    r = experiments.train_autoencoder(
                        data,
                        kind,
                        latents=cfg["latents"],
                        epochs=cfg["epochs"],
                        seed=seed,
                        on_epoch=progress.epoch,
                        **{knob: value},
                    )
                    runs.append(r.row())
    settings: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        knob = "k" if r["kind"] == "topk" else "lam"
        settings.setdefault((r["kind"], knob, r[knob]), []).append(r)
    rows = []
    for (kind, knob, value), rs in settings.items():
        row = {"kind": kind, knob: value, "seeds": len(rs)}
        for m in METRICS:
            row[m] = statistics.fmean(r[m] for r in rs)
        row["recovered_min"] = min(r["recovered"] for r in rs)
        row["seconds"] = statistics.fmean(r["seconds"] for r in rs)
        rows.append(row)
    best = {}
    for row in rows:
        b = best.get(row["kind"])
        if b is None or (row["recovered"], -row["fvu"]) > (b["recovered"], -b["fvu"]):
            best[row["kind"]] = row
    summary = [
        {
            "kind": k,
            "setting": f"λ={b['lam']:g}" if "lam" in b else f"k={b['k']}",
            "recovered_%": 100 * b["recovered"],
            "worst_seed_%": 100 * b["recovered_min"],
            "mean_L0": b["l0"],
            "FVU": b["fvu"],
            "dead": b["dead"],
        }
        for k, b in best.items()
    ]
    out = {
        "suite": "activity",
        "quick": quick,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "data": {
            "n_features": data.meta["n_latent"],
            "d": data.n_features,
            "p": data.meta["p"],
            "n_train": data.n_train,
            "n_test": data.n_test,
        },
        "settings": cfg,
        "expected_l0": data.meta["n_latent"] * data.meta["p"],
        "summary": summary,
        "settings_mean": rows,
        "runs": runs,
        "seconds": time.perf_counter() - t0,
    }
    if not quick:  # a smoke run never replaces the results of a real one
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    for line in run(quick=parser.parse_args().quick)["summary"]:
        print(line)
