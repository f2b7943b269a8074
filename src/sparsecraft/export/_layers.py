"""The layer allowlist of :func:`save` / :func:`load`: settings out, layers back in.

Every supported layer type maps to its class and to the constructor
arguments that rebuild it. Most arguments are attributes of the same name;
layers that keep a setting elsewhere (``MultiheadAttention``'s ``bias`` is
``in_proj_bias is not None``, ``TransformerEncoderLayer``'s ``d_model`` is its
attention's ``embed_dim``) read it with a small getter. A layer's tensors are
its ``state_dict`` with ``torch.nn.utils.prune`` and ``parametrize``
re-parametrisations folded into the plain tensor the layer computes with, so
that the file loads as an ordinary layer with the same outputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune

from sparsecraft.export._io_modules import (
    COMPACT_ENCODER,
    ENCODER_PARTS,
    SPARSE_CONV,
    build_compact_encoder,
    build_sparse_conv,
    encoder_getters,
)
from sparsecraft.export._sparse import KERNELS, SparseLinear
from sparsecraft.export._sparse_conv import SparseConv
from sparsecraft.export._transformer import CompactEncoderLayer

_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
         "groups", "bias", "padding_mode")
_NORM = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_POOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_AVG1 = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
_AVG = (*_AVG1, "divisor_override")
_RNN = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
        "bidirectional")
_EMBEDDING = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
              "scale_grad_by_freq", "sparse")
_MHA = ("embed_dim", "num_heads", "dropout", "bias", "add_bias_kv", "add_zero_attn", "kdim",
        "vdim", "batch_first")
_ENCODER = ("d_model", "nhead", "dim_feedforward", "dropout", "activation", "layer_norm_eps",
            "batch_first", "norm_first", "bias")
# type name -> (class, constructor arguments, read from attributes of the same name unless
# _GETTERS has a getter for the argument)
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
    "SparseConv": (SparseConv, SPARSE_CONV),
    "CompactEncoderLayer": (CompactEncoderLayer, COMPACT_ENCODER),
    "Embedding": (nn.Embedding, _EMBEDDING),
    "LSTM": (nn.LSTM, (*_RNN, "proj_size")), "GRU": (nn.GRU, _RNN),
    "MultiheadAttention": (nn.MultiheadAttention, _MHA),
    "TransformerEncoderLayer": (nn.TransformerEncoderLayer, _ENCODER),
    "TransformerEncoder": (nn.TransformerEncoder, ("encoder_layer", "num_layers", "norm",
                                                   "enable_nested_tensor", "mask_check",
                                                   "layers")),
}  # fmt: skip
# settings that are layers themselves: setting -> the layer types allowed there
_NESTED = {("TransformerEncoder", "encoder_layer"): ("TransformerEncoderLayer",),
           ("TransformerEncoder", "norm"): ("LayerNorm",),
           **{("CompactEncoderLayer", name): allowed
              for name, (_, allowed) in ENCODER_PARTS.items()}}
# layers built by code of their own rather than by their constructor and ``load_state_dict``
_CUSTOM = (SparseLinear, SparseConv, CompactEncoderLayer)
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def _encoder_activation(layer: nn.TransformerEncoderLayer) -> str:
    for name, fn in _ACTIVATIONS.items():
        if layer.activation is fn:
            return name
    raise _unsupported(f"a {type(layer).__name__} activation {layer.activation!r} (only the "
                       "strings 'relu' and 'gelu' can be saved)")


_STACKED = ("TransformerEncoderLayer", "CompactEncoderLayer")


def _stacked_layers(stack: nn.TransformerEncoder) -> list[dict[str, Any]] | None:
    """Each layer's spec where they differ (``compact`` resizes each layer on its own),
    else ``None``: the layers are ``num_layers`` copies of ``encoder_layer``."""
    specs = [layer_spec(layer, f"layers.{i}") for i, layer in enumerate(stack.layers)]
    for i, spec in enumerate(specs):
        if spec["type"] not in _STACKED:
            raise _unsupported(f"layers.{i} of a TransformerEncoder of type {spec['type']} "
                               f"(expected {', '.join(_STACKED)})")
    return None if all(spec == specs[0] for spec in specs) else specs


def _template(stack: nn.TransformerEncoder) -> dict[str, Any]:
    """The ``encoder_layer`` a TransformerEncoder is rebuilt from: its first
    ``nn.TransformerEncoderLayer``, else the one its first CompactEncoderLayer was made from
    (its settings decide ``use_nested_tensor``; differing layers replace the copies)."""
    for i, layer in enumerate(stack.layers):
        if type(layer) is nn.TransformerEncoderLayer:
            return layer_spec(layer, f"layers.{i}")
    first = stack.layers[0]
    if type(first) is not CompactEncoderLayer:
        raise _unsupported(f"layers.0 of a TransformerEncoder of type {type(first).__name__} "
                           f"(expected {', '.join(_STACKED)})")
    config = {"d_model": first.self_attn.embed_dim, "nhead": first.self_attn.orig_num_heads,
              "dim_feedforward": first.linear1.out_features, "dropout": first.dropout.p,
              "activation": _encoder_activation(first), "layer_norm_eps": first.norm1.eps,
              "batch_first": first.self_attn.batch_first, "norm_first": first.norm_first,
              "bias": first.linear1.bias is not None}
    return {"type": "TransformerEncoderLayer", "config": config}


_GETTERS: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("TransformerEncoder", "encoder_layer"): lambda m: _template(m),
    ("TransformerEncoder", "layers"): _stacked_layers,
    ("TransformerEncoder", "norm"): lambda m: None if m.norm is None else layer_spec(m.norm,
                                                                                     "norm"),
    ("MultiheadAttention", "bias"): lambda m: m.in_proj_bias is not None,
    ("MultiheadAttention", "add_bias_kv"): lambda m: m.bias_k is not None,
    ("TransformerEncoderLayer", "d_model"): lambda m: m.self_attn.embed_dim,
    ("TransformerEncoderLayer", "nhead"): lambda m: m.self_attn.num_heads,
    ("TransformerEncoderLayer", "dim_feedforward"): lambda m: m.linear1.out_features,
    ("TransformerEncoderLayer", "dropout"): lambda m: m.dropout.p,
    ("TransformerEncoderLayer", "activation"): _encoder_activation,
    ("TransformerEncoderLayer", "layer_norm_eps"): lambda m: m.norm1.eps,
    ("TransformerEncoderLayer", "batch_first"): lambda m: m.self_attn.batch_first,
    ("TransformerEncoderLayer", "bias"): lambda m: m.linear1.bias is not None,
    **encoder_getters(lambda m, where: layer_spec(m, where), _encoder_activation),
}
_WEIGHTS_ONLY = (
    "To keep the weights only, save them with safetensors.torch.save_model(model, path) "
    "(or torch.save(model.state_dict(), path)) and load them into a model built in code "
    "(safetensors.torch.load_model / model.load_state_dict)."
)


def _unsupported(what: str) -> TypeError:
    return TypeError(
        "Expected a model made of nn.Sequential containers or a torch.fx-traceable forward "
        f"over supported layers ({', '.join(LAYERS)}), functions and tensor methods. "
        f"Received: {what}. {_WEIGHTS_ONLY}"
    )


def layer_type(module: nn.Module) -> str | None:
    """The allowlist name of ``module``'s type, or ``None`` when it is not a supported layer."""
    cls = type(module)
    if parametrize.is_parametrized(module):  # parametrize swaps in a subclass of the layer
        cls = cls.__bases__[0]
    name = cls.__name__
    return name if name in LAYERS and LAYERS[name][0] is cls else None


def layer_spec(module: nn.Module, where: str) -> dict[str, Any]:
    """The JSON description (type and constructor settings) of a supported layer.

    Raises:
        TypeError: If the layer or one of its settings is not supported.
    """
    name = layer_type(module)
    if name is None:
        raise _unsupported(f"layer {where or '<root>'!r} of type {type(module).__name__}")
    config = {}
    for attr in LAYERS[name][1]:
        getter = _GETTERS.get((name, attr))
        if getter is not None:
            config[attr] = getter(module)
        else:
            value = getattr(module, attr)
            config[attr] = value is not None if attr == "bias" else value
    for (owner, setting), allowed in _NESTED.items():
        nested = config.get(setting) if owner == name else None
        if nested is not None and nested["type"] not in allowed:
            raise _unsupported(f"{setting} of {where or '<root>'!r} of type {nested['type']} "
                               f"(expected {', '.join(allowed)})")
    spec = {"type": name, "config": {k: _jsonable(v) for k, v in config.items()}}
    if not issubclass(LAYERS[name][0], _CUSTOM):
        _check_parts(module, spec, where)
    return spec


def _check_parts(module: nn.Module, spec: dict[str, Any], where: str) -> None:
    """Refuses a layer whose parts or tensors are not those its constructor makes.

    ``load`` rebuilds a layer from its settings: a part replaced after
    construction (``to_sparse`` putting a :class:`SparseLinear` into an
    ``nn.TransformerEncoderLayer``) or an extra tensor would not load, so it is
    refused at ``save`` time instead of writing a file that cannot be read.
    """
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = _instantiate(spec, ValueError)
    have = dict(module.named_modules())
    # per-layer specs of a TransformerEncoder: each layer was checked as a layer of its own
    mine = (lambda path: not path.startswith("layers.")) if spec["config"].get("layers") \
        else (lambda path: True)
    for path, part in fresh.named_modules():
        if not mine(path):
            continue
        got = have.get(path)
        got_type = None if got is None else type(got)
        if got is not None and parametrize.is_parametrized(got):
            got_type = got_type.__bases__[0]
        if got_type is not type(part):
            raise _unsupported(
                f"layer {where or '<root>'!r} of type {spec['type']} whose part {path!r} is "
                f"{'missing' if got is None else got_type.__name__}, not the "
                f"{type(part).__name__} that {spec['type']} builds")
    extra = sorted(k for k in set(layer_state(module)) ^ set(fresh.state_dict()) if mine(k))
    if extra:
        raise _unsupported(f"layer {where or '<root>'!r} of type {spec['type']} with tensors "
                           f"{extra[:5]} that {spec['type']} does not build")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):  # the spec of a nested layer
        return {k: _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise _unsupported(f"a layer setting {value!r} of type {type(value).__name__}")


def layer_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a layer computes with, by ``state_dict`` key, with the objects kept.

    ``torch.nn.utils.prune`` keeps ``weight_orig`` and ``weight_mask`` and
    recomputes ``weight`` in a forward pre-hook; ``parametrize`` keeps
    ``parametrizations.weight.original``. Both are folded into ``weight`` (the
    value the layer uses), so the file describes a plain layer with the same
    outputs. Parameters and buffers are returned as the module's own objects
    (not copies), so that tied tensors can be recognised by identity.
    """
    state = dict(module.state_dict(keep_vars=True))
    for path, sub in module.named_modules():
        prefix = f"{path}." if path else ""
        for hook in sub._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                name = hook._tensor_name
                orig = state.pop(f"{prefix}{name}_orig")
                mask = state.pop(f"{prefix}{name}_mask")
                state[f"{prefix}{name}"] = (orig * mask).detach()
        if parametrize.is_parametrized(sub):
            for name in sub.parametrizations:
                for key in [k for k in state if k.startswith(f"{prefix}parametrizations.{name}.")]:
                    del state[key]
                state[f"{prefix}{name}"] = getattr(sub, name).detach()
    return state


def build_layer(spec: Any, where: str, own: dict[str, torch.Tensor],
                invalid: Callable[[str], ValueError]) -> nn.Module:
    """Rebuilds a layer from its JSON description and its tensors.

    The layer is built on the ``meta`` device and takes the file's tensors
    (``assign=True``), so sizes in the description never allocate memory.

    Raises:
        ValueError: (made by ``invalid``) for an unknown type, wrong settings or tensors.
    """
    if not isinstance(spec, dict) or set(spec) != {"type", "config"} or spec["type"] not in LAYERS:
        raise invalid(f"layer spec {spec!r:.200} at {where or '<root>'!r}")
    cls = LAYERS[spec["type"]][0]
    if cls is SparseConv:
        return build_sparse_conv(_settings(spec, invalid), own, invalid)
    if cls is CompactEncoderLayer:
        return build_compact_encoder(
            _settings(spec, invalid), own,
            lambda part, path, tensors: build_layer(part, f"{where}.{path}".lstrip("."),
                                                    tensors, invalid), invalid)
    if cls is SparseLinear:
        config = _settings(spec, invalid)
        if config["kernel"] not in KERNELS or set(own) != (
            {"crow_indices", "col_indices", "values"} | ({"bias"} if config["bias"] else set())
        ):
            raise invalid(f"SparseLinear tensors {sorted(own)} / kernel {config['kernel']!r}")
        return SparseLinear.from_csr(
            own["crow_indices"], own["col_indices"], own["values"],
            (config["out_features"], config["in_features"]), own.get("bias"), config["kernel"])
    with torch.device("meta"), warnings.catch_warnings():
        # meta: sizes come from the file's tensors, never allocated blindly; the warnings
        # of construction (TransformerEncoder's nested-tensor note) were shown at training
        warnings.simplefilter("ignore")
        module = _instantiate(spec, invalid)
    if cls is nn.TransformerEncoder and spec["config"]["layers"] is not None:
        _stack_layers(module, spec["config"]["layers"], where, own, invalid)
    module.load_state_dict(own, strict=True, assign=True)
    if isinstance(module, nn.RNNBase):
        module.flatten_parameters()
    return module


def _stack_layers(stack: nn.TransformerEncoder, specs: Any, where: str,
                  own: dict[str, torch.Tensor], invalid: Callable[[str], ValueError]) -> None:
    """Puts the layers of a TransformerEncoder whose layers differ in place of its copies."""
    if not isinstance(specs, list) or len(specs) != len(stack.layers) or not all(
            isinstance(spec, dict) and spec.get("type") in _STACKED for spec in specs):
        raise invalid(f"TransformerEncoder layers {specs!r:.200}")
    for i, spec in enumerate(specs):
        prefix = f"layers.{i}."
        tensors = {k[len(prefix):]: t for k, t in own.items() if k.startswith(prefix)}
        stack.layers[i] = build_layer(spec, f"{where}.{prefix}".strip("."), tensors, invalid)


def _settings(spec: dict[str, Any], invalid: Callable[[str], ValueError]) -> dict[str, Any]:
    fields = LAYERS[spec["type"]][1]
    config = spec["config"]
    if not isinstance(config, dict) or set(config) != set(fields):
        raise invalid(f"settings {config!r:.200} for {spec['type']}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def _instantiate(spec: Any, invalid: Callable[[str], ValueError]) -> nn.Module:
    """Constructs a layer (on the current default device) from its validated description."""
    name = spec["type"]
    config = _settings(spec, invalid)
    if name == "TransformerEncoder":
        config.pop("layers")  # not a constructor argument: build_layer puts them in
    for (owner, setting), allowed in _NESTED.items():
        if owner == name and config[setting] is not None:
            nested = config[setting]
            if not isinstance(nested, dict) or set(nested) != {"type", "config"} \
                    or nested["type"] not in allowed:
                raise invalid(f"{setting} {nested!r:.200} of {name}")
            config[setting] = _instantiate(nested, invalid)
    if name == "TransformerEncoderLayer" and config["activation"] not in _ACTIVATIONS:
        raise invalid(f"TransformerEncoderLayer activation {config['activation']!r:.50}")
    if name == "Embedding":  # normal_ on meta imports torch._dynamo (seconds): give a weight
        config["_weight"] = torch.empty(config["num_embeddings"], config["embedding_dim"])
    return LAYERS[name][0](**config)
