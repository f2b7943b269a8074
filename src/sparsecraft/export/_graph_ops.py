"""Channel rules of ``_graph`` for embeddings, recurrent layers, norms over features,
softmax, reductions and concatenation (issue 11, item 7).

Each rule takes the analyser, the node and the layout of its first input and
returns the layout of the output (``None`` when the channels are not followed
past it, after pinning or skipping with a reason).

* ``Embedding`` opens a channel space over its ``embedding_dim`` features; a
  feature whose weight column is zero is the constant 0 for every token.
* ``LSTM``/``GRU``/``RNN`` read their input features through ``weight_ih_l0``
  (both directions): an input feature they do not read, or a constant one
  (folded into ``bias_ih_l0``), is removed before them. Their hidden units are
  not removed: they feed back through ``weight_hh`` and the gates, so a zero
  input row does not make a unit constant.
* ``LayerNorm``/``GroupNorm`` normalise over the features: every feature counts
  in the mean and variance, so none can be removed before them.
* ``softmax``/``log_softmax`` over a non-channel dimension, and ``mean``/``sum``/
  ``amax``/``amin`` over non-channel dimensions, keep the channels (a constant
  channel stays constant); over the channel dimension they mix channels.
* ``cat`` of followed tensors along a non-channel dimension joins their spaces
  (as a residual add does); along the channel dimension it is not followed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from sparsecraft.export._channels import _RNN, Layout

_SOFTMAX = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax, "softmax", "log_softmax"}
_REDUCE = {
    torch.mean: "mean", "mean": "mean", torch.sum: "sum", "sum": "sum",
    torch.amax: "max", "amax": "max", torch.amin: "min", "amin": "min",
}  # fmt: skip
_CAT = {torch.cat, torch.concat, torch.concatenate}
FEATURE_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _arg(node: fx.Node, index: int, name: str, default):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def visit_embedding(an, node: fx.Node, name: str, module: nn.Embedding) -> Layout | None:
    """An Embedding output: a new space over its features, zero columns constant 0."""
    if module.max_norm is not None:
        an.skip(node, "Embedding with max_norm renormalises rows: its features are kept")
        return None
    weight = module.weight.detach()
    zero = (weight == 0).all(0).cpu()
    out = an.new_space(node, weight.shape[1], -1, torch.zeros(weight.shape[1],
                                                              dtype=torch.float64), zero)
    if out is None:
        an.skip(node, "its output shape is unknown")
        return None
    an.result.producers[name] = out.space
    return out


def visit_recurrent(an, node: fx.Node, name: str, module: nn.RNNBase,
                    layout: Layout | None) -> None:
    """An LSTM/GRU/RNN reads its input features; its hidden units are kept."""
    ndim = len(layout.shape) if layout is not None else 0
    if layout is not None and layout.dim == ndim - 1 and layout.rep == 1:
        an.result.consumers[name] = layout
    elif layout is not None:
        an.pins.append(layout.space)
    reason = (f"{type(module).__name__} hidden units are kept: they feed back through "
              "weight_hh and the gates, so removing one is not exact in general")
    if (name, reason) not in an.result.skipped:
        an.result.skipped.append((name, reason))


def visit_feature_norm(an, node: fx.Node, module: nn.Module) -> None:
    an.skip(node, f"{type(module).__name__} normalises over all its features: every one "
                  "counts in the mean and variance, so none is removed before it")


def visit_softmax(an, node: fx.Node, layout: Layout, out_shape) -> Layout | None:
    dim = _arg(node, 1, "dim", None)
    if not isinstance(dim, int) or set(node.kwargs) - {"dim", "dtype"}:
        an.skip(node, "softmax without an explicit integer dim is not followed")
        return None
    if dim % len(layout.shape) == layout.dim:
        an.skip(node, "softmax over the channel dimension mixes channels")
        return None
    return an.probe(layout, lambda x: x.softmax(dim) if node.target in (
        F.softmax, torch.softmax, "softmax") else x.log_softmax(dim), out_shape)


def visit_reduce(an, node: fx.Node, layout: Layout, out_shape) -> Layout | None:
    kind = _REDUCE[node.target]
    dims = _arg(node, 1, "dim", None)
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if set(node.kwargs) - {"dim", "keepdim"} or out_shape is None or layout.rep != 1:
        an.skip(node, f"{kind} with these arguments is not followed")
        return None
    ndim = len(layout.shape)
    dims = [dims] if isinstance(dims, int) else dims
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        an.skip(node, f"{kind} over all dimensions mixes channels")
        return None
    dims = sorted({d % ndim for d in dims})
    if layout.dim in dims:
        an.skip(node, f"{kind} over the channel dimension mixes channels")
        return None
    dim = layout.dim if keepdim else layout.dim - sum(d < layout.dim for d in dims)
    const = layout.const * math.prod(layout.shape[d] for d in dims) if kind == "sum" \
        else layout.const
    return Layout(layout.space, dim, 1, out_shape, const, layout.is_const & const.isfinite())


def visit_cat(an, node: fx.Node, out_shape) -> Layout | None:
    parts = _arg(node, 0, "tensors", None)
    dim = _arg(node, 1, "dim", 0)
    layouts = [an.values.get(p) if isinstance(p, fx.Node) else None for p in parts or ()]
    first = layouts[0] if layouts else None
    ok = (
        first is not None and isinstance(dim, int) and out_shape is not None
        and all(lay is not None and lay.dim == first.dim and lay.rep == first.rep
                and len(lay.shape) == len(first.shape) for lay in layouts)
    )
    if not ok or dim % len(first.shape) == first.dim:
        an.skip(node, "concatenation along the channel dimension, or of tensors whose "
                      "channels are not followed, is not followed")
        return None
    space, const, is_const = first.space, first.const, first.is_const
    for lay in layouts[1:]:
        space = an.result.spaces.union(space, lay.space)
        is_const = is_const & lay.is_const & (lay.const == const)
    return Layout(space, first.dim, first.rep, out_shape, const, is_const)


def function_rule(key) -> str | None:
    """Which rule of this file handles a called function or method, if any."""
    if key in _SOFTMAX:
        return "softmax"
    if key in _REDUCE:
        return "reduce"
    if key in _CAT:
        return "cat"
    return None


def is_recurrent(module: nn.Module) -> bool:
    return type(module) in _RNN
