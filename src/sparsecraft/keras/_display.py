"""What the model shows in latent mode: ``prox(z, γ)``, or the relaxed display, in ``keras.ops``.

The torch library's ``ProximalOptimizer(relaxed=...)`` (src/sparsecraft/optim/_support.py,
``_relax`` and ``_rank_survivors``). In latent mode the model normally shows
``prox(z, γ·λ)``: the survivors are shrunk by the threshold. Adam's latent copy
moves each coordinate by about ``lr`` a step, so at a high sparsity the
threshold is nearly as large as the largest ``|z|`` and the shown survivors are
a fraction of their latent values. The relaxed display (relaxed lasso,
Meinshausen 2007) shows the latent values unshrunk on as many coordinates per
variable as the prox keeps, zeros elsewhere. Under an adaptive optimizer
(Adam, AdamW, Adagrad, RMSprop) and an elementwise ``L1`` or ``L1L2`` those are
the coordinates with the largest ``|z|·d^½``, ``d = sqrt(v) + ε`` the
denominator of the inner optimizer's step (Keras's Adagrad and RMSprop put
``ε`` inside the root: ``d = sqrt(v + ε)``), unfloored: ``|z|`` alone ranks
Adam's coordinates by how consistent their gradient was, not by how large.
Otherwise (SGD, a group penalty) the prox's own survivors. The count per
variable, and so what the controller measures, is the prox's.

The rank cut is a bisection on the scores' float32 bits and a cumulative sum
for the ties at the cut (filled in index order, as torch does), inside the
train step: no host sync (:func:`_top`).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from .regularizers import L1, L1L2

# The ranking's power on the step's denominator (torch's RANK_POWER; docs/optim.md, fourth round).
RANK_POWER = 0.5
# float32 +inf read as int32: the largest score; 31 halvings close the bracket [-1, _INF_BITS].
_INF_BITS = 0x7F800000
_BIT_STEPS = 31
# The adaptive families (ProximalOptimizer._family; AdamW is "Adam"): the relaxed display and
# _fine_tune's learning-rate scale apply to them.
ADAPTIVE = ("Adam", "Adagrad", "RMSprop")
# SGD's display under the controller: relaxed on a sequence model without BatchNormalization
# (torch's _unshrunk_sequence_model: shrinkage compounds through recurrence and attention).
_SEQUENCE = (keras.layers.RNN, keras.layers.MultiHeadAttention, keras.layers.Embedding)


def check(relaxed: Any) -> bool | None:
    """``relaxed`` as given to the optimizer: True, False or None (the default decides).

    Raises:
        TypeError: anything else (the torch library's ``ProximalOptimizer`` raises the same).
    """
    if relaxed is not None and not isinstance(relaxed, bool):
        raise TypeError(f"Expected relaxed to be a bool or None. Received: relaxed={relaxed!r}")
    return relaxed


def sequence_model(layers: list) -> bool:
    """Whether the layers hold recurrence, attention or an embedding (SGD's relaxed default)."""
    return any(isinstance(layer, _SEQUENCE) for layer in layers)


def is_relaxed(optimizer: Any) -> bool:
    """Whether ``optimizer`` shows the relaxed display now (read when the train step is traced).

    Latent mode only. ``relaxed=None``: off at a fixed strength; under a
    :class:`~sparsecraft.keras.callbacks.TargetSparsity`, on for an adaptive
    inner optimizer, and for any other on a sequence model without
    BatchNormalization (the callback tells it: ``_unshrunk_model``), as torch's
    ``ProximalOptimizer._steer`` decides.
    """
    if optimizer.mode != "latent":
        return False
    if optimizer.relaxed is not None:
        return optimizer.relaxed
    if optimizer._control is None:
        return False
    return optimizer._family in ADAPTIVE or optimizer._unshrunk_model


def moment_root(optimizer: Any, k: int, dtype: str) -> Any:
    """``sqrt`` of the inner optimizer's second moment for slot ``k`` (Adam, Adagrad, RMSprop only)."""
    inner, idx = optimizer.inner_optimizer, optimizer._slots[k]
    read = lambda v: ops.cast(ops.convert_to_tensor(v), dtype)  # noqa: E731
    if optimizer._family == "Adam":
        return ops.sqrt(read(inner._velocity_hats[idx] if inner.amsgrad else inner._velocities[idx]))
    if optimizer._family == "Adagrad":
        return ops.sqrt(read(inner._accumulators[idx]))
    second = read(inner._velocities[idx])  # RMSprop
    if inner.centered:
        second = second - ops.square(read(inner._average_gradients[idx]))
    return ops.sqrt(ops.maximum(second, 0.0))


def denominator(optimizer: Any, root: Any) -> Any:
    """The inner step's denominator from ``root = sqrt(v)``: Adam ``root + ε``, Adagrad/RMSprop ``sqrt(root² + ε)``."""
    eps = optimizer.inner_optimizer.epsilon
    if optimizer._family == "Adam":
        return root + eps  # Keras's Adam: ε outside the bias correction
    return ops.sqrt(ops.square(root) + eps)


def _ranked(optimizer: Any, k: int) -> bool:
    return optimizer._family in ADAPTIVE and type(optimizer._regs[k]) in (L1, L1L2)


def relax(optimizer: Any, k: int, z: Any, shown: Any) -> Any:
    """The relaxed display of slot ``k``: ``z`` on ``count(shown ≠ 0)`` coordinates, 0 elsewhere.

    ``shown`` is ``prox(z, step)``. Which coordinates: the prox's own, or under an
    adaptive optimizer with an L1/L1L2 term the largest ``|z|·d^RANK_POWER``
    (ties at the cut in index order). Returns a new tensor of ``z``'s dtype.
    """
    keep = ops.not_equal(shown, 0)
    if _ranked(optimizer, k):
        keep = _top(_score(optimizer, k, z), ops.sum(ops.cast(keep, "int32")))
    return ops.where(keep, z, ops.zeros_like(z))


def _score(optimizer: Any, k: int, z: Any) -> Any:
    """``|z|·d^RANK_POWER`` in float32; a non-finite ``sqrt(v)`` counts as 0 (torch's nan_to_num)."""
    root = moment_root(optimizer, k, "float32")
    root = ops.where(ops.isfinite(root), root, ops.zeros_like(root))
    return ops.abs(ops.cast(z, "float32")) * ops.power(denominator(optimizer, root), RANK_POWER)


def _top(score: Any, count: Any) -> Any:
    """A boolean mask of ``score``'s shape: its ``count`` largest entries (ties at the cut in index order).

    ``score`` is float32 and >= 0, so its bit patterns read as int32 have the
    order of its values: the cut, the smallest ``T`` with ``#(bits > T) <= count``
    (an entry's value, the one a sort would put there), is found by bisection on
    the integers in ``_BIT_STEPS`` count passes, all in the graph. Measured on one
    CPU thread, a 256×256 variable: 4 ms against 28 ms for ``ops.sort`` on JAX,
    5.5 against 6 ms on eager torch.
    """
    flat = ops.reshape(score, (-1,))
    bits = ops.view(flat, "int32")
    count = ops.cast(count, "int32")

    def halve(_, bracket):  # #(bits > hi) <= count < #(bits > lo)
        lo, hi = bracket
        mid = lo + (hi - lo) // 2
        enough = ops.sum(ops.cast(bits > mid, "int32")) <= count
        return ops.where(enough, lo, mid), ops.where(enough, mid, hi)

    start = (ops.convert_to_tensor(-1, "int32"), ops.convert_to_tensor(_INF_BITS, "int32"))
    _, cut = ops.fori_loop(0, _BIT_STEPS, halve, start)
    above = bits > cut
    short = count - ops.sum(ops.cast(above, "int32"))
    ties = ops.equal(bits, cut)
    tie_rank = ops.cumsum(ops.cast(ties, "int32"))  # 1, 2, … along the ties, in index order
    keep = ops.logical_or(above, ops.logical_and(ties, tie_rank <= short))
    return ops.reshape(keep, score.shape)


def show(optimizer: Any, k: int, z: Any, step: Any) -> Any:
    """What slot ``k`` shows for latent ``z`` at prox step ``step``: the prox, or its relaxed display."""
    value = optimizer._regs[k].prox(z, step)
    if is_relaxed(optimizer):
        value = relax(optimizer, k, z, value)
    return value
