"""ProximalOptimizer inside fit(): prox steps against numpy references, zeros, saving, mixed precision."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops
from keras_problems import BACKEND, batches, dense_model, mse_grad, soft

from sparsecraft.keras import optimizers as O
from sparsecraft.keras import regularizers as R


def _kernel(model) -> np.ndarray:
    return ops.convert_to_numpy(model.layers[-1].kernel).astype(np.float64)


@pytest.mark.parametrize("loss_scale", [False, True], ids=["plain", "inside_loss_scale_optimizer"])
def test_sgd_with_schedule_matches_numpy_forward_backward(lasso, loss_scale) -> None:
    x, y = lasso
    lr = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=20, decay_rate=0.5)
    model = dense_model(R.L1(0.2))
    opt = O.ProximalOptimizer(keras.optimizers.SGD(lr, momentum=0.5))
    if loss_scale:  # float32 scaling by powers of 2 is exact: the same weights are expected
        opt = keras.optimizers.LossScaleOptimizer(opt)
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=16, epochs=10, shuffle=False, verbose=0)

    w, vel = np.full((12, 1), 0.5), np.zeros((12, 1))
    for step, (xb, yb) in enumerate(batches(x, y, 16, 10)):
        a = 0.1 * 0.5 ** (step / 20)  # the lr of this step, read before the update
        vel = 0.5 * vel - a * mse_grad(xb, yb, w)  # Keras SGD momentum
        w = soft(w + vel, a * 0.2)
    got = _kernel(model)
    assert 3 <= np.sum(w == 0) < 12
    np.testing.assert_array_equal(got == 0, w == 0)
    np.testing.assert_allclose(got, w, atol=1e-5)
    assert model.losses == []  # the prox applies the term: it left the loss


def test_adam_matches_numpy_per_coordinate_step_with_floor(lasso) -> None:
    x, y = lasso
    model = dense_model(R.L1(0.2))
    model.compile(optimizer=O.ProximalOptimizer(keras.optimizers.Adam(0.05)), loss="mse")
    model.fit(x, y, batch_size=32, epochs=20, shuffle=False, verbose=0)

    b1, b2, eps, floor = 0.9, 0.999, 1e-7, 0.1
    w, m, v, ref = np.full((12, 1), 0.5), np.zeros((12, 1)), np.zeros((12, 1)), 0.0
    for step, (xb, yb) in enumerate(batches(x, y, 32, 20)):
        t = step + 1
        g = mse_grad(xb, yb, w)
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        w = w - m * (0.05 * np.sqrt(1 - b2**t) / (1 - b1**t)) / (np.sqrt(v) + eps)
        ref = max(ref, np.sqrt(v).mean())
        w = soft(w, 0.2 * 0.05 * np.sqrt(1 - b2**t) / (np.maximum(np.sqrt(v), floor * ref) + eps))
    got = _kernel(model)
    assert 3 <= np.sum(w == 0) < 12
    np.testing.assert_array_equal(got == 0, w == 0)
    np.testing.assert_allclose(got, w, atol=1e-5)


def test_latent_mode_matches_numpy_dual_averaging(lasso) -> None:
    x, y = lasso
    model = dense_model(R.L1(0.3))
    model.compile(optimizer=O.ProximalOptimizer(keras.optimizers.SGD(0.05), mode="latent"), loss="mse")
    model.fit(x, y, batch_size=32, epochs=10, shuffle=False, verbose=0)

    z, w, gamma = np.full((12, 1), 0.5), np.full((12, 1), 0.5), 0.0
    for xb, yb in batches(x, y, 32, 10):
        z = z - 0.05 * mse_grad(xb, yb, w)  # the gradient at the shown weights, applied to the latent
        gamma += 0.05
        w = soft(z, gamma * 0.3)
    got = _kernel(model)
    assert 3 <= np.sum(w == 0) < 12
    np.testing.assert_array_equal(got == 0, w == 0)
    np.testing.assert_allclose(got, w, atol=1e-5)


@pytest.mark.skipif(BACKEND == "torch", reason="jit_compile on torch is torch.compile (minutes on CPU)")
def test_jit_compile_gives_the_same_weights(lasso) -> None:
    x, y = lasso
    out = []
    for jit in (False, True):
        model = dense_model(R.L1L2(0.2, 0.01))
        model.compile(optimizer=O.ProximalOptimizer(keras.optimizers.Adam(0.05)), loss="mse", jit_compile=jit)
        model.fit(x, y, batch_size=32, epochs=5, shuffle=False, verbose=0)
        out.append(_kernel(model))
    assert np.sum(out[1] == 0) > 0
    np.testing.assert_array_equal(out[0] == 0, out[1] == 0)
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)


def test_exact_zeros_through_fit_where_plain_l1_gives_none(lasso) -> None:
    x, y = lasso
    plain = dense_model(keras.regularizers.L1(0.2))
    plain.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    plain.fit(x, y, batch_size=16, epochs=10, shuffle=False, verbose=0)
    prox = dense_model(keras.regularizers.L1(0.2))  # Keras's own L1, applied by its prox
    prox.compile(optimizer=O.ProximalOptimizer(keras.optimizers.SGD(0.05)), loss="mse")
    prox.fit(x, y, batch_size=16, epochs=10, shuffle=False, verbose=0)
    assert np.sum(_kernel(plain) == 0) == 0
    assert np.sum(_kernel(prox) == 0) >= 3


def test_activity_and_value_only_terms_stay_in_the_loss(lasso) -> None:
    x, _ = lasso
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(
        4, kernel_initializer="ones", kernel_regularizer=R.OrthogonalRegularizer(0.1),
        bias_regularizer=R.L1(0.1), activity_regularizer=R.L1(0.01))])
    opt = O.ProximalOptimizer(keras.optimizers.SGD(0.01))
    opt.build(model.trainable_variables)
    layer = model.layers[-1]
    assert [v.path for v in opt.prox_variables] == [layer.bias.path]
    assert layer.kernel.regularizer is not None and layer.bias.regularizer is None
    model(x[:2])
    assert len(model.losses) == 2  # orthogonal kernel term + activity term
    opt.release()
    assert layer.bias.regularizer == R.L1(0.1)
    model(x[:2])
    assert len(model.losses) == 3  # the bias term is back in the loss


def test_save_and_load_round_trip_continues_identically(lasso, tmp_path) -> None:
    x, y = lasso
    model = dense_model(R.L1(0.1))
    model.compile(optimizer=O.ProximalOptimizer(keras.optimizers.Adam(0.05), mode="latent"), loss="mse")
    model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    opt = loaded.optimizer
    assert isinstance(opt, O.ProximalOptimizer) and opt.mode == "latent"
    assert isinstance(opt.inner_optimizer, keras.optimizers.Adam)
    assert [v.path for v in opt.prox_variables] == [loaded.layers[-1].kernel.path]
    for a, b in zip(model.optimizer.variables, opt.variables, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    for m in (model, loaded):
        m.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    assert np.sum(_kernel(loaded) == 0) > 0
    np.testing.assert_allclose(_kernel(loaded), _kernel(model), atol=1e-6)


def test_mixed_precision_under_loss_scale_optimizer(lasso) -> None:
    x, y = lasso
    keras.config.set_dtype_policy("mixed_float16")
    model = dense_model(R.L1(0.2))
    model.compile(optimizer=O.ProximalOptimizer(keras.optimizers.SGD(0.05)), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = model.fit(x, y, batch_size=16, epochs=10, shuffle=False, verbose=0)
    kernel = _kernel(model)
    assert model.layers[-1].kernel.dtype == "float32"
    assert np.isfinite(history.history["loss"]).all()
    assert np.sum(kernel == 0) >= 3
    assert np.abs(kernel[:3]).min() > 0.3  # the informative weights survive


def test_constructor_errors() -> None:
    with pytest.raises(TypeError, match="keras.optimizers.Optimizer"):
        O.ProximalOptimizer("sgd")
    inner = keras.optimizers.SGD()
    with pytest.raises(ValueError, match="Received: mode='lazy'"):
        O.ProximalOptimizer(inner, mode="lazy")
    with pytest.raises(ValueError, match="floor"):
        O.ProximalOptimizer(inner, floor=2.0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        O.ProximalOptimizer(keras.optimizers.SGD(gradient_accumulation_steps=4))
    with pytest.raises(TypeError, match="wrap only once"):
        O.ProximalOptimizer(O.ProximalOptimizer(inner))
