"""sparsity() and explain() for Keras models: counts and the term table."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

import sparsecraft.keras as sk
from sparsecraft.keras import regularizers as R


def test_explain_the_seed_terms_and_the_prox_mode() -> None:
    d1 = ops.ones((2, 2, 4)) * 3
    layer = keras.layers.Dense(3, kernel_initializer="ones", kernel_regularizer=R.L1(0.1),
                               bias_regularizer=keras.regularizers.L2(0.5), activity_regularizer=R.L1(0.1))
    model = keras.Sequential([keras.Input((2, 4)), layer])
    table = sk.explain(model, d1)
    rows = {r["kind"] + ":" + r["where"].split("/")[-1]: r for r in table.rows}
    assert rows["weight:kernel"]["value"] == pytest.approx(1.2)
    assert rows["weight:kernel"]["formula"] == "0.1·Σ|W|"
    assert rows["weight:kernel"]["mode"] == "loss"
    assert rows["weight:bias"]["value"] == 0.0 and rows["weight:bias"]["formula"].startswith("L2(l2=0.5)")
    act = rows[f"activity:{layer.name}"]
    assert act["value"] == pytest.approx(7.2) and act["formula"] == "0.1·Σ|out| / 2"
    assert table.total == pytest.approx(8.4)
    model(d1)
    keras_total = sum(float(ops.convert_to_numpy(v)) for v in model.losses)
    assert table.total == pytest.approx(keras_total)
    assert "0.1·Σ|out| / 2" in str(table)

    sk.ProximalOptimizer(keras.optimizers.SGD(0.1)).build(model.trainable_variables)
    after = {r["kind"] + ":" + r["where"].split("/")[-1]: r for r in sk.explain(model).rows}
    assert after["weight:kernel"]["mode"] == "prox" and after["weight:kernel"]["value"] == pytest.approx(1.2)
    assert after["weight:bias"]["mode"] == "prox"  # Keras's own L2 has a prox too
    assert after[f"activity:{layer.name}"]["value"] is None  # no inputs given


def test_sparsity_counts_exact_zeros_rows_and_columns() -> None:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    kernel = np.array([[0, 1, 0], [0, 0, 0], [0, 2, 0], [0, 1e-4, 3]], "float32")
    model.layers[0].kernel.assign(kernel)
    report = sk.sparsity(model, tol=1e-3)
    k, b = report.rows
    assert (k.numel, k.zeros, k.near_zeros, k.zero_rows, k.zero_cols) == (12, 8, 9, 1, 1)
    assert (b.numel, b.zeros, b.zero_rows) == (3, 3, None)
    assert report.sparsity == pytest.approx(11 / 15)
    assert report.weight_sparsity == pytest.approx(8 / 12)
    assert "73.33%" in str(report)
    with pytest.raises(ValueError, match="tol=-1"):
        sk.sparsity(model, tol=-1)
