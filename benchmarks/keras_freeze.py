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


def _one_run(hold: str | None, target: float, seed: int, epochs: int, mode: str = "latent") -> dict:
    """One training run inside a process whose KERAS_BACKEND is set; ``hold=None``: dense."""
    import keras
    import numpy as np

    import sparsecraft.keras as sk

    keras.utils.set_random_seed(seed)  # fit()'s shuffling
    xtr, ytr, xte, yte = _digits(seed)
    reg = None if hold is None else sk.L1(LAM)
    model = keras.Sequential([keras.Input((64,))] + [
        keras.layers.Dense(n, activation="relu" if n != 10 else None, kernel_regularizer=reg,
                           kernel_initializer=keras.initializers.GlorotUniform(seed=100 * seed + i))
        for i, n in enumerate((256, 256, 10))])
    inner = keras.optimizers.SGD(LR, momentum=0.9)
    opt = inner if hold is None else sk.ProximalOptimizer(inner, mode=mode)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps = epochs * -(-len(xtr) // BATCH)
    callbacks = []
    if hold is not None:
        ctrl = sk.TargetSparsity(target, end_step=max(1, round(RAMP_FRACTION * steps)), hold=hold)
        callbacks.append(ctrl)
    t0 = time.perf_counter()
    model.fit(xtr, ytr, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=callbacks)
    seconds = time.perf_counter() - t0
    logits = model.predict(xte, batch_size=512, verbose=0)
    accuracy = float(np.mean(np.argmax(logits, -1) == yte))
    shifted = logits - logits.max(-1, keepdims=True)
    loss = float(np.mean(np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(len(yte)), yte]))
    kernels = [keras.ops.convert_to_numpy(layer.kernel) for layer in model.layers]
    zeros = sum(int(np.sum(k == 0)) for k in kernels) / sum(k.size for k in kernels)
    row = {"hold": hold or "dense", "target": target if hold else 0.0, "seed": seed, "steps": steps,
           "test_accuracy": accuracy, "test_loss": loss, "sparsity": zeros, "seconds": round(seconds, 2)}
    if hold is not None:
        row.update(controller_sparsity=ctrl.final["before"], frozen_at=ctrl.final["frozen_at"],
                   freeze_step=ctrl.freeze_step, end_step=ctrl.config["end_step"])
    return row


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
    parser.add_argument("--quick", action="store_true", help="2 epochs, seed 0, no file")
    parser.add_argument("--summarize", action="store_true", help="recompute the summaries of the results file")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    epochs, seeds = (2, [0]) if args.quick else (EPOCHS, args.seeds)
    results = RESULTS if args.mode == "latent" else RESULTS.with_name("keras_freeze_fb.json")
    if args.summarize:
        out = json.loads(results.read_text())
        for part in out["backends"].values():
            part.update(summary=_summary(part["runs"]), paired=_paired(part["runs"]))
        results.write_text(json.dumps(out, indent=1) + "\n")
        print(json.dumps({b: p["paired"] for b, p in out["backends"].items()}, indent=1))
        return
    if args._child:
        print(json.dumps(_one_backend(args.targets, seeds, epochs, args.mode)))
        return
    out = {"command": "python benchmarks/keras_freeze.py " + " ".join(sys.argv[1:]),
           "settings": {"epochs": epochs, "batch": BATCH, "lr": LR, "momentum": 0.9, "lam_start": LAM,
                        "ramp_fraction": RAMP_FRACTION, "model": "64-256-256-10", "mode": args.mode},
           "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
           "backends": {}}
    for backend in args.backends:
        env = dict(os.environ, KERAS_BACKEND=backend, OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1",
                   TF_NUM_INTEROP_THREADS="1", XLA_FLAGS="--xla_cpu_multi_thread_eigen=false")
        cmd = [sys.executable, __file__, "--_child", "1", "--mode", args.mode, "--targets", *map(str, args.targets),
               "--seeds", *map(str, seeds)] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True)
        rows = json.loads(done.stdout.strip().splitlines()[-1])
        out["backends"][backend] = {"runs": rows, "summary": _summary(rows), "paired": _paired(rows)}
        for s in out["backends"][backend]["summary"]:
            print(backend, json.dumps(s))
    if not args.quick:
        results.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {results}")


if __name__ == "__main__":
    main()
