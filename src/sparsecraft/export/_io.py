"""``save`` / ``load``: safetensors weights, a JSON structure header, a checksum.

File layout (one ``.safetensors`` file):

* tensors: each distinct tensor of the model's layers once, under the first
  qualified name that reaches it (``"0.weight"``, ``"block.conv1.bias"``); a
  :class:`SparseLinear` or :class:`SparseConv` stores its CSR components
  ``crow_indices``, ``col_indices`` (int32) and ``values``, so its size grows
  with the number of non-zeros, not with the dense shape;
* metadata ``sparsecraft.structure``: JSON describing how to rebuild the model
  from an allowlist of layer types (``_layers``), either a tree of
  ``nn.Sequential`` (a module used twice appears once, then as ``{"ref": path}``)
  or a ``torch.fx`` graph of allowlisted layers, functions and tensor methods
  (``_io_graph``); ``aliases`` maps every other name of a tied tensor
  (``head.weight`` tied to ``emb.weight``) to its stored name;
* metadata ``sparsecraft.sha256``: SHA-256 over the structure and every tensor
  (name, dtype, shape, bytes). A mismatch refuses the whole file.

Loading never executes code from the file: no pickle; layer types, functions
and methods are looked up in fixed tables; every name that reaches ``torch.fx``
code generation is checked to be a plain identifier first; what a header may
ask for is bounded (``_format``). Saving writes a temporary file next to the
target and renames it over the target, so a failed save leaves the old file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparsecraft.export import _io_graph
from sparsecraft.export._format import (
    MAX_MODULES,
    check_count,
    check_header_size,
    check_regular_file,
    invalid,
    is_path,
    parse_structure,
)
from sparsecraft.export._layers import LAYERS, build_layer, layer_spec, layer_state, layer_type

FORMAT_VERSION = "1"
FUNCTIONS = _io_graph.FUNCTIONS
METHODS = _io_graph.METHODS
__all__ = ["FUNCTIONS", "LAYERS", "METHODS", "load", "save"]


# ---------------------------------------------------------------------------- describe
def _tree(module: nn.Module, where: str, seen: dict[int, str],
          layers: dict[str, nn.Module]) -> dict[str, Any] | None:
    if id(module) in seen:  # a module used twice: one object, two places
        return {"ref": seen[id(module)]}
    seen[id(module)] = where
    if type(module) is nn.Sequential:
        children = []
        for name, child in module._modules.items():  # named_children() skips repeats
            spec = None if child is None else _tree(
                child, f"{where}.{name}" if where else name, seen, layers)
            if spec is None:
                return None
            children.append([name, spec])
        return {"type": "Sequential", "children": children}
    if layer_type(module) is not None:
        layers[where] = module
        return layer_spec(module, where)
    return None


def _describe(model: nn.Module) -> tuple[dict[str, Any], dict[str, nn.Module], dict]:
    layers: dict[str, nn.Module] = {}
    spec = _tree(model, "", {}, layers)
    if spec is not None:
        return {"kind": "tree", "root": spec}, layers, {}
    return _io_graph.describe(model)


def _collect(layers: dict[str, nn.Module], free: dict[str, torch.Tensor]
             ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every distinct tensor once (copied to the CPU), and the other names of tied ones."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    # ``named`` holds every tensor (folded ones too) until the end: no id() is reused meanwhile
    named = [(f"{p}.{k}" if p else k, t) for p, m in layers.items()
             for k, t in layer_state(m).items()] + list(free.items())
    for key, t in named:
        if id(t) in first:
            aliases[key] = first[id(t)]
        else:
            first[id(t)] = key
            tensors[key] = t.detach().cpu().contiguous().clone()
    return tensors, aliases


def _digest(structure: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(b"sparsecraft/" + FORMAT_VERSION.encode() + b"\0")
    h.update(structure.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    return h.hexdigest()


def _new_file_mode() -> int:
    """0o666 minus the process umask: the mode ``open()`` gives a new file."""
    try:  # reading the umask without changing it (Linux >= 4.7)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _write_atomic(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Writes a safetensors file to a temporary file beside ``path``, then renames it."""
    target = os.path.realpath(path)  # through a symlink to the file it points to
    folder = os.path.dirname(target)
    if os.path.isdir(target):
        raise IsADirectoryError(errno.EISDIR, f"Expected a file path. Received: path={path!r}, "
                                "which is a directory", path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, "Expected an existing folder. Received: "
                                f"path={path!r}, whose folder does not exist", path)
    mode = stat.S_IMODE(os.stat(target).st_mode) if os.path.exists(target) else _new_file_mode()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                                   dir=folder)
    except OSError as err:  # named after the user's path, not the hidden temporary one
        raise OSError(err.errno, f"Expected a writable folder. Received: path={path!r} "
                      f"({err.strerror})", path) from None
    try:
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes are on disk before the name points at them
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as err:  # a KeyboardInterrupt too: never leave the temporary file
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if not isinstance(err, Exception):
            raise
        # OSError or safetensors' SafetensorError (disk full, ...): named after the user's path
        reason = (getattr(err, "strerror", None) or str(err)).replace(tmp, path)
        raise OSError(getattr(err, "errno", None) or errno.EIO, "Expected to write the model "
                      f"file. Received: path={path!r} ({reason})", path) from None


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Saves ``model`` as one safetensors file: weights, structure and checksum.

    Supported structures: an ``nn.Sequential`` tree (nested Sequentials of
    supported layers, rebuilt as ``nn.Sequential``), or any module whose
    forward ``torch.fx`` can trace into supported layers, the functions in
    ``FUNCTIONS``, the tensor methods in ``METHODS`` and tensors read
    directly (rebuilt as a ``torch.fx.GraphModule`` with the same submodule
    names, forward parameters and outputs; a parameter keeps its default
    unless ``torch.fx`` can only trace it fixed at it). A ``torch.compile``d
    model is saved as the model it wraps (``_orig_mod``). A module used twice
    and tensors tied between layers (``head.weight = emb.weight``) stay one
    object after loading. A layer pruned with ``torch.nn.utils.prune`` or
    re-parametrised with ``parametrize`` is saved as the plain layer it
    computes as (``weight = weight_orig * weight_mask``). Hooks are not
    saved (``load`` builds fresh layers); sparsecraft's forward hooks are set
    aside while ``torch.fx`` traces, so a training ``Regularizer`` sees nothing.

    Supported layers (``LAYERS``): Linear, Conv1d/2d/3d, BatchNorm1d/2d/3d,
    LayerNorm, the common activations, Dropout, Flatten, pooling, Embedding,
    LSTM, GRU, MultiheadAttention, TransformerEncoderLayer (activation "relu"
    or "gelu"), TransformerEncoder (optional LayerNorm; layers that differ,
    as ``compact`` leaves them, are stored one by one), and what ``compact``
    and ``to_sparse`` make: :class:`SparseLinear` and :class:`SparseConv`
    (stored as CSR) and :class:`CompactEncoderLayer` (its parts may be
    SparseLinear). A supported layer whose parts are not those its
    constructor makes (a SparseLinear put into an ``nn.TransformerEncoderLayer``)
    is refused, since it could not be rebuilt.

    The file is written to a temporary file in the same folder and renamed
    over ``path``: a failed save leaves an existing file unchanged and no
    temporary file behind. An existing file keeps its permissions; a new one
    gets those of ``open()`` (0o666 minus the umask).

    Args:
        model: The model.
        path: Destination file (replaced if it exists).

    Raises:
        TypeError: If ``model`` is not a module, or contains a layer, function,
            method or argument outside the supported set (nothing is
            written; the message says how to save the weights alone).
        IsADirectoryError: If ``path`` is a directory.
        FileNotFoundError: If ``path``'s folder does not exist.
        OSError: If the folder is not writable or writing fails (the message
            names ``path``; an existing file is left unchanged).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected an nn.Module. Received: model={type(model).__name__}")
    if type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
        model = model._orig_mod
    structure, layers, free = _describe(model)
    tensors, aliases = _collect(layers, free)
    if aliases:
        structure["aliases"] = aliases
    header = json.dumps(structure, sort_keys=True)
    metadata = {"format": "pt", "sparsecraft.version": FORMAT_VERSION,
                "sparsecraft.structure": header, "sparsecraft.sha256": _digest(header, tensors)}
    _write_atomic(os.fspath(path), tensors, metadata)


# ---------------------------------------------------------------------------- rebuild
class _Tensors:
    """The file's tensors by name, handed out to the layer (or attribute) that owns each once."""

    def __init__(self, tensors: dict[str, torch.Tensor], aliases: Any) -> None:
        if not isinstance(aliases, dict) or not all(
                isinstance(k, str) and v in tensors and k not in tensors
                for k, v in aliases.items()):
            raise invalid("aliases that do not name stored tensors")
        self.tensors, self.aliases = tensors, aliases
        self.index: dict[str, list[str]] = {}
        for key in [*tensors, *aliases]:
            parts = key.split(".")
            for i in range(len(parts)):  # "" is the prefix of a root layer
                self.index.setdefault(".".join(parts[:i]), []).append(key)
        self.taken: set[str] = set()

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[self.aliases.get(key, key)]

    def take(self, keys: list[str]) -> None:
        if self.taken.intersection(keys):
            raise invalid(f"tensors claimed by two layers: {sorted(self.taken & set(keys))[:5]}")
        self.taken.update(keys)

    def of_layer(self, path: str) -> dict[str, torch.Tensor]:
        keys = self.index.get(path, [])
        self.take(keys)
        cut = len(path) + 1 if path else 0
        return {k[cut:]: self.get(k) for k in keys}

    def check_all_taken(self) -> None:
        left = sorted((set(self.tensors) | set(self.aliases)) - self.taken)
        if left:
            raise invalid(f"tensors that do not match the structure: {left[:5]}")


def _build_tree(spec: Any, prefix: str, store: _Tensors, built: dict[str, nn.Module]
                ) -> nn.Module:
    check_count("modules", len(built), MAX_MODULES)
    if isinstance(spec, dict) and set(spec) == {"ref"}:
        if not isinstance(spec["ref"], str) or spec["ref"] not in built:
            raise invalid(f"reference {spec['ref']!r:.100} to a module not built before it")
        return built[spec["ref"]]
    if isinstance(spec, dict) and spec.get("type") == "Sequential":
        if set(spec) != {"type", "children"} or not isinstance(spec["children"], list):
            raise invalid(f"Sequential spec at {prefix or '<root>'!r}")
        seq = nn.Sequential()
        for item in spec["children"]:
            if not (isinstance(item, list) and len(item) == 2 and is_path(item[0])
                    and "." not in item[0]):
                raise invalid(f"child entry {item!r:.200}")
            name = item[0]
            seq.add_module(name, _build_tree(item[1], f"{prefix}.{name}" if prefix else name,
                                             store, built))
        built[prefix] = seq  # after its children: a reference to an ancestor is refused
        return seq
    built[prefix] = build_layer(spec, prefix, store.of_layer(prefix), invalid)
    return built[prefix]


def _build_root(structure: dict[str, Any], store: _Tensors) -> nn.Module:
    modules, kinds = structure["modules"], structure.get("attributes", {})
    _io_graph.check_modules(modules)
    if not isinstance(kinds, dict) or not all(is_path(k) for k in kinds):
        raise invalid("graph attributes table")
    check_count("attributes", len(kinds), MAX_MODULES)
    root = nn.Module()

    def owner(path: str) -> tuple[nn.Module, str]:
        *parents, leaf = path.split(".")
        parent = root
        for part in parents:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
            if layer_type(parent) is not None:
                raise invalid(f"path {path!r} inside a layer")
        if leaf in parent._modules or hasattr(parent, leaf):
            raise invalid(f"module path {path!r}")
        return parent, leaf

    for path, spec in modules.items():
        parent, leaf = owner(path)
        parent.add_module(leaf, build_layer(spec, path, store.of_layer(path), invalid))
    for path, kind in kinds.items():
        parent, leaf = owner(path)
        store.take([path])
        t = store.get(path)
        if kind == "parameter":
            parent.register_parameter(leaf, nn.Parameter(t, t.is_floating_point()))
        elif kind == "buffer":
            parent.register_buffer(leaf, t)
        else:
            raise invalid(f"attribute kind {kind!r:.50}")
    return root


def _tie(root: nn.Module, aliases: dict[str, str]) -> None:
    """Makes every alias the same object as the tensor it names (tied weights)."""
    for key, source in aliases.items():
        src_path, _, src_name = source.rpartition(".")
        dst_path, _, dst_name = key.rpartition(".")
        obj = getattr(root.get_submodule(src_path), src_name)
        dst = root.get_submodule(dst_path)
        if dst_name in dst._parameters and isinstance(obj, nn.Parameter):
            setattr(dst, dst_name, obj)  # setattr: nn.LSTM refreshes its flat weight list
        elif dst_name in dst._buffers and not isinstance(obj, nn.Parameter):
            dst._buffers[dst_name] = obj
        else:
            raise invalid(f"alias {key!r} of {source!r} of a different kind")


def _read(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    check_regular_file(path)
    check_header_size(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError and OSErrors
        raise ValueError(
            f"Expected a complete safetensors file. Received: path={path!r}, which "
            f"safetensors cannot read ({type(err).__name__}: {err})"
        ) from err
    return metadata, tensors


def load(path: str | os.PathLike) -> nn.Module:
    """Loads a model written by :func:`save`; refuses a damaged or crafted file whole.

    The checksum over the structure header and all tensors is verified before
    anything is built; the structure is checked against the limits of
    ``sparsecraft.export._format`` (header at most 16 MiB, JSON nested at most
    64 deep with at most 500,000 values, at most 20,000 graph nodes and 10,000
    modules, literal lists of at most 1,024 elements, strings of at most 1,024
    characters) and rebuilt from allowlisted layer types, functions and methods
    only (no pickle, no code from the file). An ``nn.Sequential`` tree comes
    back as ``nn.Sequential``, any other model as a ``torch.fx.GraphModule``
    with the same submodule names and forward parameters. Shared modules and
    tied tensors come back as one object. The model is returned in eval mode.

    Args:
        path: File written by :func:`save`.

    Returns:
        The rebuilt model.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If ``path`` is not a regular file (a directory, a FIFO: it is
            never opened), or the file is not a complete, unmodified sparsecraft
            file within the limits (truncated, corrupted, checksum mismatch,
            unknown or malformed structure).
    """
    path = os.fspath(path)
    metadata, tensors = _read(path)
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
    structure = parse_structure(header)
    if not isinstance(structure, dict):
        raise invalid(f"a structure header {header!r:.100} of unknown kind")
    try:
        store = _Tensors(tensors, structure.get("aliases", {}))
        if structure.get("kind") == "tree" and set(structure) <= {"kind", "root", "aliases"}:
            model = root = _build_tree(structure.get("root"), "", store, {})
        elif structure.get("kind") == "graph" and set(structure) <= {
                "kind", "modules", "attributes", "nodes", "aliases"}:
            root = _build_root(structure, store)
            model = None
        else:
            raise invalid(f"a structure header {header!r:.100} of unknown kind")
        store.check_all_taken()
        _tie(root, store.aliases)
        if model is None:
            model = _io_graph.build(structure, root)
    except ValueError:
        raise
    except Exception as err:  # whatever a crafted structure breaks is an invalid file
        raise invalid(f"a structure that does not rebuild ({type(err).__name__}: "
                      f"{str(err)[:300]})") from err
    return model.eval()
