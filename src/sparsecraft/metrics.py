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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "ACTIVATION_TYPES",
    "ActivationMonitor",
    "LayerFlops",
    "ParamRecord",
    "SparsityReport",
    "count_zeros",
    "flops",
    "layer_flops",
    "sparsity",
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
        records.append(LayerFlops(names[module], type(module).__name__, 2 * dense, 2 * structured))

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


# --------------------------------------------------------------------------- parameter sparsity


@dataclass(frozen=True)
class ParamRecord:
    """Zero counts of one parameter.

    Attributes:
        name: Parameter name.
        shape: Parameter shape.
        numel: Number of elements.
        zeros: Exact zeros.
        near_zeros: Elements with ``|x| <= tol`` (equals ``zeros`` when tol is 0).
        density: ``(numel - zeros) / numel`` (1.0 for an empty tensor).
        zero_rows: For ``ndim >= 2``, all-zero slices along dim 0 (output units,
            conv output channels), using ``|x| <= tol``; ``None`` otherwise.
        zero_cols: For ``ndim >= 2``, all-zero slices along dim 1 (input
            features, conv input channels), using ``|x| <= tol``; ``None`` otherwise.
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    near_zeros: int
    density: float
    zero_rows: int | None
    zero_cols: int | None

    @property
    def sparsity(self) -> float:
        """Exact-zero fraction ``zeros / numel`` (0.0 for an empty tensor)."""
        return self.zeros / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the record."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "numel": self.numel,
            "zeros": self.zeros,
            "near_zeros": self.near_zeros,
            "density": self.density,
            "sparsity": self.sparsity,
            "zero_rows": self.zero_rows,
            "zero_cols": self.zero_cols,
        }


def _fraction(num: int, den: int) -> float:
    return num / den if den else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Result of :func:`sparsity`: per-parameter records, totals and FLOPs.

    Attributes:
        rows: One :class:`ParamRecord` per parameter, in model order.
        tol: The tolerance used for ``near_zeros`` and zero rows/columns.
        layers: Per-layer FLOPs when ``example_inputs`` was given, else ``None``.
    """

    rows: list[ParamRecord]
    tol: float = 0.0
    layers: list[LayerFlops] | None = None

    @property
    def numel(self) -> int:
        """Total number of parameter elements (also the parameter count)."""
        return sum(r.numel for r in self.rows)

    @property
    def zeros(self) -> int:
        """Total exact zeros."""
        return sum(r.zeros for r in self.rows)

    @property
    def near_zeros(self) -> int:
        """Total elements with ``|x| <= tol``."""
        return sum(r.near_zeros for r in self.rows)

    @property
    def sparsity(self) -> float:
        """Exact-zero fraction over all parameters (0.0 when there are none)."""
        return _fraction(self.zeros, self.numel)

    @property
    def near_sparsity(self) -> float:
        """Fraction with ``|x| <= tol`` over all parameters."""
        return _fraction(self.near_zeros, self.numel)

    @property
    def weight_numel(self) -> int:
        """Elements of the parameters with ``ndim >= 2`` ("weights")."""
        return sum(r.numel for r in self.rows if len(r.shape) >= 2)

    @property
    def weight_zeros(self) -> int:
        """Exact zeros of the parameters with ``ndim >= 2``."""
        return sum(r.zeros for r in self.rows if len(r.shape) >= 2)

    @property
    def weight_sparsity(self) -> float:
        """Exact-zero fraction of the parameters with ``ndim >= 2``."""
        return _fraction(self.weight_zeros, self.weight_numel)

    @property
    def n_params(self) -> int:
        """Total parameter count (same as ``numel``)."""
        return self.numel

    @property
    def n_nonzero(self) -> int:
        """Parameters that are not exactly zero."""
        return self.numel - self.zeros

    @property
    def flops(self) -> int | None:
        """Dense ``2 * MACs`` of the example forward pass, or ``None``."""
        return None if self.layers is None else sum(r.flops for r in self.layers)

    @property
    def flops_structured(self) -> int | None:
        """``2 * MACs`` after removing all-zero rows/columns per layer, or ``None``."""
        return None if self.layers is None else sum(r.flops_structured for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the totals, the records and the FLOPs."""
        return {
            "tol": self.tol,
            "numel": self.numel,
            "zeros": self.zeros,
            "near_zeros": self.near_zeros,
            "sparsity": self.sparsity,
            "near_sparsity": self.near_sparsity,
            "weight_numel": self.weight_numel,
            "weight_zeros": self.weight_zeros,
            "weight_sparsity": self.weight_sparsity,
            "n_params": self.n_params,
            "n_nonzero": self.n_nonzero,
            "flops": self.flops,
            "flops_structured": self.flops_structured,
            "params": [r.to_dict() for r in self.rows],
            "layers": None
            if self.layers is None
            else [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "flops": r.flops,
                    "flops_structured": r.flops_structured,
                }
                for r in self.layers
            ],
        }

    def _cells(self) -> tuple[list[str], list[list[str]], list[str]]:
        header = ["parameter", "shape", "numel", "zeros"]
        if self.tol > 0:
            header.append(f"|x|<={self.tol:g}")
        header += ["density", "zero rows", "zero cols"]

        def line(name, shape, numel, zeros, near, density, zr, zc) -> list[str]:
            cells = [name, shape, f"{numel:,}", f"{zeros:,}"]
            if self.tol > 0:
                cells.append(f"{near:,}")
            return cells + [f"{density:.2%}", zr, zc]

        body = [
            line(
                r.name,
                "x".join(map(str, r.shape)) or "()",
                r.numel,
                r.zeros,
                r.near_zeros,
                r.density,
                "-" if r.zero_rows is None else f"{r.zero_rows}/{r.shape[0]}",
                "-" if r.zero_cols is None else f"{r.zero_cols}/{r.shape[1]}",
            )
            for r in self.rows
        ]
        total = line(
            "total",
            "",
            self.numel,
            self.zeros,
            self.near_zeros,
            1.0 - self.sparsity if self.numel else 1.0,
            "",
            "",
        )
        return header, body, total

    def _summary(self) -> str:
        text = (
            f"sparsity {self.sparsity:.2%} ({self.zeros:,} of {self.numel:,} exact zeros), "
            f"weights {self.weight_sparsity:.2%}"
        )
        if self.layers is not None:
            text += (
                f"; FLOPs {self.flops:,} dense, {self.flops_structured:,} without zero rows/cols"
            )
        return text

    def table(self) -> Any:
        """The per-parameter table as a ``rich.table.Table`` (not printed)."""
        from rich.table import Table

        header, body, total = self._cells()
        table = Table(title="Parameter sparsity", caption=self._summary(), show_footer=True)
        for i, (name, foot) in enumerate(zip(header, total, strict=True)):
            table.add_column(name, footer=foot, justify="left" if i < 2 else "right")
        for cells in body:
            table.add_row(*cells)
        return table

    def __str__(self) -> str:
        header, body, total = self._cells()
        lines = [header, *body, total]
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]

        def fmt(row: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()

        rule = "-" * len(fmt(header))
        return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(total), self._summary()])


ParamSelector = Iterable[str] | Callable[[str, torch.Tensor], bool]


def _named_tensors(model_or_params: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(model_or_params, nn.Module):
        return list(model_or_params.named_parameters())
    if isinstance(model_or_params, torch.Tensor):
        return [("tensor", model_or_params)]
    if isinstance(model_or_params, Mapping):
        items = list(model_or_params.items())
    elif isinstance(model_or_params, Iterable) and not isinstance(model_or_params, str):
        items = list(model_or_params)
    else:
        raise TypeError(
            "Expected an nn.Module, a tensor, or an iterable of (name, tensor). "
            f"Received: model_or_params={type(model_or_params).__name__}"
        )
    named = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            named.append((str(i), item))
        elif (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)
        ):
            named.append(item)
        else:
            raise TypeError(
                "Expected (name, tensor) pairs or tensors. "
                f"Received: model_or_params[{i}]={type(item).__name__}"
            )
    return named


def _select(named: list[tuple[str, torch.Tensor]], params: Any) -> list[tuple[str, torch.Tensor]]:
    if params is None:
        return named
    if callable(params):
        return [(n, t) for n, t in named if params(n, t)]
    if isinstance(params, str):
        params = [params]
    wanted = list(params)
    known = [n for n, _ in named]
    for name in wanted:
        if not isinstance(name, str):
            raise TypeError(f"Expected parameter names (str). Received: params item={name!r}")
        if name not in known:
            raise _unknown_name_error("parameter", name, known)
    keep = set(wanted)
    return [(n, t) for n, t in named if n in keep]


def _record(name: str, t: torch.Tensor, tol: float) -> ParamRecord:
    t = _local(t).detach()
    counts = [count_zeros(t, 0.0, as_tensor=True), count_zeros(t, tol, as_tensor=True)[:1]]
    if t.ndim >= 2:
        nz = ~_zero_mask(t, tol)
        rows = (~nz.flatten(1).any(1)).sum()
        cols = (~nz.transpose(0, 1).flatten(1).any(1)).sum()
        counts.append(torch.stack([rows, cols]).to(counts[0].device))
    values = torch.cat(counts).tolist()  # one host sync per parameter
    zeros, numel, near = values[0], values[1], values[2]
    return ParamRecord(
        name=name,
        shape=tuple(t.shape),
        numel=numel,
        zeros=zeros,
        near_zeros=near,
        density=(numel - zeros) / numel if numel else 1.0,
        zero_rows=values[3] if t.ndim >= 2 else None,
        zero_cols=values[4] if t.ndim >= 2 else None,
    )


def sparsity(
    model_or_params: nn.Module | torch.Tensor | Iterable[Any] | Mapping[str, torch.Tensor],
    tol: float = 0.0,
    example_inputs: Any = None,
    params: ParamSelector | None = None,
) -> SparsityReport:
    """Measures the zeros of a model's parameters (or of any named tensors).

    For every selected parameter: shape, numel, exact zeros, elements with
    ``|x| <= tol``, density ``= nonzeros / numel``, and for ``ndim >= 2``
    the all-zero rows (slices along dim 0: output units, conv output
    channels) and columns (slices along dim 1: input features, input
    channels), where "zero" means ``|x| <= tol``. Totals are on the report.

    Args:
        model_or_params: An ``nn.Module`` (its ``named_parameters()``, shared
            parameters once), a tensor, a mapping name -> tensor (e.g. a
            ``state_dict``), or an iterable of ``(name, tensor)`` pairs or of
            tensors (named by position).
        tol: Tolerance for near-zeros and zero rows/columns; ``0.0`` means exact.
        example_inputs: If given (a tensor, tuple or dict of inputs), ``model``
            is run once to count the FLOPs of its Linear/Conv layers for that
            batch, dense and without all-zero rows/columns (see
            :func:`layer_flops`). Requires an ``nn.Module``.
        params: Restrict to some parameters: a list of names, or a callable
            ``(name, tensor) -> bool``.

    Returns:
        A :class:`SparsityReport`.

    Raises:
        TypeError: On inputs of the wrong type.
        ValueError: If ``tol`` is negative or not finite, or a name in
            ``params`` is not a parameter (the error lists close names).
    """
    tol = _check_tol(tol)
    named = _select(_named_tensors(model_or_params), params)
    records = [_record(n, t, tol) for n, t in named]
    layers = None
    if example_inputs is not None:
        if not isinstance(model_or_params, nn.Module):
            raise TypeError(
                "Expected an nn.Module when example_inputs is given. "
                f"Received: model_or_params={type(model_or_params).__name__}"
            )
        layers = layer_flops(model_or_params, example_inputs, tol)
    return SparsityReport(rows=records, tol=tol, layers=layers)


# --------------------------------------------------------------------------- activations


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


class _Counts:
    """Running counts of one module's outputs; device tensors are updated in place."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.elements = 0  # from shapes: known on the host, no synchronisation
        self.samples = 0
        self.nonzeros: torch.Tensor | None = None
        # One "ever active" mask per output width, in first-seen order (see ActivationMonitor).
        self.active: dict[int, torch.Tensor] = {}


class ActivationMonitor:
    """Counts zeros in module outputs with forward hooks, keeping no activations.

    Per monitored module it accumulates, across forward calls: elements seen,
    elements with ``|a| > tol`` (non-zeros), samples seen (size of dim 0) and
    a per-unit "ever active" flag. The counts live on the activation's device
    and are updated in place under ``torch.no_grad()``; nothing synchronises
    with the host until :meth:`stats` is called.

    Unit rule: for an output of shape ``[N, C]`` a unit is a column (last
    dim); for ``[N, C, ...]`` (convolution-style) a unit is a channel (dim 1).
    Pass ``unit_dim=-1`` for sequence outputs ``[N, T, D]`` whose units are the
    last dim. A 1-D output ``[N]`` is N samples of one unit, a 0-d output one
    sample of one unit. Tuple/list outputs use their first tensor.

    A module called several times per forward counts every call (``samples``
    grows by the batch size per call). A module reused after layers of
    different widths (one ``nn.ReLU`` shared by a block) keeps one "ever
    active" mask per output width, and ``n_units`` is their sum; uses with the
    same width share a mask, so such a unit is dead only if it is zero at all
    of them. Monitor the distinct producing modules to separate them.

    Hooks are registered at construction; :meth:`remove` (or leaving a
    ``with`` block) removes them and keeps the counts.

    Args:
        model: The model.
        modules: Which modules to watch: names, module objects, module types,
            or a list mixing them. Default: every activation module
            (:data:`ACTIVATION_TYPES`), or every leaf module if there is none.
        tol: Outputs with ``|a| <= tol`` count as zero.
        unit_dim: Dimension holding the units for outputs with ``ndim >= 2``
            (default 1, which is the last dim of ``[N, C]``).

    Raises:
        TypeError: On a ``modules`` item of the wrong type.
        ValueError: If ``tol`` is invalid, a name is not a module of the model
            (the error lists close names), or a module/type is not found.

    Example:
        >>> with ActivationMonitor(model) as mon:
        ...     for x, _ in loader:
        ...         model(x)
        >>> mon.stats()["1"]["dead_units"]
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Any = None,
        tol: float = 0.0,
        unit_dim: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected an nn.Module. Received: model={type(model).__name__}")
        if unit_dim is not None and (isinstance(unit_dim, bool) or not isinstance(unit_dim, int)):
            raise TypeError(
                f"Expected unit_dim to be an int or None. Received: unit_dim={unit_dim!r}"
            )
        self.tol = _check_tol(tol)
        self.unit_dim = 1 if unit_dim is None else unit_dim
        self.model = model
        self._selected = _select_modules(model, modules)
        self._counts = {name: _Counts() for name, _ in self._selected}
        self._handles = [
            module.register_forward_hook(self._make_hook(name)) for name, module in self._selected
        ]

    @property
    def names(self) -> list[str]:
        """Names of the monitored modules (``"<model>"`` for the model itself)."""
        return [name for name, _ in self._selected]

    def _make_hook(self, name: str) -> Callable[..., None]:
        counts = self._counts[name]

        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            a = _first_tensor(output)
            if a is not None:
                self._update(name, counts, a)

        return hook

    def _update(self, name: str, counts: _Counts, a: torch.Tensor) -> None:
        with torch.no_grad():
            a = a.detach()
            nz = a != 0 if self.tol == 0.0 else a.abs() > self.tol
            if a.ndim == 0:
                samples, units = 1, nz.reshape(1)
            elif a.ndim == 1:
                samples, units = a.shape[0], nz.any().reshape(1)
            else:
                dim = self.unit_dim
                if not -a.ndim <= dim < a.ndim or dim % a.ndim == 0:
                    raise ValueError(
                        f"Expected unit_dim to index a non-batch dim of the output of {name!r} "
                        f"(shape {tuple(a.shape)}). Received: unit_dim={self.unit_dim}"
                    )
                samples = a.shape[0]
                units = nz.movedim(dim, 0).reshape(a.shape[dim], -1).any(1)
            count = torch.count_nonzero(nz)
            if counts.nonzeros is None:
                counts.nonzeros = count
            else:
                counts.nonzeros += count.to(counts.nonzeros.device)
            mask = counts.active.get(units.numel())
            if mask is None:
                counts.active[units.numel()] = units.clone()
            else:
                mask |= units.to(mask.device)
            counts.elements += a.numel()
            counts.samples += samples

    def stats(self) -> dict[str, dict[str, float | int]]:
        """Statistics per monitored module (synchronises with the device once per module).

        Returns:
            ``{name: {"zero_fraction", "mean_l0", "dead_units", "n_units",
            "samples", "elements"}}`` where ``zero_fraction`` is the fraction
            of output elements with ``|a| <= tol``, ``mean_l0`` the mean number
            of non-zeros per sample, ``dead_units`` the units never active
            (``|a| > tol``) on any sample seen. A module not yet called has
            zeros everywhere (``samples == 0``).
        """
        out: dict[str, dict[str, float | int]] = {}
        for name, c in self._counts.items():
            if c.nonzeros is None:
                out[name] = {
                    "zero_fraction": 0.0,
                    "mean_l0": 0.0,
                    "dead_units": 0,
                    "n_units": 0,
                    "samples": 0,
                    "elements": 0,
                }
                continue
            device = c.nonzeros.device
            alive = [m.sum().to(device) for m in c.active.values()]
            nonzeros, *alive = torch.stack([c.nonzeros.to(torch.int64), *alive]).tolist()
            n_units = sum(c.active)
            out[name] = {
                "zero_fraction": _fraction(c.elements - nonzeros, c.elements),
                "mean_l0": _fraction(nonzeros, c.samples),
                "dead_units": n_units - sum(alive),
                "n_units": n_units,
                "samples": c.samples,
                "elements": c.elements,
            }
        return out

    def dead_mask(self, name: str) -> torch.Tensor:
        """Boolean mask of the units of ``name`` never active so far.

        For a module seen with several output widths, the masks of each width
        are concatenated in first-seen order.

        Raises:
            ValueError: If ``name`` is not monitored or has not been called yet.
        """
        if name not in self._counts:
            raise _unknown_name_error("monitored module", name, self._counts)
        active = self._counts[name].active
        if not active:
            raise ValueError(
                f"Expected module {name!r} to have run at least once. Received: 0 calls"
            )
        device = next(iter(active.values())).device
        return ~torch.cat([m.to(device) for m in active.values()])

    def reset(self) -> None:
        """Clears all counts; hooks stay in place."""
        for counts in self._counts.values():
            counts.clear()

    def remove(self) -> None:
        """Removes the hooks; the model is left as before. Counts are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> ActivationMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self._handles else "removed"
        return f"ActivationMonitor({len(self._selected)} modules, tol={self.tol:g}, {state})"


def _select_modules(model: nn.Module, modules: Any) -> list[tuple[str, nn.Module]]:
    named = [(name or "<model>", m) for name, m in model.named_modules()]
    if modules is None:
        chosen = [(n, m) for n, m in named if isinstance(m, ACTIVATION_TYPES)]
        return chosen or [(n, m) for n, m in named if next(m.children(), None) is None]
    if isinstance(modules, (str, nn.Module, type)):
        modules = [modules]
    by_name = dict(named)
    by_module = {m: n for n, m in named}
    wanted: set[str] = set()
    for item in modules:
        if isinstance(item, str):
            if item not in by_name:
                raise _unknown_name_error("module", item, by_name)
            wanted.add(item)
        elif isinstance(item, nn.Module):
            if item not in by_module:
                raise ValueError(
                    "Expected a module that is part of the model. "
                    f"Received: modules item={type(item).__name__} not found in the model"
                )
            wanted.add(by_module[item])
        elif isinstance(item, type) and issubclass(item, nn.Module):
            found = [n for n, m in named if isinstance(m, item)]
            if not found:
                raise ValueError(
                    f"Expected a module type present in the model. Received: modules item={item.__name__}"
                )
            wanted.update(found)
        else:
            raise TypeError(
                "Expected module names, module objects or module types. "
                f"Received: modules item={item!r}"
            )
    return [(n, m) for n, m in named if n in wanted]
