"""Measurement: zeros in parameters, FLOPs of a forward pass, zeros in activations.

Nothing here prints: every function returns numbers or report objects, and
presentation (``rich`` tables, plain text) is produced on request.

Three tools:

* :func:`sparsity` counts exact zeros, near-zeros (``|x| <= tol``) and
  all-zero rows/columns of every parameter, and optionally the FLOPs of one
  forward pass before and after removing the zero rows/columns.
* :func:`flops` counts ``2 * MACs`` of the Linear and convolution layers of
  one forward pass.
* :class:`ActivationMonitor` accumulates zero fractions, per-sample L0 and
  dead units of module outputs with forward hooks, without keeping activations.

The raw counting is one function, :func:`count_zeros`, returning integers (or
a device tensor) that a distributed caller can all-reduce across ranks.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "ACTIVATION_TYPES",
    "LayerFlops",
    "count_zeros",
    "flops",
    "layer_flops",
]

# Modules treated as "activations" by ActivationMonitor's default selection.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Tanhshrink,
    nn.Threshold,
    nn.LogSigmoid,
    nn.GLU,
)

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# --------------------------------------------------------------------------- validation


def _check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"Expected tol to be a float. Received: tol={tol!r}")
    tol = float(tol)
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"Expected tol to be a finite float >= 0. Received: tol={tol!r}")
    return tol


def _unknown_name_error(kind: str, name: str, known: Iterable[str]) -> ValueError:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Close names: {close}." if close else ""
    shown = known if len(known) <= 20 else known[:20] + ["..."]
    return ValueError(
        f"Expected the name of a {kind} of the model ({shown}).{hint} Received: name={name!r}"
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    # A DTensor is counted on its local shard; the caller all-reduces the counts.
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


# --------------------------------------------------------------------------- raw counts


def count_zeros(
    tensors: torch.Tensor | Iterable[torch.Tensor],
    tol: float = 0.0,
    as_tensor: bool = False,
) -> tuple[int, int] | torch.Tensor:
    """Counts elements with ``|x| <= tol`` and all elements of some tensors.

    This is the one place where zeros are counted; every other count in this
    module derives from it or from the same comparison. A distributed caller
    counts its local shards with ``as_tensor=True`` and all-reduces the result
    (``torch.distributed.all_reduce(counts)``, SUM). A ``DTensor`` is counted
    on its local shard (``to_local()``), so sharded parameters must be summed
    across ranks and replicated ones must not.

    Args:
        tensors: A tensor or an iterable of tensors.
        tol: Elements with ``|x| <= tol`` count as zeros; ``0.0`` counts exact
            zeros only. NaN is never counted as zero.
        as_tensor: If true, return an int64 tensor ``[zeros, numel]`` on the
            device of the first tensor (no host synchronisation); otherwise a
            tuple of Python ints.

    Returns:
        ``(zeros, numel)`` as ints, or an int64 tensor of shape ``[2]``.

    Raises:
        TypeError: If an element is not a tensor.
        ValueError: If ``tol`` is negative or not finite.
    """
    tol = _check_tol(tol)
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    zeros: torch.Tensor | None = None
    numel = 0
    device = torch.device("cpu")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Expected tensors. Received: tensors[{i}]={type(t).__name__}")
        t = _local(t).detach()
        z = _zero_mask(t, tol).sum()
        if zeros is None:
            zeros, device = z, t.device
        else:
            zeros = zeros + z.to(device)
        numel += t.numel()
    if zeros is None:
        zeros = torch.zeros((), dtype=torch.int64, device=device)
    if as_tensor:
        return torch.stack([zeros.to(torch.int64), torch.tensor(numel, device=device)])
    return int(zeros), numel


def _zero_mask(t: torch.Tensor, tol: float) -> torch.Tensor:
    return t == 0 if tol == 0.0 else t.abs() <= tol


# --------------------------------------------------------------------------- FLOPs


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


def _layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor, tol: float) -> tuple:
    w = module.weight
    if isinstance(module, nn.Linear):
        n = out.numel() // module.out_features
        rows, cols = _zero_slices(w, 0, tol), _zero_slices(w, 1, tol)
        dense = n * module.in_features * module.out_features
        structured = n * (module.in_features - cols) * (module.out_features - rows)
        return dense, structured
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


def layer_flops(model: nn.Module, example_inputs: Any, tol: float = 0.0) -> list[LayerFlops]:
    """FLOPs of every Linear / Conv / ConvTranspose call in one forward pass.

    Runs ``model(*example_inputs)`` once under ``torch.no_grad()`` in eval mode
    (each module's ``training`` flag is restored afterwards, so batch-norm
    statistics are not updated) with forward hooks on ``nn.Linear``,
    ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``. The counts are for
    the whole batch given, ``2 * MACs`` per call; a module called twice is
    listed twice. Layers used functionally (``F.linear(x, layer.weight)``, as
    inside ``nn.MultiheadAttention``) are not seen.

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
        records.append(
            LayerFlops(names[module], type(module).__name__, 2 * dense, 2 * structured)
        )

    counted = (nn.Linear, *_CONV_TYPES, *_CONV_TRANSPOSE_TYPES)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, counted)]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return records


def flops(model: nn.Module, example_inputs: Any) -> int:
    """``2 * MACs`` of the Linear and convolution layers for one forward pass.

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
