"""``save`` / ``load``: safetensors weights, a JSON structure header, a checksum.

File layout (one ``.safetensors`` file):

* tensors: the ``state_dict`` entries of every layer under its qualified name
  (``"0.weight"``, ``"block.conv1.bias"``); a :class:`SparseLinear` stores its
  CSR components ``crow_indices``, ``col_indices`` (int32) and ``values``, so
  its size grows with the number of non-zeros, not with the dense shape;
* metadata ``sparsecraft.structure``: JSON describing how to rebuild the model
  from an allowlist of layer types, either a tree of ``nn.Sequential`` or a
  ``torch.fx`` graph of allowlisted layers, functions and tensor methods;
* metadata ``sparsecraft.sha256``: SHA-256 over the structure and every tensor
  (name, dtype, shape, bytes). A mismatch refuses the whole file.

Loading never executes code from the file: no pickle; layer types, functions
and methods are looked up in fixed tables; every name that reaches
``torch.fx`` code generation is checked to be a plain identifier first.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import fx, nn

from sparsecraft.export._sparse import KERNELS, SparseLinear
from sparsecraft.export._trace import trace

FORMAT_VERSION = "1"
_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
         "groups", "bias", "padding_mode")
_NORM = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_POOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_AVG1 = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
_AVG = (*_AVG1, "divisor_override")
# type name -> (class, constructor arguments read from attributes of the same name)
LAYERS: dict[str, tuple[type, tuple[str, ...]]] = {
    "Linear": (nn.Linear, ("in_features", "out_features", "bias")),
    "Conv1d": (nn.Conv1d, _CONV), "Conv2d": (nn.Conv2d, _CONV), "Conv3d": (nn.Conv3d, _CONV),
    "BatchNorm1d": (nn.BatchNorm1d, _NORM), "BatchNorm2d": (nn.BatchNorm2d, _NORM),
    "BatchNorm3d": (nn.BatchNorm3d, _NORM),
    "LayerNorm": (nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine", "bias")),
    "ReLU": (nn.ReLU, ("inplace",)), "ReLU6": (nn.ReLU6, ("inplace",)),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope", "inplace")),
    "ELU": (nn.ELU, ("alpha", "inplace")), "SELU": (nn.SELU, ("inplace",)),
    "GELU": (nn.GELU, ("approximate",)), "SiLU": (nn.SiLU, ("inplace",)),
    "Mish": (nn.Mish, ("inplace",)), "Sigmoid": (nn.Sigmoid, ()), "Tanh": (nn.Tanh, ()),
    "Hardtanh": (nn.Hardtanh, ("min_val", "max_val", "inplace")),
    "Softplus": (nn.Softplus, ("beta", "threshold")), "Identity": (nn.Identity, ()),
    "Softmax": (nn.Softmax, ("dim",)), "LogSoftmax": (nn.LogSoftmax, ("dim",)),
    "Dropout": (nn.Dropout, ("p", "inplace")), "Dropout2d": (nn.Dropout2d, ("p", "inplace")),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "MaxPool1d": (nn.MaxPool1d, _POOL), "MaxPool2d": (nn.MaxPool2d, _POOL),
    "AvgPool1d": (nn.AvgPool1d, _AVG1), "AvgPool2d": (nn.AvgPool2d, _AVG),
    "AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d, ("output_size",)),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "SparseLinear": (SparseLinear, ("in_features", "out_features", "bias", "kernel")),
}  # fmt: skip
FUNCTIONS: dict[str, Any] = {
    "operator.add": operator.add, "operator.sub": operator.sub, "operator.mul": operator.mul,
    "operator.truediv": operator.truediv, "operator.iadd": operator.iadd,
    "operator.isub": operator.isub, "operator.imul": operator.imul,
    "operator.getitem": operator.getitem, "operator.eq": operator.eq,
    "torch.flatten": torch.flatten, "torch.relu": torch.relu, "torch.sigmoid": torch.sigmoid,
    "torch.tanh": torch.tanh, "torch.add": torch.add, "torch.sub": torch.sub,
    "torch.mul": torch.mul, "torch.cat": torch.cat, "torch.mean": torch.mean,
    "torch.sum": torch.sum, "torch.softmax": torch.softmax, "torch.abs": torch.abs,
    "torch._assert": torch._assert,
    "torch.fx._symbolic_trace._assert_is_none": fx._symbolic_trace._assert_is_none,
    "F.relu": F.relu, "F.relu6": F.relu6, "F.gelu": F.gelu, "F.silu": F.silu,
    "F.leaky_relu": F.leaky_relu, "F.elu": F.elu, "F.sigmoid": F.sigmoid, "F.tanh": F.tanh,
    "F.softmax": F.softmax, "F.log_softmax": F.log_softmax, "F.max_pool2d": F.max_pool2d,
    "F.avg_pool2d": F.avg_pool2d, "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
}  # fmt: skip
METHODS = frozenset({
    "relu", "relu_", "sigmoid", "tanh", "abs", "neg", "flatten", "view", "reshape", "size",
    "dim", "add", "add_", "sub", "mul", "mul_", "div", "mean", "sum", "softmax",
    "log_softmax", "contiguous", "permute", "transpose", "unsqueeze", "squeeze",
})  # fmt: skip
_FUNCTION_NAMES = {id(fn): name for name, fn in FUNCTIONS.items()}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\Z")


def _unsupported(what: str) -> TypeError:
    return TypeError(
        "Expected a model made of nn.Sequential containers or a torch.fx-traceable forward "
        f"over supported layers ({', '.join(LAYERS)}), functions and tensor methods. "
        f"Received: {what}"
    )


# ---------------------------------------------------------------------------- describe
def _layer_spec(module: nn.Module, where: str) -> dict[str, Any]:
    name = type(module).__name__
    if name not in LAYERS or type(module) is not LAYERS[name][0]:
        raise _unsupported(f"layer {where or '<root>'!r} of type {type(module).__name__}")
    config = {}
    for attr in LAYERS[name][1]:
        value = getattr(module, attr)
        config[attr] = value is not None if attr == "bias" else value
    return {"type": name, "config": _jsonable(config)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise _unsupported(f"a layer setting {value!r} of type {type(value).__name__}")


def _tree(module: nn.Module, where: str) -> dict[str, Any] | None:
    if type(module) is nn.Sequential:
        children = []
        for name, child in module.named_children():
            spec = _tree(child, f"{where}.{name}" if where else name)
            if spec is None:
                return None
            children.append([name, spec])
        return {"type": "Sequential", "children": children}
    if type(module).__name__ in LAYERS and type(module) is LAYERS[type(module).__name__][0]:
        return _layer_spec(module, where)
    return None


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise _unsupported(f"a graph argument {value!r} of type {type(value).__name__}")


def _graph(model: nn.Module) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    leaf_types = tuple(cls for cls, _ in LAYERS.values())
    try:
        gm, _, opaque = trace(model, None, None, leaf_types)
    except (RuntimeError, TypeError) as err:
        raise _unsupported(f"{type(model).__name__}, which torch.fx cannot trace ({err})") from err
    if opaque:
        name, reason = next(iter(opaque.items()))
        raise _unsupported(f"submodule {name!r}: {reason}")
    modules, nodes = {}, []
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_module":
            modules[target] = gm.get_submodule(target)
        elif node.op == "call_function":
            if id(target) not in _FUNCTION_NAMES:
                raise _unsupported(f"function {getattr(target, '__name__', target)!r}")
            target = _FUNCTION_NAMES[id(target)]
        elif node.op == "call_method" and target not in METHODS:
            raise _unsupported(f"tensor method {target!r}")
        elif node.op == "get_attr":
            raise _unsupported(f"a tensor attribute {target!r} read directly in forward")
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": _encode(node.args),
                      "kwargs": {k: _encode(v) for k, v in node.kwargs.items()}})
    specs = {name: _layer_spec(m, name) for name, m in modules.items()}
    return {"kind": "graph", "modules": specs, "nodes": nodes}, modules


def _describe(model: nn.Module) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    spec = _tree(model, "")
    if spec is not None:
        leaves = {n: m for n, m in model.named_modules() if type(m) is not nn.Sequential}
        return {"kind": "tree", "root": spec}, leaves
    return _graph(model)


def _digest(structure: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(b"sparsecraft/" + FORMAT_VERSION.encode() + b"\0")
    h.update(structure.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    return h.hexdigest()


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Saves ``model`` as one safetensors file: weights, structure and checksum.

    Supported structures: an ``nn.Sequential`` tree (nested Sequentials of
    supported layers, rebuilt as ``nn.Sequential``), or any module whose
    forward ``torch.fx`` can trace into supported layers, the functions in
    ``FUNCTIONS`` and the tensor methods in ``METHODS`` (residual blocks,
    models returned by :func:`compact`; rebuilt as a ``torch.fx.GraphModule``
    with the same submodule names and outputs). Forward parameters with a
    default are fixed at that default. Supported layers: Linear, Conv1d/2d/3d,
    BatchNorm1d/2d/3d, LayerNorm, the common activations, Dropout, Flatten,
    pooling and :class:`SparseLinear` (stored as CSR, so the file size grows
    with the number of non-zeros).

    Args:
        model: The model.
        path: Destination file (overwritten).

    Raises:
        TypeError: If the model contains a layer, function, method or
            argument outside the supported set (nothing is written).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected an nn.Module. Received: model={type(model).__name__}")
    structure, leaves = _describe(model)
    tensors = {}
    for prefix, module in leaves.items():
        for key, t in module.state_dict().items():
            tensors[f"{prefix}.{key}" if prefix else key] = t.detach().cpu().contiguous().clone()
    header = json.dumps(structure, sort_keys=True)
    metadata = {"format": "pt", "sparsecraft.version": FORMAT_VERSION,
                "sparsecraft.structure": header, "sparsecraft.sha256": _digest(header, tensors)}
    save_file(tensors, os.fspath(path), metadata=metadata)


# ---------------------------------------------------------------------------- rebuild
def _invalid(what: str) -> ValueError:
    return ValueError(f"Expected a valid sparsecraft model file. Received: {what}")


def _build_layer(spec: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    if not isinstance(spec, dict) or set(spec) != {"type", "config"} or spec["type"] not in LAYERS:
        raise _invalid(f"layer spec {spec!r:.200} at {prefix or '<root>'!r}")
    cls, fields = LAYERS[spec["type"]]
    config = spec["config"]
    if not isinstance(config, dict) or set(config) != set(fields):
        raise _invalid(f"settings {config!r:.200} for {spec['type']}")
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    own = {k[len(prefix) + 1:] if prefix else k: t for k, t in tensors.items()
           if (k.startswith(prefix + ".") if prefix else "." not in k)}
    if cls is SparseLinear:
        if config["kernel"] not in KERNELS or set(own) != (
            {"crow_indices", "col_indices", "values"} | ({"bias"} if config["bias"] else set())
        ):
            raise _invalid(f"SparseLinear tensors {sorted(own)} / kernel {config['kernel']!r}")
        return SparseLinear.from_csr(
            own["crow_indices"], own["col_indices"], own["values"],
            (config["out_features"], config["in_features"]), own.get("bias"), config["kernel"])
    with torch.device("meta"):  # sizes come from the file's tensors, never allocated blindly
        module = cls(**config)
    module.load_state_dict(own, strict=True, assign=True)
    return module


def _build_tree(spec: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    if isinstance(spec, dict) and spec.get("type") == "Sequential":
        if set(spec) != {"type", "children"} or not isinstance(spec["children"], list):
            raise _invalid(f"Sequential spec at {prefix or '<root>'!r}")
        seq = nn.Sequential()
        for item in spec["children"]:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                    and _PATH.match(item[0]) and "." not in item[0]):
                raise _invalid(f"child entry {item!r:.200}")
            name = item[0]
            seq.add_module(name, _build_tree(item[1], f"{prefix}.{name}" if prefix else name,
                                             tensors))
        return seq
    return _build_layer(spec, prefix, tensors)


def _decode(value: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if isinstance(value, dict):
        if set(value) == {"node"} and value["node"] in nodes:
            return nodes[value["node"]]
        if set(value) == {"tuple"} and isinstance(value["tuple"], list):
            return tuple(_decode(v, nodes) for v in value["tuple"])
        if set(value) == {"slice"} and isinstance(value["slice"], list) and len(value["slice"]) == 3:
            return slice(*(_decode(v, nodes) for v in value["slice"]))
        raise _invalid(f"graph argument {value!r:.200}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise _invalid(f"graph argument {value!r:.200}")


def _build_graph(structure: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    specs, records = structure.get("modules"), structure.get("nodes")
    if not isinstance(specs, dict) or not isinstance(records, list):
        raise _invalid("graph structure without 'modules' and 'nodes'")
    root = nn.Module()
    for path, spec in specs.items():
        if not isinstance(path, str) or not _PATH.match(path):
            raise _invalid(f"module path {path!r:.200}")
        *parents, leaf = path.split(".")
        parent = root
        for part in parents:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        if leaf in parent._modules or hasattr(parent, leaf):
            raise _invalid(f"module path {path!r}")
        parent.add_module(leaf, _build_layer(spec, path, tensors))
    graph, nodes = fx.Graph(), {}
    for rec in records:
        if not isinstance(rec, dict) or set(rec) != {"name", "op", "target", "args", "kwargs"}:
            raise _invalid(f"graph node {rec!r:.200}")
        op, target, name = rec["op"], rec["target"], rec["name"]
        if not isinstance(name, str) or not _IDENT.match(name) or name in nodes:
            raise _invalid(f"node name {name!r:.200}")
        if op == "call_function" and target in FUNCTIONS:
            target = FUNCTIONS[target]
        elif op == "call_module" and target in specs:
            pass
        elif not (op == "call_method" and target in METHODS) and not (
            op == "placeholder" and isinstance(target, str) and _IDENT.match(target)
        ) and not (op == "output" and target == "output"):
            raise _invalid(f"node {name!r} with op {op!r:.50} and target {target!r:.100}")
        kwargs = rec["kwargs"]
        if not isinstance(kwargs, dict) or not all(
            isinstance(k, str) and _IDENT.match(k) for k in kwargs
        ):
            raise _invalid(f"keyword arguments of node {name!r}")
        args = _decode(rec["args"], nodes)
        if not isinstance(args, tuple):
            raise _invalid(f"arguments of node {name!r}")
        nodes[name] = graph.create_node(op, target, tuple(args),
                                        {k: _decode(v, nodes) for k, v in kwargs.items()}, name)
    if not records or records[-1]["op"] != "output":
        raise _invalid("graph without an output node")
    graph.lint()
    return fx.GraphModule(root, graph)


def load(path: str | os.PathLike) -> nn.Module:
    """Loads a model written by :func:`save`; refuses a damaged file whole.

    The checksum over the structure header and all tensors is verified before
    anything is built; the structure is rebuilt from allowlisted layer types,
    functions and methods only (no pickle, no code from the file). An
    ``nn.Sequential`` tree comes back as ``nn.Sequential``, any other model as
    a ``torch.fx.GraphModule`` with the same submodule names. The model is
    returned in eval mode.

    Args:
        path: File written by :func:`save`.

    Returns:
        The rebuilt model.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a complete, unmodified sparsecraft file
            (truncated, corrupted, checksum mismatch, unknown structure).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Expected an existing file. Received: path={path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError and OSErrors
        raise ValueError(
            f"Expected a complete safetensors file. Received: path={path!r}, which "
            f"safetensors cannot read ({type(err).__name__}: {err})"
        ) from err
    header, stored = metadata.get("sparsecraft.structure"), metadata.get("sparsecraft.sha256")
    if header is None or stored is None:
        raise ValueError(f"Expected a file written by sparsecraft.save. Received: path={path!r} "
                         "without sparsecraft metadata")
    if metadata.get("sparsecraft.version") != FORMAT_VERSION:
        raise ValueError(f"Expected format version {FORMAT_VERSION}. Received: "
                         f"sparsecraft.version={metadata.get('sparsecraft.version')!r}")
    if _digest(header, tensors) != stored:
        raise ValueError(f"Expected the stored checksum to match the file's content. Received: "
                         f"path={path!r} whose structure or tensors were modified or damaged")
    try:
        structure = json.loads(header)
    except json.JSONDecodeError as err:
        raise _invalid(f"a structure header that is not JSON ({err})") from err
    try:
        if isinstance(structure, dict) and structure.get("kind") == "tree":
            model = _build_tree(structure.get("root"), "", tensors)
        elif isinstance(structure, dict) and structure.get("kind") == "graph":
            model = _build_graph(structure, tensors)
        else:
            raise _invalid(f"a structure header {header!r:.100} of unknown kind")
    except (TypeError, KeyError, RuntimeError, IndexError, AttributeError) as err:
        raise _invalid(f"a structure that does not rebuild ({type(err).__name__}: {err})") from err
    if set(model.state_dict()) != set(tensors):
        extra = sorted(set(tensors) ^ set(model.state_dict()))
        raise _invalid(f"tensors that do not match the structure: {extra[:5]}")
    return model.eval()
