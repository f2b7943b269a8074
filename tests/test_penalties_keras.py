"""The torch side for Keras users: penalties.get reads Keras's serialized regularizers."""

from __future__ import annotations

import os

import pytest
import torch

import sparsecraft as sc
from sparsecraft import penalties

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")


def _value(reg, x: torch.Tensor) -> float:
    return float(keras.ops.convert_to_numpy(reg(keras.ops.convert_to_tensor(x.numpy()))))


KERAS_REGS = [
    lambda: keras.regularizers.L1(0.3),
    lambda: keras.regularizers.L2(0.2),
    lambda: keras.regularizers.L1L2(0.1, 0.05),
    lambda: keras.regularizers.OrthogonalRegularizer(0.4, "columns"),
    lambda: keras.regularizers.OrthogonalRegularizer(0.4, "rows"),
]


@pytest.mark.parametrize("make", KERAS_REGS, ids=["l1", "l2", "l1l2", "orth_cols", "orth_rows"])
def test_get_reads_keras_serialize_and_gives_keras_values(make) -> None:
    reg = make()
    pen = penalties.get(keras.regularizers.serialize(reg))
    x = torch.randn(5, 4, dtype=torch.float64)
    assert float(pen(x)) == pytest.approx(_value(reg, x), rel=1e-7)


def test_get_reads_the_regularizer_entries_of_model_get_config() -> None:
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, kernel_regularizer=keras.regularizers.L1L2(0.1, 0.2),
                           bias_regularizer="l1", activity_regularizer=keras.regularizers.L2(0.03)),
    ])
    cfg = model.get_config()["layers"][-1]["config"]
    assert set(cfg["kernel_regularizer"]) >= {"module", "registered_name", "class_name", "config"}
    assert penalties.get(cfg["kernel_regularizer"]) == sc.L1L2(0.1, 0.2)
    assert penalties.get(cfg["activity_regularizer"]) == sc.L2(0.03)
    bias = penalties.get(cfg["bias_regularizer"])
    assert isinstance(bias, sc.L1)
    assert bias.l1 == pytest.approx(float(model.layers[-1].bias_regularizer.l1))


def test_orthogonal_regularizer_name_matches_keras_identifier() -> None:
    ours = penalties.get("orthogonal_regularizer")
    theirs = keras.regularizers.get("orthogonal_regularizer")
    x = torch.randn(6, 3, dtype=torch.float64)
    assert float(ours(x)) == pytest.approx(_value(theirs, x), rel=1e-7)


@pytest.mark.parametrize("name", ["L1", "L2", "L1L2"])
def test_none_strengths_give_keras_defaults(name: str) -> None:
    ours = getattr(sc, name)(None)
    theirs = getattr(keras.regularizers, name)(None)
    x = torch.randn(4, 4, dtype=torch.float64)
    assert float(ours(x)) == pytest.approx(_value(theirs, x), rel=1e-7, abs=0.0)
    assert ours == getattr(sc, name)()


def test_extra_keys_next_to_flat_keys_still_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        penalties.get({"class_name": "L1", "config": {"l1": 0.1}, "l1": 0.2})


def test_sparsecraft_keras_group_lasso_config_maps_axes_to_torch_groups() -> None:
    from sparsecraft.keras import regularizers as kreg

    pen = penalties.get(keras.regularizers.serialize(kreg.GroupLasso(0.3, axis=-1)))
    assert pen == sc.GroupLasso(0.3, groups="rows")
    kernel = torch.randn(5, 3, dtype=torch.float64)  # Keras (in, out): groups are its columns
    assert float(pen(kernel.T)) == pytest.approx(
        float(keras.ops.convert_to_numpy(kreg.GroupLasso(0.3)(kernel.numpy()))), rel=1e-9)
    with pytest.raises(ValueError, match="axis"):
        penalties.get(keras.regularizers.serialize(kreg.GroupLasso(0.3, axis=0)))
