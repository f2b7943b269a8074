"""torch.fx tracing shared by :func:`compact` and :func:`save`.

A model is traced with :mod:`torch.fx` symbolic tracing. Submodules whose
``forward`` cannot be traced (data-dependent control flow, ...) are kept as
opaque leaves instead of failing the whole model; the reason is returned so
that reports can say which layer was not followed and why.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn


def call_args(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    """Splits ``example_inputs`` into positional and keyword arguments of ``model``.

    Args:
        model: The model the inputs are meant for.
        example_inputs: A tensor, a tuple/list of positional inputs, or a dict
            of keyword inputs (the forms :func:`sparsecraft.metrics.flops` accepts).

    Returns:
        ``(args, kwargs)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected an nn.Module. Received: model={type(model).__name__}")
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise TypeError(
        "Expected example_inputs to be a tensor, a tuple/list or a dict of inputs. "
        f"Received: example_inputs={type(example_inputs).__name__}"
    )


class _Tracer(fx.Tracer):
    """An fx tracer that keeps chosen modules and module types as leaves."""

    def __init__(self, opaque: set[int], leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.opaque = opaque
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.opaque or type(m) in self.leaf_types:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(
    module: nn.Module, opaque: set[int], leaf_types: tuple[type, ...], concrete: dict | None
) -> fx.Graph:
    return _Tracer(opaque, leaf_types).trace(module, concrete_args=concrete)


def _first_untraceable(
    model: nn.Module, opaque: set[int], leaf_types: tuple[type, ...]
) -> tuple[str, nn.Module, Exception] | None:
    """The deepest submodule that cannot be traced on its own, if any."""
    probe = _Tracer(opaque, leaf_types)
    named = [(n, m) for n, m in model.named_modules() if n]
    named.sort(key=lambda item: item[0].count("."), reverse=True)
    for name, module in named:
        if probe.is_leaf_module(module, name):
            continue
        try:
            _trace(module, opaque, leaf_types, None)
        except Exception as err:  # any tracing failure makes it a leaf
            return name, module, err
    return None


def trace(
    model: nn.Module,
    args: tuple | None,
    kwargs: dict | None,
    leaf_types: tuple[type, ...] = (),
) -> tuple[fx.GraphModule, tuple, dict[str, str]]:
    """Traces ``model`` for the given call, keeping untraceable submodules opaque.

    Forward parameters that the call does not give are fixed to their defaults
    (``concrete_args``), so optional flags such as ``mask=None`` do not break
    tracing.

    Args:
        model: The model (not modified).
        args: Positional inputs of the call; ``None`` for no particular call: every
            forward parameter without a default becomes a graph input.
        kwargs: Keyword inputs of the call (``None`` with ``args=None``).
        leaf_types: Module types to keep as leaves besides the torch.nn ones.

    Returns:
        ``(graph_module, placeholder_values, opaque)``: the traced module, the
        input values in placeholder order, and ``{module name: reason}`` for
        the submodules kept opaque because they could not be traced.

    Raises:
        TypeError: If the inputs do not match ``model.forward``'s signature.
        RuntimeError: If the model itself cannot be traced (including a
            forward taking ``*args`` / ``**kwargs``).
    """
    signature = inspect.signature(model.forward)
    try:
        if args is None:
            bound = signature.bind_partial()
            bound.arguments.update({n: None for n, p in signature.parameters.items()
                                    if p.default is p.empty})
        else:
            bound = signature.bind(*args, **(kwargs or {}))
    except TypeError as err:
        raise TypeError(
            "Expected example_inputs matching the model's forward signature "
            f"{signature}. Received: {len(args or ())} positional and keyword "
            f"{sorted(kwargs or {})} ({err})"
        ) from err
    concrete: dict[str, Any] = {}
    values = []
    for name, param in signature.parameters.items():
        if name in bound.arguments:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise RuntimeError(
                    "Expected a forward without *args/**kwargs to trace it with torch.fx. "
                    f"Received: parameter {name!r} of {type(model).__name__}.forward"
                )
            values.append(bound.arguments[name])
        elif param.default is not param.empty:
            concrete[name] = param.default
    opaque: set[int] = set()
    reasons: dict[str, str] = {}
    while True:
        try:
            graph = _trace(model, opaque, leaf_types, concrete or None)
            break
        except Exception as err:  # retried with the culprit as a leaf
            culprit = _first_untraceable(model, opaque, leaf_types)
            if culprit is None:
                raise RuntimeError(
                    f"torch.fx cannot trace {type(model).__name__}: {err}"
                ) from err
            name, module, sub_err = culprit
            opaque.add(id(module))
            first_line = next(iter(str(sub_err).splitlines()), "")
            reasons[name] = (
                f"torch.fx cannot trace its forward ({type(sub_err).__name__}: {first_line})"
            )
    return fx.GraphModule(model, graph), tuple(values), reasons
