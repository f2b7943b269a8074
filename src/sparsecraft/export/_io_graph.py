"""The ``torch.fx`` graph form of a saved model: describe a traced forward, rebuild it safely.

Saving traces ``forward`` with every parameter as a graph input, its default
kept (``def forward(self, x, scale=3.0)`` loads with ``scale=3.0`` and still
accepts another value). A parameter whose default is ``None`` is fixed at
``None`` (``torch.fx`` cannot see an ``if mask is None`` on an input), and so is
a ``bool`` flag that ``torch.fx`` cannot branch on; the loaded model then
refuses another value for it with an error.

Rebuilding only creates nodes whose function, method or module comes from a
fixed table, and every name that reaches ``torch.fx`` code generation (node
names, placeholders, keyword names, module paths) is checked to be a plain
identifier that is not a Python keyword, so the generated ``forward`` is
valid Python that calls nothing outside the tables.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import operator
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from sparsecraft.export._format import (
    MAX_ARGUMENTS,
    MAX_LITERAL,
    MAX_MODULES,
    MAX_NODES,
    check_count,
    invalid,
    is_name,
    is_path,
)
from sparsecraft.export._hooks import is_sparsecraft_hook
from sparsecraft.export._layers import LAYERS, _unsupported, layer_spec
from sparsecraft.export._trace import _Tracer

FUNCTIONS: dict[str, Any] = {
    "operator.add": operator.add, "operator.sub": operator.sub, "operator.mul": operator.mul,
    "operator.truediv": operator.truediv, "operator.iadd": operator.iadd,
    "operator.isub": operator.isub, "operator.imul": operator.imul,
    "operator.getitem": operator.getitem, "operator.eq": operator.eq, "operator.ne": operator.ne,
    "operator.lt": operator.lt, "operator.le": operator.le, "operator.gt": operator.gt,
    "operator.ge": operator.ge,
    "operator.neg": operator.neg, "operator.matmul": operator.matmul,
    "operator.pow": operator.pow, "operator.floordiv": operator.floordiv,
    "getattr": builtins.getattr,
    "torch.flatten": torch.flatten, "torch.relu": torch.relu, "torch.sigmoid": torch.sigmoid,
    "torch.tanh": torch.tanh, "torch.add": torch.add, "torch.sub": torch.sub,
    "torch.mul": torch.mul, "torch.cat": torch.cat, "torch.mean": torch.mean,
    "torch.sum": torch.sum, "torch.softmax": torch.softmax, "torch.abs": torch.abs,
    "torch.matmul": torch.matmul, "torch.stack": torch.stack, "torch.where": torch.where,
    "torch.arange": torch.arange, "torch.full": torch.full, "torch.ones": torch.ones,
    "torch.zeros": torch.zeros, "torch.triu": torch.triu, "torch.tril": torch.tril,
    "torch._assert": torch._assert,
    "torch.fx._symbolic_trace._assert_is_none": fx._symbolic_trace._assert_is_none,
    "F.relu": F.relu, "F.relu6": F.relu6, "F.gelu": F.gelu, "F.silu": F.silu,
    "F.leaky_relu": F.leaky_relu, "F.elu": F.elu, "F.sigmoid": F.sigmoid, "F.tanh": F.tanh,
    "F.softmax": F.softmax, "F.log_softmax": F.log_softmax, "F.max_pool2d": F.max_pool2d,
    "F.avg_pool2d": F.avg_pool2d, "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "F.linear": F.linear, "F.layer_norm": F.layer_norm, "F.dropout": F.dropout,
    "F.scaled_dot_product_attention": F.scaled_dot_product_attention,
}  # fmt: skip
METHODS = frozenset({
    "relu", "relu_", "sigmoid", "tanh", "abs", "neg", "flatten", "view", "reshape", "size",
    "dim", "add", "add_", "sub", "mul", "mul_", "div", "mean", "sum", "softmax",
    "log_softmax", "contiguous", "permute", "transpose", "unsqueeze", "squeeze",
    "masked_fill", "expand", "chunk", "split", "matmul", "float", "bool", "long", "to",
    "type_as", "t",
})  # fmt: skip
# attributes ``getattr`` may read in a graph (fx records ``x.shape`` / ``x.device`` this way)
ATTRIBUTES = frozenset({"shape", "device", "dtype", "ndim", "T", "mT"})
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool)}  # fmt: skip
_FUNCTION_NAMES = {id(fn): name for name, fn in FUNCTIONS.items()}


@contextlib.contextmanager
def _without_sparsecraft_hooks(model: nn.Module) -> Iterator[None]:
    """Hides sparsecraft's forward hooks while ``torch.fx`` traces ``model``, then restores them.

    Tracing calls every module that is not a leaf through ``nn.Module.__call__``,
    so its forward hooks run with ``torch.fx`` proxies as outputs: a training
    ``Regularizer``'s activity terms and an ``ActivationMonitor`` would be fed
    symbolic values, or add their own operations to the saved graph. The hook
    dictionaries are swapped for filtered copies and the originals put back, so
    nothing is copied but the dictionaries and the user's handles stay valid.
    """
    swapped: list[tuple[nn.Module, str, Any]] = []
    try:
        for module in model.modules():
            for attr in ("_forward_hooks", "_forward_pre_hooks"):
                hooks = module.__dict__.get(attr)
                if hooks and any(is_sparsecraft_hook(h) for h in hooks.values()):
                    swapped.append((module, attr, hooks))
                    setattr(module, attr, OrderedDict(
                        (k, h) for k, h in hooks.items() if not is_sparsecraft_hook(h)))
        yield
    finally:
        for module, attr, hooks in swapped:
            setattr(module, attr, hooks)


def _trace(model: nn.Module) -> fx.GraphModule:
    """Traces ``model.forward`` keeping its parameters (and defaults) as graph inputs."""
    signature = inspect.signature(model.forward)
    for name, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise _unsupported(f"a forward with *args/**kwargs (parameter {name!r} of "
                               f"{type(model).__name__}.forward)")
    defaults = {n: p.default for n, p in signature.parameters.items() if p.default is not p.empty}
    # ``mask is None`` on a traced input is always False, silently: a None default is
    # always fixed (fx then asserts at call time that it is still None)
    nones = {n: v for n, v in defaults.items() if v is None}
    flags = {n: v for n, v in defaults.items() if v is None or isinstance(v, bool)}
    leaf_types = tuple(cls for cls, _ in LAYERS.values())
    error: Exception | None = None
    # keep the other parameters inputs; else fix the flags fx cannot branch on; else all
    for concrete in (nones, flags, defaults):
        try:
            with _without_sparsecraft_hooks(model):
                graph = _Tracer(set(), leaf_types).trace(model, concrete_args=concrete or None)
            return fx.GraphModule(model, graph)
        except Exception as err:  # any tracing failure: try fixing more parameters
            error = err
    first = next(iter(str(error).splitlines()), "")
    raise _unsupported(f"{type(model).__name__}, which torch.fx cannot trace "
                       f"({type(error).__name__}: {first})")


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": None}
    if isinstance(value, torch.dtype) and str(value).removeprefix("torch.") in DTYPES:
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise _unsupported(f"a graph argument {value!r} of type {type(value).__name__}")


def _owned(path: str, layers: dict[str, Any]) -> bool:
    """Whether ``path`` (a tensor attribute) lies inside one of the saved layers."""
    parts = path.split(".")
    return any(".".join(parts[:i]) in layers for i in range(1, len(parts)))


def describe(model: nn.Module) -> tuple[dict[str, Any], dict[str, nn.Module], dict[str, Any]]:
    """The graph structure of ``model``, its layers by path and its free tensors by path.

    Free tensors are parameters, buffers and constants that ``forward`` reads
    directly (``get_attr``) outside any saved layer, such as a causal mask buffer.

    Raises:
        TypeError: If the forward uses anything outside the tables.
    """
    gm = _trace(model)
    modules: dict[str, nn.Module] = {}
    attrs: dict[str, torch.Tensor] = {}
    nodes = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_module":
            modules[target] = gm.get_submodule(target)
        elif node.op == "call_function":
            if id(target) not in _FUNCTION_NAMES:
                raise _unsupported(f"function {getattr(target, '__name__', target)!r}")
            target = _FUNCTION_NAMES[id(target)]
            if target == "getattr" and node.args[1] not in ATTRIBUTES:
                raise _unsupported(f"attribute {node.args[1]!r} read in forward")
        elif node.op == "call_method" and target not in METHODS:
            raise _unsupported(f"tensor method {target!r}")
        elif node.op == "get_attr":
            owner, _, name = target.rpartition(".")
            value = getattr(gm.get_submodule(owner), name)
            if not isinstance(value, torch.Tensor):
                raise _unsupported(f"attribute {target!r} of type {type(value).__name__}")
            attrs[target] = value
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": _encode(node.args),
                      "kwargs": {k: _encode(v) for k, v in node.kwargs.items()}})
    specs = {name: layer_spec(m, name) for name, m in modules.items()}
    free = {t: v for t, v in attrs.items() if not _owned(t, specs)}
    kinds = {t: "parameter" if isinstance(v, nn.Parameter) else "buffer" for t, v in free.items()}
    return {"kind": "graph", "modules": specs, "attributes": kinds, "nodes": nodes}, modules, free


# ---------------------------------------------------------------------------- rebuild
def _decode(value: Any, nodes: dict[str, fx.Node], budget: list[int]) -> Any:
    """Rebuilds an argument; ``budget[0]`` counts down the literal elements still allowed."""
    if isinstance(value, list) or isinstance(value, dict) and set(value) == {"tuple"}:
        items = value if isinstance(value, list) else value["tuple"]
        if not isinstance(items, list):
            raise invalid(f"graph argument {value!r:.200}")
        check_count("elements in one literal list or tuple", len(items), MAX_LITERAL)
        budget[0] -= len(items)
        if budget[0] < 0:
            raise invalid(f"graph arguments of more than {MAX_ARGUMENTS} literal elements")
        decoded = [_decode(v, nodes, budget) for v in items]
        return decoded if isinstance(value, list) else tuple(decoded)
    if isinstance(value, dict):
        (key, item), = value.items() if len(value) == 1 else ((None, None),)
        if key == "node" and isinstance(item, str) and item in nodes:
            return nodes[item]
        if key == "slice" and isinstance(item, list) and len(item) == 3:
            return slice(*(_decode(v, nodes, budget) for v in item))
        if key == "ellipsis" and item is None:
            return Ellipsis
        if key == "dtype" and item in DTYPES:
            return DTYPES[item]
        if key == "device" and isinstance(item, str):
            return torch.device(item)
        raise invalid(f"graph argument {value!r:.200}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise invalid(f"graph argument {value!r:.200}")


def _target(rec: dict[str, Any], modules: dict[str, Any], placeholders: set[str]) -> Any:
    op, target, name = rec["op"], rec["target"], rec["name"]
    if op == "call_function" and isinstance(target, str) and target in FUNCTIONS:
        return FUNCTIONS[target]
    if op == "call_module" and isinstance(target, str) and target in modules:
        return target
    if op == "call_method" and target in METHODS:
        return target
    if op == "get_attr" and isinstance(target, str) and is_path(target):
        return target
    if op == "output" and target == "output":
        return target
    if op == "placeholder" and is_name(target) and target != "self":
        if target in placeholders:
            raise invalid(f"placeholder {target!r} declared twice")
        placeholders.add(target)
        return target
    raise invalid(f"node {name!r} with op {op!r:.50} and target {target!r:.100}")


def build(structure: dict[str, Any], root: nn.Module) -> fx.GraphModule:
    """Builds the graph of a graph structure over ``root``, whose layers are already built.

    Raises:
        ValueError: If a node is malformed or uses anything outside the tables.
    """
    records = structure["nodes"]
    if not isinstance(records, list) or not records:
        raise invalid("graph structure without nodes")
    check_count("graph nodes", len(records), MAX_NODES)
    modules = structure["modules"]
    graph, nodes, placeholders, budget = fx.Graph(), {}, set(), [MAX_ARGUMENTS]
    for rec in records:
        if not isinstance(rec, dict) or set(rec) != {"name", "op", "target", "args", "kwargs"}:
            raise invalid(f"graph node {rec!r:.200}")
        name = rec["name"]
        if not is_name(name) or name in nodes:
            raise invalid(f"node name {name!r:.200}")
        target = _target(rec, modules, placeholders)
        kwargs = rec["kwargs"]
        if not isinstance(kwargs, dict) or not all(is_name(k) for k in kwargs):
            raise invalid(f"keyword arguments of node {name!r}")
        args = _decode(rec["args"], nodes, budget)
        if not isinstance(args, tuple):
            raise invalid(f"arguments of node {name!r}")
        if rec["op"] == "placeholder" and (kwargs or len(args) > 1 or any(
                isinstance(a, (fx.Node, list, tuple, slice)) for a in args)):
            raise invalid(f"placeholder {name!r} with a default that is not a literal")
        if target is builtins.getattr and (len(args) != 2 or args[1] not in ATTRIBUTES):
            raise invalid(f"getattr node {name!r} reading {args[1:]!r:.100}")
        nodes[name] = graph.create_node(rec["op"], target, args,
                                        {k: _decode(v, nodes, budget) for k, v in kwargs.items()}, name)
    if records[-1]["op"] != "output" or sum(r["op"] == "output" for r in records) != 1:
        raise invalid("graph without exactly one output node at the end")
    graph.lint()
    gm = fx.GraphModule(root, graph)  # generates forward's code; nothing of it runs here
    # a placeholder named like a global of the generated code ("torch") would shadow it
    clash = placeholders & set(type(gm).forward.__globals__)
    if clash:
        raise invalid(f"placeholder names {sorted(clash)} that shadow names of the generated code")
    return gm


def check_modules(modules: Any) -> None:
    """Checks the module table of a graph structure: paths and count."""
    if not isinstance(modules, dict):
        raise invalid("graph structure without a 'modules' table")
    check_count("modules", len(modules), MAX_MODULES)
    for path in modules:
        if not is_path(path):
            raise invalid(f"module path {path!r:.200}")
