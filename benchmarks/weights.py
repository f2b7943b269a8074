"""Weight sparsity: how sparse each method gets the digits MLP within 1 point of dense accuracy.

For every method (L1 in the loss + threshold, one-shot and gradual magnitude
pruning, sparsecraft prox at a fixed λ and with ``TargetSparsity``, torchao's
PAT) the knob is swept over a grid, each setting trained with 3 seeds (60
epochs, batch 64, SGD momentum 0.9, lr 0.05, the 64-256-256-10 MLP); the
reported point is the setting with the highest mean exact-zero sparsity whose
mean test accuracy is within 1 point of the dense mean. The knob is chosen on
the test split for every method alike (this measures the frontier, not a
tuned model). Then teacher–student: a sparse linear 64 → 10 classification
teacher (10 % of its weights kept, labels = argmax of its logits, 32768
training samples); each method trains the same-shaped student for 15 epochs
(magnitude: 15 dense + 5 fine-tuning) and the F1 of its non-zero pattern
against the teacher's is measured (see ``experiments.pattern_f1``): the
sparsity knobs are set to the teacher's sparsity, the λ knobs swept (best
mean F1 over 3 seeds reported). ``TargetSparsity`` runs use the library's
defaults (ramp over 2/3 of the run, target held until the zeros are frozen
at 0.9 of it) and, at 0.997 and 0.998, also ``freeze_fraction=2/3`` (frozen
at the ramp's end, the default before): its grid is both.

Writes ``benchmarks/results/weights.json`` and ``weights_pareto.png`` (not with ``--quick``).
Run ``python benchmarks/weights.py [--quick]`` or ``sparsecraft bench --suite weights``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from sparsecraft import datasets, experiments
from sparsecraft.cli import RunProgress

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "weights.json"
FIGURE = HERE / "results" / "weights_pareto.png"

# Knob grids (digits). l1_loss trains once per λ and thresholds copies at each tol.
FULL = {
    "seeds": (0, 1, 2),
    "epochs": 60,
    "l1_loss": {"lam": (3e-4, 1e-3, 3e-3), "tol": (3e-3, 1e-2, 2e-2, 4e-2, 8e-2, 0.15, 0.3)},
    "magnitude": (0.9, 0.95, 0.98, 0.99),
    "finetune_epochs": 20,
    "gradual": (0.95, 0.98, 0.99, 0.995),
    "prox": (2e-2, 3e-2, 4e-2),
    "target": (0.99, 0.995, 0.997, 0.998),
    # TargetSparsity with the zeros frozen at the ramp's end (2/3) instead of the default 0.9.
    "target_ramp_end_freeze": (0.997, 0.998),
    "pat": (2e-2, 3e-2, 4e-2),
    "teacher": {
        "seeds": (0, 1, 2),
        "epochs": 15,
        "finetune_epochs": 5,
        "lam": (1e-2, 2e-2, 4e-2),
        "l1_lam": (1e-3, 3e-3),
        "l1_tol": (3e-2, 1e-1),
    },
}
QUICK = {
    "seeds": (0,),
    "epochs": 3,
    "l1_loss": {"lam": (1e-3,), "tol": (1e-2,)},
    "magnitude": (0.9,),
    "finetune_epochs": 1,
    "gradual": (0.9,),
    "prox": (2e-2,),
    "target": (0.9,),
    "target_ramp_end_freeze": (0.9,),
    "pat": (2e-2,),
    "teacher": {
        "seeds": (0,),
        "epochs": 1,
        "finetune_epochs": 1,
        "lam": (2e-2,),
        "l1_lam": (3e-3,),
        "l1_tol": (3e-2,),
    },
}
# The knobs each method is swept over, as its results name them ("target": requested sparsity).
KNOBS = {
    "l1_loss": ("lam", "tol"),
    "magnitude": ("target",),
    "gradual": ("target",),
    "prox": ("lam",),
    "target": ("target", "freeze_fraction"),
    "pat": ("lam",),
}
TEACHER = {
    "n_train": 32768,
    "n_in": 64,
    "hidden": (),
    "n_out": 10,
    "density": 0.1,
    "task": "classification",
    "seed": 0,
}


def _plan(cfg: dict[str, Any], pat: bool) -> list[tuple[str, dict[str, Any]]]:
    plan: list[tuple[str, dict[str, Any]]] = [("dense", {})]
    plan += [
        ("magnitude", {"sparsity": s, "finetune_epochs": cfg["finetune_epochs"]})
        for s in cfg["magnitude"]
    ]
    plan += [("gradual", {"sparsity": s}) for s in cfg["gradual"]]
    plan += [("prox", {"lam": lam, "mode": "latent"}) for lam in cfg["prox"]]
    plan += [("target", {"target": t}) for t in cfg["target"]]
    plan += [("target", {"target": t, "freeze_fraction": 2 / 3}) for t in cfg["target_ramp_end_freeze"]]
    if pat:
        plan += [("pat", {"lam": lam}) for lam in cfg["pat"]]
    return plan


def _digits(cfg: dict[str, Any], pat: bool, progress: Any) -> list[experiments.RunResult]:
    data = datasets.digits()
    results = experiments.compare(
        data,
        _plan(cfg, pat),
        cfg["seeds"],
        epochs=cfg["epochs"],
        on_run_start=progress.start,
        on_epoch=progress.epoch,
    )
    for seed in cfg["seeds"]:
        for lam in cfg["l1_loss"]["lam"]:
            progress.start(f"l1_loss λ={lam:g}", seed, cfg["epochs"])
            results += experiments.run_l1_loss_thresholds(
                data,
                lam,
                cfg["l1_loss"]["tol"],
                epochs=cfg["epochs"],
                seed=seed,
                on_epoch=progress.epoch,
            )
    return results


def _teacher(cfg: dict[str, Any], pat: bool, progress: Any) -> list[dict[str, Any]]:
    data = datasets.teacher_student(**TEACHER)
    s = 1.0 - data.meta["density"]
    t = cfg["teacher"]
    common = {"hidden": TEACHER["hidden"], "epochs": t["epochs"]}
    plan: list[tuple[str, dict[str, Any]]] = [
        ("magnitude", {"sparsity": s, "finetune_epochs": t["finetune_epochs"]}),
        ("gradual", {"sparsity": s}),
        ("target", {"target": s}),
    ]
    plan += [("prox", {"lam": lam, "mode": "latent"}) for lam in t["lam"]]
    if pat:
        plan += [("pat", {"lam": lam}) for lam in t["lam"]]
    runs = experiments.compare(
        data, plan, t["seeds"], on_run_start=progress.start, on_epoch=progress.epoch, **common
    )
    for seed in t["seeds"]:
        for lam in t["l1_lam"]:
            progress.start(f"teacher l1_loss λ={lam:g}", seed, t["epochs"])
            runs += experiments.run_l1_loss_thresholds(
                data, lam, t["l1_tol"], seed=seed, on_epoch=progress.epoch, **common
            )
    rows = []
    for r in runs:
        f1 = experiments.pattern_f1(r.model, data)
        rows.append({**r.row(), **{f"pattern_{k}": v for k, v in f1.items()}})
    return rows


def _teacher_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: the setting with the best mean F1 over seeds."""
    knobs = ("lam", "tol", "target", "mode")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], *((k, r[k]) for k in knobs if k in r)), []).append(r)
    best: dict[str, dict[str, Any]] = {}
    for key, rs in groups.items():
        mean = {
            m: sum(r[m] for r in rs) / len(rs)
            for m in ("pattern_f1", "pattern_precision", "pattern_recall", "sparsity", "accuracy")
        }
        row = {"method": key[0], **dict(key[1:]), "seeds": len(rs), **mean}
        if key[0] not in best or row["pattern_f1"] > best[key[0]]["pattern_f1"]:
            best[key[0]] = row
    return best


def _figure(summary: list[dict[str, Any]], dense: float, path: Path) -> str:
    from sparsecraft import report

    curves: dict[str, list[tuple[float, float]]] = {}
    for r in summary:
        if r["method"] != "dense":
            curves.setdefault(r["method"], []).append((r["sparsity"], r["accuracy"]))
    return report.plot_pareto(
        curves,
        path,
        dense_accuracy=dense,
        title="digits MLP: accuracy vs exact zeros (each point: mean of seeds)",
    )


def run(quick: bool = False) -> dict:
    """Runs the suite, writes ``results/weights.json`` and the Pareto figure; returns all."""
    cfg = QUICK if quick else FULL
    torch.set_num_threads(1)  # small MLPs: one thread is fastest, and the machine is shared
    t0 = time.perf_counter()
    pat = experiments.pat_available()
    with RunProgress() as progress:
        runs = _digits(cfg, pat, progress)
        teacher_rows = _teacher(cfg, pat, progress)
    summary = experiments.summarize(runs)
    dense = next(r for r in summary if r["method"] == "dense")
    best = {}
    for method in dict.fromkeys(r["method"] for r in summary):
        if method == "dense":
            continue
        b = experiments.best_within(
            [r for r in summary if r["method"] == method], dense["accuracy"], 0.01
        )
        best[method] = b
    teacher_best = _teacher_summary(teacher_rows)
    table = []
    for method, b in best.items():
        tb = teacher_best.get(method, {})
        knob = {k: b[k] for k in KNOBS[method] if b is not None and k in b}
        table.append(
            {
                "method": method,
                "setting": ", ".join(f"{k}={v:g}" for k, v in knob.items())
                if b
                else "none within 1 point",
                "teacher_setting": ", ".join(f"{k}={tb[k]:g}" for k in KNOBS[method] if k in tb),
                "sparsity_%": 100 * b["sparsity"] if b else None,
                "accuracy_%": 100 * b["accuracy"] if b else None,
                "vs_dense_points": 100 * (b["accuracy"] - dense["accuracy"]) if b else None,
                "nonzero": round(b["nonzero"]) if b else "",
                "seconds_per_run": b["seconds"] if b else None,
                "teacher_f1": tb.get("pattern_f1", None),
            }
        )
    if not quick:
        _figure(summary, dense["accuracy"], FIGURE)
    out = {
        "suite": "weights",
        "quick": quick,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "settings": {k: v for k, v in cfg.items()},
        "teacher": TEACHER,
        "dense": dense,
        "best_within_1_point": best,
        "teacher_best_f1": teacher_best,
        "summary": table,
        "runs": [{k: v for k, v in r.row().items()} for r in runs],
        "teacher_runs": teacher_rows,
        "figure": str(FIGURE.relative_to(HERE.parent)),
        "seconds": time.perf_counter() - t0,
    }
    if not quick:  # a smoke run never replaces the results of a real one
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    result = run(quick=parser.parse_args().quick)
    for row in result["summary"]:
        print(row)
