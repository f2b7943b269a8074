"""save / load of what compact and to_sparse produce, on a BN-CNN, an Embedding+LSTM and a
causal transformer with tied embeddings (issue 11, "Done means": compact -> to_sparse ->
save/load with equal outputs). Dead units are set by hand; nothing here trains.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import sparsecraft as sc
from sparsecraft.export import (
    CompactEncoderLayer,
    SparseConv,
    SparseLinear,
    compact,
    load,
    save,
    to_sparse,
)
from sparsecraft.export._hooks import is_sparsecraft_hook
from sparsecraft.export._io import _digest

TOL = 1e-5


def _round_trip(model: nn.Module, tmp_path, name: str = "m.safetensors") -> nn.Module:
    path = tmp_path / name
    save(model, path)
    return load(path)


def _force_sparse(model: nn.Module, x) -> nn.Module:
    """to_sparse replacing every Linear/Conv layer, whatever the timing says."""
    out, _ = to_sparse(model, x, min_sparsity=0.0, repeats=1, warmup=0, min_speedup=1e-9)
    return out


def _stored(path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _resign(path, structure: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Rewrites the file with a changed structure and a valid checksum, as an attacker could."""
    header = json.dumps(structure)
    save_file(tensors, str(path), metadata={
        "format": "pt", "sparsecraft.version": "1", "sparsecraft.structure": header,
        "sparsecraft.sha256": _digest(header, tensors)})


# ---------------------------------------------------------------------------- CNN with BatchNorm
class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
            nn.Conv1d(8, 12, 3, padding=1), nn.BatchNorm1d(12), nn.ReLU())
        self.head = nn.Linear(12 * 20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def test_bn_cnn_compact_then_to_sparse_round_trip(tmp_path):
    torch.manual_seed(0)
    m = _CNN()
    with torch.no_grad():
        for bn in (m.features[1], m.features[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
        m.features[0].weight[:3] = 0  # channels 0-2 dead; BN maps them below 0, ReLU to 0
        m.features[1].bias[:3] = -10.0
        m.features[3].weight[4:6] = 0
        m.features[4].bias[4:6] = -10.0
        m.features[3].weight[torch.rand_like(m.features[3].weight) < 0.7] = 0
    m.eval()
    x = torch.randn(4, 1, 20)
    small, _ = compact(m, x)
    assert small.features[0].out_channels == 5 and small.features[3].out_channels == 10
    assert (small(x) - m(x)).abs().max() <= TOL
    loaded = _round_trip(small, tmp_path, "small.safetensors")
    assert torch.equal(loaded(x), small(x))
    fast = _force_sparse(small, x[:1])
    assert isinstance(fast.features[3], SparseConv) and isinstance(fast.head, SparseLinear)
    loaded = _round_trip(fast, tmp_path)
    conv = loaded.get_submodule("features.3")  # a GraphModule keeps the submodule paths
    assert isinstance(conv, SparseConv) and isinstance(loaded.head, SparseLinear)
    assert conv.nnz == fast.features[3].nnz
    for batch in (x[:1], x):
        assert torch.equal(loaded(batch), fast(batch))
    _, tensors = _stored(tmp_path / "m.safetensors")  # CSR parts, not a dense weight
    assert tensors["features.3.col_indices"].dtype == torch.int32
    assert tensors["features.3.values"].numel() == fast.features[3].nnz
    assert "features.3.weight" not in tensors


@pytest.mark.parametrize("conv", [
    nn.Conv1d(3, 6, 4, padding="same", bias=False),
    nn.Conv1d(3, 6, 3, stride=2, dilation=2, padding=1, padding_mode="circular"),
    nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 0), padding_mode="reflect"),
])
def test_sparse_conv_settings_round_trip(tmp_path, conv):
    torch.manual_seed(1)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) < 0.8] = 0
    x = torch.randn((2, 3, 11) if isinstance(conv, nn.Conv1d) else (2, 3, 9, 8))
    fast = _force_sparse(nn.Sequential(conv, nn.Tanh()), x[:1])
    assert isinstance(fast[0], SparseConv)
    loaded = _round_trip(fast, tmp_path)
    assert type(loaded) is nn.Sequential and isinstance(loaded[0], SparseConv)
    for batch in (x, x[0]):  # batched and unbatched
        assert torch.equal(loaded(batch), fast(batch))
    assert (loaded(x) - conv(x).tanh()).abs().max() <= TOL


# ---------------------------------------------------------------------------- Embedding + LSTM
class _LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.lstm = nn.LSTM(16, 24, batch_first=True, bidirectional=True)
        self.head = nn.Linear(48, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(ids))
        return self.head(out[:, -1])


def test_embedding_lstm_compact_then_to_sparse_round_trip(tmp_path):
    torch.manual_seed(2)
    m = _LSTMClassifier()
    with torch.no_grad():
        m.emb.weight[:, [3, 4]] = 0  # embedding features zero for every token
        m.head.weight[torch.rand(4, 48) < 0.8] = 0
    m.eval()
    ids = torch.randint(0, 30, (4, 9))
    small, _ = compact(m, ids)
    assert small.emb.embedding_dim == 14 and small.lstm.input_size == 14
    fast = _force_sparse(small, ids)
    assert isinstance(fast.head, SparseLinear)
    loaded = _round_trip(fast, tmp_path)
    assert loaded.lstm.input_size == 14 and isinstance(loaded.head, SparseLinear)
    assert torch.equal(loaded(ids), fast(ids))
    assert (loaded(ids) - m(ids)).abs().max() <= TOL


# ---------------------------------------------------------------------------- causal transformer
class _TinyLM(nn.Module):
    """Tied embedding/head, a ModuleList of batch-first encoder layers, a causal mask built
    from the length with torch functions (traceable, as the arch branch's model)."""

    def __init__(self, vocab: int = 20, d: int = 32, heads: int = 4, ff: int = 48,
                 norm_first: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(16, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True,
                                       norm_first=norm_first) for _ in range(2))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        x = self.emb(ids) + self.pos(torch.arange(n, device=ids.device))
        mask = torch.triu(torch.full((n, n), float("-inf"), device=ids.device), diagonal=1)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


def _kill(layer: nn.TransformerEncoderLayer, ffn_rows=(), v_heads=(), out_heads=()) -> None:
    e, hd = layer.self_attn.embed_dim, layer.self_attn.head_dim
    with torch.no_grad():
        layer.linear1.weight[list(ffn_rows)] = 0
        for h in v_heads:
            layer.self_attn.in_proj_weight[2 * e + h * hd: 2 * e + (h + 1) * hd] = 0
            layer.self_attn.in_proj_bias[2 * e + h * hd: 2 * e + (h + 1) * hd] = 0.3
        for h in out_heads:
            layer.self_attn.out_proj.weight[:, h * hd:(h + 1) * hd] = 0


@pytest.mark.parametrize("norm_first", [True, False])
def test_tied_transformer_compact_then_to_sparse_round_trip(tmp_path, norm_first):
    torch.manual_seed(3)
    m = _TinyLM(norm_first=norm_first)
    _kill(m.layers[0], ffn_rows=range(20), v_heads=(1,))
    _kill(m.layers[1], ffn_rows=range(5), out_heads=(0, 2))
    m.eval()
    ids = torch.randint(0, 20, (3, 10))
    small, _ = compact(m, ids)
    assert all(isinstance(layer, CompactEncoderLayer) for layer in small.layers)
    assert small.layers[1].self_attn.num_heads == 2
    loaded = _round_trip(small, tmp_path, "small.safetensors")
    assert isinstance(loaded.get_submodule("layers.0"), CompactEncoderLayer)
    assert loaded.get_submodule("layers.1.self_attn").heads.tolist() == [1, 3]
    assert loaded.head.weight is loaded.emb.weight  # still tied
    assert torch.equal(loaded(ids), small(ids))
    fast = _force_sparse(small, ids)
    assert isinstance(fast.layers[0].linear1, SparseLinear)
    assert isinstance(fast.layers[1].self_attn.in_proj, SparseLinear)
    loaded = _round_trip(fast, tmp_path)
    assert isinstance(loaded.get_submodule("layers.0.linear1"), SparseLinear)
    assert isinstance(loaded.get_submodule("layers.1.self_attn.in_proj"), SparseLinear)
    assert torch.equal(loaded(ids), fast(ids))
    assert torch.equal(loaded(ids[:1, :4]), fast(ids[:1, :4]))  # another length
    assert (loaded(ids) - m(ids)).abs().max() <= TOL


def test_compact_encoder_layer_as_root_keeps_its_settings(tmp_path):
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.1, activation="gelu",
                                       norm_first=True)  # (S, N, E) layout
    _kill(layer, ffn_rows=range(5), v_heads=(0,), out_heads=(3,))
    layer.eval()
    x = torch.randn(7, 2, 16)
    small, _ = compact(layer, (x,))
    assert isinstance(small, CompactEncoderLayer)
    loaded = _round_trip(small, tmp_path)
    assert isinstance(loaded, CompactEncoderLayer) and not loaded.training
    assert loaded.dropout.p == 0.1 and loaded.self_attn.dropout == 0.1
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    for kwargs in ({}, {"src_key_padding_mask": padding}, {"src_mask": torch.randn(8, 7, 7)},
                   {"is_causal": True,
                    "src_mask": nn.Transformer.generate_square_subsequent_mask(7)}):
        assert torch.equal(loaded(x, **kwargs), small(x, **kwargs)), kwargs


@pytest.mark.parametrize("nested, kills", [
    (True, ({"ffn_rows": range(8)}, {"ffn_rows": range(3), "out_heads": (1,)})),
    (False, ({"v_heads": (0,)}, {"ffn_rows": range(3)})),
    (False, ({"out_heads": (2,)}, {"v_heads": (1, 3)})),
])
def test_compacted_transformer_encoder_with_differing_layers_round_trips(tmp_path, nested,
                                                                         kills):
    # compact resizes each layer on its own: the stack's layers no longer share settings
    torch.manual_seed(10)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2,
                                nn.LayerNorm(16), enable_nested_tensor=nested)
    for layer, kill in zip(enc.layers, kills, strict=True):
        _kill(layer, **kill)
    enc.eval()
    x = torch.randn(2, 6, 16)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 4:] = True
    small, _ = compact(enc, (x,))
    kinds = [type(layer) for layer in small.layers]
    loaded = _round_trip(small, tmp_path)
    config = json.loads(_stored(tmp_path / "m.safetensors")[0]["sparsecraft.structure"])
    assert [spec["type"] for spec in config["root"]["config"]["layers"]] == [
        kind.__name__ for kind in kinds]  # one spec a layer: they differ
    assert [type(layer) for layer in loaded.layers] == kinds
    assert loaded.use_nested_tensor == small.use_nested_tensor
    with torch.no_grad():  # the nested fast path runs without autograd
        for kwargs in ({}, {"src_key_padding_mask": padding}):
            assert torch.equal(loaded(x, **kwargs), small(x, **kwargs)), kwargs
            assert (loaded(x, **kwargs) - enc(x, **kwargs)).abs().max() <= TOL


def test_to_sparse_keeps_torch_encoder_layer_parts_dense_and_the_model_round_trips(tmp_path):
    # only FFN neurons dead: compact keeps nn.TransformerEncoderLayer, whose eval fast path
    # reads linear1.weight; a SparseLinear there raised AttributeError in forward
    torch.manual_seed(9)
    m = _TinyLM()
    _kill(m.layers[0], ffn_rows=range(30))
    with torch.no_grad():
        m.layers[1].linear2.weight[torch.rand(32, 48) < 0.8] = 0
    m.eval()
    ids = torch.randint(0, 20, (2, 8))
    small, _ = compact(m, ids)
    assert type(small.layers[0]) is nn.TransformerEncoderLayer
    fast, report = to_sparse(small, ids, min_sparsity=0.0, repeats=1, warmup=0,
                             min_speedup=1e-9)
    rows = {r.name: r for r in report.layers}
    assert rows["layers.1.linear2"].chosen == "dense"
    assert "TransformerEncoderLayer" in rows["layers.1.linear2"].reason
    assert type(fast.layers[1].linear2) is nn.Linear and isinstance(fast.head, SparseLinear)
    loaded = _round_trip(fast, tmp_path)
    assert torch.equal(loaded(ids), fast(ids))
    assert (loaded(ids) - m(ids)).abs().max() <= TOL


def test_save_refuses_a_sparse_linear_inside_a_torch_encoder_layer(tmp_path):
    # put there by hand (to_sparse leaves these parts dense): load could not rebuild it
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(16, 2, 24, batch_first=True).eval()
    layer.linear1 = SparseLinear.from_linear(layer.linear1)
    path = tmp_path / "m.safetensors"
    with pytest.raises(TypeError, match="part 'linear1' is SparseLinear, not the Linear"):
        save(nn.Sequential(layer), path)
    assert not path.exists()


# ---------------------------------------------------------------------------- damaged, crafted
def _sparse_cnn_file(tmp_path):
    torch.manual_seed(6)
    conv = nn.Conv1d(2, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) < 0.7] = 0
    fast = _force_sparse(nn.Sequential(conv), torch.randn(1, 2, 8))
    path = tmp_path / "m.safetensors"
    save(fast, path)
    return path


def test_load_refuses_a_tampered_sparse_conv_file(tmp_path):
    path = _sparse_cnn_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load(path)


@pytest.mark.parametrize("setting, value, match", [
    ("kernel_size", [1, 1], "do not fit"),  # column indices past the new width
    ("stride", [1, 0], "stride"),
    ("pre_pad_mode", "os.system", "pre_pad"),
    ("bias", False, "SparseConv tensors"),
])
def test_load_refuses_crafted_sparse_conv_settings(tmp_path, setting, value, match):
    path = _sparse_cnn_file(tmp_path)
    metadata, tensors = _stored(path)
    structure = json.loads(metadata["sparsecraft.structure"])
    structure["root"]["children"][0][1]["config"][setting] = value
    _resign(path, structure, tensors)
    with pytest.raises(ValueError, match=f"valid sparsecraft model file.*{match}"):
        load(path)


@pytest.mark.parametrize("setting, value, match", [
    ("heads", [1, 7], "heads="), ("heads", [3, 1], "heads="), ("num_heads", 5, "num_heads=5"),
    ("activation", "tanh", "activation="), ("heads", [1], "part self_attn.in_proj of"),
    ("linear1", {"type": "Conv1d", "config": {}}, "part linear1"),
])
def test_load_refuses_crafted_compact_encoder_settings(tmp_path, setting, value, match):
    torch.manual_seed(7)
    layer = nn.TransformerEncoderLayer(16, 4, 24, batch_first=True)
    _kill(layer, out_heads=(0, 2))
    small, _ = compact(layer.eval(), torch.randn(2, 5, 16))
    path = tmp_path / "m.safetensors"
    save(small, path)
    metadata, tensors = _stored(path)
    structure = json.loads(metadata["sparsecraft.structure"])
    structure["root"]["config"][setting] = value
    _resign(path, structure, tensors)
    with pytest.raises(ValueError, match=f"valid sparsecraft model file.*CompactEncoderLayer "
                                         f".*{match}"):
        load(path)


@pytest.mark.parametrize("layers", [
    [{"type": "Linear", "config": {"in_features": 16, "out_features": 16, "bias": True}}] * 2,
    "drop the second",
])
def test_load_refuses_crafted_transformer_encoder_layers(tmp_path, layers):
    torch.manual_seed(11)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2,
                                enable_nested_tensor=False)
    _kill(enc.layers[0], ffn_rows=range(4))
    small, _ = compact(enc.eval(), (torch.randn(2, 3, 16),))
    path = tmp_path / "m.safetensors"
    save(small, path)
    metadata, tensors = _stored(path)
    structure = json.loads(metadata["sparsecraft.structure"])
    config = structure["root"]["config"]
    config["layers"] = config["layers"][:1] if layers == "drop the second" else layers
    _resign(path, structure, tensors)
    with pytest.raises(ValueError, match="valid sparsecraft model file.*TransformerEncoder layers"):
        load(path)


# ---------------------------------------------------------------------------- hooks
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = _Block(), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def _sparsecraft_hooks(model: nn.Module) -> int:
    return sum(is_sparsecraft_hook(h) for m in model.modules()
               for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))


def test_save_neither_runs_nor_stores_training_hooks(tmp_path):
    torch.manual_seed(8)
    model = _Net()
    calls: list[str] = []

    def probe(module, args, out):  # counts as sparsecraft's: records what it is given
        calls.append(type(out).__name__)

    probe.__module__ = "sparsecraft.probe"
    model.block.register_forward_hook(probe)
    reg = sc.Regularizer(model)
    reg.add_activity("block", sc.L1(0.1))  # a hook on a module that tracing steps into
    monitor = sc.ActivationMonitor(model, modules=["block", "head"])
    x = torch.randn(5, 6)
    model(x)
    loss, seen = float(reg.loss().detach()), monitor.stats()
    assert _sparsecraft_hooks(model) > 0
    assert calls == ["Tensor"]
    hooks = dict(model.block._forward_hooks)
    loaded = _round_trip(model, tmp_path)  # torch.fx tracing calls `block` through __call__
    assert calls == ["Tensor"]  # no hook saw a tracing proxy
    assert float(reg.loss().detach()) == loss and monitor.stats() == seen
    assert dict(model.block._forward_hooks) == hooks  # all back, in order
    assert _sparsecraft_hooks(loaded) == 0
    assert torch.equal(loaded(x), model.eval()(x))
    assert calls == ["Tensor", "Tensor"]  # the original keeps its hooks
