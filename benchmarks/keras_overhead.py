"""What sparsecraft.keras's ProximalOptimizer costs per fit() step, on each Keras backend.

Model: an MLP 256-1024-1024-10 (1.3 M weights), batch 256, MSE to random
targets, ``fit()`` with Keras's default ``jit_compile="auto"`` (XLA on JAX and
TensorFlow, eager on torch). Cases, each a fresh model:

* ``sgd`` / ``adam``: no penalty (SGD lr 1e-3 momentum 0.9; Adam lr 1e-4);
* ``l1_loss_sgd`` / ``l1_loss_adam``: ``keras.regularizers.L1(1e-5)`` on every
  kernel, in the loss (Keras's way: no exact zeros);
* ``prox_sgd`` / ``prox_adam``: the same L1 from ``sparsecraft.keras`` applied by
  ``ProximalOptimizer`` (forward–backward); ``prox_sgd_latent``: latent mode.

Per case: one warm-up ``fit()`` (tracing, compiling); then ``REPEATS`` rounds
time one ``fit()`` of ``STEPS`` steps of every case in turn (interleaved); the
median time per step is reported. Each
backend runs in its own process (``KERAS_BACKEND``), one thread per op pool.

Writes ``benchmarks/results/keras_overhead.json``. Run
``python benchmarks/keras_overhead.py`` (``--quick``: small model, no file).
Nothing here asserts speed.
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

RESULTS = Path(__file__).resolve().parent / "results" / "keras_overhead.json"
BACKENDS = ("tensorflow", "jax", "torch")
CASES = ("sgd", "l1_loss_sgd", "prox_sgd", "prox_sgd_latent", "adam", "l1_loss_adam", "prox_adam")
BATCH, STEPS, REPEATS, LAM = 256, 20, 5, 1e-5


def _one_backend(width: int, steps: int, repeats: int) -> dict:
    """Runs inside a process whose KERAS_BACKEND is set: times every case."""
    import keras
    import numpy as np

    import sparsecraft.keras as sk

    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * steps, 256)).astype("float32")
    y = rng.normal(size=(BATCH * steps, 10)).astype("float32")

    def model(reg):
        return keras.Sequential([keras.Input((256,))] + [
            keras.layers.Dense(n, activation="relu" if n != 10 else None, kernel_regularizer=reg)
            for n in (width, width, 10)])

    models = {}
    for case in CASES:
        adam = case.endswith("adam")
        inner = keras.optimizers.Adam(1e-4) if adam else keras.optimizers.SGD(1e-3, momentum=0.9)
        if case.startswith("prox"):
            m = model(sk.L1(LAM))
            opt = sk.ProximalOptimizer(inner, mode="latent" if case.endswith("latent") else "forward_backward")
        else:
            m = model(keras.regularizers.L1(LAM) if case.startswith("l1_loss") else None)
            opt = inner
        m.compile(optimizer=opt, loss="mse")
        m.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)  # warm-up: trace, compile
        models[case] = m
    times = {case: [] for case in CASES}
    for _ in range(repeats):  # cases interleaved: a load change on the shared machine hits all alike
        for case, m in models.items():
            t0 = time.perf_counter()
            m.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
            times[case].append((time.perf_counter() - t0) / steps)
    out = {case: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t)} for case, t in times.items()}
    base = {"sgd": out["sgd"]["median_ms"], "adam": out["adam"]["median_ms"]}
    for case, r in out.items():
        r["vs_plain"] = r["median_ms"] / base["adam" if case.endswith("adam") else "sgd"]
    return {"keras": keras.__version__, "cases": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, 2 repeats, no file")
    parser.add_argument("--backend", choices=BACKENDS, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backends")
    args = parser.parse_args()
    width, repeats = (128, 2) if args.quick else (1024, REPEATS)
    if args.backend:
        print(json.dumps(_one_backend(width, STEPS, repeats)))
        return
    results = {}
    for backend in args.backends.split(","):
        env = {**os.environ, "KERAS_BACKEND": backend, "OMP_NUM_THREADS": "1",
               "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
               "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
               "TF_CPP_MIN_LOG_LEVEL": "3"}
        cmd = [sys.executable, __file__, "--backend", backend] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        results[backend] = json.loads(done.stdout.strip().splitlines()[-1])
        for case, r in results[backend]["cases"].items():
            print(f"{backend:<10} {case:<16} {r['median_ms']:8.2f} ms/step  x{r['vs_plain']:.2f} vs plain")
    record = {"model": f"MLP 256-{width}-{width}-10", "batch": BATCH, "steps": STEPS, "repeats": repeats,
              "threads": 1, "load_average": os.getloadavg(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "results": results}
    if not args.quick:
        RESULTS.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
