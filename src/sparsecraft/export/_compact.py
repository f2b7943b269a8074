"""``compact``: remove zero units/channels and return a smaller dense model."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from sparsecraft.export._channels import _RNN, input_weight_names
from sparsecraft.export._graph import Analysis, Layout, analyse, column_weights
from sparsecraft.export._hooks import check_torch_model, strip_sparsecraft_hooks
from sparsecraft.export._trace import call_args, trace
from sparsecraft.export._transformer import CompactEncoderLayer, compact_encoder_layer
from sparsecraft.metrics import flops


@dataclass(frozen=True)
class LayerChange:
    """How one layer was resized.

    Attributes:
        name: Qualified module name.
        kind: Module type name.
        shape_before: Weight shape before (``(num_features,)`` for BatchNorm,
            ``weight_ih_l0``'s for a recurrent layer, ``(num_heads, dim_feedforward)``
            for a transformer encoder layer).
        shape_after: The same after.
        detail: What was removed, where the shapes do not say it all.
    """

    name: str
    kind: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    detail: str = ""


@dataclass
class CompactReport:
    """What :func:`compact` did.

    Attributes:
        layers: The resized layers.
        skipped: ``(name, reason)`` of layers and operations compact did not
            follow; the units flowing through them were kept.
        params_before: Parameter count of the original model.
        params_after: Parameter count of the compacted model.
        flops_before: ``sparsecraft.metrics.flops`` of the original on the example inputs.
        flops_after: The same for the compacted model.
        max_abs_diff: Largest absolute difference between the outputs of the
            original (eval mode) and of the compacted model on the example inputs.
    """

    layers: list[LayerChange] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    max_abs_diff: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable Python values."""
        out = asdict(self)
        out["layers"] = [
            {**asdict(c), "shape_before": list(c.shape_before), "shape_after": list(c.shape_after)}
            for c in self.layers
        ]
        out["skipped"] = [{"name": n, "reason": r} for n, r in self.skipped]
        return out


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _max_abs_diff(a: Any, b: Any) -> float:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb, strict=True)):
        return float("inf")
    diffs = [float((x.double() - y.double()).abs().max()) for x, y in zip(ta, tb, strict=True)
             if x.numel()]
    return max(diffs, default=0.0)


def _replace(model: nn.Module, target: nn.Module, new: nn.Module) -> None:
    """Replaces every reference to ``target`` inside ``model`` by ``new``."""
    for module in list(model.modules()):
        for child_name, child in list(module._modules.items()):
            if child is target:
                setattr(module, child_name, new)


def _resize_layer(
    module: nn.Module, rows: torch.Tensor | None, layout: Layout | None, keep_in: torch.Tensor | None
) -> nn.Module | None:
    """A copy of a Linear/Conv with output ``rows`` kept and input channels ``keep_in`` kept.

    Constant input channels that are dropped are folded into the bias.
    Returns ``None`` when nothing changes.
    """
    weight = module.weight.detach()
    out_features = weight.shape[0]
    rows = rows if rows is not None else torch.ones(out_features, dtype=torch.bool)
    bias = (
        module.bias.detach().cpu().double() if module.bias is not None
        else torch.zeros(out_features, dtype=torch.float64)
    )
    cols = None
    if layout is not None and keep_in is not None and not keep_in.all():
        dropped = ~keep_in & layout.is_const
        fold = torch.where(dropped, layout.const, 0.0)
        bias = bias + column_weights(module, layout.rep) @ fold
        cols = keep_in.repeat_interleave(layout.rep)
    if rows.all() and cols is None:
        return None
    new = copy.deepcopy(module)
    rows = rows.to(weight.device)
    w = weight[rows] if cols is None else weight[rows][:, cols.to(weight.device)]
    new.weight = nn.Parameter(w.clone(), requires_grad=module.weight.requires_grad)
    needs_bias = module.bias is not None or bool((bias != 0).any())
    new_bias = bias[rows.cpu()].to(weight)
    new.bias = nn.Parameter(new_bias) if needs_bias else None
    if isinstance(module, nn.Linear):
        new.out_features, new.in_features = w.shape[0], w.shape[1]
    else:
        new.out_channels, new.in_channels = w.shape[0], w.shape[1]
    return new


def _resize_embedding(module: nn.Embedding, keep: torch.Tensor | None) -> nn.Module | None:
    """A copy of an Embedding keeping the features (weight columns) ``keep``."""
    if keep is None or keep.all():
        return None
    new = copy.deepcopy(module)
    w = module.weight.detach()[:, keep.to(module.weight.device)].clone()
    new.weight = nn.Parameter(w, requires_grad=module.weight.requires_grad)
    new.embedding_dim = w.shape[1]
    return new


def _resize_recurrent(module: nn.Module, layout: Layout, keep_in: torch.Tensor) -> nn.Module | None:
    """A copy of an LSTM/GRU/RNN reading only the input features ``keep_in``.

    A dropped constant input feature ``c`` adds ``W_ih[:, c] * c`` to every
    step's input projection: it is folded into ``bias_ih_l0`` (and its reverse).
    """
    if keep_in.all():
        return None
    new = copy.deepcopy(module)
    fold = torch.where(~keep_in & layout.is_const, layout.const, 0.0)
    for w_name in input_weight_names(module):
        w = getattr(module, w_name).detach()
        if module.bias:
            b_name = w_name.replace("weight", "bias")
            b = getattr(module, b_name).detach().double() + w.cpu().double() @ fold
            setattr(new, b_name, nn.Parameter(b.to(w), requires_grad=getattr(
                module, b_name).requires_grad))
        w_new = w[:, keep_in.to(w.device)].clone()
        setattr(new, w_name, nn.Parameter(w_new, requires_grad=getattr(
            module, w_name).requires_grad))
    new.input_size = int(keep_in.sum())
    return new


def _resize_norm(module: nn.Module, keep: torch.Tensor) -> nn.Module | None:
    if keep.all():
        return None
    new = copy.deepcopy(module)
    keep = keep.to(module.running_mean.device)
    for name in ("weight", "bias"):
        p = getattr(module, name)
        if p is not None:
            setattr(new, name, nn.Parameter(p.detach()[keep].clone(), requires_grad=p.requires_grad))
    new.running_mean = module.running_mean[keep].clone()
    new.running_var = module.running_var[keep].clone()
    new.num_features = int(keep.sum())
    return new


def _shape_of(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (module.num_features,)
    if isinstance(module, _RNN):
        return tuple(module.weight_ih_l0.shape)
    return tuple(module.weight.shape)


def _rewrite(model: nn.Module, result: Analysis) -> list[LayerChange]:
    spaces, keep = result.spaces, result.keep
    changes = []
    modules = dict(model.named_modules())
    for name in sorted(set(result.producers) | set(result.consumers)):
        module = modules[name]
        rows = keep[spaces.find(result.producers[name])] if name in result.producers else None
        layout = result.consumers.get(name)
        keep_in = keep[spaces.find(layout.space)] if layout is not None else None
        if isinstance(module, nn.Embedding):
            new = _resize_embedding(module, rows)
        elif isinstance(module, _RNN):
            new = _resize_recurrent(module, layout, keep_in)
        else:
            new = _resize_layer(module, rows, layout, keep_in)
        if new is not None:
            changes.append(LayerChange(name, type(module).__name__, _shape_of(module),
                                       _shape_of(new)))
            _replace(model, module, new)
    for name, space in sorted(result.norms.items()):
        module = modules[name]
        new = _resize_norm(module, keep[spaces.find(space)])
        if new is not None:
            changes.append(LayerChange(name, type(module).__name__, _shape_of(module),
                                       _shape_of(new)))
            _replace(model, module, new)
    return changes


def _floating_like(model: nn.Module) -> torch.Tensor:
    """An empty tensor with the model's floating dtype and device."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.new_empty(0)
    return torch.empty(0)


def _encoder_shape(layer: nn.Module) -> tuple[int, int]:
    return (layer.self_attn.num_heads, layer.linear1.out_features)


def _compact_transformers(model: nn.Module, report: CompactReport) -> nn.Module | None:
    """Removes dead FFN neurons and attention heads inside each TransformerEncoderLayer.

    Returns the new root when ``model`` itself is such a layer, else ``None``
    (``model`` is then changed in place).
    """
    nested = {
        id(layer) for encoder in model.modules() if isinstance(encoder, nn.TransformerEncoder)
        and getattr(encoder, "use_nested_tensor", False) for layer in encoder.layers
    }
    done: set[int] = set()
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, nn.TransformerEncoderLayer) or id(layer) in done:
            continue
        done.add(id(layer))
        new, notes, refusals = compact_encoder_layer(layer, id(layer) in nested)
        report.skipped.extend((name, reason) for reason in refusals)
        if new is None:
            continue
        report.layers.append(LayerChange(name, type(layer).__name__, _encoder_shape(layer),
                                         _encoder_shape(new), "; ".join(notes)))
        if layer is model:
            return new
        _replace(model, layer, new)
    return None


def compact(model: nn.Module, example_inputs: Any) -> tuple[nn.Module, CompactReport]:
    """Removes zero structure from ``model``: a smaller dense model with the same outputs.

    The model is traced with ``torch.fx`` and every chain producer -> consumer
    through ``Linear``, ``Conv1d/2d/3d`` (``groups=1``), ``BatchNorm``
    (running statistics), element-wise activations, dropout, pooling,
    flatten, residual add/sub/mul, ``cat`` (not along the channels),
    ``softmax`` and ``mean``/``sum``/``amax``/``amin`` over other dimensions
    is followed. ``Embedding`` features are units too, and an
    ``LSTM``/``GRU``/``RNN`` reads its input features like a Linear. A unit
    (output feature or channel) is removed when no consumer needs it:

    * its consumers' weight columns for it are all zero (its value is unused), or
    * its value is a known constant: a unit whose incoming weights are all zero
      outputs ``act(bias)`` (through BatchNorm, its shifted constant), an
      all-zero embedding column outputs 0; that constant is folded into the
      consumers' biases. A constant entering a zero-padded convolution is only
      folded when it is 0 (borders differ otherwise; the report says so).

    Inside every ``nn.TransformerEncoderLayer``, dead FFN neurons (zero rows of
    ``linear1``, their constant ``act(b1)`` folded into ``linear2``, or zero
    columns of ``linear2``) and dead attention heads (zero value weights, their
    constant folded into ``out_proj``, or zero ``out_proj`` columns) are
    removed; a layer that loses heads becomes a :class:`CompactEncoderLayer`.
    A head with zero query or key weights attends uniformly and is kept.

    Layers and operations it cannot follow (other layer types, LayerNorm, the
    hidden units of recurrent layers, shared modules or tied weights, modules
    whose forward cannot be traced, reshapes other than flatten, ...) are left
    as they are, the units flowing through them are kept, and
    ``report.skipped`` says which and why. Model outputs keep all their units.
    Every resized layer keeps at least one unit.

    The original model is not modified. The result is a copy of it (same
    classes, except the replaced layers) in eval mode, without the hooks
    sparsecraft registered on the original (a training ``Regularizer``'s
    activity hooks would otherwise record the copy's outputs): its outputs
    equal the original's eval-mode outputs up to float rounding
    (``report.max_abs_diff`` is measured on the example inputs). A layer
    without bias gets one when a constant is folded into it.

    Args:
        model: The model to compact.
        example_inputs: Inputs for one forward call: a tensor, a tuple/list
            of positional inputs, or a dict of keyword inputs.

    Returns:
        ``(compacted_model, report)``; see :class:`CompactReport`.

    Raises:
        TypeError: If ``model`` is not a torch ``nn.Module`` built from torch
            layers (a Keras 3 model is refused), or the inputs do not fit it.
    """
    check_torch_model(model, "compact")
    args, kwargs = call_args(model, example_inputs)
    work = copy.deepcopy(model).eval()
    strip_sparsecraft_hooks(work)  # before the copy runs: its hooks would feed the user's terms
    report = CompactReport()
    with torch.no_grad():
        reference = work(*args, **kwargs)
    report.params_before = sum(p.numel() for p in work.parameters())
    report.flops_before = flops(work, example_inputs)
    with torch.no_grad():
        work = _compact_transformers(work, report) or work
    result = None
    try:
        gm, values, opaque = trace(work, args, kwargs, leaf_types=(CompactEncoderLayer,))
    except RuntimeError as err:
        report.skipped.append(("", str(err)))
    else:
        with torch.no_grad():
            ShapeProp(gm).propagate(*values)
        result = analyse(gm, opaque, _floating_like(work))
        report.skipped.extend(result.skipped)
    with torch.no_grad():
        if result is not None:
            report.layers.extend(_rewrite(work, result))
        work.eval()  # layers built by the rewrite start in training mode
        report.max_abs_diff = _max_abs_diff(reference, work(*args, **kwargs))
    report.params_after = sum(p.numel() for p in work.parameters())
    report.flops_after = flops(work, example_inputs)
    return work, report
