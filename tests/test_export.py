"""Tests of sparsecraft.export: compact, to_sparse / SparseLinear, save / load."""

from __future__ import annotations

import copy
import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparsecraft.export import (
    CompactReport,
    SparseConv,
    SparseLinear,
    compact,
    load,
    save,
    to_sparse,
)
from sparsecraft.export._io import _digest
from sparsecraft.metrics import flops

TOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> float:
    diff = float((a - b).detach().abs().max())
    assert diff <= tol, diff
    return diff


def _randomise_bn(bn: nn.modules.batchnorm._BatchNorm, gen: torch.Generator) -> None:
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
        bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
        bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        bn.bias.copy_(torch.rand(n, generator=gen) * 2 - 1)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- compact: MLPs
def _dead_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))
    with torch.no_grad():
        m[0].weight[:5] = 0  # dead: output relu(b) (some biases positive, some negative)
        m[0].bias[:5] = torch.tensor([0.5, -0.3, 1.2, -2.0, 0.7])
        m[2].weight[:, 13:] = 0  # units 13..15 of layer 0 are read by nobody
        m[2].weight[3:6] = 0  # dead: output tanh(b), folded into layer 4
        m[2].bias[3:6] = torch.tensor([0.9, -0.4, 0.2])
    return m


def test_compact_mlp_dead_units_with_bias_give_same_outputs_and_smaller_layers():
    m = _dead_mlp()
    before = _state(m)
    x = torch.randn(32, 8)
    c, report = compact(m, x)
    _close(c(x), m(x))
    y = torch.randn(7, 8) * 5
    _close(c(y), m(y))
    # layer 0 keeps units 5..12 (0..4 dead and folded, 13..15 unread)
    assert c[0].weight.shape == (8, 8)
    assert c[2].weight.shape == (9, 8)  # 12 - 3 dead rows, 8 inputs
    assert c[4].weight.shape == (3, 9)
    assert isinstance(report, CompactReport)
    assert {ch.name: ch.shape_after for ch in report.layers} == {
        "0": (8, 8), "2": (9, 8), "4": (3, 9)}
    assert report.params_before == sum(p.numel() for p in m.parameters())
    assert report.params_after == sum(p.numel() for p in c.parameters())
    assert report.flops_before == flops(m, x) and report.flops_after == flops(c, x)
    assert report.flops_after < report.flops_before
    assert report.max_abs_diff <= TOL
    assert report.skipped == []
    json.dumps(report.to_dict())
    # the original is untouched
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m[0].weight.shape == (16, 8)


def test_compact_keeps_training_flag_of_original_and_returns_eval_copy():
    m = _dead_mlp().train()
    c, _ = compact(m, torch.randn(4, 8))
    assert m.training and not c.training
    assert c is not m


def test_compact_folds_into_consumer_without_bias():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 2, bias=False))
    with torch.no_grad():
        m[0].weight[2] = 0  # sigmoid(b) = constant != 0
    x = torch.randn(10, 4)
    c, _ = compact(m, x)
    assert c[2].bias is not None and c[2].weight.shape == (2, 5)
    _close(c(x), m(x))


def test_compact_cascade_constant_through_two_layers():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        m[0].weight[0] = 0
        m[0].bias[0] = 1.0
        m[2].weight[1] = 0
        m[2].weight[1, 0] = 3.0  # unit 1 of layer 2 reads only the constant unit 0
    x = torch.randn(6, 4)
    c, _ = compact(m, x)
    assert c[0].weight.shape == (4, 4) and c[2].weight.shape == (4, 4)
    _close(c(x), m(x))


def test_compact_view_size_flatten_and_kwargs_inputs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3)
            self.fc = nn.Linear(4 * 4 * 4, 3)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.fc(h.view(h.size(0), -1))

    torch.manual_seed(3)
    m = Net()
    with torch.no_grad():
        m.conv.weight[1] = 0
        m.conv.bias[1] = 0.3
    x = torch.randn(2, 2, 6, 6)
    c, report = compact(m, {"x": x})
    assert c.conv.weight.shape == (3, 2, 3, 3) and c.fc.weight.shape == (3, 48)
    _close(c(x), m(x))
    assert report.skipped == []


# ---------------------------------------------------------------------------- compact: CNN
class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 5, 1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(5 * 4 * 4, 4))

    def forward(self, x):
        return self.head(self.features(x))


def test_compact_cnn_batchnorm_dead_channels():
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    m = _CNN()
    for bn in (m.features[1], m.features[5]):
        _randomise_bn(bn, gen)
    f = m.features
    with torch.no_grad():
        # constant channels, shifted by BN, through relu and pool, read by conv 4 which pads
        # with zeros: channel 1 (0 after relu) is folded, channel 4 (positive) must stay
        f[0].weight[[1, 4]] = 0
        f[0].bias[1] = f[1].running_mean[1] - 10.0
        f[0].bias[4] = f[1].running_mean[4] + 10.0
        f[4].weight[2] = 0  # constant after BN -> folded into the 1x1 conv 7 (no padding)
        f[7].weight[:, 3] = 0  # channel 3 of block 2 unread
        m.head[1].weight[:, 16:32] = 0  # channel 1 of the last conv unread through flatten
    m.eval()
    x = torch.randn(3, 3, 10, 10)
    c, report = compact(m, x)
    _close(c(x), m(x))
    assert c.features[0].weight.shape[0] == 7
    assert c.features[1].num_features == 7
    assert c.features[4].weight.shape == (4, 7, 3, 3)
    assert c.features[5].running_mean.shape == (4,)
    assert c.features[7].weight.shape == (4, 4, 1, 1)
    assert c.head[1].weight.shape == (4, 4 * 16)
    assert report.params_after < report.params_before
    assert report.flops_after < report.flops_before


def test_compact_padded_conv_keeps_nonzero_constant_channel():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 2, 3, padding=1))
    with torch.no_grad():
        m[0].weight[0] = 0
        m[0].bias[0] = 1.5  # constant 1.5: zero padding makes the borders differ
        m[0].weight[1] = 0
        m[0].bias[1] = 0.0  # constant 0: removable
    x = torch.randn(2, 2, 7, 7)
    c, _ = compact(m, x)
    assert c[0].weight.shape[0] == 2 and c[1].weight.shape[1] == 2
    _close(c(x), m(x))


# ---------------------------------------------------------------------------- compact: residual
class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 10)
        self.fc1 = nn.Linear(10, 8)
        self.fc2 = nn.Linear(8, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.out(torch.relu(h))


def test_compact_residual_block():
    torch.manual_seed(6)
    m = _Residual()
    with torch.no_grad():
        m.fc1.weight[[0, 3]] = 0  # dead inner units (gelu(b) folded into fc2)
        m.fc2.weight[:, 5] = 0  # inner unit 5 unread
        m.inp.weight[[2, 7]] = 0  # residual stream units 2 and 7 are constant only if
        m.fc2.weight[[2]] = 0  # both branches are constant: only unit 2 is
    x = torch.randn(9, 6)
    c, report = compact(m, x)
    _close(c(x), m(x))
    assert c.fc1.weight.shape == (5, 9)
    assert c.fc2.weight.shape == (9, 5)
    assert c.inp.weight.shape == (9, 6) and c.out.weight.shape == (3, 9)
    assert type(c) is _Residual
    assert report.skipped == []


# ---------------------------------------------------------------------------- compact: unknown
class _Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_compact_layer_it_cannot_follow_is_left_and_reported():
    torch.manual_seed(7)
    m = nn.Sequential(
        nn.Linear(5, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 8), _Gate(), nn.Linear(8, 6),
        nn.ReLU(), nn.Linear(6, 2),
    )  # fmt: skip
    with torch.no_grad():
        m[0].weight[:3] = 0  # behind the LayerNorm: must stay
        m[3].weight[:2] = 0  # behind the untraceable gate: must stay
        m[5].weight[:4] = 0  # followed: removed
    x = torch.randn(4, 5)
    c, report = compact(m, x)
    _close(c(x), m(x))
    reasons = dict(report.skipped)
    assert "LayerNorm" in reasons["2"]
    assert "torch.fx cannot trace" in reasons["4"]
    assert c[0].weight.shape == (8, 5) and c[3].weight.shape == (8, 8)
    assert c[5].weight.shape == (2, 8) and c[7].weight.shape == (2, 2)


def test_compact_shared_module_is_not_resized():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(self.a(x)))

    torch.manual_seed(8)
    m = Twice()
    with torch.no_grad():
        m.a.weight[0] = 0
    x = torch.randn(3, 4)
    c, report = compact(m, x)
    _close(c(x), m(x))
    assert c.a.weight.shape == (4, 4)
    assert "more than once" in dict(report.skipped)["a"]


def test_compact_rejects_bad_arguments():
    with pytest.raises(TypeError, match="Expected an nn.Module"):
        compact(lambda x: x, torch.randn(1))
    with pytest.raises(TypeError, match="Expected example_inputs"):
        compact(nn.Linear(2, 2), "not a tensor")


@settings(max_examples=40, deadline=None)
@given(
    widths=st.lists(st.integers(1, 9), min_size=2, max_size=5),
    seed=st.integers(0, 2**31 - 1),
    act=st.sampled_from([nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.Identity]),
    p_row=st.floats(0, 0.7),
    p_col=st.floats(0, 0.7),
    p_elem=st.floats(0, 0.9),
)
def test_compact_hypothesis_mlps(widths, seed, act, p_row, p_col, p_elem):
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        lin = nn.Linear(widths[i], widths[i + 1])
        with torch.no_grad():
            # unit-scale outputs, so that 1e-5 is an absolute float32 tolerance (~100 ulp)
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / widths[i] ** 0.5)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen))
            lin.weight[torch.rand(lin.weight.shape, generator=gen) < p_elem] = 0
            lin.weight[torch.rand(lin.weight.shape[0], generator=gen) < p_row] = 0
            lin.weight[:, torch.rand(lin.weight.shape[1], generator=gen) < p_col] = 0
        layers += [lin, act()]
    m = nn.Sequential(*layers[:-1])
    x = torch.randn(5, widths[0], generator=gen)
    c, report = compact(m, x)
    _close(c(x), m(x))
    assert report.params_after <= report.params_before
    # a hidden unit with incoming weights all zero, or outgoing weights all zero, never survives
    # (unless the whole layer goes and one unit is kept for a valid shape)
    for i in range(1, len(widths) - 1):
        w_in, w_out = m[2 * (i - 1)].weight, m[2 * i].weight
        live = int(((w_in != 0).any(1) & (w_out != 0).any(0)).sum())
        assert c[2 * (i - 1)].weight.shape[0] <= max(live, 1)
    assert c[-1].weight.shape[0] == widths[-1]


# ---------------------------------------------------------------------------- SparseLinear
@pytest.mark.parametrize("kernel", ["auto", "addmm", "linear"])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_dense(kernel, bias):
    torch.manual_seed(9)
    lin = nn.Linear(20, 7, bias=bias)
    with torch.no_grad():
        lin.weight[torch.rand(7, 20) < 0.8] = 0
    s = SparseLinear.from_linear(lin, kernel=kernel)
    assert s.nnz == int((lin.weight != 0).sum())
    for shape in [(1, 20), (5, 20), (2, 3, 20), (20,)]:
        x = torch.randn(shape)
        _close(s(x), lin(x))
        assert s(x).shape == lin(x).shape


def test_sparse_linear_rejects_bad_input():
    with pytest.raises(ValueError, match="kernel"):
        SparseLinear(torch.zeros(2, 2), kernel="fast")
    with pytest.raises(ValueError, match="2-D weight"):
        SparseLinear(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="bias"):
        SparseLinear(torch.zeros(2, 3), torch.zeros(3))


def test_sparse_linear_survives_deepcopy_and_dtype_change():
    s = SparseLinear(torch.eye(3), torch.ones(3))
    d = copy.deepcopy(s).double()
    _close(d(torch.ones(1, 3, dtype=torch.float64)).float(), torch.full((1, 3), 2.0))


# ---------------------------------------------------------------------------- to_sparse
def _sparse_mlp() -> nn.Sequential:
    torch.manual_seed(10)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        m[0].weight[torch.rand(64, 64) < 0.95] = 0
        m[2].weight[torch.rand(32, 64) < 0.3] = 0
    return m


def test_to_sparse_decision_follows_measurements():
    m = _sparse_mlp()
    x = torch.randn(8, 64)
    s, report = to_sparse(m, x, min_sparsity=0.5, repeats=3, warmup=1)
    rows = {r.name: r for r in report.layers}
    assert set(rows) == {"0", "2", "4"}
    assert rows["0"].sparsity == pytest.approx(float((m[0].weight == 0).float().mean()))
    assert rows["2"].chosen == "dense" and rows["2"].reason == "below min_sparsity"
    r = rows["0"]
    assert r.dense_ms > 0 and r.sparse_ms > 0 and r.kernel in ("auto", "addmm", "linear")
    assert (r.chosen == "sparse") == (r.dense_ms / r.sparse_ms >= 1.1)
    assert isinstance(s[0], SparseLinear) == (r.chosen == "sparse")
    _close(s(x), m(x))
    json.dumps(report.to_dict())


def test_to_sparse_forced_choices_and_original_untouched():
    m = _sparse_mlp()
    before = _state(m)
    x = torch.randn(3, 64)
    s, _ = to_sparse(m, x, min_sparsity=0.0, repeats=1, warmup=0, min_speedup=1e-9)
    assert all(isinstance(s[i], SparseLinear) for i in (0, 2, 4))
    _close(s(x), m(x))
    d, _ = to_sparse(m, x, repeats=1, warmup=0, min_speedup=1e9)
    assert not any(isinstance(mod, SparseLinear) for mod in d.modules())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert isinstance(m[0], nn.Linear)
    root, _ = to_sparse(m[0], x, repeats=1, warmup=0, min_speedup=1e-9)
    assert isinstance(root, SparseLinear)


def test_to_sparse_reports_conv_as_dense_limitation():
    # Conv1d/Conv2d are measured (tests/test_export_arch.py); Conv3d has no CSR path.
    m = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4 * 4, 2))
    with torch.no_grad():
        m[0].weight.zero_()
    _, report = to_sparse(m, torch.randn(1, 1, 6, 6, 6), repeats=1, warmup=0)
    conv = report.layers[0]
    assert conv.name == "0" and conv.chosen == "dense" and "limitation" in conv.reason
    assert conv.sparsity == 1.0


@pytest.mark.parametrize("kwargs", [{"min_sparsity": 1.5}, {"repeats": 0}, {"warmup": -1},
                                    {"min_speedup": 0}, {"kernels": ("x",)}])
def test_to_sparse_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="Expected"):
        to_sparse(nn.Linear(2, 2), torch.randn(1, 2), **kwargs)


# ---------------------------------------------------------------------------- save / load
def test_save_load_sequential_round_trip(tmp_path):
    m = _dead_mlp()
    path = tmp_path / "mlp.safetensors"
    save(m, path)
    loaded = load(path)
    assert type(loaded) is nn.Sequential
    assert [type(a) for a in loaded] == [type(b) for b in m]
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    x = torch.randn(4, 8)
    assert torch.equal(loaded(x), m(x))


def test_save_load_cnn_with_batchnorm(tmp_path):
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    m = _CNN()
    _randomise_bn(m.features[1], gen)
    m.eval()
    save(m, tmp_path / "cnn.safetensors")
    loaded = load(tmp_path / "cnn.safetensors")
    x = torch.randn(2, 3, 10, 10)
    assert torch.equal(loaded(x), m(x))
    assert torch.equal(loaded.features.get_submodule("1").running_var, m.features[1].running_var)
    assert not loaded.training


def test_save_load_compacted_residual_model_as_graph(tmp_path):
    torch.manual_seed(12)
    m = _Residual()
    with torch.no_grad():
        m.fc1.weight[:3] = 0
    x = torch.randn(5, 6)
    c, _ = compact(m, x)
    save(c, tmp_path / "res.safetensors")
    loaded = load(tmp_path / "res.safetensors")
    assert isinstance(loaded, torch.fx.GraphModule)
    assert loaded.fc1.weight.shape == c.fc1.weight.shape
    _close(loaded(x), m(x))


def test_save_load_sparse_model_file_size_follows_nonzeros(tmp_path):
    torch.manual_seed(13)
    sizes = {}
    for density in (0.01, 0.1):
        w = torch.randn(256, 512)
        w[torch.rand(256, 512) > density] = 0
        s = SparseLinear(w, torch.randn(256), kernel="addmm")
        path = tmp_path / f"s{density}.safetensors"
        save(nn.Sequential(s, nn.ReLU()), path)
        nnz = s.nnz
        size = os.path.getsize(path)
        payload = 8 * nnz + 4 * 257 + 4 * 256  # values + col (int32) + crow (int32) + bias
        assert payload <= size <= payload + 4096
        sizes[density] = size
        loaded = load(path)
        assert isinstance(loaded[0], SparseLinear) and loaded[0].kernel == "addmm"
        x = torch.randn(3, 512)
        assert torch.equal(loaded(x), nn.Sequential(s, nn.ReLU())(x))
    assert sizes[0.1] > 5 * sizes[0.01]
    assert sizes[0.1] < 0.25 * (256 * 512 * 4)


def _saved_bytes(tmp_path) -> tuple[bytes, nn.Module]:
    m = _dead_mlp()
    path = tmp_path / "ok.safetensors"
    save(m, path)
    return path.read_bytes(), m


@pytest.mark.parametrize("cut", [4, 40, 0.5, -1])
def test_load_refuses_truncated_file(tmp_path, cut):
    data, _ = _saved_bytes(tmp_path)
    keep = int(len(data) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(data) - 1)
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[:keep])
    with pytest.raises(ValueError, match="Expected a complete safetensors file"):
        load(bad)


def test_load_refuses_corrupted_tensor_bytes(tmp_path):
    data, _ = _saved_bytes(tmp_path)
    corrupted = bytearray(data)
    corrupted[-3] ^= 0x40  # inside the last tensor
    bad = tmp_path / "corrupted.safetensors"
    bad.write_bytes(bytes(corrupted))
    with pytest.raises(ValueError, match="checksum"):
        load(bad)


def test_load_refuses_modified_structure(tmp_path):
    data, _ = _saved_bytes(tmp_path)
    text = data.replace(b'\\"Tanh\\"', b'\\"ReLU\\"')
    assert text != data
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(text)
    with pytest.raises(ValueError, match="checksum"):
        load(bad)


def test_load_refuses_plain_safetensors_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="sparsecraft metadata"):
        load(path)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors")


def _write_with_valid_checksum(path, structure: dict, tensors: dict) -> None:
    header = json.dumps(structure)
    save_file(tensors, str(path), metadata={
        "format": "pt", "sparsecraft.version": "1", "sparsecraft.structure": header,
        "sparsecraft.sha256": _digest(header, tensors)})


@pytest.mark.parametrize("node", [
    {"name": "x", "op": "call_function", "target": "os.system", "args": {"tuple": []},
     "kwargs": {}},
    {"name": "y; import os", "op": "placeholder", "target": "x", "args": {"tuple": []},
     "kwargs": {}},
    {"name": "y", "op": "call_method", "target": "__reduce__", "args": {"tuple": []},
     "kwargs": {}},
    {"name": "y", "op": "placeholder", "target": "x=__import__('os')", "args": {"tuple": []},
     "kwargs": {}},
])
def test_load_refuses_crafted_graph_with_valid_checksum(tmp_path, node):
    path = tmp_path / "crafted.safetensors"
    structure = {"kind": "graph", "modules": {}, "nodes": [
        node, {"name": "output", "op": "output", "target": "output",
               "args": {"tuple": [None]}, "kwargs": {}}]}
    _write_with_valid_checksum(path, structure, {"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="Expected a valid sparsecraft model file"):
        load(path)


def test_load_refuses_unknown_layer_type_with_valid_checksum(tmp_path):
    path = tmp_path / "crafted.safetensors"
    structure = {"kind": "tree", "root": {"type": "Sequential", "children": [
        ["0", {"type": "os.system", "config": {}}]]}}
    _write_with_valid_checksum(path, structure, {"0.w": torch.zeros(1)})
    with pytest.raises(ValueError, match="layer spec"):
        load(path)


def test_load_never_unpickles(tmp_path, monkeypatch):
    data, m = _saved_bytes(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = load(tmp_path / "ok.safetensors")
    x = torch.randn(2, 8)
    assert torch.equal(loaded(x), m(x))


def test_save_refuses_unsupported_model_and_writes_nothing(tmp_path):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return torch.einsum("ij,j->ij", self.fc(x), self.scale)

    for model in (Scaled(), nn.Sequential(nn.Linear(2, 2), nn.Bilinear(2, 2, 2))):
        path = tmp_path / "no.safetensors"
        with pytest.raises(TypeError, match="Expected a model made of"):
            save(model, path)
        assert not path.exists()


def test_saved_metadata_describes_structure(tmp_path):
    m = _dead_mlp()
    save(m, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    structure = json.loads(meta["sparsecraft.structure"])
    assert structure["kind"] == "tree"
    assert [c[1]["type"] for c in structure["root"]["children"]] == [
        "Linear", "ReLU", "Linear", "Tanh", "Linear"]
    assert keys == set(m.state_dict())
    assert len(meta["sparsecraft.sha256"]) == 64


_LAYER_CASES = {
    "Linear": (lambda: nn.Linear(4, 3), (2, 4)),
    "Conv1d": (lambda: nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 2, 8)),
    "Conv2d": (lambda: nn.Conv2d(2, 3, (3, 1), stride=2, dilation=(1, 2), bias=False),
               (2, 2, 8, 8)),
    "Conv3d": (lambda: nn.Conv3d(2, 4, 3, padding="same", groups=2), (1, 2, 4, 4, 4)),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(2, eps=1e-3, momentum=None), (3, 2, 5)),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(2, affine=False), (3, 2, 4, 4)),
    "BatchNorm3d": (lambda: nn.BatchNorm3d(2), (1, 2, 3, 3, 3)),
    "LayerNorm": (lambda: nn.LayerNorm((2, 4), elementwise_affine=True, bias=False), (3, 2, 4)),
    "ReLU": (nn.ReLU, (2, 4)), "ReLU6": (nn.ReLU6, (2, 4)),
    "LeakyReLU": (lambda: nn.LeakyReLU(0.2), (2, 4)), "ELU": (lambda: nn.ELU(0.5), (2, 4)),
    "SELU": (nn.SELU, (2, 4)), "GELU": (lambda: nn.GELU("tanh"), (2, 4)),
    "SiLU": (nn.SiLU, (2, 4)), "Mish": (nn.Mish, (2, 4)), "Sigmoid": (nn.Sigmoid, (2, 4)),
    "Tanh": (nn.Tanh, (2, 4)), "Hardtanh": (lambda: nn.Hardtanh(-0.5, 0.7), (2, 4)),
    "Softplus": (lambda: nn.Softplus(2.0, 10.0), (2, 4)), "Identity": (nn.Identity, (2, 4)),
    "Softmax": (lambda: nn.Softmax(dim=1), (2, 4)),
    "LogSoftmax": (lambda: nn.LogSoftmax(dim=0), (2, 4)),
    "Dropout": (lambda: nn.Dropout(0.3), (2, 4)), "Dropout2d": (nn.Dropout2d, (2, 3, 4, 4)),
    "Flatten": (lambda: nn.Flatten(0, 1), (2, 3, 4)),
    "MaxPool1d": (lambda: nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True), (2, 2, 9)),
    "MaxPool2d": (lambda: nn.MaxPool2d(2), (2, 2, 6, 6)),
    "AvgPool1d": (lambda: nn.AvgPool1d(3, padding=1, count_include_pad=False), (2, 2, 9)),
    "AvgPool2d": (lambda: nn.AvgPool2d(2, divisor_override=3), (2, 2, 6, 6)),
    "AdaptiveAvgPool1d": (lambda: nn.AdaptiveAvgPool1d(4), (2, 2, 9)),
    "AdaptiveAvgPool2d": (lambda: nn.AdaptiveAvgPool2d((2, 3)), (2, 2, 7, 7)),
    "SparseLinear": (lambda: SparseLinear(torch.randn(3, 4) * (torch.rand(3, 4) < 0.5),
                                          torch.randn(3), kernel="linear"), (2, 4)),
    "SparseConv": (lambda: SparseConv(nn.Conv1d(2, 3, 4, padding="same")), (2, 2, 9)),
}  # fmt: skip


def test_every_supported_layer_has_a_round_trip_case():
    from sparsecraft.export._io import LAYERS

    # layers that take several inputs or return tuples are round-tripped in test_export_io.py
    # (CompactEncoderLayer in test_export_roundtrip.py)
    multi = {"Embedding", "LSTM", "GRU", "MultiheadAttention", "TransformerEncoderLayer",
             "TransformerEncoder", "CompactEncoderLayer"}
    assert set(_LAYER_CASES) == set(LAYERS) - multi


@pytest.mark.parametrize("name", sorted(_LAYER_CASES))
def test_save_load_round_trip_of_each_supported_layer(tmp_path, name):
    torch.manual_seed(14)
    make, shape = _LAYER_CASES[name]
    layer = make()
    for buf in layer.buffers():
        if buf.is_floating_point():  # non-trivial running statistics
            buf.copy_(torch.rand_like(buf) + 0.5)
    model = nn.Sequential(layer).eval()
    save(model, tmp_path / "layer.safetensors")
    loaded = load(tmp_path / "layer.safetensors")
    assert type(loaded[0]) is type(layer)
    assert repr(loaded[0]) == repr(layer)
    x = torch.randn(shape)
    assert torch.equal(loaded(x), model(x))


def test_save_load_graph_with_functions_and_methods(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 2, 1)
            self.fc = nn.Linear(6 * 2 * 2, 5)

        def forward(self, x, scale: float = 2.0):
            h = torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
            h = F.max_pool2d(h, 2) * scale
            h = h.reshape(h.size(0), -1)
            return F.log_softmax(self.fc(h), dim=-1) + h.mean(dim=1, keepdim=True)

    torch.manual_seed(15)
    m = Net().eval()
    save(m, tmp_path / "g.safetensors")
    loaded = load(tmp_path / "g.safetensors")
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(loaded(x), m(x))
    assert sorted(dict(loaded.named_children())) == ["a", "b", "fc"]


def test_compact_untraceable_root_is_returned_unchanged_and_reported():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    class Star(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, *xs):
            return self.fc(xs[0])

    for model in (Branchy(), Star()):
        with torch.no_grad():
            model.fc.weight[0] = 0
        x = torch.randn(2, 3)
        c, report = compact(model, x)
        assert report.skipped[0][0] == "" and "trace" in report.skipped[0][1]
        assert report.layers == [] and report.params_after == report.params_before
        assert torch.equal(c(x), model(x))


def _structured_mask(w: torch.Tensor, rows: bool = True, cols: bool = True) -> torch.Tensor:
    """Entries of a 2-D weight lying in an all-zero row or an all-zero column."""
    zero = w == 0
    mask = torch.zeros_like(zero)
    if rows:
        mask |= zero.all(1, keepdim=True)
    if cols:
        mask |= zero.all(0, keepdim=True)
    return mask


def test_compact_cuts_params_and_flops_by_at_least_the_structured_zero_fraction():
    from sparsecraft.experiments import structured_zeros

    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 3))
    with torch.no_grad():
        for layer in model[::2]:  # a trained-like MLP: 30 % scattered zeros, non-zero biases
            layer.weight.mul_(torch.rand(layer.weight.shape, generator=gen) > 0.3)
            layer.bias.copy_(torch.rand(layer.bias.shape, generator=gen) + 0.1)
        model[0].weight[:6] = 0  # 6 dead hidden units (constant relu(bias), folded)
        model[0].weight[:, :2] = 0  # 2 unread inputs: compact keeps the model's input shape
        model[2].weight[:4] = 0  # 4 dead units
        model[2].weight[:, 6:10] = 0  # 4 unread units of the first hidden layer
        model[4].weight[:, 8:] = 0  # 2 unread units of the second hidden layer
        model[4].weight[0] = 0  # a zero output row: model outputs keep their units
    x = torch.randn(5, 8, generator=gen)
    masks = [_structured_mask(layer.weight) for layer in model[::2]]
    removable = [_structured_mask(model[0].weight, cols=False), masks[1],
                 _structured_mask(model[4].weight, rows=False)]
    n_weights = sum(layer.weight.numel() for layer in model[::2])
    n_params = sum(p.numel() for p in model.parameters())
    counted = structured_zeros(model, x)
    assert counted["weights"] == n_weights and counted["params"] == n_params
    assert counted["structured"] == sum(int(m.sum()) for m in masks)
    assert counted["removable"] == sum(int(m.sum()) for m in removable)
    assert [(r["reads_input"], r["writes_output"]) for r in counted["layers"]] == [
        (True, False), (False, False), (False, True)]

    small, report = compact(model, x)
    _close(small(x), model.eval()(x))
    params_cut = 1 - report.params_after / report.params_before
    flops_cut = 1 - report.flops_after / report.flops_before
    assert report.flops_before == flops(model, x) and report.flops_after == flops(small, x)
    assert params_cut >= counted["removable_param_fraction"] > 0.4
    assert flops_cut >= counted["removable_fraction"] > 0.4
    # Only the zeros at the model's interface stay: its 2 unread inputs, its zero output row.
    assert small[0].in_features == 8 and small[4].out_features == 3
    assert counted["fraction"] > counted["removable_fraction"]
