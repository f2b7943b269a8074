"""The modules ``compact`` and ``to_sparse`` produce, in a saved file: settings out, modules back.

* :class:`SparseConv` (``to_sparse`` on a convolution): its CSR weight is
  stored as three dense tensors (``crow_indices``, ``col_indices`` as int32,
  ``values``; safetensors holds dense tensors only) beside the bias, with the
  settings that its forward uses (``dims``, ``kernel_size``, ``stride``,
  ``dilation`` and the ``F.pad`` amounts and mode that replace the padding).
* :class:`CompactEncoderLayer` (``compact`` removing attention heads): its
  settings (layout, activation, the original head count and the kept heads)
  and its parts as nested layer descriptions, so that a part ``to_sparse``
  replaced (``linear1`` as a :class:`SparseLinear`) is stored as CSR too.

Rebuilding checks the settings and the tensors against each other before
anything runs, and reports a mismatch as an invalid file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparsecraft.export._sparse_conv import SparseConv
from sparsecraft.export._transformer import CompactEncoderLayer

SPARSE_CONV = ("dims", "in_channels", "out_channels", "kernel_size", "stride", "dilation",
               "pre_pad", "pre_pad_mode", "bias")
_CSR = {"crow_indices", "col_indices", "values"}
_LINEAR = ("Linear", "SparseLinear")
# part of a CompactEncoderLayer -> (its path in the layer, the layer types allowed there)
ENCODER_PARTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "linear1": ("linear1", _LINEAR), "linear2": ("linear2", _LINEAR),
    "norm1": ("norm1", ("LayerNorm",)), "norm2": ("norm2", ("LayerNorm",)),
    "dropout": ("dropout", ("Dropout",)), "dropout1": ("dropout1", ("Dropout",)),
    "dropout2": ("dropout2", ("Dropout",)),
    "in_proj": ("self_attn.in_proj", _LINEAR), "out_proj": ("self_attn.out_proj", _LINEAR),
}  # fmt: skip
COMPACT_ENCODER = ("norm_first", "activation", "batch_first", "embed_dim", "num_heads", "heads",
                   "attn_dropout", *ENCODER_PARTS)
Spec = Callable[[nn.Module, str], dict[str, Any]]


def encoder_getters(layer_spec: Spec, activation: Callable[[Any], str]
                    ) -> dict[tuple[str, str], Callable[[Any], Any]]:
    """The settings of a CompactEncoderLayer that are not attributes of the same name."""
    getters: dict[tuple[str, str], Callable[[Any], Any]] = {
        ("CompactEncoderLayer", "activation"): activation,
        ("CompactEncoderLayer", "batch_first"): lambda m: m.self_attn.batch_first,
        ("CompactEncoderLayer", "embed_dim"): lambda m: m.self_attn.embed_dim,
        ("CompactEncoderLayer", "num_heads"): lambda m: m.self_attn.orig_num_heads,
        ("CompactEncoderLayer", "heads"): lambda m: [int(h) for h in m.self_attn.heads],
        ("CompactEncoderLayer", "attn_dropout"): lambda m: m.self_attn.dropout,
    }
    for name, (path, _) in ENCODER_PARTS.items():
        getters[("CompactEncoderLayer", name)] = (
            lambda m, path=path: layer_spec(m.get_submodule(path), path))
    return getters


def build_sparse_conv(config: dict[str, Any], own: dict[str, torch.Tensor],
                      invalid: Callable[[str], ValueError]) -> SparseConv:
    """Rebuilds a :class:`SparseConv` from its checked settings and its tensors.

    Raises:
        ValueError: (made by ``invalid``) if the tensors or settings do not fit.
    """
    if set(own) != _CSR | ({"bias"} if config["bias"] is True else set()) \
            or not isinstance(config["bias"], bool):
        raise invalid(f"SparseConv tensors {sorted(own)[:5]}")
    settings = {k: v for k, v in config.items() if k != "bias"}
    try:
        return SparseConv.from_csr(own["crow_indices"], own["col_indices"], own["values"],
                                   own.get("bias"), **settings)
    except (ValueError, RuntimeError) as err:  # RuntimeError: torch's CSR invariant checks
        raise invalid(f"SparseConv settings or CSR tensors that do not fit ({err})") from None


def build_compact_encoder(config: dict[str, Any], own: dict[str, torch.Tensor],
                          build_part: Callable[[Any, str, dict[str, torch.Tensor]], nn.Module],
                          invalid: Callable[[str], ValueError]) -> CompactEncoderLayer:
    """Rebuilds a :class:`CompactEncoderLayer`: its parts first, then the layer around them.

    ``build_part(spec, path, tensors)`` builds one part from its nested description.

    Raises:
        ValueError: (made by ``invalid``) for settings, parts or tensors that do not fit.
    """
    e, n, heads = config["embed_dim"], config["num_heads"], config["heads"]
    if not (type(e) is int and type(n) is int and 1 <= n <= e and e % n == 0
            and isinstance(heads, tuple) and heads and all(type(h) is int for h in heads)
            and list(heads) == sorted(set(heads)) and 0 <= heads[0] and heads[-1] < n
            and config["activation"] in ("relu", "gelu")
            and isinstance(config["norm_first"], bool) and isinstance(config["batch_first"], bool)
            and isinstance(config["attn_dropout"], (int, float))
            and 0 <= config["attn_dropout"] <= 1):
        raise invalid(f"CompactEncoderLayer settings embed_dim={e!r:.20}, num_heads={n!r:.20}, "
                      f"heads={heads!r:.100}, activation={config['activation']!r:.20}")
    parts, used = {}, set()
    for name, (path, allowed) in ENCODER_PARTS.items():
        spec = config[name]
        if not isinstance(spec, dict) or spec.get("type") not in allowed:
            raise invalid(f"CompactEncoderLayer part {name} {spec!r:.100}")
        mine = {k: t for k, t in own.items() if k.startswith(f"{path}.")}
        used.update(mine)
        parts[path] = build_part(spec, path, {k[len(path) + 1:]: t for k, t in mine.items()})
    if set(own) - used:
        raise invalid(f"CompactEncoderLayer tensors {sorted(set(own) - used)[:5]}")
    width = len(heads) * (e // n)
    for path, shape in (("self_attn.in_proj", (e, 3 * width)), ("self_attn.out_proj", (width, e)),
                        ("linear1", (e, None)), ("linear2", (None, e))):
        got = (parts[path].in_features, parts[path].out_features)
        if any(want is not None and want != have for want, have in zip(shape, got, strict=True)):
            raise invalid(f"CompactEncoderLayer part {path} of (in, out) {got} for "
                          f"embed_dim={e}, {len(heads)} heads of {e // n}")
    # the layer is made from a template on the meta device (no memory), then takes the parts
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        template = nn.TransformerEncoderLayer(
            e, n, 1, dropout=float(config["attn_dropout"]), activation=config["activation"],
            batch_first=config["batch_first"], norm_first=config["norm_first"])
    # built outside the meta context: its (non-persistent) ``heads`` index is a real tensor
    layer = CompactEncoderLayer(template, list(heads), None)
    for path, part in parts.items():
        owner, _, leaf = path.rpartition(".")
        setattr(layer.get_submodule(owner), leaf, part)
    return layer
