"""Sparse (CSR) inference: :class:`SparseLinear` and :func:`to_sparse`."""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsecraft.export._hooks import check_torch_model, strip_sparsecraft_hooks
from sparsecraft.export._sparse_conv import CONVS, SparseConv
from sparsecraft.export._trace import call_args

KERNELS = ("auto", "addmm", "linear")


def _check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"Expected kernel to be one of {KERNELS}. Received: kernel={kernel!r}")
    return kernel


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored in compressed sparse row (CSR) form.

    The weight is held as three buffers, ``crow_indices``, ``col_indices``
    (int32) and ``values``, and assembled into a ``torch.sparse_csr_tensor``
    at each call (a few microseconds; a cached sparse tensor would break
    ``copy.deepcopy``, which torch does not support for sparse CSR tensors).

    Kernels, measured on 2 CPU threads (see ``docs/export.md``):

    * ``"addmm"``: ``addmm(b, W, x.T).T``, a sparse-times-dense product with
      the CSR weight on the left, so the kernel runs row-major over output units.
    * ``"linear"``: ``F.linear(x, W, b)`` with the CSR weight.
    * ``"auto"``: ``torch.mv`` when the input holds a single row (batch 1),
      ``"addmm"`` otherwise.

    Inference module: ``W`` is a buffer (not trained); ``bias`` is a parameter.

    Args:
        weight: Dense or sparse ``[out_features, in_features]`` weight.
        bias: Optional ``[out_features]`` bias.
        kernel: One of ``"auto"``, ``"addmm"``, ``"linear"``.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, kernel: str = "auto"
    ) -> None:
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise ValueError(
                "Expected a 2-D weight tensor. Received: "
                f"weight={getattr(weight, 'shape', type(weight).__name__)}"
            )
        self.kernel = _check_kernel(kernel)
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        with warnings.catch_warnings():
            # torch warns once per process that CSR support is "beta"; the kernels
            # used here are the measured, tested ones.
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = weight.detach().to_sparse_csr() if weight.layout != torch.sparse_csr else weight
        self.register_buffer("crow_indices", csr.crow_indices().to(torch.int32))
        self.register_buffer("col_indices", csr.col_indices().to(torch.int32))
        self.register_buffer("values", csr.values().detach().clone())
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(
                f"Expected a bias of shape ({self.out_features},). Received: "
                f"bias.shape={tuple(bias.shape)}"
            )
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "auto") -> SparseLinear:
        """Builds a SparseLinear computing the same function as ``linear``."""
        return cls(linear.weight.detach(), linear.bias, kernel=kernel)

    @classmethod
    def from_csr(
        cls, crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
        shape: tuple[int, int], bias: torch.Tensor | None = None, kernel: str = "auto",
    ) -> SparseLinear:
        """Builds a SparseLinear from CSR components (checked for consistency)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = torch.sparse_csr_tensor(
                crow_indices.to(torch.int64), col_indices.to(torch.int64), values, tuple(shape),
                check_invariants=True,
            )
        return cls(csr, bias, kernel=kernel)

    @property
    def nnz(self) -> int:
        """Number of stored (non-zero) weights."""
        return int(self.values.numel())

    def weight_csr(self) -> torch.Tensor:
        """The weight as a ``torch.sparse_csr`` tensor."""
        return torch.sparse_csr_tensor(
            self.crow_indices, self.col_indices, self.values,
            (self.out_features, self.in_features), check_invariants=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        w = self.weight_csr()
        if self.kernel == "linear":
            y = F.linear(rows, w, self.bias)
        elif self.kernel == "auto" and rows.shape[0] == 1:
            y = torch.mv(w, rows[0])
            y = (y if self.bias is None else y + self.bias).unsqueeze(0)
        elif self.bias is None:
            y = torch.sparse.mm(w, rows.t()).t()
        else:
            y = torch.addmm(self.bias.unsqueeze(1), w, rows.t()).t()
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        density = self.nnz / max(1, self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nnz={self.nnz}, density={density:.4f}, "
                f"kernel={self.kernel!r}")


@dataclass(frozen=True)
class SparseChoice:
    """The measurement and decision for one layer.

    Attributes:
        name: Qualified module name.
        kind: Module type name.
        shape: Weight shape.
        sparsity: Fraction of exact zeros in the weight.
        dense_ms: Median latency of the dense layer (ms), ``None`` if not measured.
        sparse_ms: Median latency of the fastest sparse kernel (ms), ``None`` if not measured.
        kernel: The fastest sparse kernel, ``None`` if not measured (``"unfold"``
            for a convolution: :class:`SparseConv`).
        chosen: ``"sparse"`` or ``"dense"``.
        reason: Why.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    sparsity: float
    dense_ms: float | None
    sparse_ms: float | None
    kernel: str | None
    chosen: str
    reason: str


@dataclass
class SparseReport:
    """What :func:`to_sparse` measured and chose, one row per Linear/Conv layer."""

    layers: list[SparseChoice] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable Python values."""
        return {"layers": [{**asdict(r), "shape": list(r.shape)} for r in self.layers]}


def median_ms(
    candidates: Mapping[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int,
    *, warm_each: bool = False,
) -> dict[str, float]:
    """Median latency (ms) of each candidate on ``x``, timed in interleaved rounds.

    Interleaving (one run of each candidate per round) spreads the drift of a
    shared machine evenly over the candidates instead of biasing the last one.
    ``warm_each`` runs each candidate once, untimed, right before its timed run:
    timed just after a larger model, a small one was measured 7-20 % slower here
    (its weights evicted from cache) — use it when models of different sizes
    are compared.
    """
    times: dict[str, list[float]] = {k: [] for k in candidates}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in candidates.values():
                fn(x)
        for _ in range(repeats):
            for key, fn in candidates.items():
                if warm_each:
                    fn(x)
                start = time.perf_counter()
                fn(x)
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _capture_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[nn.Module, torch.Tensor]:
    seen: dict[nn.Module, torch.Tensor] = {}

    def hook(module, inputs):
        if module not in seen and inputs and isinstance(inputs[0], torch.Tensor):
            seen[module] = inputs[0].detach()

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, *CONVS))]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"Expected {name} to be a number in [0, 1]. Received: {name}={value!r}")
    return float(value)


def to_sparse(
    model: nn.Module,
    example_inputs: Any,
    min_sparsity: float = 0.5,
    repeats: int = 15,
    warmup: int = 3,
    min_speedup: float = 1.1,
    kernels: tuple[str, ...] = KERNELS,
) -> tuple[nn.Module, SparseReport]:
    """Replaces ``Linear``/``Conv1d``/``Conv2d`` layers by CSR ones where that is measured faster.

    For each ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (``groups=1``)
    with at least ``min_sparsity`` exact zeros, the dense layer and each
    sparse candidate are timed on the input that layer receives for
    ``example_inputs`` (median of ``repeats`` runs after ``warmup``), with the
    current ``torch.get_num_threads()``. The layer is replaced when
    ``dense_ms / sparse_ms >= min_speedup`` (the default 1.1 leaves a margin
    for timing noise, so that a replaced layer is not slower). The decision
    holds for that input shape: re-run for another batch size.

    A Linear becomes a :class:`SparseLinear` (kernels below); a convolution
    becomes a :class:`SparseConv` (CSR weight times the unfolded input, kernel
    ``"unfold"``). ``Conv3d`` and grouped convolutions are left dense and
    listed in the report with the reason, and so are ``linear1``/``linear2``
    of an ``nn.TransformerEncoderLayer`` (its eval fast path reads their dense
    weights); the parts of a :class:`CompactEncoderLayer` are replaced like
    any Linear.

    The original model is not modified; the result is a copy in eval mode
    without the hooks sparsecraft registered on the original (a training
    ``Regularizer``'s activity hooks, activation monitors).

    Args:
        model: The model.
        example_inputs: A tensor, a tuple/list of positional inputs or a dict
            of keyword inputs for one forward call.
        min_sparsity: Layers with a smaller zero fraction are left dense unmeasured.
        repeats: Timed runs per candidate (median taken).
        warmup: Untimed runs before timing.
        min_speedup: Required ``dense_ms / sparse_ms`` to choose sparse.
        kernels: SparseLinear kernels to try (see :class:`SparseLinear`).

    Returns:
        ``(model, report)``; see :class:`SparseReport`.

    Raises:
        ValueError: If an argument is out of range.
        TypeError: If ``model`` is not a torch model (a Keras model included) or
            the inputs do not fit it.
    """
    check_torch_model(model, "to_sparse")
    min_sparsity = _check_fraction(min_sparsity, "min_sparsity")
    for name, value, least in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"Expected {name} to be an int >= {least}. "
                             f"Received: {name}={value!r}")
    if not isinstance(min_speedup, (int, float)) or not min_speedup > 0:
        raise ValueError(f"Expected min_speedup > 0. Received: min_speedup={min_speedup!r}")
    kernels = tuple(_check_kernel(k) for k in kernels)
    if not kernels:
        raise ValueError("Expected at least one kernel. Received: kernels=()")
    args, kwargs = call_args(model, example_inputs)
    work = copy.deepcopy(model).eval()
    strip_sparsecraft_hooks(work)  # before the copy runs: its hooks would feed the user's terms
    inputs = _capture_inputs(work, args, kwargs)
    report = SparseReport()
    replacements: list[tuple[nn.Module, nn.Module]] = []
    # nn.TransformerEncoderLayer's forward reads linear1/linear2.weight for its fused fast
    # path (eval, batch_first): a SparseLinear there breaks the layer, so they stay dense
    fused = {id(part) for layer in work.modules() if isinstance(layer, nn.TransformerEncoderLayer)
             for part in (layer.linear1, layer.linear2)}
    for name, module in work.named_modules():
        conv = type(module) in CONVS and module.groups == 1
        if isinstance(module, nn.modules.conv._ConvNd) and not conv:
            w = module.weight.detach()
            report.layers.append(SparseChoice(
                name, type(module).__name__, tuple(w.shape), float((w == 0).float().mean()),
                None, None, None, "dense", "Conv3d, transposed or grouped convolution: no CSR "
                "kernel, left dense (limitation)"))
        if type(module) is not nn.Linear and not conv:
            continue
        w = module.weight.detach()
        sparsity = float((w == 0).float().mean()) if w.numel() else 0.0
        row = dict(name=name, kind=type(module).__name__, shape=tuple(w.shape), sparsity=sparsity)
        if id(module) in fused:
            report.layers.append(SparseChoice(
                **row, dense_ms=None, sparse_ms=None, kernel=None, chosen="dense",
                reason="part of an nn.TransformerEncoderLayer, whose fast path reads its dense "
                       "weight: left dense (a CompactEncoderLayer from compact takes sparse parts)"))
            continue
        if sparsity < min_sparsity:
            report.layers.append(SparseChoice(**row, dense_ms=None, sparse_ms=None, kernel=None,
                                              chosen="dense", reason="below min_sparsity"))
            continue
        if module not in inputs:
            report.layers.append(SparseChoice(**row, dense_ms=None, sparse_ms=None, kernel=None,
                                              chosen="dense", reason="not called by forward"))
            continue
        x = inputs[module]
        candidates = {"dense": module}
        if conv:
            candidates["unfold"] = SparseConv(module)
        else:
            candidates.update({k: SparseLinear.from_linear(module, k) for k in kernels})
        timed = median_ms(candidates, x, repeats, warmup)
        dense_ms = timed.pop("dense")
        kernel = min(timed, key=timed.get)
        faster = dense_ms / timed[kernel] >= min_speedup
        report.layers.append(SparseChoice(
            **row, dense_ms=dense_ms, sparse_ms=timed[kernel], kernel=kernel,
            chosen="sparse" if faster else "dense",
            reason=f"measured speed-up {dense_ms / timed[kernel]:.2f}x "
                   f"({'>=' if faster else '<'} min_speedup {min_speedup})"))
        if faster:
            replacements.append((module, candidates[kernel]))
    for old, new in replacements:
        if old is work:
            return new.eval(), report
        for parent in list(work.modules()):
            for child_name, child in list(parent._modules.items()):
                if child is old:
                    setattr(parent, child_name, new)
    return work, report
