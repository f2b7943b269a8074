"""save / load: shared modules, tied weights, pruned layers, limits, atomic writes, real layers.

Regression tests for issue 10 (items 1, 4, 7, 9, 12) and issue 11 (item 8).
"""

from __future__ import annotations

import copy
import json
import os
import stat
import threading

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize, prune

import sparsecraft.export._io as io_module
from sparsecraft.export import load, save
from sparsecraft.export._format import (
    MAX_ARGUMENTS,
    MAX_DEPTH,
    MAX_HEADER_BYTES,
    MAX_LITERAL,
    MAX_NODES,
    MAX_STRING,
    MAX_VALUES,
)
from sparsecraft.export._io import _digest


def _round_trip(model: nn.Module, tmp_path, name: str = "m.safetensors") -> nn.Module:
    path = tmp_path / name
    save(model, path)
    return load(path)


def _write_crafted(path, structure, tensors: dict) -> None:
    """A file as an attacker would write it: any structure, with a valid checksum."""
    header = structure if isinstance(structure, str) else json.dumps(structure)
    save_file(tensors, str(path), metadata={
        "format": "pt", "sparsecraft.version": "1", "sparsecraft.structure": header,
        "sparsecraft.sha256": _digest(header, tensors)})


def _output(arg) -> dict:
    return {"name": "output", "op": "output", "target": "output", "args": {"tuple": [arg]},
            "kwargs": {}}


def _placeholder(name: str, target: str | None = None) -> dict:
    return {"name": name, "op": "placeholder", "target": target or name,
            "args": {"tuple": []}, "kwargs": {}}


def _graph(nodes: list, modules: dict | None = None) -> dict:
    return {"kind": "graph", "modules": modules or {}, "nodes": nodes}


# ---------------------------------------------------------------------------- sharing
def test_save_keeps_a_layer_used_twice_in_a_sequential(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    loaded = _round_trip(model, tmp_path)
    assert len(loaded) == 3 and loaded[0] is loaded[2]
    assert loaded[0].weight is loaded[2].weight
    x = torch.randn(4, 8)
    assert torch.equal(loaded(x), model(x))


def test_save_keeps_a_block_used_twice_in_a_sequential(tmp_path):
    torch.manual_seed(1)
    block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    model = nn.Sequential(block, block, nn.Linear(6, 2))
    loaded = _round_trip(model, tmp_path)
    assert loaded[0] is loaded[1] and loaded[0][0].weight is loaded[1][0].weight
    x = torch.randn(3, 6)
    assert torch.equal(loaded(x), model(x))


def test_save_keeps_a_layer_called_twice_in_a_graph(tmp_path):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x))) + x

    torch.manual_seed(2)
    model = Twice()
    loaded = _round_trip(model, tmp_path)
    x = torch.randn(3, 5)
    assert torch.equal(loaded(x), model(x))
    assert sum(1 for _ in loaded.parameters()) == 2


# ---------------------------------------------------------------------------- pruned layers
def test_save_folds_a_torch_pruned_layer_into_a_plain_weight(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[0], "weight", amount=0.2)  # a PruningContainer
    prune.ln_structured(model[2], "weight", amount=0.5, n=2, dim=0)
    loaded = _round_trip(model, tmp_path)
    assert set(loaded.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert torch.equal(loaded[0].weight, model[0].weight_orig * model[0].weight_mask)
    assert (loaded[0].weight == 0).float().mean().item() >= 0.5
    assert not loaded[0]._forward_pre_hooks
    x = torch.randn(4, 8)
    assert torch.equal(loaded(x), model(x))


def test_save_folds_a_parametrized_layer(tmp_path):
    class Masked(nn.Module):
        def forward(self, w):
            return w * (w.abs() > 0.2)

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    parametrize.register_parametrization(model[0], "weight", Masked())
    loaded = _round_trip(model, tmp_path)
    assert type(loaded[0]) is nn.Linear
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------------------- limits
def _assert_refused(path, match: str) -> None:
    """Refused with the documented error (speed is measured in docs/export.md, not asserted)."""
    with pytest.raises(ValueError, match=match):
        load(path)


def test_load_refuses_a_header_over_the_byte_limit(tmp_path):
    path = tmp_path / "big.safetensors"
    structure = json.dumps({"kind": "tree", "root": {"type": "Identity", "config": {}},
                            "pad": "x" * (MAX_HEADER_BYTES + 1)})
    _write_crafted(path, structure, {})
    _assert_refused(path, "header of")


def test_load_refuses_a_long_literal_list_in_a_graph_argument(tmp_path):
    path = tmp_path / "literal.safetensors"
    nodes = [_placeholder("x"), {"name": "v", "op": "call_method", "target": "view",
                                 "args": {"tuple": [{"node": "x"}, list(range(MAX_LITERAL + 1))]},
                                 "kwargs": {}}, _output({"node": "v"})]
    _write_crafted(path, _graph(nodes), {})
    _assert_refused(path, "literal list")


def test_load_refuses_more_literal_elements_in_all_arguments_than_the_limit(tmp_path):
    path = tmp_path / "arguments.safetensors"
    n = MAX_ARGUMENTS // MAX_LITERAL + 1
    nodes = [_placeholder("x")] + [
        {"name": f"v{i}", "op": "call_method", "target": "view",
         "args": {"tuple": [{"node": "x"}, [1] * MAX_LITERAL]}, "kwargs": {}} for i in range(n)
    ] + [_output({"node": "x"})]
    _write_crafted(path, _graph(nodes), {})
    _assert_refused(path, "literal elements")


def test_load_refuses_more_values_than_the_limit(tmp_path):
    path = tmp_path / "values.safetensors"
    many = [[0] * MAX_LITERAL for _ in range(MAX_VALUES // MAX_LITERAL + 1)]
    nodes = [_placeholder("x"), _output({"tuple": many})]
    _write_crafted(path, _graph(nodes), {})
    _assert_refused(path, "values")


def test_load_refuses_more_nodes_than_the_limit(tmp_path):
    path = tmp_path / "nodes.safetensors"
    nodes = [_placeholder("x")] + [
        {"name": f"n{i}", "op": "call_method", "target": "relu",
         "args": {"tuple": [{"node": "x"}]}, "kwargs": {}} for i in range(MAX_NODES)
    ] + [_output({"node": "x"})]
    _write_crafted(path, _graph(nodes), {})
    _assert_refused(path, "graph nodes")


def test_load_refuses_a_long_string(tmp_path):
    path = tmp_path / "string.safetensors"
    nodes = [_placeholder("x"), _output("s" * (MAX_STRING + 1))]
    _write_crafted(path, _graph(nodes), {})
    _assert_refused(path, "string of")


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 100_000])
def test_load_refuses_deep_json_with_value_error(tmp_path, depth):
    path = tmp_path / "deep.safetensors"
    deep = "[" * depth + "]" * depth
    header = '{"kind": "graph", "modules": {}, "nodes": [' + deep + "]}"
    _write_crafted(path, header, {})
    _assert_refused(path, "nested deeper")


# ---------------------------------------------------------------------------- crafted files
def test_load_refuses_hardtanh_min_above_max_with_value_error(tmp_path):
    path = tmp_path / "hardtanh.safetensors"
    structure = {"kind": "tree", "root": {"type": "Sequential", "children": [
        ["0", {"type": "Hardtanh", "config": {"min_val": 2.0, "max_val": -1.0,
                                              "inplace": False}}]]}}
    _write_crafted(path, structure, {})
    with pytest.raises(ValueError, match="does not rebuild"):
        load(path)


@pytest.mark.parametrize("target", ["lambda", "torch", "self"])
def test_load_refuses_a_placeholder_that_breaks_generated_code(tmp_path, target):
    path = tmp_path / "placeholder.safetensors"
    nodes = [_placeholder("x", target), _output({"node": "x"})]
    _write_crafted(path, _graph(nodes), {})
    with pytest.raises(ValueError, match="Expected a valid sparsecraft model file"):
        load(path)


@pytest.mark.parametrize("node", [
    {"name": "g", "op": "call_function", "target": "getattr",
     "args": {"tuple": [{"node": "x"}, "__class__"]}, "kwargs": {}},
    {"name": "s", "op": "call_method", "target": "sum", "args": {"tuple": [{"node": "x"}]},
     "kwargs": {"lambda": 1}},
    {"name": "class", "op": "call_method", "target": "sum",
     "args": {"tuple": [{"node": "x"}]}, "kwargs": {}},
])
def test_load_refuses_nodes_that_would_reach_outside_the_tables(tmp_path, node):
    path = tmp_path / "node.safetensors"
    _write_crafted(path, _graph([_placeholder("x"), node, _output({"node": "x"})]), {})
    with pytest.raises(ValueError, match="Expected a valid sparsecraft model file"):
        load(path)


def test_load_refuses_duplicate_placeholders(tmp_path):
    path = tmp_path / "dup.safetensors"
    nodes = [_placeholder("x"), _placeholder("y", "x"), _output({"node": "y"})]
    _write_crafted(path, _graph(nodes), {})
    with pytest.raises(ValueError, match="declared twice"):
        load(path)


@pytest.mark.parametrize("module_path", ["import", "class.x", "x.lambda", "forward", "a..b"])
def test_load_refuses_module_paths_that_are_not_plain_names(tmp_path, module_path):
    path = tmp_path / "paths.safetensors"
    nodes = [_placeholder("x"), {"name": "y", "op": "call_module", "target": module_path,
                                 "args": {"tuple": [{"node": "x"}]}, "kwargs": {}},
             _output({"node": "y"})]
    modules = {module_path: {"type": "ReLU", "config": {"inplace": False}}}
    _write_crafted(path, _graph(nodes, modules), {})
    with pytest.raises(ValueError, match="module path"):
        load(path)


def test_load_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    errors = []

    def run():
        try:
            load(fifo)
        except Exception as err:  # collected for the main thread
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)  # a hang guard: opening a FIFO for reading blocks until a writer comes
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # releases the blocked reader
        pytest.fail("load blocked on a FIFO")
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    assert "regular file" in str(errors[0])


def test_load_refuses_a_directory(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        load(tmp_path)


def test_load_refuses_a_reference_to_an_unbuilt_module(tmp_path):
    path = tmp_path / "ref.safetensors"
    structure = {"kind": "tree", "root": {"type": "Sequential", "children": [
        ["0", {"ref": ""}]]}}
    _write_crafted(path, structure, {})
    with pytest.raises(ValueError, match="reference"):
        load(path)


# ---------------------------------------------------------------------------- atomic save
def test_save_replaces_a_file_and_keeps_its_permissions(tmp_path):
    path = tmp_path / "m.safetensors"
    save(nn.Sequential(nn.Linear(2, 2)), path)
    os.chmod(path, 0o640)
    model = nn.Sequential(nn.Linear(3, 3))
    save(model, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert load(path)[0].weight.shape == (3, 3)
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_save_gives_a_new_file_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "new.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.safetensors").st_mode) == 0o640


def test_failed_save_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save(nn.Sequential(nn.Linear(2, 2)), path)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt  # a save killed half-way

    monkeypatch.setattr(io_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save(nn.Sequential(nn.Linear(4, 4)), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_failed_write_raises_oserror_naming_the_path_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"

    def disk_full(tensors, filename, metadata=None):
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(io_module, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left") as info:
        save(nn.Sequential(nn.Linear(2, 2)), path)
    assert info.value.filename == str(path) and ".tmp" not in str(info.value)
    assert os.listdir(tmp_path) == []


def test_save_into_a_missing_folder_names_the_path(tmp_path):
    path = tmp_path / "missing" / "m.safetensors"
    with pytest.raises(FileNotFoundError, match="missing/m.safetensors"):
        save(nn.Sequential(nn.Linear(2, 2)), path)


def test_save_into_a_read_only_folder_raises_oserror_naming_the_path(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "m.safetensors"
    if os.geteuid() != 0:  # root writes into a 0o555 folder, so simulate the refusal there
        os.chmod(folder, 0o555)
    else:
        def refuse(prefix, suffix, dir):
            raise PermissionError(13, "Permission denied", os.path.join(dir, prefix + "x" + suffix))

        monkeypatch.setattr(io_module.tempfile, "mkstemp", refuse)
    try:
        with pytest.raises(PermissionError) as info:
            save(nn.Sequential(nn.Linear(2, 2)), path)
    finally:
        os.chmod(folder, 0o755)
    assert str(path) in str(info.value) and ".tmp" not in str(info.value)
    assert os.listdir(folder) == []


def test_save_to_a_directory_refuses(tmp_path):
    with pytest.raises(IsADirectoryError, match="directory"):
        save(nn.Sequential(nn.Linear(2, 2)), tmp_path)


# ---------------------------------------------------------------------------- real layers
class _Recurrent(nn.Module):
    def __init__(self, cell: type) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.rnn = cell(8, 12, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24, 3)

    def forward(self, idx):
        out, _ = self.rnn(self.emb(idx))
        return self.head(out[:, -1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_save_load_embedding_and_recurrent_model(tmp_path, cell):
    torch.manual_seed(5)
    model = _Recurrent(cell).eval()
    loaded = _round_trip(model, tmp_path)
    assert type(loaded.rnn) is cell and loaded.emb.padding_idx == 0
    idx = torch.randint(0, 20, (4, 7))
    assert torch.equal(loaded(idx), model(idx))


def test_save_load_lstm_with_projection_in_a_sequential(tmp_path):
    torch.manual_seed(6)
    model = nn.Sequential(nn.LSTM(4, 8, proj_size=3)).eval()
    loaded = _round_trip(model, tmp_path)
    x = torch.randn(5, 2, 4)
    (out_a, (h_a, c_a)), (out_b, (h_b, c_b)) = loaded(x), model(x)
    assert torch.equal(out_a, out_b) and torch.equal(h_a, h_b) and torch.equal(c_a, c_b)


def test_save_load_multihead_attention(tmp_path):
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, bias=False, add_bias_kv=True, kdim=8,
                                              vdim=8, batch_first=True)

        def forward(self, q, kv):
            out, weights = self.attn(q, kv, kv)
            return out, weights

    torch.manual_seed(7)
    model = Attend().eval()
    loaded = _round_trip(model, tmp_path)
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 6, 8)
    for a, b in zip(loaded(q, kv), model(q, kv), strict=True):
        assert torch.equal(a, b)


class _TinyLM(nn.Module):
    """A small causal transformer with tied input/output embeddings."""

    def __init__(self, stack: bool, vocab: int = 32, d: int = 32, context: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = (
            nn.TransformerEncoder(layer, 2, nn.LayerNorm(d), enable_nested_tensor=False)
            if stack else nn.ModuleList([layer, copy.deepcopy(layer)]))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        t = idx.size(1)
        h = self.emb(idx) + self.pos(torch.arange(t, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        if isinstance(self.blocks, nn.TransformerEncoder):
            h = self.blocks(h, mask=mask, is_causal=True)
        else:
            for block in self.blocks:
                h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


@pytest.mark.parametrize("stack", [False, True], ids=["layers", "encoder"])
def test_save_load_causal_transformer_with_tied_embeddings(tmp_path, stack):
    torch.manual_seed(8)
    model = _TinyLM(stack).eval()
    path = tmp_path / "lm.safetensors"
    save(model, path)
    loaded = load(path)
    assert loaded.head.weight is loaded.emb.weight
    idx = torch.randint(0, 32, (3, 16))
    assert torch.equal(loaded(idx), model(idx))
    short = idx[:, :5]
    assert torch.equal(loaded(short), model(short))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert "head.weight" not in set(f.keys())  # stored once


def test_save_load_a_compiled_model(tmp_path):
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)).eval()
    loaded = _round_trip(torch.compile(model), tmp_path)
    assert type(loaded) is nn.Sequential
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), model(x))


def test_load_keeps_forward_default_arguments(tmp_path):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, scale: float = 2.0, mask=None):
            h = self.fc(x) * scale
            if mask is not None:  # a flag fx cannot branch on: fixed at its default
                h = h * mask
            return h

    torch.manual_seed(10)
    model = Scaled().eval()
    loaded = _round_trip(model, tmp_path)
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded(x, 3.0), model(x, 3.0))
    assert torch.equal(loaded(x, scale=-1.5), model(x, scale=-1.5))
    with pytest.raises(AssertionError, match="mask has been specialized"):
        loaded(x, 2.0, torch.ones(4))  # fx's own check: the None default was fixed


def test_save_of_an_unsupported_layer_says_how_to_save_the_weights(tmp_path):
    path = tmp_path / "no.safetensors"
    with pytest.raises(TypeError, match="safetensors.torch.save_model"):
        save(nn.Sequential(nn.Linear(2, 2), nn.Bilinear(2, 2, 2)), path)
    assert not path.exists()


def test_transformer_encoder_layer_with_relu_in_a_sequential(tmp_path):
    torch.manual_seed(11)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, bias=False)).eval()
    loaded = _round_trip(model, tmp_path)
    x = torch.randn(5, 2, 16)
    assert torch.equal(loaded(x), model(x))
    assert loaded[0].dropout.p == 0.1 and loaded[0].dropout1.p == 0.1


def test_save_refuses_a_custom_encoder_activation_or_norm(tmp_path):
    layer = nn.TransformerEncoderLayer(8, 2, 16, activation=torch.tanh)
    with pytest.raises(TypeError, match="activation"):
        save(nn.Sequential(layer), tmp_path / "act.safetensors")
    stack = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 2, norm=nn.Identity(),
                                  enable_nested_tensor=False)
    with pytest.raises(TypeError, match="norm"):
        save(nn.Sequential(stack), tmp_path / "norm.safetensors")
    assert not os.listdir(tmp_path)


def test_save_load_free_tensors_read_in_forward(tmp_path):
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.randn(4))
            self.register_buffer("mask", (torch.rand(4) > 0.5).float())

        def forward(self, x):
            return F.linear(x, self.fc.weight) * self.scale * self.mask + self.fc(x)

    torch.manual_seed(12)
    model = Gate().eval()
    loaded = _round_trip(model, tmp_path)
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), model(x))
    assert isinstance(loaded.scale, nn.Parameter) and not isinstance(loaded.mask, nn.Parameter)


def test_save_load_graph_with_dtypes_slices_constants_and_attention(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x).to(torch.float64)[..., :3]
            z = torch.zeros(2, 3, dtype=torch.float64)  # a constant: stored as a tensor
            att = F.scaled_dot_product_attention(h[None], h[None], h[None], is_causal=True)
            return (h + z.sum() + att[0]).masked_fill(h > 0.5, float("-inf")) @ h.t()

    torch.manual_seed(13)
    model = Net().eval()
    loaded = _round_trip(model, tmp_path)
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), model(x))
