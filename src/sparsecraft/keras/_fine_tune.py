"""The fine-tuning after the freeze, in ``keras.ops``: the average of the weights and ``fine_tune_scale``.

The torch controller's ``average`` and ``fine_tune_scale``
(src/sparsecraft/control/_average.py, whose docstring gives the measurements
behind both defaults). After the freeze the survivors of a very sparse network
train with the learning rate chosen for the dense one: with SGD the last
iterate is a noisy draw, with Adam (whose step moves every coordinate by about
``lr``) the network is still learning when the run ends.

* ``average``: the k-th iterate after the freeze weighs ``k`` (the freeze's
  own iterate 0), in the running form ``a ← a + 2/(n + 1)·(w − a)`` for the
  n-th iterate; :meth:`TargetSparsity.finalize` writes it into the model. Every
  trainable variable is averaged (the torch controller averages every
  parameter its optimizer trains); the zeros are zero in every iterate, so they
  stay zero. One float32 copy of the trainable variables, created only where
  ``average`` is on (:func:`create_average`), as optimizer variables: saved
  with the model.
* ``fine_tune_scale``: while the support is frozen, the inner optimizer's
  learning rate is multiplied by it inside the step (the user's variable or
  schedule is not touched), as the torch ``freeze_support(lr_scale=…)`` does.
  The multiplier is an optimizer variable, 1 until a freeze sets it.

Both run inside the train step: on TensorFlow and JAX the flag is read in the
graph (``ops.where`` on a scalar, an ``ops.cond`` for the average); on eager
torch the host's copy of the flag (:func:`._freeze.host_frozen`) decides.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import keras
from keras import ops

from ._display import ADAPTIVE


def create_state(optimizer: Any) -> None:
    """At build: the multiplier and the average's count (scalars); the copies if ``average`` is on already."""
    add = optimizer.add_variable
    optimizer._lr_scale = add((), initializer="ones", dtype="float32", name="fine_tune_scale")
    optimizer._average_count = add((), initializer="zeros", dtype="float32", name="average_count")
    optimizer._averages = None
    control = optimizer._control
    if control is not None and control.get("average"):
        create_average(optimizer)


def create_average(optimizer: Any) -> None:
    """One float32 copy of each trainable variable (once; after build, or from ``load_own_variables``)."""
    if optimizer._averages is not None:
        return
    optimizer._averages = [
        optimizer.add_variable(tuple(v.shape), initializer="zeros", dtype=_average_dtype(v), name="average")
        for v in optimizer._trainable_variables
    ]


def _average_dtype(v: Any) -> str:
    dtype = keras.backend.standardize_dtype(v.dtype)
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def defaults(optimizer: Any, hold: str, target: float, batchnorm: bool) -> tuple[bool, float]:
    """The torch controller's defaults of ``average`` and ``fine_tune_scale``.

    On with ``hold="freeze"`` in latent mode on a model without BatchNorm
    (whose running statistics belong to the last weights, not to their
    average); the scale is then ``1/sqrt(1 − target)`` for Adam, AdamW,
    Adagrad and RMSprop (their step's norm over ``n`` coordinates is about
    ``lr·sqrt(n)``: this keeps it that of the dense network), 1 for SGD (its step
    follows the gradient) and any other optimizer. Measured on torch:
    docs/optim.md, fifth and sixth rounds.
    """
    on = hold == "freeze" and optimizer.mode == "latent" and not batchnorm
    scale = 1.0 / math.sqrt(1.0 - target) if on and optimizer._family in ADAPTIVE else 1.0
    return on, scale


def _read(variable: Any) -> Any:
    return ops.convert_to_tensor(variable)


@contextlib.contextmanager
def scaled_learning_rate(optimizer: Any, frozen: Any, host: bool | None) -> Iterator[None]:
    """The inner optimizer's step with its learning rate times the multiplier while frozen.

    ``frozen``: the flag as a tensor (TensorFlow, JAX: ``where(frozen, scale,
    1)``, exactly the user's rate before the freeze); ``host``: eager torch's
    copy of the flag (False: nothing changes). The inner optimizer reads its
    rate through ``_get_current_learning_rate`` (its update, AdamW's decay): for
    the step, its ``_learning_rate`` is a callable returning the scaled value.
    """
    if host is False:
        yield
        return
    inner = optimizer.inner_optimizer
    factor = _read(optimizer._lr_scale) if host else ops.where(frozen, _read(optimizer._lr_scale), 1.0)
    scaled = ops.cast(inner._get_current_learning_rate(), "float32") * factor
    user = inner.__dict__["_learning_rate"]
    # object.__setattr__: the optimizer's own __setattr__ would track the callable.
    object.__setattr__(inner, "_learning_rate", lambda: scaled)
    try:
        yield
    finally:
        object.__setattr__(inner, "_learning_rate", user)


def follow(optimizer: Any, host: bool | None) -> None:
    """After the step (and the freeze, if it came now): add the weights to the average while frozen."""
    averages = optimizer._averages
    control = optimizer._control
    if averages is None or control is None or not control.get("average"):
        return
    weights = optimizer._trainable_variables
    n = _read(optimizer._average_count)
    if host is not None:  # eager torch: the host knows the flag
        if host:
            for var, value in zip(averages + [optimizer._average_count], _added(weights, averages, n), strict=True):
                var.assign(value)
        return
    keep = [_read(a) for a in averages] + [n]
    new = ops.cond(_read(optimizer._frozen) > 0, lambda: _added(weights, averages, n), lambda: keep)
    for var, value in zip(averages + [optimizer._average_count], new, strict=True):
        var.assign(value)


def _added(weights: list, averages: list, n: Any) -> list:
    """The averages with the weights as they are now added (the first: the weights themselves), and ``n + 1``."""
    started = n > 0
    weight = ops.where(started, 2.0 / (n + 1.0), 1.0)
    out = []
    for w, a in zip(weights, averages, strict=True):
        w, a = ops.cast(_read(w), a.dtype), _read(a)
        out.append(ops.where(started, a + ops.cast(weight, a.dtype) * (w - a), w))
    return out + [n + 1.0]


def write_average(optimizer: Any) -> int:
    """Set the trainable variables to their average and start over (eagerly); returns how many iterates it held."""
    n = int(ops.convert_to_numpy(optimizer._average_count))
    if optimizer._averages is None or n == 0:
        return 0
    for v, a in zip(optimizer._trainable_variables, optimizer._averages, strict=True):
        v.assign(ops.cast(_read(a), v.dtype))
    optimizer._average_count.assign(0.0)
    return n


def forget(optimizer: Any) -> None:
    """The support was released: the iterates belonged to another network."""
    optimizer._average_count.assign(0.0)
    optimizer._lr_scale.assign(1.0)
