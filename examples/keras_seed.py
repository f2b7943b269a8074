"""The seed question in Keras 3: "I apply L1(0.1) to make d1 sparse: which way does it?"

Run on any backend (no torch needed on TensorFlow or JAX):

    KERAS_BACKEND=jax python examples/keras_seed.py
    KERAS_BACKEND=tensorflow python examples/keras_seed.py
    KERAS_BACKEND=torch python examples/keras_seed.py

Part 1 shows Keras's three ways to apply ``L1(0.1)`` with sparsecraft's
``explain()``. Part 2 trains, through ``fit()`` with the prox, a model whose
hidden layer produces ``d1``, once with the penalty on the kernel and once on
the activity, and counts the exact zeros of the kernel and of ``d1``.
"""

from __future__ import annotations

import json
import sys

import keras
import numpy as np
from keras import ops

import sparsecraft.keras as sk
from sparsecraft.keras.regularizers import L1


def three_ways() -> None:
    d1 = ops.ones((2, 2, 4)) * 3
    print(f"1. a tensor:   L1(0.1)(d1) = {float(ops.convert_to_numpy(L1(0.1)(d1))):.4g}   (0.1 × 48)")
    for place in ("kernel", "activity"):
        layer = keras.layers.Dense(3, kernel_initializer="ones", bias_initializer="zeros",
                                   **{f"{place}_regularizer": L1(0.1)})
        model = keras.Sequential([keras.Input((2, 4)), layer])
        keras_value = sum(float(ops.convert_to_numpy(v)) for v in (model(d1), model.losses)[1])
        print(f"\n{2 if place == 'kernel' else 3}. {place}_regularizer=L1(0.1): model.losses = {keras_value:.4g}")
        print(sk.explain(model, d1))


def make_data(n: int = 512):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype("float32")
    teacher = rng.normal(size=(8, 1)).astype("float32")
    return x, np.maximum(x @ teacher, 0.0).astype("float32")


def train(place: str) -> dict[str, float]:
    """Hidden layer "d1" (8 → 16, ReLU) with L1(0.1) on its kernel, its activity or nowhere; fit() with the prox."""
    x, y = make_data()
    hidden = keras.layers.Dense(16, activation="relu", name="d1",
                                **({f"{place}_regularizer": L1(0.1)} if place != "none" else {}))
    model = keras.Sequential([keras.Input((8,)), hidden, keras.layers.Dense(1)])
    # The same numpy start on every backend (Keras's seeded initializers differ between backends).
    rng = np.random.default_rng(1)
    model.set_weights([rng.uniform(-0.5, 0.5, size=w.shape).astype("float32") if w.ndim == 2
                       else np.zeros(w.shape, "float32") for w in model.get_weights()])
    model.compile(optimizer=sk.ProximalOptimizer(keras.optimizers.SGD(0.02)), loss="mse")
    model.fit(x, y, batch_size=64, epochs=40, shuffle=False, verbose=0)
    if place != "none":
        print(f"\n{place}_regularizer, after fit() with ProximalOptimizer:")
        print(sk.explain(model, x[:64]))
    d1 = ops.convert_to_numpy(keras.Model(model.inputs[0], hidden.output)(x))
    kernel = ops.convert_to_numpy(hidden.kernel)
    return {
        "place": place,
        "kernel_zeros": float(np.mean(kernel == 0)),
        "d1_zeros": float(np.mean(d1 == 0)),
        "d1_dead_units": int(np.sum(np.all(d1 == 0, axis=0))),
        "loss": float(model.evaluate(x, y, verbose=0)),
    }


def main() -> None:
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}\n")
    three_ways()
    results = [train("none"), train("kernel"), train("activity")]
    print("\nWhich makes d1 sparse? (exact zeros, on the 512 training inputs)")
    print(f"{'penalty on':<10}  {'kernel zeros':>12}  {'d1 zeros':>8}  {'dead d1 units':>13}  {'mse':>7}")
    for r in results:
        print(f"{r['place']:<10}  {r['kernel_zeros']:>12.1%}  {r['d1_zeros']:>8.1%}  "
              f"{r['d1_dead_units']:>13d}  {r['loss']:>7.4f}")
    if "--json" in sys.argv:
        print(json.dumps({"backend": keras.backend.backend(), "results": results}))


if __name__ == "__main__":
    main()
