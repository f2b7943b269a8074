"""Penalties: *what* is penalised, never where or how (see DESIGN.md).

Each penalty is an immutable value object with ``value(x)`` (= ``__call__``),
``prox(v, step)`` where a closed form exists, ``formula()``, and
``get_config()`` / ``from_config()``. :func:`get` builds one from a name, a
spec string (``"l1:1e-4"``, ``"group_lasso:1e-3:rows"``) or a config dict.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from ._base import _REGISTRY, Penalty, check_strength
from ._elementwise import L0, L1, L1L2, L2, MCP, ElasticNet
from ._group import GroupLasso, GroupLayout, SparseGroupLasso
from ._shape import Hoyer, Orthogonal

__all__ = [
    "Penalty",
    "L1",
    "L2",
    "L1L2",
    "ElasticNet",
    "L0",
    "MCP",
    "GroupLasso",
    "SparseGroupLasso",
    "GroupLayout",
    "Hoyer",
    "Orthogonal",
    "get",
    "names",
    "check_strength",
]

# Other spellings users bring with them (Keras class names, sklearn's name).
_ALIASES = {
    "elastic_net": "l1l2",
    "elasticnet": "l1l2",
    "orthogonalregularizer": "orthogonal",
    "orthogonal_regularizer": "orthogonal",
    "grouplasso": "group_lasso",
    "sparsegrouplasso": "sparse_group_lasso",
}


# Keys that Keras's serialized form carries besides "class_name" and "config".
_KERAS_KEYS = ("module", "registered_name", "shared_object_id")
# sparsecraft.keras.GroupLasso groups the slices along an axis of a Keras kernel (in, out):
# axis -1 (output units / channels) is the torch weight's dim 0 ("rows"), axis -2 its dim 1.
_KERAS_GROUP_AXES = {-1: "rows", -2: "columns"}


def _group_lasso_from_keras(config: dict[str, Any]) -> dict[str, Any]:
    axis = config.pop("axis")
    if axis not in _KERAS_GROUP_AXES:
        raise ValueError(
            f"Expected axis -1 or -2 for a Keras GroupLasso config (output or input units). "
            f"Received: axis={axis!r}"
        )
    return {**config, "groups": _KERAS_GROUP_AXES[axis]}


def names() -> list[str]:
    """The registered penalty names, as :func:`get` accepts them."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> type[Penalty]:
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY) + list(_ALIASES), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"Expected a penalty name among {names()}. Received: name={name!r}.{hint}")
    return _REGISTRY[key]


def _parse_arg(cls: type[Penalty], field: dataclasses.Field, text: str) -> Any:
    default = field.default
    if isinstance(default, float) or field.metadata.get("strength"):
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f"Expected a number for `{field.name}` of {cls.name}. Received: {field.name}={text!r}"
            ) from None
    if isinstance(default, int) and not isinstance(default, bool):
        try:
            return int(text)
        except ValueError:
            raise ValueError(
                f"Expected an integer for `{field.name}` of {cls.name}. Received: {field.name}={text!r}"
            ) from None
    return text


def _from_spec(spec: str) -> Penalty:
    name, *args = spec.split(":")
    cls = _lookup(name)
    fields = dataclasses.fields(cls)
    if len(args) > len(fields):
        raise ValueError(
            f"Expected at most {len(fields)} values for {cls.name} "
            f"({', '.join(f.name for f in fields)}). Received: {spec!r}"
        )
    kwargs = {f.name: _parse_arg(cls, f, a) for f, a in zip(fields, args, strict=False) if a != ""}
    return cls(**kwargs)


def get(identifier: Any) -> Penalty:
    """Build a penalty from an instance, a name, a spec string or a config dict.

    * an instance is returned as is;
    * ``"l1"`` gives ``L1()`` with Keras's defaults;
    * ``"l1:1e-4"``, ``"l1l2:1e-5:1e-4"``, ``"group_lasso:1e-3:rows"``: values fill the
      penalty's fields in order (see each class);
    * ``{"name": "l1", "config": {"l1": 1e-4}}`` (or Keras's ``class_name`` key),
      or a flat ``{"name": "l1", "l1": 1e-4}``;
    * Keras's serialized regularizers: ``keras.regularizers.serialize(r)`` and the
      ``kernel_regularizer``/``activity_regularizer`` entries of ``model.get_config()``
      (their ``module``/``registered_name`` keys are ignored), Keras's
      ``OrthogonalRegularizer`` (``"orthogonal_regularizer"``) and
      ``sparsecraft.keras`` regularizers (a ``GroupLasso`` over axis -1 becomes
      ``groups="rows"`` of the torch weight, axis -2 ``"columns"``).

    Raises:
        ValueError: unknown name (the message lists the known ones) or bad values.
        TypeError: anything else.
    """
    if isinstance(identifier, Penalty):
        return identifier
    if isinstance(identifier, str):
        return _from_spec(identifier)
    if isinstance(identifier, dict):
        cfg = dict(identifier)
        name = cfg.pop("name", None)
        if not isinstance(name, str) or not name:  # never the truth value of a tensor
            name = cfg.pop("class_name", None)
        if not isinstance(name, str):
            raise ValueError(f"Expected a config dict with a 'name' key. Received: {identifier!r}")
        inner = cfg.pop("config", None)
        if inner is not None:
            # keras.regularizers.serialize() and model.get_config() add where the class lives.
            for key in _KERAS_KEYS:
                cfg.pop(key, None)
        if inner is not None and cfg:
            raise ValueError(f"Expected either 'config' or flat keys, not both. Received: {identifier!r}")
        cls = _lookup(name)
        config = dict(inner if inner is not None else cfg)
        if cls is GroupLasso and "axis" in config:
            config = _group_lasso_from_keras(config)
        return cls.from_config(config)
    raise TypeError(
        f"Expected a Penalty, a name, a spec string or a config dict. Received: {type(identifier).__name__}"
    )
