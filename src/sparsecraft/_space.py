"""The names a model gives its parameters and modules: a torch model, or a Keras 3 model.

Selectors (``"encoder.*.weight"``, ``nn.Linear``, a module object) are resolved
against this view. For a torch model it is ``named_parameters`` and
``named_modules`` with ``remove_duplicate=False``, so a tied weight
(``out.weight = emb.weight``) is found under each of its names.

On the torch backend a Keras 3 layer is an ``nn.Module``, but the layers of a
Sequential or Functional model are not its torch children and its parameters
are named ``_torch_params.<path>``. For a Keras model the view is therefore
Keras's own: ``model.weights`` named by their paths (``sequential/d1/kernel``)
and the layers of ``model._flatten_layers()`` named by path and by name. Keras
is never imported here: an object is recognised only when ``keras`` is already
loaded.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = ["ModelSpace", "is_keras_layer", "is_keras_variable"]


def _keras() -> Any:
    return sys.modules.get("keras")


def is_keras_layer(obj: Any) -> bool:
    """Whether ``obj`` is a Keras 3 layer or model (without importing keras)."""
    keras = _keras()
    return keras is not None and isinstance(obj, keras.layers.Layer)


def is_keras_layer_type(obj: Any) -> bool:
    """Whether ``obj`` is a Keras 3 layer class."""
    keras = _keras()
    return keras is not None and isinstance(obj, type) and issubclass(obj, keras.layers.Layer)


def is_keras_variable(obj: Any) -> bool:
    """Whether ``obj`` is a Keras 3 variable (whose torch tensor is ``obj.value``)."""
    keras = _keras()
    return keras is not None and isinstance(obj, keras.Variable)


def keras_variable_tensor(variable: Any) -> nn.Parameter:
    """The torch Parameter behind a Keras variable on the torch backend."""
    value = variable.value
    if not isinstance(value, nn.Parameter):
        raise TypeError(
            "Expected a Keras variable of the torch backend (KERAS_BACKEND=torch), whose value is "
            f"a torch Parameter. Received: {variable.path} holding a {type(value).__name__}; on "
            "other backends use the Keras regularizers of sparsecraft.keras"
        )
    return value


@dataclass
class ModelSpace:
    """Named parameters and modules of the regularizer's model (empty without a model).

    Attributes:
        params: ``(name, parameter)`` pairs, a tied parameter once per name.
        modules: ``(name, module)`` pairs (Keras: layers by path and by name).
        keras: True for a Keras model: default attribute ``kernel``, names joined by ``/``.
    """

    params: list[tuple[str, Tensor]] = field(default_factory=list)
    modules: list[tuple[str, Any]] = field(default_factory=list)
    keras: bool = False

    @classmethod
    def of(cls, model: Any) -> ModelSpace:
        if model is None:
            return cls()
        if is_keras_layer(model):
            params = [(v.path, keras_variable_tensor(v)) for v in model.weights]
            modules: list[tuple[str, Any]] = []
            for layer in model._flatten_layers(include_self=True, recursive=True):
                path = getattr(layer, "path", None)
                if path:
                    modules.append((path, layer))
                if layer.name != path:
                    modules.append((layer.name, layer))
            return cls(params, modules, keras=True)
        return cls(
            list(model.named_parameters(remove_duplicate=False)),
            list(model.named_modules(remove_duplicate=False)),
        )

    @property
    def empty(self) -> bool:
        return not self.params and not self.modules

    def param_names(self) -> list[str]:
        return [n for n, _ in self.params]

    def names_of(self, tensor: Tensor) -> list[str]:
        """Every name of ``tensor`` in the model (several for a tied weight)."""
        return [n for n, p in self.params if p is tensor]

    def module_name(self, module: Any) -> str | None:
        for n, m in self.modules:
            if m is module:
                return n
        return None

    def join(self, module_name: str, attr: str) -> str:
        if not module_name:
            return attr
        return f"{module_name}/{attr}" if self.keras else f"{module_name}.{attr}"

    def default_attr(self, module: Any) -> str:
        """What "a module's weight" means: ``weight``, a Keras layer's ``kernel``/``embeddings``."""
        if not is_keras_layer(module):
            return "weight"
        for attr in ("kernel", "embeddings"):
            if attribute(module, attr) is not None:
                return attr
        return "kernel"


def attribute(module: Any, attr: str) -> Tensor | None:
    """``module.<attr>`` as a torch tensor when it is a parameter (Keras: a variable), else None.

    A Keras RNN layer keeps its variables on its cell (``LSTM.cell.kernel``).
    """
    if is_keras_layer(module):
        value = getattr(module, attr, None)
        if value is None and getattr(module, "cell", None) is not None:
            value = getattr(module.cell, attr, None)
        return keras_variable_tensor(value) if is_keras_variable(value) else None
    value = getattr(module, attr, None)
    return value if isinstance(value, nn.Parameter) else None


def own_attributes(module: Any) -> list[str]:
    """The names of a module's own parameters (for error messages)."""
    if is_keras_layer(module):
        return [v.path.rsplit("/", 1)[-1] for v in module.weights]
    return [n for n, _ in module.named_parameters(recurse=False)]
