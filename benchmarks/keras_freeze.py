"""sparsecraft.keras's TargetSparsity: hold="freeze" against hold="track", on the digits MLP.

The torch controller's comparison (docs/optim.md, third round) redone with the
Keras-native pieces: scikit-learn's digits (``train_test_split`` 75/25,
stratified, ``random_state=seed``; pixels standardised with the training
statistics), an MLP 64-256-256-10 (ReLU, Glorot-uniform kernels seeded by
``seed``), ``sk.L1(1e-2)`` on every kernel (the starting strength only),
``ProximalOptimizer(SGD(0.05, momentum=0.9), mode="latent")``, batch 64, 60
epochs (1320 steps), cross-entropy. ``TargetSparsity(target, end_step=2/3 of
the steps)`` with ``hold="track"`` (the target held with the prox on to the
end, then ``finalize()``) or ``hold="freeze"`` (its default ``freeze_step``:
0.9 of the run; then fixed zeros, survivors without the penalty). Also one
dense run (no penalty) per seed as the reference.

``--mode forward_backward``: the same with forward–backward splitting (its
default ``freeze_step`` is ``end_step``), written to ``keras_freeze_fb.json``.

``--compare fine_tune``: the fine-tuning after the freeze (``hold="freeze"``,
latent mode), per optimizer and target (``--optimizers sgd adamw``; AdamW lr
1e-3, weight decay 0.01, torch's defaults): one run with ``average=True,
fine_tune_scale=1`` evaluated on its last weights (the plain freeze) and on
the written average; for AdamW one more with the defaults (``fine_tune_scale
= 1/sqrt(1 − target)``), evaluated on its last weights and on its average (the
default). A seed's runs share everything up to the freeze, so the differences
are paired. Written to ``keras_freeze_fine_tune.json``.

``--compare display``: AdamW (lr 1e-3, weight decay 0.01) in latent mode
with the callback's defaults (``hold="freeze"``, the average, ``fine_tune_scale
= 1/sqrt(1 − target)``, ``finalize()`` at the end), the model showing
``prox(z)`` (``relaxed=False``, the soft display) or the relaxed display
(``relaxed=None``, the default under TargetSparsity for AdamW), paired per
seed. Written to ``keras_freeze_display.json``.

Each backend runs in its own process (``KERAS_BACKEND``), one thread per op
pool. Writes ``benchmarks/results/keras_freeze.json``. Run
``python benchmarks/keras_freeze.py --backends torch jax --targets 0.99 0.997``
(``--quick``: 2 epochs, one seed, no file; ``--summarize``: recompute the
summaries of the results file). Nothing here asserts accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "keras_freeze.json"
HOLDS = ("track", "freeze")
EPOCHS, BATCH, LR, LAM, RAMP_FRACTION = 60, 64, 0.05, 1e-2, 2 / 3


def _digits(seed: int):
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    mean, std = xtr.mean(0), xtr.std(0)
    std[std < 1e-12] = 1.0
    f32 = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    return f32(xtr), ytr.astype(np.int32), f32(xte), yte.astype(np.int32)


def _mlp(seed: int, reg):
    import keras

    return keras.Sequential([keras.Input((64,))] + [
        keras.layers.Dense(n, activation="relu" if n != 10 else None, kernel_regularizer=reg,
                           kernel_initializer=keras.initializers.GlorotUniform(seed=100 * seed + i))
        for i, n in enumerate((256, 256, 10))])


def _evaluate(model, xte, yte) -> tuple[float, float, float]:
    """Test accuracy, test cross-entropy and the share of exact zeros over the kernels."""
    import keras
    import numpy as np

    logits = model.predict(xte, batch_size=512, verbose=0)
    accuracy = float(np.mean(np.argmax(logits, -1) == yte))
    shifted = logits - logits.max(-1, keepdims=True)
    loss = float(np.mean(np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(len(yte)), yte]))
    kernels = [keras.ops.convert_to_numpy(layer.kernel) for layer in model.layers]
    return accuracy, loss, sum(int(np.sum(k == 0)) for k in kernels) / sum(k.size for k in kernels)


def _one_run(hold: str | None, target: float, seed: int, epochs: int, mode: str = "latent") -> dict:
    """One training run inside a process whose KERAS_BACKEND is set; ``hold=None``: dense."""
    import keras

    import sparsecraft.keras as sk

    keras.utils.set_random_seed(seed)  # fit()'s shuffling
    xtr, ytr, xte, yte = _digits(seed)
    model = _mlp(seed, None if hold is None else sk.L1(LAM))
    inner = keras.optimizers.SGD(LR, momentum=0.9)
    opt = inner if hold is None else sk.ProximalOptimizer(inner, mode=mode)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps = epochs * -(-len(xtr) // BATCH)
    callbacks = []
    if hold is not None:
        # The fine-tuning's average and scale off: this compares the holds (--compare fine_tune: those two).
        extra = {"average": False, "fine_tune_scale": 1.0} if hold == "freeze" else {}
        ctrl = sk.TargetSparsity(target, end_step=max(1, round(RAMP_FRACTION * steps)), hold=hold, **extra)
        callbacks.append(ctrl)
    t0 = time.perf_counter()
    model.fit(xtr, ytr, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=callbacks)
    seconds = time.perf_counter() - t0
    accuracy, loss, zeros = _evaluate(model, xte, yte)
    row = {"hold": hold or "dense", "target": target if hold else 0.0, "seed": seed, "steps": steps,
           "test_accuracy": accuracy, "test_loss": loss, "sparsity": zeros, "seconds": round(seconds, 2)}
    if hold is not None:
        row.update(controller_sparsity=ctrl.final["before"], frozen_at=ctrl.final["frozen_at"],
                   freeze_step=ctrl.freeze_step, end_step=ctrl.config["end_step"])
    return row


def _fine_tune_run(optimizer: str, target: float, seed: int, epochs: int, scaled: bool) -> dict:
    """``hold="freeze"`` in latent mode with the average on; the last weights and the average, both evaluated.

    ``scaled``: ``fine_tune_scale`` at its default (``1/sqrt(1 − target)`` for
    AdamW), else 1.
    """
    import keras

    import sparsecraft.keras as sk

    keras.utils.set_random_seed(seed)
    xtr, ytr, xte, yte = _digits(seed)
    model = _mlp(seed, sk.L1(LAM))
    inner = keras.optimizers.SGD(LR, momentum=0.9) if optimizer == "sgd" \
        else keras.optimizers.AdamW(1e-3, weight_decay=0.01)
    model.compile(optimizer=sk.ProximalOptimizer(inner, mode="latent"),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps = epochs * -(-len(xtr) // BATCH)
    ctrl = sk.TargetSparsity(target, end_step=max(1, round(RAMP_FRACTION * steps)), average=True,
                             fine_tune_scale=None if scaled else 1.0, finalize=False)
    t0 = time.perf_counter()
    model.fit(xtr, ytr, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=[ctrl])
    seconds = time.perf_counter() - t0
    last = _evaluate(model, xte, yte)
    final = ctrl.finalize()  # writes the average
    average = _evaluate(model, xte, yte)
    return {"optimizer": optimizer, "target": target, "seed": seed, "steps": steps,
            "fine_tune_scale": ctrl.fine_tune_scale, "freeze_step": ctrl.freeze_step, "frozen_at": final["frozen_at"],
            "averaged": final["averaged"], "last_accuracy": last[0], "last_loss": last[1], "last_sparsity": last[2],
            "average_accuracy": average[0], "average_loss": average[1], "average_sparsity": average[2],
            "seconds": round(seconds, 2)}


def _display_run(target: float, seed: int, epochs: int, relaxed: bool) -> dict:
    """AdamW in latent mode with the callback's defaults; the soft (``relaxed=False``) or the default display."""
    import keras

    import sparsecraft.keras as sk
    from sparsecraft.keras import _display

    keras.utils.set_random_seed(seed)
    xtr, ytr, xte, yte = _digits(seed)
    model = _mlp(seed, sk.L1(LAM))
    opt = sk.ProximalOptimizer(keras.optimizers.AdamW(1e-3, weight_decay=0.01), mode="latent",
                               relaxed=None if relaxed else False)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps = epochs * -(-len(xtr) // BATCH)
    ctrl = sk.TargetSparsity(target, end_step=max(1, round(RAMP_FRACTION * steps)))
    t0 = time.perf_counter()
    model.fit(xtr, ytr, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=[ctrl])
    seconds = time.perf_counter() - t0
    accuracy, loss, zeros = _evaluate(model, xte, yte)  # after finalize(): the average
    return {"display": "relaxed" if _display.is_relaxed(opt) else "soft", "target": target, "seed": seed,
            "steps": steps, "fine_tune_scale": ctrl.fine_tune_scale, "average": ctrl.average,
            "frozen_at": ctrl.final["frozen_at"], "controller_sparsity": ctrl.final["before"],
            "test_accuracy": accuracy, "test_loss": loss, "sparsity": zeros, "seconds": round(seconds, 2)}


def _display_backend(targets: list[float], seeds: list[int], epochs: int) -> list[dict]:
    rows = []
    for seed in seeds:
        for target in targets:
            for relaxed in (False, True):
                rows.append(_display_run(target, seed, epochs, relaxed))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _display_summary(rows: list[dict]) -> list[dict]:
    """Per target and display: mean accuracy, and relaxed minus soft seed by seed."""
    out = []
    for target in sorted({r["target"] for r in rows}):
        acc = {(r["display"], r["seed"]): r["test_accuracy"] for r in rows if r["target"] == target}
        seeds = sorted(s for d, s in acc if d == "soft" and ("relaxed", s) in acc)
        diffs = [acc[("relaxed", s)] - acc[("soft", s)] for s in seeds]
        for display in ("soft", "relaxed"):
            vals = [acc[(display, s)] for s in seeds]
            out.append({"target": target, "display": display, "seeds": len(seeds),
                        "mean_accuracy": statistics.mean(vals),
                        "sem": statistics.stdev(vals) / len(vals) ** 0.5 if len(vals) > 1 else None})
        out.append({"target": target, "display": "relaxed - soft", "seeds": len(seeds),
                    "mean_difference": statistics.mean(diffs),
                    "sem": statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None,
                    "relaxed_better": sum(d > 0 for d in diffs), "equal": sum(d == 0 for d in diffs),
                    "soft_better": sum(d < 0 for d in diffs)})
    return out


def _fine_tune_backend(optimizers: list[str], targets: list[float], seeds: list[int], epochs: int) -> list[dict]:
    rows = []
    for seed in seeds:
        for optimizer in optimizers:
            for target in targets:
                for scaled in (False, True) if optimizer != "sgd" else (False,):  # SGD's default scale is 1
                    rows.append(_fine_tune_run(optimizer, target, seed, epochs, scaled))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _fine_tune_variants(rows: list[dict], optimizer: str, target: float) -> dict[str, dict[int, float]]:
    """Accuracy per seed of: the plain freeze, the average, the scale alone, the scale with the average."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        if (r["optimizer"], r["target"]) != (optimizer, target):
            continue
        scaled = r["fine_tune_scale"] != 1.0
        out.setdefault("scale" if scaled else "freeze", {})[r["seed"]] = r["last_accuracy"]
        out.setdefault("scale+average" if scaled else "average", {})[r["seed"]] = r["average_accuracy"]
    return out


def _fine_tune_summary(rows: list[dict]) -> list[dict]:
    """Per optimizer, target and variant: mean accuracy, and the paired difference to the plain freeze."""
    out = []
    for optimizer, target in sorted({(r["optimizer"], r["target"]) for r in rows}):
        variants = _fine_tune_variants(rows, optimizer, target)
        base = variants["freeze"]
        for name, acc in variants.items():
            seeds = sorted(set(acc) & set(base))
            diffs = [acc[s] - base[s] for s in seeds]
            out.append({"optimizer": optimizer, "target": target, "variant": name, "seeds": len(seeds),
                        "mean_accuracy": statistics.mean(acc[s] for s in seeds),
                        "vs_freeze": statistics.mean(diffs),
                        "sem": statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None,
                        "better": sum(d > 0 for d in diffs), "equal": sum(d == 0 for d in diffs),
                        "worse": sum(d < 0 for d in diffs)})
    return out


def _one_backend(targets: list[float], seeds: list[int], epochs: int, mode: str) -> list[dict]:
    rows = []
    for seed in seeds:
        rows.append(_one_run(None, 0.0, seed, epochs))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        for target in targets:
            for hold in HOLDS:
                rows.append(_one_run(hold, target, seed, epochs, mode))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _summary(rows: list[dict]) -> list[dict]:
    out = []
    for key in sorted({(r["hold"], r["target"]) for r in rows}, key=lambda k: (k[1], k[0])):
        acc = [r["test_accuracy"] for r in rows if (r["hold"], r["target"]) == key]
        out.append({"hold": key[0], "target": key[1], "seeds": len(acc),
                    "mean_accuracy": statistics.mean(acc),
                    "mean_test_loss": statistics.mean(r["test_loss"] for r in rows
                                                      if (r["hold"], r["target"]) == key),
                    "sem": statistics.stdev(acc) / len(acc) ** 0.5 if len(acc) > 1 else None,
                    "mean_sparsity": statistics.mean(r["sparsity"] for r in rows
                                                     if (r["hold"], r["target"]) == key)})
    return out


def _paired(rows: list[dict]) -> list[dict]:
    """Per target: freeze minus track, seed by seed (the same split and initial weights)."""
    out = []
    for target in sorted({r["target"] for r in rows if r["hold"] != "dense"}):
        acc = {(r["hold"], r["seed"]): r["test_accuracy"] for r in rows if r["target"] == target}
        diffs = [acc[("freeze", s)] - acc[("track", s)] for s in sorted({s for _, s in acc})
                 if ("freeze", s) in acc and ("track", s) in acc]
        out.append({"target": target, "seeds": len(diffs), "mean_difference": statistics.mean(diffs),
                    "freeze_better": sum(d > 0 for d in diffs), "equal": sum(d == 0 for d in diffs),
                    "track_better": sum(d < 0 for d in diffs)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch"], choices=["torch", "jax", "tensorflow"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.99])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--mode", default="latent", choices=["latent", "forward_backward"],
                        help="the ProximalOptimizer's mode (forward_backward: results in keras_freeze_fb.json)")
    parser.add_argument("--compare", default="holds", choices=["holds", "fine_tune", "display"],
                        help="holds: track vs freeze; fine_tune: average and fine_tune_scale after the freeze; "
                             "display: AdamW's soft vs relaxed latent display")
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adamw"], choices=["sgd", "adamw"],
                        help="with --compare fine_tune")
    parser.add_argument("--quick", action="store_true", help="2 epochs, seed 0, no file")
    parser.add_argument("--summarize", action="store_true", help="recompute the summaries of the results file")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    epochs, seeds = (2, [0]) if args.quick else (EPOCHS, args.seeds)
    results = RESULTS if args.mode == "latent" else RESULTS.with_name("keras_freeze_fb.json")
    fine_tune, display = args.compare == "fine_tune", args.compare == "display"
    if fine_tune or display:
        results = RESULTS.with_name(f"keras_freeze_{args.compare}.json")
    summarize = _fine_tune_summary if fine_tune else _display_summary if display else _summary
    if args.summarize:
        out = json.loads(results.read_text())
        for part in out["backends"].values():
            part.update(summary=summarize(part["runs"]))
            if summarize is _summary:
                part.update(paired=_paired(part["runs"]))
        results.write_text(json.dumps(out, indent=1) + "\n")
        key = "paired" if summarize is _summary else "summary"
        print(json.dumps({b: p[key] for b, p in out["backends"].items()}, indent=1))
        return
    if args._child:
        rows = _fine_tune_backend(args.optimizers, args.targets, seeds, epochs) if fine_tune \
            else _display_backend(args.targets, seeds, epochs) if display \
            else _one_backend(args.targets, seeds, epochs, args.mode)
        print(json.dumps(rows))
        return
    out = {"command": "python benchmarks/keras_freeze.py " + " ".join(sys.argv[1:]),
           "settings": {"epochs": epochs, "batch": BATCH, "lr": LR, "momentum": 0.9, "lam_start": LAM,
                        "ramp_fraction": RAMP_FRACTION, "model": "64-256-256-10", "mode": args.mode,
                        **({"adamw": {"lr": 1e-3, "weight_decay": 0.01}} if fine_tune or display else {})},
           "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
           "backends": {}}
    for backend in args.backends:
        env = dict(os.environ, KERAS_BACKEND=backend, OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1",
                   TF_NUM_INTEROP_THREADS="1", XLA_FLAGS="--xla_cpu_multi_thread_eigen=false")
        cmd = [sys.executable, __file__, "--_child", "1", "--mode", args.mode, "--targets", *map(str, args.targets),
               "--seeds", *map(str, seeds), "--compare", args.compare, "--optimizers", *args.optimizers] \
            + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True)
        rows = json.loads(done.stdout.strip().splitlines()[-1])
        out["backends"][backend] = {"runs": rows, "summary": summarize(rows)}
        if summarize is _summary:
            out["backends"][backend]["paired"] = _paired(rows)
        for s in out["backends"][backend]["summary"]:
            print(backend, json.dumps(s))
    if not args.quick:
        results.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {results}")


if __name__ == "__main__":
    main()
