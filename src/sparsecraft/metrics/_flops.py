"""FLOPs (``2 * MACs``) of the Linear, convolution and attention-projection layers of one forward pass."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._counts import _check_tol, _local, _zero_mask

__all__ = ["LayerFlops", "flops", "layer_flops"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs of one call of a Linear or convolution layer.

    FLOPs are ``2 * MACs`` for the whole batch of that call; bias additions,
    activations and normalisation are not counted.

    Attributes:
        name: Qualified module name (``""`` for the model itself).
        kind: Module class name.
        flops: ``2 * MACs`` of the dense layer.
        flops_structured: ``2 * MACs`` after removing the weight's all-zero
            output rows and input columns (see :func:`layer_flops`).
    """

    name: str
    kind: str
    flops: int
    flops_structured: int


def _as_args(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _zero_slices(weight: torch.Tensor, dim: int, tol: float) -> int:
    """Number of all-zero slices of ``weight`` along ``dim`` (0: rows, 1: columns)."""
    w = _local(weight).detach()
    nz = ~_zero_mask(w, tol)
    other = [d for d in range(w.ndim) if d != dim]
    return int((~nz.any(dim=other)).sum()) if other else int((~nz).sum())


def _projection_macs(weight: torch.Tensor, tokens: int, tol: float) -> tuple[int, int]:
    """MACs of ``tokens`` rows times a projection ``weight [out, in]``: dense, and without
    its all-zero rows and columns."""
    rows, cols = _zero_slices(weight, 0, tol), _zero_slices(weight, 1, tol)
    out, inp = weight.shape
    return tokens * out * inp, tokens * (out - rows) * (inp - cols)


def _layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor, tol: float) -> tuple:
    w = module.weight
    if isinstance(module, nn.Linear):
        return _projection_macs(w, out.numel() // module.out_features, tol)
    kernel = math.prod(module.kernel_size)
    if isinstance(module, _CONV_TYPES):
        # weight [C_out, C_in / groups, *k]; each output element costs (C_in / groups) * k MACs.
        in_per_group = module.in_channels // module.groups
        positions = out.numel() // module.out_channels
        rows, cols = _zero_slices(w, 0, tol), _zero_slices(w, 1, tol)
        dense = positions * module.out_channels * in_per_group * kernel
        structured = positions * (module.out_channels - rows) * (in_per_group - cols) * kernel
        return dense, structured
    # Transposed conv, weight [C_in, C_out / groups, *k]: each input element is
    # scattered to (C_out / groups) * k outputs.
    out_per_group = module.out_channels // module.groups
    positions = inp.numel() // module.in_channels
    rows, cols = _zero_slices(w, 0, tol), _zero_slices(w, 1, tol)
    dense = positions * module.in_channels * out_per_group * kernel
    structured = positions * (module.in_channels - rows) * (out_per_group - cols) * kernel
    return dense, structured


def _attention_macs(module: nn.MultiheadAttention, args: tuple, kwargs: dict, tol: float) -> tuple:
    """The input projections (query, key, value) and the output projection of one call.

    ``nn.MultiheadAttention`` applies its weights functionally, so they are counted
    here from its parameters: ``in_proj_weight`` (three ``[E, E]`` blocks), or the
    separate ``q/k/v_proj_weight`` when key and value have other widths.
    """
    named = ("query", "key", "value")
    q, k, v = (args[i] if len(args) > i else kwargs[name] for i, name in enumerate(named))
    tokens = [t.numel() // t.shape[-1] for t in (q, k, v)]
    if module.in_proj_weight is not None:
        blocks = list(module.in_proj_weight.chunk(3, dim=0))
    else:
        blocks = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
    dense = structured = 0
    for weight, n in (*zip(blocks, tokens, strict=True), (module.out_proj.weight, tokens[0])):
        d, st = _projection_macs(weight, n, tol)
        dense, structured = dense + d, structured + st
    return dense, structured


def layer_flops(model: nn.Module, example_inputs: Any, tol: float = 0.0) -> list[LayerFlops]:
    """FLOPs of every Linear / Conv / ConvTranspose call in one forward pass.

    Runs ``model(*example_inputs)`` once under ``torch.no_grad()`` in eval mode
    (each module's ``training`` flag is restored afterwards, so batch-norm
    statistics are not updated) with forward hooks on ``nn.Linear``,
    ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and
    ``nn.MultiheadAttention`` (its query/key/value and output projections,
    one record per call; the attention products themselves, activations
    times activations, are not counted). PyTorch's fused fast path for
    attention and encoder layers is switched off for the pass, so every
    layer is seen. The counts are for the whole batch given, ``2 * MACs``
    per call; a module called twice is listed twice. Other layers used
    functionally (``F.linear(x, layer.weight)``) are not seen.

    ``flops_structured`` is the cost of the same layer with its weight's
    all-zero output rows (dim 0) and all-zero input columns (dim 1) removed,
    per layer only: ``out_eff = out - zero_rows``, ``in_eff = in - zero_cols``
    (for grouped convolutions a column is one input channel of every group).
    Zeros are ``|w| <= tol``. Biases are ignored, so a removed row whose bias
    is non-zero still needs its constant folded into the next layer.

    Args:
        model: The model.
        example_inputs: A tensor, a tuple/list of positional inputs, or a dict
            of keyword inputs.
        tol: Weights with ``|w| <= tol`` count as zero for the structured count.

    Returns:
        One :class:`LayerFlops` per layer call, in call order.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: If ``tol`` is negative or not finite.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected an nn.Module. Received: model={type(model).__name__}")
    tol = _check_tol(tol)
    args, kwargs = _as_args(example_inputs)
    names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
    records: list[LayerFlops] = []

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        inp = inputs[0] if inputs else output
        dense, structured = _layer_macs(module, inp, output, tol)
        records.append(LayerFlops(names[module], type(module).__name__, 2 * dense, 2 * structured))

    def attention_hook(module: nn.Module, inputs: tuple, kw: dict, output: Any) -> None:
        dense, structured = _attention_macs(module, inputs, kw, tol)
        records.append(LayerFlops(names[module], type(module).__name__, 2 * dense, 2 * structured))

    attentions = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    inside = {id(m.out_proj) for m in attentions}  # counted with their attention, never called
    counted = (nn.Linear, *_CONV_TYPES, *_CONV_TRANSPOSE_TYPES)
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, counted) and id(m) not in inside]
    handles += [m.register_forward_hook(attention_hook, with_kwargs=True) for m in attentions]
    modes = {m: m.training for m in model.modules()}
    fast_path = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return records


def flops(model: nn.Module, example_inputs: Any) -> int:
    """``2 * MACs`` of the Linear, convolution and attention-projection layers for one forward pass.

    Counts the whole batch in ``example_inputs`` (divide by the batch size for
    a per-sample figure). Bias additions and other layers are not counted;
    see :func:`layer_flops` for the exact rule and per-layer numbers.

    Args:
        model: The model.
        example_inputs: A tensor, a tuple/list of positional inputs, or a dict
            of keyword inputs.

    Returns:
        The FLOP count as an int.
    """
    return sum(r.flops for r in layer_flops(model, example_inputs))
