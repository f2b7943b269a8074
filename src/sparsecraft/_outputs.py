"""Which tensor of a module's output an activity term penalises, and where its batch is.

Keras penalises the tensor a layer returns, divided by its batch size (dim 0
in Keras). Torch modules return tuples and put the batch elsewhere:
``nn.LSTM`` returns ``(out, (h_n, c_n))`` with ``h_n`` batched along dim 1, and
RNN, attention and transformer layers take ``(seq, batch, feature)`` unless
``batch_first=True``. So by default an activity term penalises the first
floating tensor of the output (an LSTM's ``out``: the tensor a Keras LSTM with
``return_sequences=True`` returns) and divides by the module's batch dimension;
``output=`` picks another part or all of them (Keras's own rule flattens a
multi-output layer and penalises every tensor).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

__all__ = ["OUTPUT_NAMES", "check_output_selector", "select_outputs"]

# Named parts of the outputs of torch modules that return tuples: name -> index path.
_RNN = {"output": (0,), "h_n": (1,)}
_LSTM = {"output": (0,), "h_n": (1, 0), "c_n": (1, 1)}
_MHA = {"attn_output": (0,), "attn_output_weights": (1,)}
OUTPUT_NAMES: tuple[tuple[type[nn.Module], dict[str, tuple[int, ...]]], ...] = (
    (nn.LSTM, _LSTM),
    (nn.RNNBase, _RNN),  # nn.RNN, nn.GRU
    (nn.MultiheadAttention, _MHA),
)
_SEQUENCE_TYPES = (
    nn.RNNBase, nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoder,
    nn.TransformerDecoder, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
)


def _names_for(module: Any) -> dict[str, tuple[int, ...]] | None:
    for kind, names in OUTPUT_NAMES:
        if isinstance(module, kind):
            return names
    return None


def check_output_selector(module: Any, output: Any) -> None:
    """Raises, before a hook is added, on an ``output=`` the module cannot have."""
    if output is None or output == "all" or callable(output):
        return
    if isinstance(output, bool) or not isinstance(output, (int, str)):
        raise TypeError(
            "Expected output= to be None (the first tensor), 'all', an index, a name or a "
            f"callable(output) -> tensor. Received: output={output!r}"
        )
    names = _names_for(module)
    if isinstance(output, str) and names is not None and output not in names:
        raise ValueError(
            f"Expected output= to name a part of the output of {type(module).__name__}: "
            f"{[*names, 'all']}. Received: output={output!r}"
        )


def _batch_first(module: nn.Module) -> bool | None:
    """The module's ``batch_first`` (transformer layers keep it on their attention)."""
    for owner in (module, getattr(module, "self_attn", None)):
        if owner is not None and isinstance(getattr(owner, "batch_first", None), bool):
            return owner.batch_first
    layers = getattr(module, "layers", None)
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and layers:
        return _batch_first(layers[0])
    return None


def _batch_dim(module: Any, part: str | None, tensor: Tensor, first: Tensor | None) -> int | None:
    """Where the batch is in ``tensor`` (``part`` of the output of ``module``); None: unbatched."""
    if not isinstance(module, _SEQUENCE_TYPES):
        return 0
    if part in ("h_n", "c_n"):  # (num_layers * directions, batch, hidden) or unbatched 2-D
        return 1 if tensor.ndim == 3 else None
    if part == "attn_output_weights":  # (batch, [heads,] L, S); unbatched when the output is 2-D
        return None if first is not None and first.ndim == 2 else 0
    if tensor.ndim == 2:  # an unbatched sequence (L, features)
        return None
    return 0 if _batch_first(module) else 1


def _walk(output: Any) -> Iterator[Tensor]:
    """Every tensor of an output, in order (tuples, lists, dict values), as Keras flattens it."""
    if isinstance(output, Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for o in output:
            yield from _walk(o)
    elif isinstance(output, dict):
        for o in output.values():
            yield from _walk(o)


def _first_float(output: Any) -> Tensor | None:
    for t in _walk(output):
        if t.is_floating_point():
            return t
    return None


def _at(output: Any, path: tuple[int, ...]) -> Any:
    for i in path:
        output = output[i]
    return output


def _part(module: Any, output: Any, key: int | str) -> Any:
    names = _names_for(module)
    if isinstance(key, str) and names is not None:
        return _at(output, names[key])
    if isinstance(key, str) and isinstance(output, dict):
        if key in output:
            return output[key]
    elif isinstance(key, str) and hasattr(output, "_fields"):  # a namedtuple
        if key in output._fields:
            return getattr(output, key)
    elif isinstance(key, int) and isinstance(output, (tuple, list)) and -len(output) <= key < len(output):
        return output[key]
    raise ValueError(
        f"Expected output={key!r} to select a part of the output of {type(module).__name__}. "
        f"Received: an output of type {type(output).__name__}"
        + (f" with {len(output)} items" if isinstance(output, (tuple, list, dict)) else "")
    )


def select_outputs(
    module: Any, output: Any, selector: Any, batch_dim: int | None
) -> list[tuple[Tensor, int | None]]:
    """The floating tensors an activity term penalises in one call, each with its batch dim.

    Args:
        module: the module that produced ``output``.
        output: what its forward returned.
        selector: ``None`` (the first floating tensor), ``"all"`` (every floating tensor),
            an index, a name (a part of an LSTM/GRU/RNN/MultiheadAttention output, a dict
            key or a namedtuple field) or a callable ``output -> tensor or tuple of tensors``.
        batch_dim: the batch dimension to divide by, overriding the module's.

    Returns:
        ``(tensor, batch_dim)`` pairs; ``batch_dim`` None means no batch (divide by 1).
    """
    first = _first_float(output)
    names = _names_for(module)
    picked: list[tuple[Tensor, str | None]]
    if selector is None:
        picked = [] if first is None else [(first, None)]
    elif selector == "all":
        if names is not None:  # name each tensor so h_n / c_n get their own batch dim
            by_id = {id(_at(output, p)): n for n, p in names.items() if _reachable(output, p)}
            picked = [(t, by_id.get(id(t))) for t in _walk(output) if t.is_floating_point()]
        else:
            picked = [(t, None) for t in _walk(output) if t.is_floating_point()]
    elif isinstance(selector, (int, str)):
        part = _part(module, output, selector)
        label = selector if isinstance(selector, str) and names is not None else None
        picked = [(t, label) for t in _walk(part) if t.is_floating_point()]
    else:
        picked = [(t, "custom") for t in _walk(selector(output)) if t.is_floating_point()]
    result = []
    for t, label in picked:
        if batch_dim is not None:
            dim: int | None = batch_dim
        elif label == "custom":
            dim = 0
        else:
            dim = _batch_dim(module, label, t, first)
        result.append((t, dim))
    return result


def _reachable(output: Any, path: tuple[int, ...]) -> bool:
    try:
        return isinstance(_at(output, path), Tensor)
    except (IndexError, TypeError, KeyError):
        return False
