"""compact / to_sparse on real architectures: BN-CNN, causal transformer, Embedding+LSTM.

Also: exported copies carry no sparsecraft hooks (issue 10, item 8) and
Keras models are refused (issue 13).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecraft as sc
from sparsecraft.export import CompactEncoderLayer, SparseConv, SparseLinear, compact, to_sparse
from sparsecraft.export._hooks import is_sparsecraft_hook

TOL = 1e-5


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


def _names(report) -> dict[str, object]:
    return {c.name: c for c in report.layers}


def _reasons(report) -> dict[str, str]:
    """Every skip reason of a name, joined."""
    out: dict[str, str] = {}
    for name, reason in report.skipped:
        out[name] = out.get(name, "") + reason + "\n"
    return out


# ---------------------------------------------------------------------------- CNN with BatchNorm
class _CNN(nn.Module):
    """Conv1d-BN-ReLU x3 + Linear, the MNIST-1D shape (length 40)."""

    def __init__(self) -> None:
        super().__init__()
        layers, c = [], 1
        for w in (8, 12, 16):
            layers += [nn.Conv1d(c, w, 5, padding=2), nn.BatchNorm1d(w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(16 * 40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _dead_cnn() -> _CNN:
    torch.manual_seed(0)
    m = _CNN()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (m.features[1], m.features[4], m.features[7]):
            n = bn.num_features
            bn.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.bias.copy_(torch.rand(n, generator=gen) - 0.5)
        # conv0 channels 0-2 dead: BN(bias) = -10, -10 (ReLU gives 0: removable before the
        # padded conv1) and +10 (a non-zero constant is not constant at conv1's zero-padded
        # borders: kept).
        m.features[0].weight[:3] = 0
        m.features[1].bias[:3] = torch.tensor([-10.0, -10.0, 10.0])
        m.features[3].weight[5:7] = 0  # conv1 channels 5, 6 dead, BN -> negative -> 0
        m.features[4].bias[5:7] = -10.0
        m.features[6].weight[:4] = 0  # conv2 channels 0-3 dead, positive constants:
        m.features[7].bias[:4] = 10.0  # folded into the head through flatten
    return m


def test_compact_bn_cnn_removes_dead_channels_and_folds_constants():
    m = _dead_cnn().eval()
    x = torch.randn(5, 1, 40)
    small, report = compact(m, x)
    assert small.features[0].out_channels == 6  # channels 0, 1 removed, 2 kept (+10 constant)
    assert small.features[1].num_features == 6
    assert small.features[3].in_channels == 6 and small.features[3].out_channels == 10
    assert small.features[6].out_channels == 12 and small.features[7].num_features == 12
    assert small.head.in_features == 12 * 40
    assert "1 constant input channel(s) kept" in _reasons(report)["features.3"]
    assert report.max_abs_diff <= TOL
    assert _diff(small(x), m(x)) <= TOL
    assert report.params_after < report.params_before and report.flops_after < report.flops_before


# ---------------------------------------------------------------------------- causal transformer
class _TinyGPT(nn.Module):
    """Tied Embedding/output, 2 TransformerEncoderLayers (batch_first) with a causal mask.

    ``sliced``: the forward slices ``pos[:T]`` with ``T = ids.shape[1]``, which
    torch.fx cannot trace (the usual GPT code).
    """

    def __init__(self, vocab: int = 20, d: int = 32, heads: int = 4, ff: int = 64, T: int = 12,
                 sliced: bool = False):
        super().__init__()
        self.sliced, self.T = sliced, T
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(T, d) * 0.1)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, ff, dropout=0.1, batch_first=True)
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1] if self.sliced else self.T
        x = self.emb(ids) + self.pos[:T]
        for layer in self.layers:
            x = layer(x, src_mask=self.mask[:T, :T], is_causal=True)
        return self.out(self.norm(x))


def _kill(layer: nn.TransformerEncoderLayer, *, ffn_rows=(), ffn_cols=(), v_heads=(),
          out_heads=(), q_heads=()) -> None:
    e, hd = layer.self_attn.embed_dim, layer.self_attn.head_dim
    with torch.no_grad():
        layer.linear1.weight[list(ffn_rows)] = 0
        layer.linear1.bias[list(ffn_rows)] = torch.linspace(-1, 1, len(ffn_rows))
        layer.linear2.weight[:, list(ffn_cols)] = 0
        for h in v_heads:
            layer.self_attn.in_proj_weight[2 * e + h * hd: 2 * e + (h + 1) * hd] = 0
            layer.self_attn.in_proj_bias[2 * e + h * hd: 2 * e + (h + 1) * hd] = 0.3
        for h in out_heads:
            layer.self_attn.out_proj.weight[:, h * hd:(h + 1) * hd] = 0
        for h in q_heads:
            layer.self_attn.in_proj_weight[h * hd:(h + 1) * hd] = 0


@pytest.mark.parametrize("sliced", [False, True])
def test_compact_causal_transformer_removes_ffn_neurons_and_heads(sliced):
    torch.manual_seed(0)
    m = _TinyGPT(sliced=sliced).eval()
    _kill(m.layers[0], ffn_rows=range(36), v_heads=(1,))
    _kill(m.layers[1], ffn_cols=range(10, 20), out_heads=(2,), q_heads=(3,))
    ids = torch.randint(0, 20, (3, 12))
    small, report = compact(m, ids)
    changes = _names(report)
    assert changes["layers.0"].shape_before == (4, 64)
    assert changes["layers.0"].shape_after == (3, 28)
    assert changes["layers.1"].shape_after == (3, 54)
    assert "36 of 64 FFN neurons removed" in changes["layers.0"].detail
    assert all(isinstance(layer, CompactEncoderLayer) for layer in small.layers)
    reasons = _reasons(report)
    assert "query weights are zero" in reasons["layers.1"]  # a uniform head is not dead
    if sliced:  # the model cannot be traced; its encoder layers are still compacted
        assert "cannot trace" in reasons[""]
    else:
        assert "tied" in reasons["out"]  # the tied output Linear is not resized
    assert _diff(small(ids), m(ids)) <= TOL and report.max_abs_diff <= TOL
    assert small.out.weight is small.emb.weight  # still tied
    assert report.params_after < report.params_before


@pytest.mark.parametrize("norm_first", [False, True])
def test_compact_encoder_layer_masks_and_layouts(norm_first):
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, activation="gelu",
                                       norm_first=norm_first)  # (S, N, E) layout
    _kill(layer, ffn_rows=range(5), v_heads=(0,), out_heads=(3,))
    layer.eval()
    x = torch.randn(7, 2, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    head_mask = torch.randn(2 * 4, 7, 7)  # a float mask per original head
    small, report = compact(layer, (x,))
    assert isinstance(small, CompactEncoderLayer) and small.self_attn.num_heads == 2
    for kwargs in ({}, {"src_key_padding_mask": padding}, {"src_mask": head_mask},
                   {"is_causal": True, "src_mask": nn.Transformer.generate_square_subsequent_mask(7)}):
        assert _diff(small(x, **kwargs), layer(x, **kwargs)) <= TOL, kwargs


def test_compact_transformer_encoder_with_nested_fast_path_keeps_heads():
    torch.manual_seed(2)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2,
                                enable_nested_tensor=True)
    for layer in enc.layers:
        _kill(layer, ffn_rows=range(8), v_heads=(2,))
    enc.eval()
    x = torch.randn(2, 6, 16)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 4:] = True
    small, report = compact(enc, (x, None, padding))
    assert all(type(layer) is nn.TransformerEncoderLayer for layer in small.layers)
    assert small.layers[0].linear1.out_features == 24
    assert any("nested" in reason for _, reason in report.skipped)
    assert _diff(small(x, src_key_padding_mask=padding), enc(x, src_key_padding_mask=padding)) \
        <= TOL


# ---------------------------------------------------------------------------- Embedding + LSTM
class _LSTMClassifier(nn.Module):
    def __init__(self, bidirectional: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.lstm = nn.LSTM(16, 24, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(24 * (2 if bidirectional else 1), 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(ids))
        return self.head(out[:, -1])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_compact_embedding_lstm_removes_dead_embedding_columns(bidirectional):
    torch.manual_seed(3)
    m = _LSTMClassifier(bidirectional).eval()
    with torch.no_grad():
        m.emb.weight[:, [3, 4]] = 0  # features 0 for every token
        for name in ("weight_ih_l0", "weight_ih_l0_reverse")[: 1 + bidirectional]:
            getattr(m.lstm, name)[:, 7] = 0  # feature 7 read by no gate
    ids = torch.randint(0, 30, (4, 9))
    small, report = compact(m, ids)
    assert small.emb.embedding_dim == 13 and small.lstm.input_size == 13
    assert small.lstm.weight_ih_l0.shape == (96, 13)
    assert "hidden units are kept" in _reasons(report)["lstm"]
    assert _diff(small(ids), m(ids)) <= TOL and report.max_abs_diff <= TOL


# ---------------------------------------------------------------------------- cat / softmax / mean
class _Pool(nn.Module):
    def __init__(self, channel_softmax: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 10), nn.Linear(6, 10), nn.Linear(10, 3)
        self.channel_softmax = channel_softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        h = h.softmax(-1) if self.channel_softmax else h.softmax(1)
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("channel_softmax", [False, True])
def test_compact_follows_cat_softmax_and_mean(channel_softmax):
    torch.manual_seed(4)
    m = _Pool(channel_softmax).eval()
    with torch.no_grad():
        for lin in (m.a, m.b):
            lin.weight[:3] = 0  # constant relu(b), the same in both halves of the cat
            lin.bias[:3] = torch.tensor([0.5, 1.0, -0.2])
        m.head.weight[:, 8:] = 0  # units 8, 9 read by nobody
    x = torch.randn(2, 5, 6)
    small, report = compact(m, x)
    if channel_softmax:  # softmax over the features mixes them: nothing may go before it
        assert small.a.out_features == 10
        assert any("channel dimension" in r for _, r in report.skipped)
    else:
        assert small.a.out_features == small.b.out_features == small.head.in_features == 5
    assert _diff(small(x), m(x)) <= TOL


# ---------------------------------------------------------------------------- to_sparse convolutions
@pytest.mark.parametrize("conv", [
    nn.Conv1d(4, 8, 5, padding=2), nn.Conv1d(4, 8, 3, stride=2, dilation=2, padding="valid"),
    nn.Conv1d(4, 8, 4, padding="same", bias=False),
    nn.Conv2d(4, 8, 3, padding=1),
    nn.Conv2d(4, 8, (3, 2), stride=(2, 1), padding=(1, 0), padding_mode="reflect"),
])
def test_to_sparse_conv_matches_dense(conv):
    torch.manual_seed(5)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) < 0.9] = 0
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.randn((1, 4, 20) if isinstance(conv, nn.Conv1d) else (1, 4, 9, 10))
    forced, report = to_sparse(model, x, repeats=1, warmup=0, min_speedup=1e-9)
    assert isinstance(forced[0], SparseConv) and report.layers[0].kernel == "unfold"
    for batch in (x, torch.cat([x, -x, 2 * x])):
        assert _diff(forced(batch), model(batch)) <= TOL
    kept, report = to_sparse(model, x, repeats=1, warmup=0, min_speedup=1e9)
    assert type(kept[0]) is type(conv) and report.layers[0].chosen == "dense"


def test_to_sparse_conv_decision_follows_measurement():
    torch.manual_seed(6)
    conv = nn.Conv1d(16, 32, 5, padding=2)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) < 0.95] = 0
    out, report = to_sparse(nn.Sequential(conv), torch.randn(1, 16, 40), repeats=3, warmup=1)
    row = report.layers[0]
    assert row.kind == "Conv1d" and row.dense_ms > 0 and row.sparse_ms > 0
    assert (row.chosen == "sparse") == (row.dense_ms / row.sparse_ms >= 1.1)
    assert isinstance(out[0], SparseConv) == (row.chosen == "sparse")


# ---------------------------------------------------------------------------- hooks (issue 10.8)
def _sparsecraft_hooks(model: nn.Module) -> int:
    return sum(is_sparsecraft_hook(h) for m in model.modules()
               for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))


def test_exported_copies_carry_no_training_hooks():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight[:6] = 0
        model[2].weight[torch.rand(4, 16) < 0.8] = 0
    reg = sc.Regularizer(model)
    reg.add_activity("1", sc.L1(0.1))
    monitor = sc.ActivationMonitor(model, modules=["1"])
    x = torch.randn(4, 8)
    model(x)
    before = float(reg.loss().detach())
    seen = monitor.stats()["1"]
    assert _sparsecraft_hooks(model) > 0
    small, _ = compact(model, x)
    fast, _ = to_sparse(model, x, min_sparsity=0.0, repeats=1, warmup=0, min_speedup=1e-9)
    assert isinstance(fast[2], SparseLinear)
    for exported in (small, fast):
        assert _sparsecraft_hooks(exported) == 0
        exported(100 * torch.randn(64, 8))
        assert float(reg.loss().detach()) == before  # the training terms did not see the copies
    assert monitor.stats()["1"] == seen
    model(2 * x)  # the original keeps its hooks
    assert float(reg.loss().detach()) != before
    assert monitor.stats()["1"] != seen


# ---------------------------------------------------------------------------- Keras (issue 13)
def test_export_refuses_a_keras_model(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("Keras runs on another backend in this process")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    assert isinstance(model, nn.Module)  # which is why it must be refused explicitly
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="Keras"):
        compact(model, x)
    with pytest.raises(TypeError, match="Keras"):
        to_sparse(model, x)
