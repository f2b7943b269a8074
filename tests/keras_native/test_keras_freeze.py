"""hold="freeze": the exact count at freeze_step, fixed zeros after it, survivors without the penalty."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops
from keras_problems import BACKEND, dense_model, mse_grad

from sparsecraft.keras import callbacks as C
from sparsecraft.keras import optimizers as O
from sparsecraft.keras import regularizers as R


def _problem():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 32)).astype("float32")
    teacher = rng.normal(size=(32, 16)).astype("float32") * (rng.random((32, 16)) < 0.2)
    return x, (x @ teacher).astype("float32")


def _kernel(model) -> np.ndarray:
    return ops.convert_to_numpy(model.layers[-1].kernel).astype(np.float64)


class _Kernels(keras.callbacks.Callback):
    """The kernel at every epoch end (one host read an epoch)."""

    def __init__(self):
        super().__init__()
        self.kernels: list[np.ndarray] = []

    def on_epoch_end(self, epoch, logs=None):
        self.kernels.append(_kernel(self.model))


@pytest.mark.parametrize("mode", ["latent", "forward_backward"])
def test_zeros_are_counted_at_freeze_step_and_stay_fixed_to_the_end(mode) -> None:
    x, y = _problem()
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(
        16, kernel_initializer=keras.initializers.RandomNormal(0.0, 0.3, seed=0), kernel_regularizer=R.L1(1e-3))])
    # Momentum: the zeros' velocity at the freeze would move them if they were not re-imposed.
    opt = O.ProximalOptimizer(keras.optimizers.SGD(0.05, momentum=0.9), mode=mode)
    model.compile(optimizer=opt, loss="mse", jit_compile=BACKEND != "torch")
    ctrl = C.TargetSparsity(0.9, end_step=40, every=2, freeze_step=48)  # 4 steps an epoch: epoch 12's end
    seen = _Kernels()
    model.fit(x, y, batch_size=16, epochs=20, shuffle=False, verbose=0, callbacks=[ctrl, seen])
    wanted = round(0.9 * 32 * 16)
    at_freeze, end = seen.kernels[11], seen.kernels[-1]
    assert [h["frozen"] for h in ctrl.history] == [0.0] * 11 + [1.0] * 9
    assert int(np.sum(at_freeze == 0)) == wanted  # the exact count, made inside the train step
    assert int(np.sum(seen.kernels[10] == 0)) != wanted or mode == "forward_backward"
    np.testing.assert_array_equal(end == 0, at_freeze == 0)
    survivors = at_freeze != 0
    assert np.abs(end[survivors] - at_freeze[survivors]).max() > 1e-3  # they kept training
    assert ctrl.final["frozen_at"] == 48.0
    assert ctrl.final["after"] == wanted / (32 * 16)
    if mode == "latent":  # the controller's own landing, solved back or up to the count
        assert ctrl.final["before"] == pytest.approx(0.9, abs=0.05)
        assert ctrl.final["latent"] == 1.0
    else:  # forward–backward lags (75 %) and is cut up by magnitude
        assert 0.5 < ctrl.final["before"] <= ctrl.final["after"]
    assert ctrl.history[-1]["measured"] == wanted / (32 * 16)
    assert opt.support_frozen


@pytest.mark.parametrize("mode", ["latent", "forward_backward"])
def test_after_the_freeze_a_survivor_moves_by_the_plain_step(lasso, mode) -> None:
    x, y = lasso
    model = dense_model(R.L1(0.2))
    model.compile(optimizer=O.ProximalOptimizer(keras.optimizers.SGD(0.05), mode=mode), loss="mse")
    ctrl = C.TargetSparsity(0.5, end_step=4, every=1, freeze_step=6)
    seen = _Kernels()
    model.fit(x, y, batch_size=64, epochs=8, shuffle=False, verbose=0, callbacks=[ctrl, seen])  # a step an epoch
    w = seen.kernels[5]  # right after the freeze
    assert int(np.sum(w == 0)) == 6
    for step in (6, 7):
        expected = (w - 0.05 * mse_grad(x, y, w)) * (seen.kernels[5] != 0)  # SGD, no shrink by 0.05·0.2
        np.testing.assert_allclose(seen.kernels[step], expected, atol=1e-5)
        w = seen.kernels[step]


def test_track_holds_with_the_prox_to_the_end() -> None:
    x, y = _problem()
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(
        16, kernel_initializer=keras.initializers.RandomNormal(0.0, 0.3, seed=0), kernel_regularizer=R.L1(1e-3))])
    opt = O.ProximalOptimizer(keras.optimizers.SGD(0.05), mode="latent")
    model.compile(optimizer=opt, loss="mse")
    ctrl = C.TargetSparsity(0.9, end_step=20, every=2, hold="track")
    model.fit(x, y, batch_size=16, epochs=10, shuffle=False, verbose=0, callbacks=[ctrl])
    assert ctrl.freeze_step is None and not opt.support_frozen
    assert all(h["frozen"] == 0.0 for h in ctrl.history)
    assert ctrl.final["frozen_at"] == -1.0
    assert int(np.sum(_kernel(model) == 0)) == round(0.9 * 512)


def test_default_freeze_step_follows_the_torch_controller() -> None:
    def resolved(mode: str, batchnorm: bool = False) -> int:
        layers = [keras.Input((4,)), keras.layers.Dense(3, kernel_regularizer=R.L1(0.1))]
        if batchnorm:
            layers.append(keras.layers.BatchNormalization())
        model = keras.Sequential(layers)
        model.compile(optimizer=O.ProximalOptimizer(keras.optimizers.SGD(0.1), mode=mode), loss="mse")
        ctrl = C.TargetSparsity(0.5, end_step=100, start_step=20)
        ctrl.set_model(model)
        ctrl.on_train_begin()
        return ctrl.freeze_step

    assert resolved("latent") == 100 + 28  # 0.35 of the 80-step ramp
    assert resolved("forward_backward") == 100
    assert resolved("latent", batchnorm=True) == 100


def test_freeze_support_by_hand_then_release(lasso) -> None:
    x, y = lasso
    model = dense_model(R.L1(0.2))
    opt = O.ProximalOptimizer(keras.optimizers.SGD(0.05))
    model.compile(optimizer=opt, loss="mse")
    with pytest.raises(ValueError, match="Expected a built optimizer"):
        opt.freeze_support()
    model.fit(x, y, batch_size=64, epochs=40, shuffle=False, verbose=0)
    with pytest.raises(TypeError, match="Received: frozen=1"):
        opt.freeze_support(1)
    opt.freeze_support()
    w = _kernel(model)
    assert opt.support_frozen and 0 < int(np.sum(w == 0)) < 12
    model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(_kernel(model), (w - 0.05 * mse_grad(x, y, w)) * (w != 0), atol=1e-5)
    opt.freeze_support(False)
    assert not opt.support_frozen
    w = _kernel(model)
    model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    shrunk = w - 0.05 * mse_grad(x, y, w)
    np.testing.assert_allclose(_kernel(model), np.sign(shrunk) * np.maximum(np.abs(shrunk) - 0.01, 0), atol=1e-5)


def test_hold_and_freeze_step_errors() -> None:
    with pytest.raises(ValueError, match=r"Expected hold in \('freeze', 'track'\). Received: hold='keep'"):
        C.TargetSparsity(0.5, end_step=10, hold="keep")
    with pytest.raises(ValueError, match="freeze_step >= end_step=10.*Received: freeze_step=9"):
        C.TargetSparsity(0.5, end_step=10, freeze_step=9)
    with pytest.raises(ValueError, match="Received: freeze_step=12.5"):
        C.TargetSparsity(0.5, end_step=10, freeze_step=12.5)
    with pytest.raises(ValueError, match="only with hold='freeze'.*Received: hold='track', freeze_step=20"):
        C.TargetSparsity(0.5, end_step=10, hold="track", freeze_step=20)


def test_finalize_without_zero_making_variables_says_so(lasso) -> None:
    x, y = lasso
    model = dense_model(R.L2(0.1))
    model.compile(optimizer=O.ProximalOptimizer(keras.optimizers.SGD(0.05)), loss="mse")
    ctrl = C.TargetSparsity(0.5, end_step=2, finalize=False)
    model.fit(x, y, batch_size=64, epochs=3, shuffle=False, verbose=0, callbacks=[ctrl])
    with pytest.raises(ValueError, match="makes zeros.*Received: 0 such elements"):
        ctrl.finalize()


def test_a_frozen_support_is_saved_and_loaded(lasso, tmp_path) -> None:
    x, y = lasso
    model = dense_model(R.L1(0.2))
    model.compile(optimizer=O.ProximalOptimizer(keras.optimizers.SGD(0.05), mode="latent"), loss="mse")
    model.fit(x, y, batch_size=64, epochs=40, shuffle=False, verbose=0)
    model.optimizer.freeze_support()
    w = _kernel(model)
    assert 0 < int(np.sum(w == 0)) < 12
    model.save(tmp_path / "frozen.keras")
    loaded = keras.saving.load_model(tmp_path / "frozen.keras")
    assert loaded.optimizer.support_frozen
    loaded.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(_kernel(loaded), (w - 0.05 * mse_grad(x, y, w)) * (w != 0), atol=1e-5)
