"""The fine-tuning after the freeze: TargetSparsity's ``average`` and ``fine_tune_scale`` (numpy references)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from keras import ops
from keras_problems import BACKEND, dense_model, mse_grad

from sparsecraft.keras import callbacks as C
from sparsecraft.keras import optimizers as O
from sparsecraft.keras import regularizers as R

_JIT = BACKEND != "torch"  # TF/JAX: the compiled train step (the flag read in the graph)


def _biased_model() -> keras.Model:
    """``x @ W + b`` (12 → 1): the bias has no prox, and is averaged too."""
    return keras.Sequential([keras.Input((12,)), keras.layers.Dense(
        1, kernel_initializer=keras.initializers.Constant(0.5), kernel_regularizer=R.L1(0.2))])


def _weights(model) -> list[np.ndarray]:
    return [ops.convert_to_numpy(v).astype(np.float64) for v in model.trainable_variables]


class _Weights(keras.callbacks.Callback):
    """Every trainable variable at every epoch end (one step an epoch: each iterate)."""

    def __init__(self):
        super().__init__()
        self.seen: list[list[np.ndarray]] = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(_weights(self.model))


def _fit(model, lasso, ctrl, epochs: int) -> _Weights:
    seen = _Weights()
    x, y = lasso
    model.fit(x, y, batch_size=64, epochs=epochs, shuffle=False, verbose=0, callbacks=[ctrl, seen])
    return seen


@pytest.mark.parametrize("mode", ["latent", "forward_backward"])
def test_finalize_writes_the_k_weighted_mean_of_the_iterates_after_the_freeze(lasso, mode) -> None:
    model = _biased_model()
    opt = O.ProximalOptimizer(keras.optimizers.SGD(0.05, momentum=0.5), mode=mode)
    model.compile(optimizer=opt, loss="mse", jit_compile=_JIT)
    ctrl = C.TargetSparsity(0.5, end_step=4, every=1, freeze_step=6, average=True)
    seen = _fit(model, lasso, ctrl, epochs=14).seen  # the freeze in the 6th step: seen[5]
    iterates = seen[6:]  # the k-th after the freeze weighs k (the freeze's own: 0)
    k = np.arange(1, len(iterates) + 1, dtype=np.float64)
    for i, written in enumerate(_weights(model)):
        expected = sum(kk * it[i] for kk, it in zip(k, iterates, strict=True)) / k.sum()
        np.testing.assert_allclose(written, expected, rtol=1e-5, atol=1e-6)
        assert np.abs(written - iterates[-1][i]).max() > 1e-4  # not the last iterate
    zeros = seen[5][0] == 0
    assert int(zeros.sum()) == 6
    assert np.all(_weights(model)[0][zeros] == 0.0)  # exactly: zero in every iterate
    assert ctrl.final["averaged"] == len(iterates) + 1
    assert ctrl.final["after"] == 0.5


def test_without_average_the_last_iterate_stays(lasso) -> None:
    model = _biased_model()
    opt = O.ProximalOptimizer(keras.optimizers.SGD(0.05), mode="latent")
    model.compile(optimizer=opt, loss="mse", jit_compile=_JIT)
    ctrl = C.TargetSparsity(0.5, end_step=4, every=1, freeze_step=6, average=False)
    seen = _fit(model, lasso, ctrl, epochs=10).seen
    for written, last in zip(_weights(model), seen[-1], strict=True):
        np.testing.assert_array_equal(written, last)
    assert ctrl.final["averaged"] == 0.0
    assert opt._averages is None  # no copy of the weights where it is off


@pytest.mark.parametrize("mode", ["latent", "forward_backward"])
def test_after_the_freeze_sgd_steps_with_lr_times_fine_tune_scale(lasso, mode) -> None:
    x, y = lasso
    model = dense_model(R.L1(0.2))
    opt = O.ProximalOptimizer(keras.optimizers.SGD(0.05), mode=mode)
    model.compile(optimizer=opt, loss="mse", jit_compile=_JIT)
    ctrl = C.TargetSparsity(0.5, end_step=4, every=1, freeze_step=6, average=False, fine_tune_scale=3.0)
    seen = _fit(model, lasso, ctrl, epochs=8).seen
    w = seen[5][0]  # the freeze's step itself ran at the user's rate
    for step in (6, 7):
        expected = (w - 3.0 * 0.05 * mse_grad(x, y, w)) * (seen[5][0] != 0)
        np.testing.assert_allclose(seen[step][0], expected, atol=1e-5)
        w = seen[step][0]
    assert float(ops.convert_to_numpy(opt.inner_optimizer.learning_rate)) == pytest.approx(0.05)  # untouched


class _AdamState(keras.callbacks.Callback):
    """The kernel and the inner Adam's moments at every epoch end."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def on_epoch_end(self, epoch, logs=None):
        inner = self.model.optimizer.inner_optimizer
        read = lambda v: ops.convert_to_numpy(v).astype(np.float64)  # noqa: E731
        self.seen.append((read(self.model.layers[-1].kernel), read(inner._momentums[0]), read(inner._velocities[0])))


def test_after_the_freeze_adam_steps_with_lr_times_the_default_scale(lasso) -> None:
    x, y = lasso
    model = dense_model(R.L1(0.2))
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-7
    opt = O.ProximalOptimizer(keras.optimizers.Adam(lr, beta_1=b1, beta_2=b2, epsilon=eps), mode="latent")
    model.compile(optimizer=opt, loss="mse", jit_compile=_JIT)
    ctrl = C.TargetSparsity(0.5, end_step=4, every=1, freeze_step=6, average=False)  # scale by default
    state = _AdamState()
    model.fit(x, y, batch_size=64, epochs=9, shuffle=False, verbose=0, callbacks=[ctrl, state])
    assert ctrl.fine_tune_scale == pytest.approx(1 / math.sqrt(0.5))
    mask = state.seen[5][0] != 0
    for t in (7, 8, 9):  # optimizer steps after the freeze (the 6th)
        w, m, v = state.seen[t - 2]
        g = mse_grad(x, y, w) * mask  # the zeros' gradients are masked
        m, v = m + (g - m) * (1 - b1), v + (g * g - v) * (1 - b2)
        alpha = lr * math.sqrt(2.0) * math.sqrt(1 - b2**t) / (1 - b1**t)
        expected = (w - alpha * m / (np.sqrt(v) + eps)) * mask
        np.testing.assert_allclose(state.seen[t - 1][0], expected, rtol=1e-4, atol=1e-6)


def test_freeze_support_by_hand_scales_the_rate_until_released(lasso) -> None:
    x, y = lasso
    model = dense_model(R.L1(0.2))
    opt = O.ProximalOptimizer(keras.optimizers.SGD(0.05))
    model.compile(optimizer=opt, loss="mse", jit_compile=_JIT)
    model.fit(x, y, batch_size=64, epochs=40, shuffle=False, verbose=0)
    with pytest.raises(ValueError, match=r"Expected lr_scale as a finite number > 0.*Received: lr_scale=0"):
        opt.freeze_support(lr_scale=0)
    with pytest.raises(ValueError, match="Received: lr_scale=2.0, frozen=False"):
        opt.freeze_support(False, lr_scale=2.0)
    opt.freeze_support(lr_scale=2.0)
    w = _weights(model)[0]
    model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(_weights(model)[0], (w - 2.0 * 0.05 * mse_grad(x, y, w)) * (w != 0), atol=1e-5)
    opt.freeze_support(False)
    assert float(ops.convert_to_numpy(opt._lr_scale)) == 1.0


def test_defaults_follow_the_torch_controller() -> None:
    def resolved(inner, mode: str = "latent", batchnorm: bool = False, **kwargs) -> tuple:
        layers = [keras.Input((4,)), keras.layers.Dense(3, kernel_regularizer=R.L1(0.1))]
        if batchnorm:
            layers.append(keras.layers.BatchNormalization())
        model = keras.Sequential(layers)
        model.compile(optimizer=O.ProximalOptimizer(inner, mode=mode), loss="mse")
        ctrl = C.TargetSparsity(0.99, end_step=100, **kwargs)
        ctrl.set_model(model)
        ctrl.on_train_begin()
        return ctrl.average, ctrl.fine_tune_scale

    ten = pytest.approx(10.0)  # 1/sqrt(1 − 0.99)
    assert resolved(keras.optimizers.SGD(0.1)) == (True, 1.0)
    assert resolved(keras.optimizers.Adam(1e-3)) == (True, ten)
    assert resolved(keras.optimizers.AdamW(1e-3)) == (True, ten)
    assert resolved(keras.optimizers.RMSprop(1e-3)) == (True, ten)
    assert resolved(keras.optimizers.Adagrad(1e-3)) == (True, ten)
    assert resolved(keras.optimizers.Adam(1e-3), mode="forward_backward") == (False, 1.0)
    assert resolved(keras.optimizers.Adam(1e-3), batchnorm=True) == (False, 1.0)
    assert resolved(keras.optimizers.Adam(1e-3), hold="track") == (False, 1.0)
    assert resolved(keras.optimizers.Adam(1e-3), average=False, fine_tune_scale=2) == (False, 2.0)
    assert resolved(keras.optimizers.SGD(0.1), mode="forward_backward", average=True) == (True, 1.0)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "2"])
def test_fine_tune_scale_must_be_a_finite_number_above_zero(bad) -> None:
    with pytest.raises(ValueError, match=r"Expected fine_tune_scale as a finite number > 0 or None\. Received"):
        C.TargetSparsity(0.5, end_step=10, fine_tune_scale=bad)


def test_average_and_scale_errors() -> None:
    with pytest.raises(ValueError, match="Expected average to be a bool or None. Received: average='yes'"):
        C.TargetSparsity(0.5, end_step=10, average="yes")
    with pytest.raises(ValueError, match="hold='freeze' for average=True.*Received: hold='track'"):
        C.TargetSparsity(0.5, end_step=10, hold="track", average=True)
    with pytest.raises(ValueError, match="hold='freeze' for fine_tune_scale=2.*Received: hold='track'"):
        C.TargetSparsity(0.5, end_step=10, hold="track", fine_tune_scale=2)
    C.TargetSparsity(0.5, end_step=10, hold="track", average=False, fine_tune_scale=1.0)  # the "off" values


def test_the_average_is_saved_and_loaded(lasso, tmp_path) -> None:
    model = _biased_model()
    opt = O.ProximalOptimizer(keras.optimizers.SGD(0.05), mode="latent")
    model.compile(optimizer=opt, loss="mse")
    ctrl = C.TargetSparsity(0.5, end_step=4, every=1, freeze_step=6, average=True, finalize=False)
    _fit(model, lasso, ctrl, epochs=9)
    averages = [ops.convert_to_numpy(a) for a in opt._averages]
    model.save(tmp_path / "averaged.keras")
    loaded = keras.saving.load_model(tmp_path / "averaged.keras")
    assert float(ops.convert_to_numpy(loaded.optimizer._average_count)) == 4.0  # the freeze's iterate and 3
    for a, b in zip(averages, loaded.optimizer._averages, strict=True):
        np.testing.assert_array_equal(a, ops.convert_to_numpy(b))
