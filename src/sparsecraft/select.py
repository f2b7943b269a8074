"""Selecting what to penalise: the selectors :meth:`Regularizer.add_weight` takes.

A selector is one of

* a parameter name (``"fc1.weight"``), a glob (``"encoder.*.weight"``) or a
  module name (``"fc1"``: its weight);
* a module type (``nn.Linear``: every such module's weight), a module object,
  or a ``(module_or_type_or_name, "bias")`` pair naming another attribute;
* a Parameter (or, on the torch backend, a Keras layer or variable);
* a predicate ``lambda name, param: ...`` called once per parameter name;
* a list (or a tuple that is not a pair) of selectors: their union;
* a :class:`Selection` from this module, which chooses by role instead of by
  name: :func:`matrices` (the weight matrices of Linear, Conv, attention and
  recurrent layers; no biases, no norm scales) and :func:`norms` (every
  parameter of the normalisation layers).

``"*.weight"`` matches every parameter called ``weight``: LayerNorm and
BatchNorm scales and embedding tables too. ``sc.select.matrices()`` is the
usual intent; ``exclude=sc.select.norms()`` (or ``exclude=(nn.LayerNorm,
nn.BatchNorm2d)``) removes the norms from any other selection.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ._space import (
    ModelSpace,
    attribute,
    is_keras_layer,
    is_keras_layer_type,
    is_keras_variable,
    keras_variable_tensor,
    own_attributes,
)

__all__ = ["Selection", "matrices", "norms"]

_MATRIX_TYPES = (
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_NORM_TYPES = tuple(
    t for t in (
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm,
        nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
        getattr(nn, "RMSNorm", None),
    ) if t is not None
)
_KERAS_NORMS = ("BatchNormalization", "LayerNormalization", "GroupNormalization",
                "RMSNormalization", "UnitNormalization", "SpectralNormalization")


class Selection:
    """Parameters chosen by their role in the model: what :func:`matrices` and :func:`norms` return.

    Args:
        label: how the selection is shown (``"matrices()"``).
        pick: ``pick(module, attr)`` says whether a torch module's own parameter
            ``attr`` is selected.
        keras_pick: ``keras_pick(layer, attr)`` does the same for a Keras layer's
            variable named ``attr`` (the last part of its path).
    """

    def __init__(
        self,
        label: str,
        pick: Callable[[nn.Module, str], bool],
        keras_pick: Callable[[Any, str], bool],
    ) -> None:
        self.label = label
        self.pick = pick
        self.keras_pick = keras_pick

    def __repr__(self) -> str:
        return f"sparsecraft.select.{self.label}"

    def find(self, space: ModelSpace) -> list[tuple[str, Tensor]]:
        """The selected ``(name, parameter)`` pairs of the model, in model order."""
        if space.keras:
            found = []
            for name, p in space.params:
                owner = _keras_owner(name, space)
                if owner is not None and self.keras_pick(owner, name.rsplit("/", 1)[-1]):
                    found.append((name, p))
            return found
        return [
            (space.join(mn, attr), p)
            for mn, m in space.modules
            for attr, p in m.named_parameters(recurse=False, remove_duplicate=False)
            if self.pick(m, attr)
        ]


def _keras_owner(param_name: str, space: ModelSpace) -> Any:
    """The Keras layer whose path is the variable path minus its last part."""
    owner = param_name.rsplit("/", 1)[0]
    for n, m in space.modules:
        if n == owner:
            return m
    return None


def matrices(embeddings: bool = True) -> Selection:
    """The weight matrices: what "the weights" of a network usually means.

    Selects ``weight`` of Linear, Bilinear, Conv1d/2d/3d and ConvTranspose
    layers, the projection matrices of ``nn.MultiheadAttention``
    (``in_proj_weight`` or ``q/k/v_proj_weight``; its ``out_proj`` is a Linear),
    the ``weight_ih``/``weight_hh``/``weight_hr`` matrices of RNN/LSTM/GRU, and,
    when ``embeddings`` is True, the tables of ``nn.Embedding``/``EmbeddingBag``.
    Never biases, never the scales of normalisation layers. A parameter held
    directly by a custom module (``self.w = nn.Parameter(...)``) is not a known
    matrix: add it by name. For a Keras model: every ``kernel`` and
    ``recurrent_kernel`` (and ``embeddings``).

    Args:
        embeddings: include embedding tables.

    Returns:
        A :class:`Selection` for :meth:`~sparsecraft.Regularizer.add_weight`.
    """
    if not isinstance(embeddings, bool):
        raise TypeError(f"Expected embeddings to be a bool. Received: embeddings={embeddings!r}")

    def pick(m: nn.Module, attr: str) -> bool:
        if isinstance(m, _MATRIX_TYPES):
            return attr == "weight"
        if isinstance(m, nn.MultiheadAttention):
            return attr in _ATTENTION_WEIGHTS
        if isinstance(m, nn.RNNBase):
            return attr.startswith("weight_")
        return embeddings and isinstance(m, _EMBEDDING_TYPES) and attr == "weight"

    def keras_pick(_layer: Any, attr: str) -> bool:
        return attr in ("kernel", "recurrent_kernel") or (embeddings and attr == "embeddings")

    return Selection(f"matrices(embeddings={embeddings})", pick, keras_pick)


def norms() -> Selection:
    """Every parameter (scale and shift) of the normalisation layers.

    BatchNorm1d/2d/3d, SyncBatchNorm, LayerNorm, GroupNorm, InstanceNorm and
    RMSNorm (Keras: BatchNormalization, LayerNormalization, GroupNormalization,
    RMSNormalization). Mostly for ``exclude=``; to penalise only the BatchNorm
    scales (network slimming, Liu et al. 2017) select ``(nn.BatchNorm2d, "weight")``.

    Returns:
        A :class:`Selection`.
    """

    def keras_pick(layer: Any, _attr: str) -> bool:
        return type(layer).__name__ in _KERAS_NORMS

    return Selection("norms()", lambda m, _attr: isinstance(m, _NORM_TYPES), keras_pick)


# -- resolving a selector against a model ---------------------------------------------------------
def _is_pair(selector: Any) -> bool:
    # ("encoder", "bias") names an attribute; ("a.weight", "b.weight") is two selectors.
    return (
        isinstance(selector, tuple) and len(selector) == 2
        and isinstance(selector[1], str) and selector[1].isidentifier()
    )


def _is_module_type(obj: Any) -> bool:
    return (isinstance(obj, type) and issubclass(obj, nn.Module)) or is_keras_layer_type(obj)


def _no_match(selector: str, space: ModelSpace) -> ValueError:
    names = space.param_names()
    close = difflib.get_close_matches(selector, names, n=5, cutoff=0.4)
    return ValueError(
        f"Expected a selector that matches parameters of the model. Received: {selector!r}, "
        f"which matches none. Close parameter names: {close or names[:8]}"
    )


def _of_module(space: ModelSpace, name: str | None, module: Any, attr: str | None,
               whole: bool) -> list[tuple[str, Tensor]]:
    if whole:  # exclusion: everything the module holds
        if is_keras_layer(module):
            return [(v.path, keras_variable_tensor(v)) for v in module.weights]
        return [(space.join(name or "", n), p)
                for n, p in module.named_parameters(remove_duplicate=False)]
    attr = attr or space.default_attr(module)
    p = attribute(module, attr)
    if p is None:
        raise ValueError(
            f"Expected {type(module).__name__} to have a parameter `{attr}`. "
            f"Received: it has {own_attributes(module)}"
        )
    names = space.names_of(p)
    full = space.join(name, attr) if name is not None else None
    return [(full if full in names else (names[0] if names else full or attr), p)]


def _belongs(space: ModelSpace, obj: Any, count: int) -> ValueError:
    return ValueError(
        f"Expected a {type(obj).__name__} that belongs to the regularizer's model. "
        f"Received: one that is not among its {count} entries"
    )


def resolve(space: ModelSpace, selector: Any, *, attr: str | None = None,
            whole: bool = False) -> list[tuple[str, Tensor]]:
    """The ``(name, parameter)`` pairs a selector matches, in order; a tied one may repeat.

    Args:
        space: the model's names.
        selector: see the module docstring.
        attr: the attribute a module selector means (default: ``weight``; Keras ``kernel``).
        whole: for ``exclude=``: a module, module name or module type stands for
            every parameter it holds, and globs or types that match nothing are fine.

    Raises:
        ValueError: a name, module or type that matches nothing (with close names), or
            an object that is not part of the model.
        TypeError: a selector of another kind.
    """
    if isinstance(selector, Selection):
        return selector.find(space)
    if _is_pair(selector):
        if attr is not None:
            raise TypeError(f"Expected a pair (module, attribute) at the top level. Received: {selector!r}")
        target, attr = selector
        if isinstance(target, str):
            if space.keras:
                return _by_name(space, target, attr, whole, pair=True)
            target = f"{target}.{attr}" if target else attr
        return resolve(space, target, attr=attr, whole=whole)
    if isinstance(selector, (list, tuple)):
        return [found for item in selector for found in resolve(space, item, attr=attr, whole=whole)]
    if isinstance(selector, nn.Parameter) or is_keras_variable(selector):
        p = keras_variable_tensor(selector) if is_keras_variable(selector) else selector
        names = space.names_of(p)
        if not names and not space.empty:
            raise _belongs(space, selector, len(space.params))
        default = selector.path if is_keras_variable(selector) else "param"
        return [(names[0] if names else default, p)]
    if isinstance(selector, str):
        return _by_name(space, selector, attr, whole, pair=False)
    if _is_module_type(selector):
        if space.empty:
            raise ValueError("Expected a Regularizer built on a model to select by module type. Received: model=None")
        mods = [(n, m) for n, m in space.modules if isinstance(m, selector)]
        found = [f for n, m in _unique(mods) for f in _maybe(space, n, m, attr, whole)]
        if not found and not whole:
            raise ValueError(
                f"Expected the model to hold {selector.__name__} modules with a "
                f"`{attr or 'weight'}` parameter. Received: none found"
            )
        return found
    if isinstance(selector, nn.Module) or is_keras_layer(selector):
        name = space.module_name(selector)
        if name is None and not space.empty:
            raise _belongs(space, selector, len(space.modules))
        return _of_module(space, name, selector, attr, whole)
    if callable(selector):
        if space.empty:
            raise ValueError("Expected a Regularizer built on a model to select by predicate. Received: model=None")
        return [(n, p) for n, p in space.params if selector(n, p)]
    raise TypeError(
        "Expected a parameter name, glob, module, module type, (module, name) pair, Parameter, "
        f"predicate (name, param) -> bool, sparsecraft.select selection or a list of them. "
        f"Received: {type(selector).__name__}"
    )


def _unique(mods: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    seen: set[int] = set()
    out = []
    for n, m in mods:
        if id(m) not in seen:
            seen.add(id(m))
            out.append((n, m))
    return out


def _maybe(space: ModelSpace, name: str, module: Any, attr: str | None,
           whole: bool) -> list[tuple[str, Tensor]]:
    """A module type's member: its attribute if it has one (a type selects those that do)."""
    if whole:
        return _of_module(space, name, module, attr, whole)
    if attribute(module, attr or space.default_attr(module)) is None:
        return []
    return _of_module(space, name, module, attr, whole)


def _by_name(space: ModelSpace, selector: str, attr: str | None, whole: bool,
             pair: bool) -> list[tuple[str, Tensor]]:
    if any(c in selector for c in "*?["):
        pattern = space.join(selector, attr) if pair and space.keras else selector
        found = [(n, p) for n, p in space.params if fnmatch.fnmatchcase(n, pattern)]
        if whole and not found:
            found = [f for n, m in space.modules if fnmatch.fnmatchcase(n, pattern)
                     for f in _of_module(space, n, m, None, True)]
        if not found and not whole:
            raise _no_match(selector, space)
        return found
    if not pair:
        found = [(n, p) for n, p in space.params if n == selector]
        if found:
            return found
    for n, m in space.modules:
        if n == selector and (n or pair):
            return _of_module(space, n, m, attr, whole)
    raise _no_match(space.join(selector, attr) if pair else selector, space)
