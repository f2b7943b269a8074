"""The latent display: ``prox(z)`` or the relaxed display, against numpy from the recorded latent copy and ``v``."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from keras import ops
from keras_problems import BACKEND, soft

from sparsecraft.keras import _display, _freeze
from sparsecraft.keras import callbacks as C
from sparsecraft.keras import optimizers as O
from sparsecraft.keras import regularizers as R

_JIT = BACKEND != "torch"  # TF/JAX: the compiled train step (torch.compile takes minutes on CPU)
_LAM = 0.05
_INNER = {
    "adam": lambda: keras.optimizers.Adam(0.05, epsilon=1e-3),
    "amsgrad": lambda: keras.optimizers.AdamW(0.05, epsilon=1e-3, amsgrad=True, weight_decay=0.0),
    "adagrad": lambda: keras.optimizers.Adagrad(0.5, epsilon=1e-3),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01, epsilon=1e-3, centered=True),
    "sgd": lambda: keras.optimizers.SGD(0.05),
}


def _problem() -> tuple[np.ndarray, np.ndarray]:
    """12 features → 8 outputs, columns of very different scale (so ``v`` varies across coordinates)."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(64, 12)) * np.geomspace(0.1, 3.0, 12)).astype("float32")
    w = rng.normal(size=(12, 8)) * (rng.random((12, 8)) < 0.4)
    return x, (x @ w + 0.1 * rng.normal(size=(64, 8))).astype("float32")


def _model(inner: str, **kwargs) -> tuple[keras.Model, O.ProximalOptimizer]:
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8, use_bias=False, kernel_regularizer=R.L1(_LAM))])
    model.layers[0].kernel.assign(np.random.default_rng(2).normal(size=(12, 8)).astype("float32") * 0.3)
    opt = O.ProximalOptimizer(_INNER[inner](), mode="latent", **kwargs)
    model.compile(optimizer=opt, loss="mse", jit_compile=_JIT)
    return model, opt


def _np(v) -> np.ndarray:
    return ops.convert_to_numpy(v).astype(np.float64)


def _denominator(opt: O.ProximalOptimizer) -> np.ndarray:
    """The inner step's denominator, from the optimizer's recorded state (Keras's formulas)."""
    inner, eps = opt.inner_optimizer, opt.inner_optimizer.epsilon
    if isinstance(inner, keras.optimizers.Adam):
        return np.sqrt(_np(inner._velocity_hats[0] if inner.amsgrad else inner._velocities[0])) + eps
    if isinstance(inner, keras.optimizers.Adagrad):
        return np.sqrt(_np(inner._accumulators[0]) + eps)
    return np.sqrt(_np(inner._velocities[0]) - _np(inner._average_gradients[0]) ** 2 + eps)


def _largest(score: np.ndarray, count: int) -> np.ndarray:
    keep = np.zeros(score.size, bool)
    keep[np.argsort(-score.reshape(-1), kind="stable")[:count]] = True
    return keep.reshape(score.shape)


def _relaxed(z: np.ndarray, tau: float, score: np.ndarray) -> np.ndarray:
    """numpy's relaxed display: ``z`` unshrunk on the ``count(soft(z, τ) ≠ 0)`` largest scores."""
    return z * _largest(score, int(np.sum(soft(z, tau) != 0)))


def _latent(opt: O.ProximalOptimizer) -> tuple[np.ndarray, float]:
    return _np(opt._latents[0]), float(_np(opt._gammas[0]))


class _ScaleInUse(keras.callbacks.Callback):
    """The multiplier at the start of each step: the one its prox uses (the controller moves it after)."""

    def on_train_batch_begin(self, batch, logs=None):
        opt = self.model.optimizer  # TensorFlow builds it inside the first step: 0 until then
        self.log_scale = float(_np(opt._log_scale)) if opt.built else 0.0


def _steered_fit(model: keras.Model) -> float:
    """Fit under TargetSparsity (every step, no freeze); returns the last step's prox multiplier."""
    x, y = _problem()
    ctrl = C.TargetSparsity(0.6, end_step=10, every=1, hold="track", finalize=False)
    scale = _ScaleInUse()
    model.fit(x, y, batch_size=16, epochs=5, shuffle=False, verbose=0, callbacks=[ctrl, scale])
    return math.exp(scale.log_scale)


@pytest.mark.parametrize("inner", ["adam", "amsgrad", "adagrad", "rmsprop"])
def test_relaxed_display_matches_numpy_from_latent_and_v(inner) -> None:
    x, y = _problem()
    model, opt = _model(inner, relaxed=True)  # at a fixed strength: only when asked
    model.fit(x, y, batch_size=16, epochs=5, shuffle=False, verbose=0)
    z, gamma = _latent(opt)
    shown = _np(model.layers[0].kernel)
    score = np.abs(z) * np.sqrt(_denominator(opt))
    expected = _relaxed(z, gamma * _LAM, score)
    count = int(np.sum(expected != 0))
    assert 0 < count < z.size, count  # a real cut
    np.testing.assert_array_equal(shown != 0, expected != 0)
    np.testing.assert_allclose(shown, expected, rtol=1e-6, atol=0)  # unshrunk: the latent values
    assert np.sum(soft(z, gamma * _LAM) != 0) == count  # the prox's count
    by_magnitude = _relaxed(z, gamma * _LAM, np.abs(z))
    assert np.any((by_magnitude != 0) != (shown != 0)), "the v factor changed nothing here: a weak test"


def test_adam_under_target_sparsity_shows_relaxed_and_the_controller_counts_it() -> None:
    model, opt = _model("adam")  # relaxed=None: the default decides
    scale = _steered_fit(model)
    assert _display.is_relaxed(opt)
    z, gamma = _latent(opt)
    tau = gamma * _LAM * scale
    expected = _relaxed(z, tau, np.abs(z) * np.sqrt(_denominator(opt)))
    shown = _np(model.layers[0].kernel)
    np.testing.assert_array_equal(shown != 0, expected != 0)
    np.testing.assert_allclose(shown, expected, rtol=1e-6, atol=0)
    assert not np.allclose(shown, soft(z, tau))  # not the soft display
    measured = float(_np(opt._control_state["measured"]))
    assert measured == pytest.approx(np.mean(shown == 0))  # the count the model shows


def test_sgd_under_target_sparsity_keeps_the_soft_display() -> None:
    model, opt = _model("sgd")
    scale = _steered_fit(model)
    assert not _display.is_relaxed(opt)
    z, gamma = _latent(opt)
    tau = gamma * _LAM * scale
    shown = _np(model.layers[0].kernel)
    assert 0 < np.sum(shown != 0) < shown.size
    np.testing.assert_allclose(shown, soft(z, tau), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("relaxed", [None, False])
def test_freeze_selection_shows_what_the_optimizer_shows(relaxed) -> None:
    x, y = _problem()
    model, opt = _model("adam", relaxed=relaxed)
    ctrl = C.TargetSparsity(0.5, end_step=10, every=1, hold="track", finalize=False)
    model.fit(x, y, batch_size=16, epochs=5, shuffle=False, verbose=0, callbacks=[ctrl])
    z, gamma = _latent(opt)
    chosen = _freeze.select(opt, 0.7)  # more zeros than now: the multiplier is solved on the latent copy
    value = _np(chosen["values"][0])
    assert float(_np(chosen["latent"])) == 1.0
    assert int(np.sum(value == 0)) == round(0.7 * value.size)
    # The solved multiplier puts one coordinate on the threshold: which side float32 puts it
    # is not numpy's to say, so the count comes from the selection (checked above).
    count = int(np.sum(value != 0))
    if relaxed is None:  # Adam under the controller: the relaxed display, unshrunk
        expected = z * _largest(np.abs(z) * np.sqrt(_denominator(opt)), count)
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=0)
    else:  # the soft display at the solved multiplier
        tau = gamma * _LAM * math.exp(float(_np(chosen["log_scale"])))
        expected = soft(z, tau) * _largest(np.abs(z), count)
        np.testing.assert_array_equal(value != 0, expected != 0)
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


def test_default_follows_the_torch_library() -> None:
    def resolved(inner: str, mode: str = "latent", layers: tuple = (), steered: bool = True, **kwargs) -> bool:
        model = keras.Sequential([keras.Input((4,), dtype="int32" if layers else "float32"), *layers,
                                  keras.layers.Dense(3, kernel_regularizer=R.L1(0.1))])
        opt = O.ProximalOptimizer(_INNER[inner](), mode=mode, **kwargs)
        model.compile(optimizer=opt, loss="mse")
        if steered:
            ctrl = C.TargetSparsity(0.5, end_step=100)
            ctrl.set_model(model)
            ctrl.on_train_begin()
        return _display.is_relaxed(opt)

    for inner in ("adam", "amsgrad", "adagrad", "rmsprop"):
        assert resolved(inner)
    assert not resolved("adam", steered=False)  # a fixed strength: the prox
    assert resolved("adam", steered=False, relaxed=True)
    assert not resolved("adam", relaxed=False)
    assert not resolved("adam", mode="forward_backward")
    assert not resolved("adam", mode="forward_backward", relaxed=True)  # latent mode only, as in torch
    assert not resolved("sgd")
    embedding = keras.layers.Embedding(10, 2)
    assert resolved("sgd", layers=(embedding, keras.layers.Flatten()))  # a sequence model
    assert not resolved("sgd", layers=(keras.layers.Embedding(10, 2), keras.layers.Flatten(),
                                       keras.layers.BatchNormalization()))


def test_relaxed_must_be_a_bool_or_none_and_round_trips() -> None:
    for bad in ("yes", 1, 0.0):
        with pytest.raises(TypeError, match=r"Expected relaxed to be a bool or None. Received: relaxed="):
            O.ProximalOptimizer(keras.optimizers.Adam(), mode="latent", relaxed=bad)
    for relaxed in (None, True, False):
        opt = O.ProximalOptimizer(keras.optimizers.Adam(), mode="latent", relaxed=relaxed)
        assert O.ProximalOptimizer.from_config(opt.get_config()).relaxed is relaxed


def test_rank_cut_keeps_exactly_count_largest_with_ties_in_index_order() -> None:
    rng = np.random.default_rng(3)
    score = rng.random((40, 30)).astype("float32")
    score[:4] = 0.0  # never-updated coordinates
    score[10, :6] = score[10, 7]  # a tie of 7 equal scores
    flat = score.reshape(-1)
    for count in (0, 1, 500, int(np.sum(flat > score[10, 7])) + 3, flat.size - 100, flat.size):
        keep = ops.convert_to_numpy(_display._top(ops.convert_to_tensor(score), ops.convert_to_tensor(count)))
        expected = _largest(score, count)  # numpy: a stable sort, ties in index order
        np.testing.assert_array_equal(keep, expected, err_msg=f"count={count}")
