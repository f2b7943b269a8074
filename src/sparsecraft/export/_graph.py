"""Channel analysis of a traced model, the first half of :func:`compact`.

Every ``Linear``/``Conv`` output opens a *channel space*: the set of units
(features, channels) that flow, unchanged in number, through the element-wise
and channel-wise operations after it (BatchNorm, activations, pooling,
flatten) until the next Linear/Conv reads them. A residual ``add`` joins the
spaces of its two operands: they must keep the same units.

For every traced value the analysis records its space, which dimension holds
the channels, how many contiguous features each channel occupies (``rep``,
> 1 after flatten) and, per channel, whether the value is a known constant
(a unit whose incoming weights are all zero outputs ``act(bias)``; BatchNorm
shifts that constant). A channel of a space can be removed when no reader
needs it physically: a Linear/Conv reader needs it unless its weight column
is zero or the channel is a constant that can be folded into the reader's
bias; anything the analysis does not understand (a model output, an unknown
layer or function) needs every channel.

The approach is the dependency-graph idea of structured pruning tools such as
Torch-Pruning (Fang et al., "DepGraph", CVPR 2023), reduced to exact
removal of zero structure; the code is written for sparsecraft. This file
walks the graph; the records it keeps (:class:`Layout`, :class:`Spaces`,
:class:`Analysis`) and the weight queries are in ``_channels``.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from sparsecraft.export._channels import (
    _CONV,
    _LINEAR,
    _NORM,
    Analysis,
    Layout,
    column_nonzero,
    column_weights,
    folds_only_zero,
    zero_padded,
)
from sparsecraft.export._graph_ops import (
    FEATURE_NORMS,
    function_rule,
    is_recurrent,
    visit_cat,
    visit_embedding,
    visit_feature_norm,
    visit_recurrent,
    visit_reduce,
    visit_softmax,
)
from sparsecraft.export._transformer import CompactEncoderLayer

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout,
)  # fmt: skip
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, torch.abs, torch.neg, F.relu, F.relu6, F.gelu,
    F.silu, F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.hardtanh, F.hardswish,
    F.hardsigmoid, F.mish, F.sigmoid, F.tanh, F.softsign,
}  # fmt: skip
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "abs", "neg", "contiguous"}
_BINARY = {
    operator.add: operator.add, operator.iadd: operator.add, torch.add: operator.add,
    operator.sub: operator.sub, operator.isub: operator.sub, torch.sub: operator.sub,
    operator.mul: operator.mul, operator.imul: operator.mul, torch.mul: operator.mul,
    operator.truediv: operator.truediv, torch.div: operator.truediv,
    "add": operator.add, "add_": operator.add, "sub": operator.sub, "sub_": operator.sub,
    "mul": operator.mul, "mul_": operator.mul, "div": operator.truediv,
}  # fmt: skip
_INPLACE = {operator.iadd, operator.isub, operator.imul, "relu_", "add_", "sub_", "mul_"}
_CONST_TOL = 1e-6


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _nodes_in(value: object) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


class _Analyser:
    def __init__(self, gm: fx.GraphModule, opaque: dict[str, str], like: torch.Tensor) -> None:
        self.gm = gm
        self.opaque = opaque
        self.like = like  # dtype and device on which constants are pushed through layers
        self.result = Analysis()
        self.values: dict[fx.Node, Layout | None] = {}
        self.pins: list[int] = []
        self.calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
        self.direct = {
            n.target.rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"
        }
        # A parameter shared by two modules (tied embedding/output weights) cannot be
        # resized for one of them without untying or changing the other.
        owners: dict[int, list[str]] = {}
        for mod_name, mod in gm.named_modules():
            for p in mod.parameters(recurse=False):
                if mod_name not in owners.setdefault(id(p), []):
                    owners[id(p)].append(mod_name)
        self.tied = {n: [o for o in names if o != n] for names in owners.values()
                     if len(names) > 1 for n in names}

    # ------------------------------------------------------------------ helpers
    def skip(self, node: fx.Node, reason: str) -> None:
        self.pin_all(node)
        name = node.target if node.op == "call_module" else node.name
        if (name, reason) not in self.result.skipped:
            self.result.skipped.append((name, reason))

    def pin_all(self, node: fx.Node) -> None:
        for arg in _nodes_in((node.args, node.kwargs)):
            layout = self.values.get(arg)
            if layout is not None:
                self.pins.append(layout.space)

    def new_space(self, node: fx.Node, size: int, dim: int, const: torch.Tensor,
                  is_const: torch.Tensor) -> Layout | None:
        shape = _shape(node)
        if shape is None:
            return None
        space = self.result.spaces.new(size)
        return Layout(space, dim % len(shape), 1, shape, const, is_const & const.isfinite())

    def probe(self, layout: Layout, fn, out_shape: tuple[int, ...] | None) -> Layout | None:
        """Applies a channel-preserving op to a tensor holding the constants, per channel."""
        if out_shape is None or len(out_shape) != len(layout.shape):
            return None
        shape = list(layout.shape)
        if layout.dim != 0:
            shape[0] = 1
        fill = torch.where(layout.is_const, layout.const, 0.0).repeat_interleave(layout.rep)
        view = [1] * len(shape)
        view[layout.dim] = fill.numel()
        x = fill.to(self.like).reshape(view).expand(shape).contiguous()
        with torch.no_grad():
            y = fn(x)
        if not isinstance(y, torch.Tensor) or y.shape[layout.dim] != fill.numel():
            return None
        rows = y.detach().cpu().double().movedim(layout.dim, 0).reshape(layout.const.numel(), -1)
        mean = rows.mean(1)
        flat = (rows.amax(1) - rows.amin(1)) <= _CONST_TOL * (1 + mean.abs())
        is_const = layout.is_const & flat & mean.isfinite()
        return Layout(layout.space, layout.dim, layout.rep, out_shape, mean, is_const)

    def flatten(self, layout: Layout, start: int, end: int, out_shape) -> Layout | None:
        n = len(layout.shape)
        start, end = start % n, end % n
        if out_shape is None or end < start:
            return None
        if layout.dim < start:
            dim, rep = layout.dim, layout.rep
        elif layout.dim > end:
            dim, rep = layout.dim - (end - start), layout.rep
        elif layout.dim == start:
            dim, rep = start, layout.rep * math.prod(layout.shape[start + 1 : end + 1])
        else:
            return None
        return Layout(layout.space, dim, rep, out_shape, layout.const, layout.is_const)

    # ------------------------------------------------------------------ node kinds
    def run(self) -> Analysis:
        for node in self.gm.graph.nodes:
            self.values[node] = self.visit(node)
        self.decide()
        return self.result

    def visit(self, node: fx.Node) -> Layout | None:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            self.pin_all(node)
            return None
        if node.op == "call_module":
            return self.visit_module(node)
        return self.visit_function(node)

    def inplace_alias(self, node: fx.Node, key) -> bool:
        first = node.args[0] if node.args else None
        return key in _INPLACE and isinstance(first, fx.Node) and len(first.users) > 1

    def visit_module(self, node: fx.Node) -> Layout | None:
        name = node.target
        module = self.gm.get_submodule(name)
        if name in self.opaque:
            self.skip(node, self.opaque[name])
            return None
        stateless = not any(True for _ in module.parameters()) and not any(
            True for _ in module.buffers()
        )
        if self.calls[name] > 1 and not stateless:
            self.skip(node, "the module is called more than once (shared weights)")
            return None
        if name in self.direct:
            self.skip(node, "its parameters are read directly in forward")
            return None
        if name in self.tied:
            self.skip(node, f"its weight is tied to {', '.join(self.tied[name])} (one shared "
                            "parameter): resizing it would untie or change the other")
            return None
        if isinstance(module, (nn.TransformerEncoderLayer, CompactEncoderLayer)):
            self.skip(node, "its d_model features pass LayerNorm and attention: they are "
                            "kept (dead FFN neurons and heads inside it are removed separately)")
            return None
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if src is None or len(node.args) != 1 or node.kwargs:
            self.skip(node, "it is not called with exactly one tensor input")
            return None
        layout = self.values.get(src)
        out_shape = _shape(node)
        kind = type(module)
        if kind in _LINEAR or (kind in _CONV and module.groups == 1):
            return self.visit_layer(node, name, module, layout)
        if kind is nn.Embedding:
            if layout is not None:
                self.pins.append(layout.space)
            return visit_embedding(self, node, name, module)
        if is_recurrent(module):
            return visit_recurrent(self, node, name, module, layout)
        if isinstance(module, FEATURE_NORMS):
            return visit_feature_norm(self, node, module)
        if getattr(module, "inplace", False) and len(src.users) > 1:
            self.skip(node, "an in-place op on a tensor that is also read elsewhere")
            return None
        if layout is None:
            if kind not in _ELEMENTWISE_MODULES + _POOL_MODULES + _NORM + (nn.Flatten,):
                self.skip(node, f"{kind.__name__} is not a layer compact can follow")
            return None
        if kind in _ELEMENTWISE_MODULES or (kind is nn.PReLU and module.num_parameters == 1):
            return self.probe(layout, module, out_shape) or self._bad(node, kind)
        if kind in _NORM and module.running_mean is not None and layout.rep == 1 \
                and layout.dim == 1:
            out = self.probe(layout, module, out_shape)
            if out is not None:
                self.result.norms[name] = layout.space
                return out
        if kind in _POOL_MODULES and layout.rep == 1 and layout.dim == 1 \
                and not getattr(module, "return_indices", False):
            return self.probe(layout, module, out_shape) or self._bad(node, kind)
        if kind is nn.Flatten:
            out = self.flatten(layout, module.start_dim, module.end_dim, out_shape)
            return out or self._bad(node, kind)
        reason = f"{kind.__name__} is not a layer compact can follow"
        if kind in _CONV:
            reason = "grouped convolution (groups > 1) is not followed"
        elif kind in _NORM:
            reason = "BatchNorm without running statistics, or not over the channel dimension"
        self.skip(node, reason)
        return None

    def _bad(self, node: fx.Node, kind: type) -> None:
        self.skip(node, f"{kind.__name__} does not act on the channel dimension here")
        return None

    def visit_layer(self, node, name, module, layout: Layout | None) -> Layout | None:
        linear = isinstance(module, _LINEAR)
        followed = layout is not None and (
            layout.dim == len(layout.shape) - 1 if linear else (layout.dim == 1 and layout.rep == 1)
        )
        if layout is not None and not followed:
            self.pins.append(layout.space)
        weight = module.weight.detach()
        bias = (
            module.bias.detach().cpu().double() if module.bias is not None
            else torch.zeros(weight.shape[0], dtype=torch.float64)
        )
        nonzero = column_nonzero(module, layout.rep if followed else 1)
        if followed:
            self.result.consumers[name] = layout
            constant_in = torch.where(layout.is_const, layout.const, 0.0)
            blocking = ~layout.is_const
            if not linear and zero_padded(module):
                blocking = blocking | (constant_in != 0)
            row_const = ~(nonzero & blocking[None, :]).any(1)
            value = bias + column_weights(module, layout.rep) @ constant_in
        else:
            row_const = ~nonzero.any(1)
            value = bias
        out = self.new_space(node, weight.shape[0], -1 if linear else 1, value, row_const)
        if out is None:
            self.skip(node, "its output shape is unknown")
            return None
        self.result.producers[name] = out.space
        return out

    def visit_function(self, node: fx.Node) -> Layout | None:
        key = node.target
        tensors = [self.values.get(a) for a in _nodes_in((node.args, node.kwargs))]
        if not any(t is not None for t in tensors):
            return None
        first = node.args[0] if node.args else None
        layout = self.values.get(first) if isinstance(first, fx.Node) else None
        out_shape = _shape(node)
        if self.inplace_alias(node, key):
            self.skip(node, "an in-place op on a tensor that is also read elsewhere")
            return None
        rule = function_rule(key)
        if rule == "cat":
            return visit_cat(self, node, out_shape)
        if rule is not None and layout is not None and not _nodes_in(
                (node.args[1:], node.kwargs)):
            if rule == "softmax":
                return visit_softmax(self, node, layout, out_shape)
            return visit_reduce(self, node, layout, out_shape)
        if key in _BINARY and len(node.args) == 2 and not node.kwargs:
            return self.visit_binary(node, _BINARY[key], out_shape)
        scalars_only = not _nodes_in((node.args[1:], node.kwargs))
        if layout is not None and scalars_only:
            elementwise = key in _ELEMENTWISE_METHODS if node.op == "call_method" else (
                key in _ELEMENTWISE_FUNCTIONS
            )
            if elementwise and not node.kwargs.get("inplace", False):
                args, kwargs = node.args[1:], node.kwargs
                if node.op == "call_method":
                    return self.probe(layout, lambda x: getattr(x, key)(*args, **kwargs), out_shape)
                return self.probe(layout, lambda x: key(x, *args, **kwargs), out_shape)
        if layout is not None and all(self.values.get(a) is None for a in _nodes_in(
                (node.args[1:], node.kwargs))):
            out = self.visit_shape_op(node, layout, out_shape)
            if out is not False:
                return out
        what = key if isinstance(key, str) else getattr(key, "__name__", str(key))
        self.skip(node, f"operation {what!r} is not followed")
        return None

    def visit_shape_op(self, node: fx.Node, layout: Layout, out_shape):
        """flatten / view(n, -1) / size(d) / .shape; returns False when not one of them."""
        key, args, kwargs = node.target, node.args, node.kwargs
        if key in (torch.flatten, "flatten"):
            start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
            end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
            return self.flatten(layout, start, end, out_shape) if not kwargs.keys() - {
                "start_dim", "end_dim"} else False
        if key in ("view", "reshape") and not kwargs and out_shape is not None:
            rest = args[1:]
            if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
                rest = tuple(rest[0])
            if len(rest) == 2 and rest[1] == -1 and rest[0] != -1 and len(out_shape) == 2:
                return self.flatten(layout, 1, -1, out_shape)
            return False
        if key == "size" and len(args) == 2 and isinstance(args[1], int) and not kwargs:
            if args[1] % len(layout.shape) != layout.dim:
                return None
            return False
        if key == "dim" and len(args) == 1:
            return None
        if key is getattr and len(args) == 2 and args[1] == "shape":
            reads = [u for u in node.users if u.target is operator.getitem]
            if len(reads) == len(node.users) and all(
                isinstance(u.args[1], int) and u.args[1] % len(layout.shape) != layout.dim
                for u in reads
            ):
                return None
        return False

    def visit_binary(self, node: fx.Node, op, out_shape) -> Layout | None:
        a, b = node.args
        la = self.values.get(a) if isinstance(a, fx.Node) else None
        lb = self.values.get(b) if isinstance(b, fx.Node) else None
        if la is not None and lb is not None:
            same = (la.shape == lb.shape == out_shape and la.dim == lb.dim and la.rep == lb.rep)
            if same:
                space = self.result.spaces.union(la.space, lb.space)
                value = op(la.const, lb.const)
                is_const = la.is_const & lb.is_const & value.isfinite()
                return Layout(space, la.dim, la.rep, out_shape, value, is_const)
        elif la is not None and isinstance(b, (int, float)) and not isinstance(b, bool):
            return self.probe(la, lambda x: op(x, b), out_shape)
        elif lb is not None and isinstance(a, (int, float)) and not isinstance(a, bool):
            return self.probe(lb, lambda x: op(a, x), out_shape)
        self.skip(node, "a binary operation on tensors of different shapes or unknown channels")
        return None

    # ------------------------------------------------------------------ decision
    def decide(self) -> None:
        spaces = self.result.spaces
        needed = {}
        for s in range(len(spaces.parent)):
            root = spaces.find(s)
            needed.setdefault(root, torch.zeros(spaces.size[root], dtype=torch.bool))
        for s in self.pins:
            needed[spaces.find(s)][:] = True
        for name, layout in self.result.consumers.items():
            module = self.gm.get_submodule(name)
            read = column_nonzero(module, layout.rep).any(0)
            foldable = layout.is_const.clone()
            if folds_only_zero(module):
                blocked = read & layout.is_const & (layout.const != 0)
                if blocked.any():
                    self.result.skipped.append((name, (
                        f"{int(blocked.sum())} constant input channel(s) kept: a non-zero "
                        "constant is not constant at a zero-padded border (or there is no "
                        "bias to fold it into)")))
                foldable &= layout.const == 0
            needed[spaces.find(layout.space)] |= read & ~foldable
        for mask in needed.values():
            if not mask.any():
                mask[0] = True  # keep one unit so that every layer keeps a valid shape
        self.result.keep = needed


def analyse(gm: fx.GraphModule, opaque: dict[str, str], like: torch.Tensor) -> Analysis:
    """Runs the channel analysis on a traced, shape-propagated graph module.

    All masks and constants of the result live on the CPU in float64.

    Args:
        gm: Graph module whose nodes carry ``tensor_meta`` (``ShapeProp``).
        opaque: Submodules kept as leaves because they could not be traced, with reasons.
        like: A tensor with the model's floating dtype and device, on which
            constants are pushed through its layers.

    Returns:
        The :class:`Analysis`.
    """
    return _Analyser(gm, opaque, like).run()
