"""TargetSparsity callback: the in-graph controller lands on the target; finalize makes it exact."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from sparsecraft.keras import callbacks as C
from sparsecraft.keras import optimizers as O
from sparsecraft.keras import regularizers as R


def _problem():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 32)).astype("float32")
    teacher = rng.normal(size=(32, 16)).astype("float32") * (rng.random((32, 16)) < 0.2)
    return x, (x @ teacher).astype("float32")


def _model(jit: bool, mode: str) -> keras.Model:
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(
        16, kernel_initializer=keras.initializers.RandomNormal(0.0, 0.3, seed=0), kernel_regularizer=R.L1(1e-3))])
    model.compile(optimizer=O.ProximalOptimizer(keras.optimizers.SGD(0.05), mode=mode), loss="mse",
                  jit_compile=jit and keras.backend.backend() != "torch")
    return model


def _zeros(model) -> int:
    return int(np.sum(ops.convert_to_numpy(model.layers[-1].kernel) == 0))


def test_latent_target_is_reached_and_finalize_makes_it_exact() -> None:
    x, y = _problem()
    model = _model(jit=True, mode="latent")
    ctrl = C.TargetSparsity(0.9, end_step=60, every=2)
    model.fit(x, y, batch_size=16, epochs=25, shuffle=False, verbose=0, callbacks=[ctrl])
    numel = 32 * 16
    assert len(ctrl.history) == 25
    assert ctrl.history[-1]["target_now"] == pytest.approx(0.9)
    assert ctrl.final["before"] == pytest.approx(0.9, abs=0.03)  # the controller's own landing
    assert abs(ctrl.final["after"] - 0.9) <= 0.001
    assert _zeros(model) == round(0.9 * numel)
    assert ctrl.final["scale_after"] > 1.0  # the strength was raised to reach the target
    assert ctrl.measured() == ctrl.final["after"]


def test_forward_backward_finalize_cuts_the_smallest_magnitudes() -> None:
    x, y = _problem()
    model = _model(jit=False, mode="forward_backward")
    ctrl = C.TargetSparsity(0.5, end_step=20, finalize=False, hold="track")
    model.fit(x, y, batch_size=16, epochs=8, shuffle=False, verbose=0, callbacks=[ctrl])
    kernel = ops.convert_to_numpy(model.layers[-1].kernel)
    before = int(np.sum(kernel == 0))
    result = ctrl.finalize()
    after = ops.convert_to_numpy(model.layers[-1].kernel)
    assert result["before"] == before / kernel.size
    if before < round(0.5 * kernel.size):
        assert int(np.sum(after == 0)) == round(0.5 * kernel.size)
        cut = (after == 0) & (kernel != 0)
        assert np.abs(kernel[cut]).max() <= np.abs(after[after != 0]).min()
    assert result["after"] >= 0.5 - 0.001


def test_argument_errors_and_missing_optimizer() -> None:
    with pytest.raises(ValueError, match="Received: target=1.5"):
        C.TargetSparsity(1.5, end_step=10)
    with pytest.raises(ValueError, match="end_step > start_step"):
        C.TargetSparsity(0.5, end_step=5, start_step=5)
    with pytest.raises(ValueError, match="ramp"):
        C.TargetSparsity(0.5, end_step=5, ramp="quadratic")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="ProximalOptimizer"):
        C.find_proximal_optimizer(model)
