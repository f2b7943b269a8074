"""TargetSparsity: does one training run land on the requested sparsity, and at what accuracy?

Digits MLP (64-256-256-10), 60 epochs, batch 64, SGD momentum 0.9, lr 0.05,
L1 on the weight matrices applied by ``ProximalOptimizer``, its strength
steered by ``TargetSparsity`` (cubic ramp from 0 over the first 2/3 of the
steps, then held; initial λ = 1e-2), through ``experiments.run_target``:

* targets 0.50, 0.80, 0.90, 0.95, 0.98, 0.99 × seeds 0, 1, 2 in latent mode:
  the sparsity the controller reached (before the exact final selection), the
  one after ``finalize()``, and test accuracy; dense SGD with the same seeds.
* latent vs forward–backward prox at 0.99 (3 seeds), and forward–backward at
  every target (seed 0): how close each mode lands.
* group lasso (rows of the two hidden layers) with ``measure="groups"``.
* teacher–student: the student (same shape as the teacher) with target =
  teacher's sparsity; F1 of its non-zero pattern (``experiments.pattern_f1``),
  as the controller left it and after ``finalize()``.
* a regularization path (``control.path``, 8 strengths, warm starts, 20
  epochs each) for the Pareto figure.
* optimizers (issue 12): the library's default path (``mode="auto"``,
  ``hold="freeze"``) with Adam, AdamW (lr 1e-3) and SGD+momentum against
  dense training, gradual magnitude pruning and torchao's PAT (its global
  sparsity constraint, when torchao is installed) with the same optimizer,
  epochs and ramp, 10 seeds (its goals are stated at 0.5 point; one test image
  is 0.22 point).
* average: SGD at 0.998 and AdamW at 0.997, seeds 0, 1, 2, test accuracy of
  the last weights and of their running average (``TargetSparsity(average=...)``)
  at every epoch after the freeze, and at the end; AdamW with the defaults
  (lr × 1/sqrt(1 − target) after the freeze, ``fine_tune_scale``) against
  ``fine_tune_scale=1, average=False``; ``control_average.png``.

The default runs in "targets" use the library's defaults (``mode="auto"``:
latent prox under the controller; ``hold="freeze"``); "sparsity reached by the
controller" is the measured sparsity at the controller's last update before
the final selection.

Writes ``benchmarks/results/control.json`` and ``control_*.png`` (``--quick``:
``control_quick.*``, a smoke test of the script, not a measurement). Run
``python benchmarks/control.py [--quick] [--parts targets optimizers ...]`` or
``sparsecraft bench --suite control``; ``--parts`` re-runs only those parts and
keeps the others of an existing results file.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import torch  # noqa: E402
from torch import nn  # noqa: E402

from sparsecraft import datasets, experiments, report
from sparsecraft.control import TargetSparsity, path
from sparsecraft.optim import ProximalOptimizer
from sparsecraft.penalties import GroupLasso
from sparsecraft.regularizer import Regularizer

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "control.json"

FULL = {"targets": (0.5, 0.8, 0.9, 0.95, 0.98, 0.99), "seeds": (0, 1, 2), "optimizer_seeds": tuple(range(10)),
        "epochs": 60,
        "path": (1e-3, 3e-3, 1e-2, 2e-2, 3e-2, 5e-2, 8e-2, 1.2e-1), "path_epochs": 20,
        "teachers": ({"name": "linear regression", "hidden": (), "task": "regression", "n_train": 8192,
                      "epochs": 20},
                     {"name": "linear classification", "hidden": (), "task": "classification",
                      "n_train": 32768, "epochs": 30},
                     {"name": "64-16-4 regression, 20 %", "hidden": (16,), "task": "regression",
                      "n_out": 4, "density": 0.2, "n_train": 8192, "epochs": 60},
                     {"name": "64-32-10 regression", "hidden": (32,), "task": "regression",
                      "n_train": 16384, "epochs": 60})}
# issue 12: per optimizer, the targets of its goals (digits MLP, lr: make_optimizer's defaults).
OPTIMIZERS = {"adam": (0.99, 0.997), "adamw": (0.99, 0.997), "sgd": (0.99, 0.997, 0.998)}
PARTS = ("targets", "groups", "teachers", "path", "optimizers", "average", "lr-factor")
QUICK = {"targets": (0.9, 0.99), "seeds": (0,), "epochs": 6, "path": (1e-2, 5e-2), "path_epochs": 2,
         "teachers": ({"name": "linear regression", "hidden": (), "task": "regression", "n_train": 2048,
                       "epochs": 6},)}


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs)


def _target_runs(data, cfg, mode: str, targets, seeds, optimizer: str = "sgd") -> list[dict[str, Any]]:
    rows = []
    for target in targets:
        for seed in seeds:
            r = experiments.run_target(data, target, epochs=cfg["epochs"], mode=mode, seed=seed,
                                       optimizer=optimizer)
            landed = r.details.get("controller_sparsity", r.details["sparsity_before_finalize"])
            rows.append({"target": target, "seed": seed, "mode": mode, "optimizer": optimizer,
                         "hold": r.config.get("hold"), "sparsity_controller": landed,
                         "accuracy_controller": r.details["accuracy_before_finalize"],
                         "sparsity_final": r.sparsity, "accuracy_final": r.accuracy,
                         "finalize_zeroed": r.details.get("finalize_zeroed", 0.0),
                         "final_scale": r.details["final_scale"], "seconds": r.seconds,
                         "_result": r})
    return rows


def _groups_run(data, epochs: int, target: float = 0.5) -> dict[str, Any]:
    model = experiments.build_model(data, (256, 256), 0)
    reg = Regularizer(model)
    reg.add_weight("[02].weight", GroupLasso(1e-3, groups="rows"))
    opt = ProximalOptimizer(experiments.make_optimizer("sgd", model.parameters()), reg, mode="latent")
    n = epochs * experiments.steps_per_epoch(data)
    ctrl = TargetSparsity(opt, target=target, end_step=2 * n // 3, measure="groups")
    experiments.train(model, data, opt, epochs=epochs, regularizer=reg, controller=ctrl)
    rows = torch.cat([(model[i].weight == 0).all(dim=1) for i in (0, 2)])
    return {"target": target, "groups": rows.numel(), "zero_groups": int(rows.sum()),
            "group_sparsity": ctrl.measured(), "accuracy": experiments.evaluate(model, data),
            "element_sparsity_of_those_layers": float((torch.cat([model[0].weight.flatten(),
                                                                  model[2].weight.flatten()]) == 0)
                                                      .float().mean())}


def _teacher_run(spec: dict[str, Any]) -> dict[str, Any]:
    kw = {k: spec[k] for k in ("hidden", "task", "n_train", "n_out", "density") if k in spec}
    data = datasets.teacher_student(**kw, seed=0)
    target = 1 - data.meta["density"]
    model = experiments.build_model(data, tuple(spec["hidden"]), 0)
    reg = Regularizer(model)
    reg.add_weight((nn.Linear, "weight"), "l1:1e-3")
    opt = ProximalOptimizer(experiments.make_optimizer("sgd", model.parameters()), reg, mode="latent")
    n = spec["epochs"] * experiments.steps_per_epoch(data)
    ctrl = TargetSparsity(opt, target=target, end_step=2 * n // 3)
    experiments.train(model, data, opt, epochs=spec["epochs"], regularizer=reg, controller=ctrl)
    f1 = experiments.pattern_f1(model, data)
    row = {"teacher": spec["name"], "target": target, "sparsity": ctrl.measured(),
           "metric": experiments.evaluate(model, data), **{f"pattern_{k}": v for k, v in f1.items()}}
    fin = ctrl.finalize()
    row.update(sparsity_after_finalize=fin["after"], metric_after_finalize=experiments.evaluate(model, data),
               pattern_f1_after_finalize=experiments.pattern_f1(model, data)["f1"])
    return row


def _optimizers_part(data, cfg) -> dict[str, Any]:
    """Issue 12 on digits: the default path per optimizer vs dense and gradual magnitude pruning."""
    seeds, epochs = cfg.get("optimizer_seeds", cfg["seeds"]), cfg["epochs"]
    plan = OPTIMIZERS if cfg is FULL else {"adamw": (0.99,)}
    peers = {"gradual magnitude": experiments.run_gradual}
    if experiments.pat_available():
        peers["PAT"] = experiments.run_pat_target
    rows, dense = [], {}
    for opt, targets in plan.items():
        accs = [experiments.run_dense(data, epochs=epochs, optimizer=opt, seed=s).accuracy for s in seeds]
        dense[opt] = {"accuracy_per_seed": accs, "accuracy_mean": _mean(accs)}
        for target in targets:
            runs = _target_runs(data, cfg, "auto", (target,), seeds, optimizer=opt)
            methods = [("sparsecraft default", runs)]
            for name, method in peers.items():
                peer = [method(data, target, epochs=epochs, optimizer=opt, seed=s) for s in seeds]
                methods.append((name, [{"accuracy_final": g.accuracy, "sparsity_final": g.sparsity,
                                        "seed": g.config["seed"]} for g in peer]))
            for method, sel in methods:
                acc = [r["accuracy_final"] for r in sel]
                rows.append({"optimizer": opt, "method": method, "target_%": 100 * target,
                             "seeds": len(sel), "sparsity_%": 100 * _mean([r["sparsity_final"] for r in sel]),
                             "accuracy_per_seed": acc, "accuracy_%": 100 * _mean(acc),
                             "vs_dense_points": 100 * (_mean(acc) - dense[opt]["accuracy_mean"])})
    return {"dense": dense, "rows": rows,
            "settings": {"epochs": epochs, "seeds": list(seeds), "lr": "make_optimizer defaults "
                         "(sgd 0.05 momentum 0.9, adam/adamw 1e-3)", "ramp": "cubic over 2/3 of the steps"}}


def run(quick: bool = False, parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    cfg = QUICK if quick else FULL
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    data = datasets.digits()
    target_file = RESULTS.with_name("control_quick.json") if quick else RESULTS
    out: dict[str, Any] = {}
    out.update({"suite": "control", "quick": quick,
                "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                            "python": platform.python_version(), "threads": 1},
                "settings": {k: v for k, v in cfg.items() if k != "teachers"}})
    out["parts_seconds"] = {}
    figures = HERE / "results"
    stem = "control_quick" if quick else "control"

    if "targets" in parts:
        t0 = time.perf_counter()
        _targets_part(data, cfg, out, figures, stem)
        out["parts_seconds"]["targets"] = time.perf_counter() - t0
    if "groups" in parts:
        out["groups"] = _groups_run(data, cfg["epochs"])
    if "teachers" in parts:
        out["teacher_student"] = [_teacher_run(spec) for spec in cfg["teachers"]]
    if "path" in parts:
        def make():
            return experiments.build_model(data, (256, 256), 0)

        p = path(make, data, cfg["path"], epochs=cfg["path_epochs"])
        out["path"] = p.to_dict()
    if "optimizers" in parts:
        t0 = time.perf_counter()
        out["optimizers"] = _optimizers_part(data, cfg)
        out["parts_seconds"]["optimizers"] = time.perf_counter() - t0
    if "average" in parts:
        t0 = time.perf_counter()
        out["average"] = _average_part(data, cfg, figures / f"{stem}_average.png")
        out["parts_seconds"]["average"] = time.perf_counter() - t0
    if "lr-factor" in parts:
        t0 = time.perf_counter()
        out["lr_factor"] = _lr_factor_part(data, cfg, figures / f"{stem}_lr_factor.png")
        out["parts_seconds"]["lr-factor"] = time.perf_counter() - t0
    out["seconds"] = time.perf_counter() - t_all
    # The parts not re-run keep their numbers: the file is read again just before writing,
    # so two processes running different parts both land.
    merged = json.loads(target_file.read_text()) if target_file.exists() else {}
    seconds = {**merged.get("parts_seconds", {}), **out.pop("parts_seconds")}
    merged.update(out)
    merged["parts_seconds"] = seconds
    if "targets" in parts and "path" in merged:
        _figures(merged, figures, stem)
    merged.pop("_figure_runs", None)
    target_file.parent.mkdir(parents=True, exist_ok=True)
    target_file.write_text(json.dumps(merged, indent=1, default=str))
    return merged


def _targets_part(data, cfg, out, figures, stem) -> None:
    dense = [experiments.run_dense(data, epochs=cfg["epochs"], seed=s) for s in cfg["seeds"]]
    dense_acc = _mean([d.accuracy for d in dense])
    out["dense"] = {"accuracy_per_seed": [d.accuracy for d in dense], "accuracy_mean": dense_acc}

    latent = _target_runs(data, cfg, "auto", cfg["targets"], cfg["seeds"])
    top = max(cfg["targets"])
    fb_top = _target_runs(data, cfg, "forward_backward", (top,), cfg["seeds"])
    fb_rest = _target_runs(data, cfg, "forward_backward", [t for t in cfg["targets"] if t != top], (0,))

    summary = []
    for mode, rows in (("default (latent)", latent), ("forward_backward", fb_top + fb_rest)):
        for target in cfg["targets"]:
            sel = [r for r in rows if r["target"] == target]
            if not sel:
                continue
            summary.append({
                "mode": mode, "target_%": 100 * target, "seeds": len(sel),
                "controller_sparsity_%": 100 * _mean([r["sparsity_controller"] for r in sel]),
                "worst_|miss|_points": 100 * max(abs(r["sparsity_controller"] - target) for r in sel),
                "final_sparsity_%": 100 * _mean([r["sparsity_final"] for r in sel]),
                "accuracy_%": 100 * _mean([r["accuracy_final"] for r in sel]),
                "vs_dense_points": 100 * (_mean([r["accuracy_final"] for r in sel]) - dense_acc),
            })
    out["summary"] = summary
    out["runs"] = [{k: v for k, v in r.items() if k != "_result"} for r in latent + fb_top + fb_rest]
    at_top = [r for r in latent if r["target"] == top]
    out["acceptance"] = {
        "all_latent_within_0.1_point_before_finalize": all(
            abs(r["sparsity_controller"] - r["target"]) <= 1e-3 for r in latent),
        f"accuracy_at_{top}_mean": _mean([r["accuracy_final"] for r in at_top]),
        f"accuracy_at_{top}_vs_dense_points": 100 * (_mean([r["accuracy_final"] for r in at_top]) - dense_acc),
        "peer_torchao_pat_at_0.99": {"accuracy": 0.9769, "dense": 0.9759, "source": "issue text"},
    }
    out["_figure_runs"] = {"best": at_top[0]["_result"], "latent": latent, "fb": fb_top + fb_rest}


def _fine_tuning_runs(data, cfg, optimizer: str, target: float, seeds, **ctrl_kw) -> list[dict[str, Any]]:
    """The default path on the digits MLP; test accuracy of the last weights and of the running
    average (when the controller keeps one) at every epoch after the freeze, and at the end."""
    epochs = cfg["epochs"]
    rows = []
    for seed in seeds:
        model = experiments.build_model(data, (256, 256), seed)
        reg = Regularizer(model)
        reg.add_weight((nn.Linear, "weight"), "l1:1e-2")
        opt = ProximalOptimizer(experiments.make_optimizer(optimizer, model.parameters()), reg)
        n = epochs * experiments.steps_per_epoch(data)
        ctrl = TargetSparsity(opt, target=target, end_step=2 * n // 3, **ctrl_kw)
        curve = []

        def on_epoch(epoch, record, model=model, ctrl=ctrl, opt=opt, curve=curve):
            if not opt.support_frozen:
                return
            point = {"epoch": epoch + 1, "last": record["metric"]}
            average = ctrl._average  # the running average the controller keeps (read only)
            if average is not None and average.count:
                shadow = copy.deepcopy(model)
                with torch.no_grad():
                    for p, a in zip(shadow.parameters(), average.values, strict=True):
                        p.copy_(a)
                point["average"] = experiments.evaluate(shadow, data)
            curve.append(point)

        experiments.train(model, data, opt, epochs=epochs, regularizer=reg, controller=ctrl, seed=seed,
                          on_epoch=on_epoch)
        last = experiments.evaluate(model, data)
        fin = ctrl.finalize()
        rows.append({"seed": seed, "freeze_epoch": ctrl.freeze_step / experiments.steps_per_epoch(data),
                     "fine_tune_scale": ctrl.fine_tune_scale,
                     "accuracy_last": last, "accuracy_final": experiments.evaluate(model, data),
                     "averaged_steps": fin["averaged"], "sparsity": fin["after"], "epochs": curve})
    return rows


def _average_part(data, cfg, png: Path) -> dict[str, Any]:
    """The fine-tuning after the freeze, epoch by epoch: SGD at 99.8 % (last weights against the
    average, ``TargetSparsity(average=...)``) and AdamW at 99.7 % (the defaults, lr × 1/sqrt(1 −
    target) and the average, against ``fine_tune_scale=1, average=False``)."""
    full = cfg is FULL
    seeds = (0, 1, 2) if full else (0,)
    sgd_target, adam_target = (0.998, 0.997) if full else (0.99, 0.99)
    sgd = _fine_tuning_runs(data, cfg, "sgd", sgd_target, seeds)
    adamw = _fine_tuning_runs(data, cfg, "adamw", adam_target, seeds)
    plain = _fine_tuning_runs(data, cfg, "adamw", adam_target, seeds, fine_tune_scale=1.0, average=False)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.4, 3.8), sharey=True)
    for i, (r, p) in enumerate(zip(sgd, plain, strict=True)):
        color = f"C{i}"
        xs = [c["epoch"] for c in r["epochs"]]
        left.plot(xs, [100 * c["last"] for c in r["epochs"]], color=color, alpha=0.6,
                  label=f"seed {r['seed']}: last weights")
        left.plot(xs, [100 * c["average"] for c in r["epochs"]], color=color, linestyle="--", linewidth=2,
                  label=f"seed {r['seed']}: average since the freeze")
        a = adamw[i]
        xs = [c["epoch"] for c in a["epochs"]]
        right.plot(xs, [100 * c["last"] for c in p["epochs"]], color=color, alpha=0.6, linestyle=":",
                   label=f"seed {r['seed']}: lr 1e-3, last weights")
        right.plot(xs, [100 * c["average"] for c in a["epochs"]], color=color, linestyle="--", linewidth=2,
                   label=f"seed {r['seed']}: lr × {a['fine_tune_scale']:.1f}, average (default)")
    left.set_title(f"SGD lr 0.05, {100 * sgd_target:g} % zeros", fontsize=10)
    right.set_title(f"AdamW lr 1e-3, {100 * adam_target:g} % zeros", fontsize=10)
    left.set_ylabel("test accuracy (%)")
    for ax in (left, right):
        ax.set_xlabel("epoch (after the zeros are fixed)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("digits MLP: the fine-tuning after the freeze", fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)

    def summary(rows, target):
        return {"target": target, "runs": rows, "accuracy_last_mean": _mean([r["accuracy_last"] for r in rows]),
                "accuracy_final_mean": _mean([r["accuracy_final"] for r in rows])}

    return {"seeds": list(seeds), "sgd": summary(sgd, sgd_target), "adamw": summary(adamw, adam_target),
            "adamw_plain": summary(plain, adam_target), "figure": os.path.relpath(png, HERE.parent)}


def _lr_factor_part(data, cfg, png: Path) -> dict[str, Any]:
    """``TargetSparsity.lr_factor`` (opt-in) on the digits MLP with AdamW at 99 % zeros, in a short
    run (10 epochs) and in the suite's long one: test accuracy per epoch, without and with it."""
    full = cfg is FULL
    seeds = (0, 1, 2) if full else (0,)
    budgets = (10, cfg["epochs"]) if full else (2, cfg["epochs"])
    out: dict[str, Any] = {"seeds": list(seeds), "target": 0.99, "optimizer": "adamw", "lr": 1e-3}
    fig, axes = plt.subplots(1, 2, figsize=(12.4, 3.8), sharey=True)
    for ax, epochs in zip(axes, budgets, strict=True):
        rows = {}
        for factor in (False, True):
            runs = []
            for i, seed in enumerate(seeds):
                curve: list[float] = []
                r = experiments.run_target(data, 0.99, optimizer="adamw", lr=1e-3, epochs=epochs, seed=seed,
                                           lr_factor=factor, on_epoch=lambda e, rec, c=curve: c.append(rec["metric"]))
                runs.append({"seed": seed, "accuracy": r.accuracy, "sparsity": r.sparsity, "epochs": curve})
                ax.plot(range(1, epochs + 1), [100 * a for a in curve], color=f"C{i}",
                        linestyle="-" if factor else ":", alpha=0.8,
                        label=f"seed {seed}: {'lr_factor' if factor else 'the user’s lr'}")
            rows["lr_factor" if factor else "default"] = {
                "runs": runs, "accuracy_mean": _mean([r["accuracy"] for r in runs])}
        out[f"epochs_{epochs}"] = rows
        ax.set_title(f"{epochs} epochs: {100 * rows['default']['accuracy_mean']:.1f} % → "
                     f"{100 * rows['lr_factor']['accuracy_mean']:.1f} % with lr_factor (after finalize)",
                     fontsize=10)
        ax.set_xlabel("epoch (ramp over the first 2/3, zeros fixed at 0.9)")
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("test accuracy (%), as the model shows it")
    fig.suptitle("digits MLP, AdamW lr 1e-3, 99 % zeros: LambdaLR(opt, ctrl.lr_factor) pays in a short run, "
                 "costs in a long one", fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    out["figure"] = os.path.relpath(png, HERE.parent)
    return out


def _figures(out, figures, stem) -> None:
    runs = out.pop("_figure_runs")
    best, latent, fb = runs["best"], runs["latent"], runs["fb"]
    top = max(r["target"] for r in latent)
    curve = [(r["sparsity"], r["accuracy"]) for r in out["path"]["rows"]]
    out["figures"] = [
        report.plot_training(best.artifacts["controller_history"], figures / f"{stem}_training.png",
                             title=f"TargetSparsity {top:g}, digits MLP, seed 0 (default path, SGD)"),
        report.plot_pareto({"TargetSparsity (default)": [(r["sparsity_final"], r["accuracy_final"])
                                                         for r in latent],
                            "TargetSparsity (forward-backward)": [(r["sparsity_final"], r["accuracy_final"])
                                                                  for r in fb],
                            "λ path (warm starts)": curve},
                           figures / f"{stem}_pareto.png", dense_accuracy=out["dense"]["accuracy_mean"],
                           title="digits MLP: accuracy vs exact-zero sparsity"),
        report.plot_layer_density(best.model, figures / f"{stem}_density.png",
                                  title=f"non-zeros per parameter at target {top:g}"),
        report.plot_magnitudes(best.model, figures / f"{stem}_magnitudes.png"),
        report.plot_mask(best.model[2].weight, figures / f"{stem}_mask.png", "2.weight"),
    ]
    out["figures"] = [os.path.relpath(f, HERE.parent) for f in out["figures"]]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    args = parser.parse_args()
    res = run(quick=args.quick, parts=tuple(args.parts))
    print(json.dumps({k: res.get(k) for k in ("summary", "acceptance", "optimizers")}, indent=1, default=str))
