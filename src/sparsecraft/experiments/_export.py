"""What exporting a trained model gains: :func:`structured_zeros` and :func:`export_summary`.

The demo and the export benchmark share these: take a trained model, measure
how much of it sits in all-zero rows/columns, run
:func:`~sparsecraft.export.compact` and :func:`~sparsecraft.export.to_sparse`,
save each variant with :func:`~sparsecraft.export.save`, and time them.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..datasets import Split
from ..export import SparseLinear, compact, save, to_sparse
from ..export._sparse import median_ms
from ..metrics import flops, sparsity

__all__ = ["export_summary", "structured_zeros"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SUFFIX = {"original": "", "to_sparse": "_to_sparse", "compact": "_compact",
           "compact + to_sparse": "_compact_to_sparse"}


def _interfaces(model: nn.Module, example_inputs: torch.Tensor) -> tuple[set[str], set[str]]:
    """Names of the layers that read the model's input and of those that produce its output.

    Found by identity of the tensors a layer receives and returns, so a layer
    behind a reshape of the input is not counted as reading it.
    """
    reads, seen = set(), {}
    names = {m: n for n, m in model.named_modules() if isinstance(m, _LAYERS)}

    def hook(module, inputs, output):
        if inputs and inputs[0] is example_inputs:
            reads.add(names[module])
        seen[id(output)] = names[module]

    handles = [m.register_forward_hook(hook) for m in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    writes = {seen[id(out)]} if isinstance(out, torch.Tensor) and id(out) in seen else set()
    return reads, writes


def structured_zeros(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, Any]:
    """How much of a model's weights lies in all-zero rows or columns.

    Counted from :func:`sparsecraft.metrics.sparsity` (``zero_rows``,
    ``zero_cols`` of every Linear/Conv weight): a weight entry is *structured
    zero* when its whole row (output unit) or column (input unit) is zero.
    *Removable* leaves out the columns of layers reading the model's input and
    the rows of layers producing its output: :func:`~sparsecraft.export.compact`
    keeps the model's input and output shapes by design.

    In an MLP every weight is used once per sample, so the weight fractions
    are also FLOP fractions.

    Args:
        model: The model.
        example_inputs: One input tensor (to find the layers at the model's input and output).

    Returns:
        ``{"weights", "structured", "removable", "params", "fraction",
        "removable_fraction", "param_fraction", "removable_param_fraction",
        "layers"}``: weight-entry counts, their fractions of all weight entries
        and of all parameters (biases included), and per layer
        ``{"name", "shape", "zero_rows", "zero_cols", "reads_input", "writes_output"}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected an nn.Module. Received: model={type(model).__name__}")
    if not isinstance(example_inputs, torch.Tensor):
        raise TypeError(
            f"Expected a tensor. Received: example_inputs={type(example_inputs).__name__}"
        )
    reads, writes = _interfaces(model, example_inputs)
    records = {r.name: r for r in sparsity(model).rows}
    weights = structured = removable = 0
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, _LAYERS):
            continue
        rec = records[f"{name}.weight" if name else "weight"]
        rows, cols = rec.shape[0], rec.shape[1]
        k = math.prod(rec.shape[2:])
        zr, zc = rec.zero_rows, rec.zero_cols
        weights += rec.numel
        structured += (zr * cols + zc * rows - zr * zc) * k
        zr_kept = 0 if name in writes else zr
        zc_kept = 0 if name in reads else zc
        removable += (zr_kept * cols + zc_kept * rows - zr_kept * zc_kept) * k
        layers.append({"name": name, "shape": list(rec.shape), "zero_rows": zr, "zero_cols": zc,
                       "reads_input": name in reads, "writes_output": name in writes})
    params = sum(r.numel for r in records.values())
    return {
        "weights": weights, "structured": structured, "removable": removable, "params": params,
        "fraction": structured / max(weights, 1),
        "removable_fraction": removable / max(weights, 1),
        "param_fraction": structured / max(params, 1),
        "removable_param_fraction": removable / max(params, 1),
        "layers": layers,
    }


def _stored_params(model: nn.Module) -> int:
    """Weights and biases a model stores: parameters, plus the non-zero values of a SparseLinear."""
    return sum(p.numel() for p in model.parameters()) + sum(
        m.nnz for m in model.modules() if isinstance(m, SparseLinear))


def _flops_per_sample(model: nn.Module, x1: torch.Tensor) -> int:
    """``2 * MACs`` for one sample: dense Linear/Conv layers, ``2 * nnz`` per SparseLinear row."""
    rows = {}

    def hook(module, inputs):
        rows[module] = rows.get(module, 0) + inputs[0].numel() // module.in_features

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, SparseLinear)]
    try:
        dense = flops(model, x1)
    finally:
        for h in handles:
            h.remove()
    return dense + sum(2 * m.nnz * n for m, n in rows.items())


def _count_sparse(model: nn.Module) -> int:
    return sum(isinstance(m, SparseLinear) for m in model.modules())


def _max_abs_diff(model: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).double() - reference.double()).abs().max())


def export_summary(
    model: nn.Module,
    data: Split,
    out: str | os.PathLike | None = None,
    *,
    repeats: int = 15,
    warmup: int = 3,
    prefix: str = "target",
) -> dict[str, Any]:
    """Compacts, sparsifies, saves and times a trained model on ``data``'s test inputs.

    Four variants, each in eval mode:

    * ``original``: the model as trained (dense storage of its zeros);
    * ``to_sparse``: :func:`~sparsecraft.export.to_sparse` of the original;
    * ``compact``: :func:`~sparsecraft.export.compact` of the original;
    * ``compact + to_sparse``: ``to_sparse`` of the compacted model.

    ``to_sparse`` decides per input shape, so it is run once for batch 1 and
    once for the whole test set; each latency column uses the conversion made
    for its batch, and parameters, FLOPs and the file use the test-set one.
    Latency is the median of ``repeats`` interleaved rounds after ``warmup``,
    each timed run right after an untimed one of the same model (steady-state
    serving, caches warm), with the current ``torch.get_num_threads()``.
    ``max_abs_diff`` is the largest difference from the original's outputs
    over the whole test set.

    Args:
        model: The trained model (not modified).
        data: The data set; its ``X_test`` gives batch 1 (the first row) and the test batch.
        out: Folder for the ``.safetensors`` files (``<prefix>.safetensors``,
            ``<prefix>_compact.safetensors``, ...); a temporary one if ``None``.
        repeats: Timed runs per variant and batch (median taken).
        warmup: Untimed runs before timing.
        prefix: File name prefix.

    Returns:
        ``{"threads", "test_batch", "repeats", "structured", "compact", "rows", "cut"}``:
        :func:`structured_zeros` of the model; compact's report (layers,
        skipped, ``max_abs_diff`` on the test set); one row per variant
        ``{"model", "sparse_layers", "params", "flops", "file", "file_bytes",
        "ms_batch1", "ms_test", "max_abs_diff"}`` (``sparse_layers`` is
        ``{"batch1": k, "test": k, "of": n}``); and ``cut``, the fractions of
        parameters, weights and FLOPs that compact removed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected an nn.Module. Received: model={type(model).__name__}")
    for name, value, least in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"Expected {name} to be an int >= {least}. Received: {name}={value!r}")
    x_test = data.X_test
    x1 = x_test[:1]
    original = model
    was_training = original.training
    original.eval()
    try:
        with torch.no_grad():
            reference = original(x_test)
        small, report = compact(original, x_test)
        variants = {"original": {"test": original, "batch1": original},
                    "compact": {"test": small, "batch1": small}}
        for label, base in (("to_sparse", original), ("compact + to_sparse", small)):
            variants[label] = {
                batch: to_sparse(base, x, repeats=repeats, warmup=warmup)[0]
                for batch, x in (("batch1", x1), ("test", x_test))
            }
        order = tuple(_SUFFIX)
        timed = {
            batch: median_ms({k: variants[k][batch] for k in order}, x, repeats, warmup, warm_each=True)
            for batch, x in (("batch1", x1), ("test", x_test))
        }
        n_linear = sum(isinstance(m, nn.Linear) for m in original.modules())
        with contextlib.ExitStack() as stack:
            folder = Path(out) if out is not None else Path(
                stack.enter_context(tempfile.TemporaryDirectory()))
            folder.mkdir(parents=True, exist_ok=True)
            rows = []
            for label in order:
                chosen = variants[label]["test"]
                path = folder / f"{prefix}{_SUFFIX[label]}.safetensors"
                save(chosen, path)
                rows.append({
                    "model": label,
                    "sparse_layers": {
                        "batch1": _count_sparse(variants[label]["batch1"]),
                        "test": _count_sparse(chosen),
                        "of": n_linear,
                    },
                    "params": _stored_params(chosen),
                    "flops": _flops_per_sample(chosen, x1),
                    "file": path.name if out is not None else None,
                    "file_bytes": path.stat().st_size,
                    "ms_batch1": timed["batch1"][label],
                    "ms_test": timed["test"][label],
                    "max_abs_diff": max(_max_abs_diff(variants[label][b], x_test, reference)
                                        for b in ("batch1", "test")),
                })
        structured = structured_zeros(original, x1)
    finally:
        original.train(was_training)
    weights_before = structured["weights"]
    weights_after = sum(p.numel() for p in small.parameters() if p.ndim >= 2)
    return {
        "threads": torch.get_num_threads(),
        "test_batch": int(x_test.shape[0]),
        "repeats": repeats,
        "structured": structured,
        "compact": {"layers": report.to_dict()["layers"], "skipped": report.to_dict()["skipped"],
                    "max_abs_diff": report.max_abs_diff},
        "rows": rows,
        "cut": {
            "params": 1 - report.params_after / max(report.params_before, 1),
            "weights": 1 - weights_after / max(weights_before, 1),
            "flops": 1 - report.flops_after / max(report.flops_before, 1),
        },
    }
