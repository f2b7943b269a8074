"""Embedded data sets with known structure; nothing is ever downloaded.

* :func:`digits`: scikit-learn's 8x8 handwritten digits (shipped with
  scikit-learn), a fixed stratified split standardised with train statistics.
* :func:`teacher_student`: Gaussian inputs labelled by a random *sparse*
  teacher MLP whose non-zero pattern is returned, so a student's learned
  pattern can be scored against the truth.
* :func:`superposition`: sparse features embedded in fewer dimensions (toy
  models of superposition, Elhage et al. 2022), with the true directions.
* :func:`mnist1d`: MNIST-1D (Greydanus & Kobak 2024), 1-D sequences of
  length 40 generated locally by the ``mnist1d`` package.
* :func:`copy_task`: a synthetic language (copy a random string) for causal
  language models, with the unpredictable targets masked.

The models the experiments train on them: :func:`mlp` (digits, teacher,
superposition), :func:`cnn1d` (a 1-D CNN with BatchNorm, :class:`CNN1d`) and
:class:`RecurrentClassifier` (LSTM/GRU) for MNIST-1D,
:class:`CausalTransformer` (tied embeddings) for the copy task.
:func:`load` builds a data set by name, :func:`make_model` a model by name
for a data set, :func:`default_model` says which one a data set uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ._common import Split, mlp
from ._copy import IGNORE, copy_task
from ._digits import digits
from ._mnist1d import mnist1d
from ._sequence_models import CNN1d, RecurrentClassifier, cnn1d
from ._superposition import superposition
from ._teacher import teacher_student
from ._transformer import CausalTransformer

__all__ = [
    "CNN1d",
    "IGNORE",
    "MODELS",
    "CausalTransformer",
    "RecurrentClassifier",
    "Split",
    "cnn1d",
    "copy_task",
    "default_model",
    "digits",
    "load",
    "make_model",
    "mlp",
    "mnist1d",
    "superposition",
    "teacher_student",
]


_LOADERS: dict[str, Callable[..., Split]] = {
    "digits": digits,
    "teacher": teacher_student,
    "superposition": superposition,
    "mnist1d": mnist1d,
    "copy": copy_task,
}

# Model families by name, and the data sets each one reads.
MODELS = ("mlp", "cnn", "lstm", "gru", "transformer")
_SEQUENCE_MODELS = {
    "cnn": ("mnist1d",),
    "lstm": ("mnist1d",),
    "gru": ("mnist1d",),
    "transformer": ("copy",),
}
_DEFAULT_MODEL = {"mnist1d": "cnn", "copy": "transformer"}


def load(name: str, **kw: Any) -> Split:
    """Builds a data set by name: ``"digits"``, ``"teacher"``, ``"superposition"``, ``"mnist1d"``, ``"copy"``.

    Args:
        name: The data set.
        **kw: Keyword arguments of the data set's function (:func:`digits`, ...).

    Returns:
        The :class:`Split`.

    Raises:
        ValueError: If ``name`` is unknown (the message lists the known names).
    """
    if name not in _LOADERS:
        raise ValueError(f"Expected a data set name in {sorted(_LOADERS)}. Received: name={name!r}")
    return _LOADERS[name](**kw)


def default_model(data: Split | str) -> str:
    """The model a data set is trained with by default: ``"cnn"`` for MNIST-1D,
    ``"transformer"`` for the copy task, ``"mlp"`` otherwise."""
    name = data if isinstance(data, str) else data.name
    return _DEFAULT_MODEL.get(name, "mlp")


def make_model(name: str, data: Split, hidden: Sequence[int] | None = None) -> nn.Module:
    """Builds model ``name`` sized for ``data`` (PyTorch's default initialisation; seed before).

    * ``"mlp"``: ``mlp(n_features, hidden or (256, 256), n_out)``, for tabular data.
    * ``"cnn"``: :func:`cnn1d` (``hidden``: one int, the channels; default 32).
    * ``"lstm"``, ``"gru"``: :class:`RecurrentClassifier` (``hidden``: one
      int, the state width; default 64).
    * ``"transformer"``: :class:`CausalTransformer` with ``d_model`` 64, 4
      heads, 2 layers, ``d_ff`` 128 (``hidden``: ``(d_model,)`` or
      ``(d_model, d_ff)``).

    Args:
        name: One of :data:`MODELS`.
        data: The split the model is for (input length, classes).
        hidden: Widths, as above.

    Returns:
        The model.

    Raises:
        ValueError: On an unknown name, a model that does not read this data
            set (e.g. a CNN on digits), or widths it cannot take.
    """
    if name not in MODELS:
        raise ValueError(f"Expected a model name in {MODELS}. Received: model={name!r}")
    wanted = _SEQUENCE_MODELS.get(name)
    if wanted is not None and data.name not in wanted:
        raise ValueError(
            f"Expected data {' or '.join(map(repr, wanted))} for model={name!r}. "
            f"Received: data={data.name!r}; its model is {default_model(data)!r}"
        )
    if name == "mlp":
        if data.X_train.ndim != 2 or data.X_train.is_floating_point() is False:
            raise ValueError(
                f"Expected float [n, features] inputs for model='mlp'. Received: data={data.name!r}"
            )
        n_out = data.n_classes if data.n_classes is not None else data.y_train.shape[1]
        return mlp(data.n_features, tuple(hidden) if hidden is not None else (256, 256), n_out)
    sizes = tuple(hidden) if hidden is not None else ()
    most = 2 if name == "transformer" else 1
    if len(sizes) > most:
        raise ValueError(
            f"Expected at most {most} width(s) for model={name!r}. Received: hidden={hidden!r}"
        )
    if name == "cnn":
        return cnn1d(data.n_features, data.n_classes, *sizes)
    if name in ("lstm", "gru"):
        return RecurrentClassifier(data.n_classes, *(sizes or (64,)), kind=name)
    d_model, d_ff = (sizes + (64, 128)[len(sizes) :])[:2] if sizes else (64, 128)
    return CausalTransformer(data.n_classes, data.n_features, d_model=d_model, d_ff=d_ff)
