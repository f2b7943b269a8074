"""sparsecraft's regularization losses against real Keras 3 (torch backend).

Each case builds a Keras layer with a kernel, bias or activity regularizer,
copies its weights into the equivalent torch module, runs the same input
through both and compares Keras's ``sum(layer.losses)`` with
``sc.regularize(module, ...).loss()``. Everything runs in float64 so that the
comparison is tight. Two things keep it from being exact, hence a relative
tolerance of 1e-6: Keras stores its strengths as float32 tensors (0.1 becomes
0.10000000149), and on the torch backend Keras promotes float64 with float64 to
float32 in binary ops such as ``matmul`` (``BIT64_TO_BIT32_DTYPE`` in
``keras/src/backend/common/dtypes.py``, to match JAX's default), so its Dense and
Conv2D outputs and its Orthogonal Gram matrix are float32-accurate. Weights and
inputs are therefore small dyadic rationals (k/8, k/4): every product and sum in
the layers is exact in float32, both libraries produce bit-identical outputs, and
the comparison measures the regularizers, not matmul rounding.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "torch"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import sparsecraft as sc  # noqa: E402

keras = pytest.importorskip("keras")

if keras.backend.backend() != "torch":  # keras was imported earlier with another backend
    pytest.skip("these tests need Keras on the torch backend", allow_module_level=True)

RTOL = 1e-6
ATOL = 1e-12


def _close(a: float, b: float, rtol: float = RTOL) -> None:
    assert abs(a - b) <= ATOL + rtol * abs(b), f"sparsecraft {a!r} != keras {b!r}"


def _keras_loss(layer) -> float:
    losses = layer.losses
    assert losses, "the Keras layer recorded no loss: the case tests nothing"
    return float(sum(float(v.detach().cpu()) for v in losses))


# --- the pairs of penalties ------------------------------------------------------------------
# (keras regularizer, sparsecraft penalty) for a place whose torch tensor has the same layout
# as Keras's: biases and activities of Dense on 2-D inputs.
PENALTIES = {
    "l1": lambda: (keras.regularizers.L1(0.1), sc.L1(0.1)),
    "l2": lambda: (keras.regularizers.L2(0.03), sc.L2(0.03)),
    "l1l2": lambda: (keras.regularizers.L1L2(l1=0.02, l2=0.05), sc.L1L2(l1=0.02, l2=0.05)),
    "orthogonal_rows": lambda: (
        keras.regularizers.OrthogonalRegularizer(factor=0.3, mode="rows"),
        sc.Orthogonal(factor=0.3, mode="rows"),
    ),
    "orthogonal_columns": lambda: (
        keras.regularizers.OrthogonalRegularizer(factor=0.3, mode="columns"),
        sc.Orthogonal(factor=0.3, mode="columns"),
    ),
}

# A Dense kernel is (in, out) and nn.Linear.weight is (out, in): Keras's rows are torch's
# columns. Elementwise penalties do not care.
_SWAP = {"rows": "columns", "columns": "rows"}


def _for_transposed(pen: sc.Penalty) -> sc.Penalty:
    if isinstance(pen, sc.Orthogonal):
        return sc.Orthogonal(factor=pen.factor, mode=_SWAP[pen.mode])
    return pen


# --- the layers ------------------------------------------------------------------------------
def _dyadic(rng: np.random.Generator, shape: tuple[int, ...], denominator: int) -> np.ndarray:
    """Values k/denominator, |k| <= 8: exact in float32, and so are their small dot products."""
    return rng.integers(-8, 9, size=shape).astype(np.float64) / denominator


def _dense(kreg: dict, input_shape: tuple[int, ...], rng: np.random.Generator):
    features, units = input_shape[-1], 5
    layer = keras.layers.Dense(units, dtype="float64", **kreg)
    layer.build(input_shape)
    kernel = _dyadic(rng, (features, units), 8)
    bias = _dyadic(rng, (units,), 8)  # non-zero, or a bias term would compare 0 with 0
    layer.set_weights([kernel, bias])
    module = nn.Linear(features, units).double()
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(kernel.T))
        module.bias.copy_(torch.from_numpy(bias))
    x = _dyadic(rng, input_shape, 4)
    return layer, module, x, torch.from_numpy(x)


def _conv(kreg: dict, input_shape: tuple[int, ...], rng: np.random.Generator):
    n, c, h, w = input_shape
    out_ch, k = 4, 3
    layer = keras.layers.Conv2D(out_ch, k, dtype="float64", **kreg)  # channels_last, "valid"
    layer.build((n, h, w, c))
    kernel = _dyadic(rng, (k, k, c, out_ch), 8)
    bias = _dyadic(rng, (out_ch,), 8)
    layer.set_weights([kernel, bias])
    module = nn.Conv2d(c, out_ch, k).double()
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(kernel).permute(3, 2, 0, 1))
        module.bias.copy_(torch.from_numpy(bias))
    x_torch = torch.from_numpy(_dyadic(rng, input_shape, 4))
    return layer, module, x_torch.permute(0, 2, 3, 1).numpy(), x_torch


LAYERS = {
    "dense2d": (_dense, (6, 4)),
    "dense3d": (_dense, (3, 5, 4)),  # (N, T, F): both apply to the last dim, batch = N
    "conv2d": (_conv, (2, 3, 7, 6)),  # torch (N, C, H, W); Keras gets (N, H, W, C)
}
PLACES = {"kernel": "weight", "bias": "bias", "activity": "activity"}


def _build(layer_name: str, place: str, kpen, spen, seed: int = 0):
    make, shape = LAYERS[layer_name]
    layer, module, xk, xt = make({f"{place}_regularizer": kpen}, shape, np.random.default_rng(seed))
    if place == "kernel":
        spen = _for_transposed(spen)
    reg = sc.regularize(module, **{PLACES[place]: spen})
    return layer, module, reg, xk, xt


def _rank_of(layer_name: str, place: str) -> int:
    if place == "bias":
        return 1
    if place == "kernel":
        return 4 if layer_name == "conv2d" else 2
    return {"dense2d": 2, "dense3d": 3, "conv2d": 4}[layer_name]


CASES = [
    pytest.param(layer_name, place, pen, id=f"{layer_name}-{place}-{pen}")
    for layer_name in LAYERS
    for place in PLACES
    for pen in PENALTIES
]


@pytest.mark.parametrize(("layer_name", "place", "pen"), CASES)
def test_loss_matches_keras(layer_name: str, place: str, pen: str) -> None:
    kpen, spen = PENALTIES[pen]()
    layer, module, reg, xk, xt = _build(layer_name, place, kpen, spen)

    if pen.startswith("orthogonal") and _rank_of(layer_name, place) != 2:
        # OrthogonalRegularizer is defined on rank-2 tensors only: a bias (rank 1), a conv
        # kernel (rank 4), a (N, T, out) or conv activity has no rows to decorrelate. Both
        # libraries must refuse rather than invent a meaning.
        with pytest.raises(ValueError, match="rank"):
            layer(xk)
            layer.losses  # noqa: B018 - weight regularizers run when losses are read
        with pytest.raises(ValueError, match="rank"):
            module(xt)
            reg.loss()
        return

    yk = layer(xk)
    yt = module(xt)
    # The weights were copied right, or the activity comparison would be meaningless; with
    # dyadic data the outputs agree exactly.
    yk_t = yk.detach().cpu()
    if layer_name == "conv2d":
        yk_t = yk_t.permute(0, 3, 1, 2)
    torch.testing.assert_close(yt.detach(), yk_t, rtol=0, atol=0)

    expected = _keras_loss(layer)
    got = reg.loss()
    assert got.dtype == torch.float64
    _close(float(got.detach()), expected)
    _close(float(reg.value()), expected, rtol=1e-5)  # value() reports in float32
    if place == "activity":
        # The activity term is divided by the batch size (Keras >= 3.14): with "sum" it is not.
        batch = xt.shape[0]
        raw = sc.regularize(module, activity=spen, reduction="sum")
        module(xt)
        _close(float(raw.loss().detach()), expected * batch)


@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_all_places_at_once_match_keras(layer_name: str) -> None:
    """Kernel, bias and activity together: Keras's total over layer.losses."""
    make, shape = LAYERS[layer_name]
    kregs = {
        "kernel_regularizer": keras.regularizers.L1(0.1),
        "bias_regularizer": keras.regularizers.L2(0.2),
        "activity_regularizer": keras.regularizers.L1L2(l1=0.01, l2=0.02),
    }
    layer, module, xk, xt = make(kregs, shape, np.random.default_rng(1))
    reg = sc.regularize(module, weight=sc.L1(0.1), bias=sc.L2(0.2), activity=sc.L1L2(0.01, 0.02))
    layer(xk)
    module(xt)
    assert len(layer.losses) == 3
    _close(float(reg.loss().detach()), _keras_loss(layer))


def test_float32_matches_keras_within_relative_1e6() -> None:
    """The everyday dtype: float32 on both sides, same data, relative 1e-6."""
    rng = np.random.default_rng(2)
    kernel = rng.standard_normal((8, 6)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    x = rng.standard_normal((16, 8)).astype(np.float32)  # both run the same float32 torch.matmul
    layer = keras.layers.Dense(
        6,
        kernel_regularizer=keras.regularizers.L1(0.1),
        bias_regularizer=keras.regularizers.L2(0.01),
        activity_regularizer=keras.regularizers.L1(0.05),
    )
    layer.build((16, 8))
    layer.set_weights([kernel, bias])
    module = nn.Linear(8, 6)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(kernel.T))
        module.bias.copy_(torch.from_numpy(bias))
    reg = sc.regularize(module, weight=sc.L1(0.1), bias=sc.L2(0.01), activity=sc.L1(0.05))
    layer(x)
    module(torch.from_numpy(x))
    got = reg.loss()
    assert got.dtype == torch.float32
    _close(float(got.detach()), _keras_loss(layer), rtol=1e-6)


# --- the reference case of DESIGN.md ----------------------------------------------------------
def test_reference_case_tensor() -> None:
    d1 = torch.ones(2, 2, 4) * 3
    got = sc.L1(0.1)(d1)
    expected = float(keras.regularizers.L1(0.1)(d1.numpy()))
    assert float(got) == pytest.approx(4.8, rel=1e-6)
    assert expected == pytest.approx(4.8, rel=1e-6)
    _close(float(got.detach()), expected)


@pytest.mark.parametrize("place", ["kernel", "activity"])
def test_reference_case_layer(place: str) -> None:
    """``regularize(nn.Linear(4, 3), weight|activity=L1(0.1))`` on d1, batch 2."""
    d1 = torch.ones(2, 2, 4) * 3
    module = nn.Linear(4, 3)
    layer = keras.layers.Dense(3, **{f"{place}_regularizer": keras.regularizers.L1(0.1)})
    layer.build((2, 2, 4))
    layer.set_weights([module.weight.detach().T.numpy(), module.bias.detach().numpy()])
    reg = sc.regularize(module, **{PLACES[place]: sc.L1(0.1)})
    layer(d1.numpy())
    out = module(d1)
    if place == "kernel":
        by_hand = 0.1 * module.weight.abs().sum()
    else:
        by_hand = 0.1 * out.abs().sum() / 2  # divided by the batch size, 2
    got = float(reg.loss().detach())
    _close(got, float(by_hand.detach()))
    _close(got, _keras_loss(layer))


def test_empty_batch_gives_zero_like_keras() -> None:
    """An empty batch: 0, never 0/0 = NaN (tf.keras divide_no_nan, Keras >= 3.14)."""
    module = nn.Linear(4, 3).double()
    layer = keras.layers.Dense(3, dtype="float64", activity_regularizer=keras.regularizers.L1(0.1))
    layer.build((0, 4))
    reg = sc.regularize(module, activity=sc.L1(0.1))
    layer(np.zeros((0, 4)))
    module(torch.zeros(0, 4, dtype=torch.float64))
    got = reg.loss()
    assert float(got.detach()) == 0.0 and not torch.isnan(got)
    assert _keras_loss(layer) == 0.0
