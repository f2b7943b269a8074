from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sparsecraft.metrics import (
    ActivationMonitor,
    count_zeros,
    flops,
    layer_flops,
    sparsity,
)

# --------------------------------------------------------------------------- count_zeros


def test_count_zeros_exact_and_tol():
    t = torch.tensor([0.0, -0.0, 1e-4, -2e-3, 5.0, float("nan")])
    assert count_zeros(t) == (2, 6)
    assert count_zeros(t, tol=1e-3) == (3, 6)
    assert count_zeros(t, tol=1e-2) == (4, 6)  # NaN is never a zero
    assert count_zeros([t, torch.zeros(3, 2)]) == (8, 12)
    assert count_zeros([]) == (0, 0)


def test_count_zeros_as_tensor_is_summable():
    parts = [torch.tensor([0.0, 1.0, 0.0]), torch.tensor([[0.0, 2.0]])]
    counts = count_zeros(parts, as_tensor=True)
    assert counts.dtype == torch.int64 and counts.shape == (2,)
    # What an all-reduce over two ranks holding these shards would compute.
    total = count_zeros(parts[:1], as_tensor=True) + count_zeros(parts[1:], as_tensor=True)
    assert counts.tolist() == total.tolist() == [3, 5]


@settings(max_examples=40, deadline=None)
@given(
    arrays(np.float32, st.integers(0, 60), elements=st.floats(-2, 2, width=32)),
    st.floats(0, 1),
)
def test_count_zeros_matches_numpy(a, tol):
    a = np.where(np.abs(a) < 0.5, 0.0, a).astype(np.float32)
    zeros, numel = count_zeros(torch.from_numpy(a), tol=tol)
    assert zeros == int(np.sum(np.abs(a) <= np.float32(tol) if tol else a == 0))
    assert numel == a.size


@pytest.mark.parametrize("tol", [-1e-3, float("nan"), float("inf")])
def test_bad_tol_raises_value_error(tol):
    with pytest.raises(ValueError, match="Expected tol"):
        count_zeros(torch.zeros(2), tol=tol)
    with pytest.raises(ValueError, match="Expected tol"):
        sparsity(nn.Linear(2, 2), tol=tol)
    with pytest.raises(ValueError, match="Expected tol"):
        ActivationMonitor(nn.Sequential(nn.ReLU()), tol=tol)


def test_non_number_tol_raises_type_error():
    with pytest.raises(TypeError, match="Received: tol=True"):
        count_zeros(torch.zeros(2), tol=True)
    with pytest.raises(TypeError, match="Received: tol='0'"):
        sparsity(nn.Linear(2, 2), tol="0")


# --------------------------------------------------------------------------- sparsity


def _structured_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand_like(p) + 0.5)  # no accidental zeros
        model[0].weight[1] = 0  # output channel 1: 4*9 = 36 zeros
        model[0].weight[:, 2] = 0  # input channel 2: 6*9 = 54, 9 overlap -> 81 zeros
        model[3].weight[[0, 5]] = 0  # two output units: 2*150 = 300
        model[3].weight[:, :10] = 0  # ten input features: 8*10, 2*10 overlap -> 360 zeros
        model[5].weight[2, 4] = 0  # a lone zero
        model[5].weight[0, 0] = 1e-4  # near-zero only
        model[0].bias[3] = 0
    return model


def test_sparsity_counts_hand_built_patterns():
    report = sparsity(_structured_model())
    rows = {r.name: r for r in report.rows}
    assert list(rows) == ["0.weight", "0.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
    conv = rows["0.weight"]
    assert conv.shape == (6, 4, 3, 3) and conv.numel == 216 and conv.zeros == 81
    assert (conv.zero_rows, conv.zero_cols) == (1, 1)
    assert conv.density == pytest.approx((216 - 81) / 216)
    lin = rows["3.weight"]
    assert (lin.zeros, lin.zero_rows, lin.zero_cols) == (360, 2, 10)
    assert (rows["5.weight"].zeros, rows["5.weight"].zero_rows) == (1, 0)
    assert rows["0.bias"].zeros == 1 and rows["0.bias"].zero_rows is None
    assert report.zeros == 81 + 1 + 360 + 1
    assert report.numel == 216 + 6 + 1200 + 8 + 24 + 3 == report.n_params
    assert report.n_nonzero == report.numel - report.zeros
    assert report.sparsity == pytest.approx(443 / 1457)
    assert report.weight_numel == 216 + 1200 + 24
    assert report.weight_sparsity == pytest.approx(442 / 1440)
    assert report.flops is None and report.layers is None


def test_sparsity_tol_counts_near_zeros_and_near_zero_rows():
    model = _structured_model()
    with torch.no_grad():
        model[5].weight[1] = 1e-5  # a row that is zero only under tol
    exact = {r.name: r for r in sparsity(model).rows}["5.weight"]
    near = {r.name: r for r in sparsity(model, tol=1e-3).rows}["5.weight"]
    assert (exact.zeros, exact.near_zeros, exact.zero_rows) == (1, 1, 0)
    assert (near.zeros, near.near_zeros, near.zero_rows) == (1, 1 + 1 + 8, 1)
    assert near.density == exact.density  # density counts exact zeros


def test_sparsity_selects_params_by_name_and_callable():
    model = _structured_model()
    by_name = sparsity(model, params=["3.weight", "5.bias"])
    assert [r.name for r in by_name.rows] == ["3.weight", "5.bias"]
    assert by_name.zeros == 360
    by_fn = sparsity(model, params=lambda name, p: p.ndim >= 2)
    assert [r.name for r in by_fn.rows] == ["0.weight", "3.weight", "5.weight"]
    assert by_fn.sparsity == pytest.approx(442 / 1440)


def test_sparsity_unknown_param_name_lists_close_names():
    with pytest.raises(ValueError, match=r"Close names: \['3.weight'") as err:
        sparsity(_structured_model(), params=["3.weigth"])
    assert "Received: name='3.weigth'" in str(err.value)


def test_sparsity_accepts_pairs_mapping_tensor_and_parameters():
    model = _structured_model()
    ref = sparsity(model)
    assert sparsity(model.named_parameters()).zeros == ref.zeros
    assert sparsity(model.state_dict()).zeros == ref.zeros
    assert [r.name for r in sparsity(model.parameters()).rows] == [str(i) for i in range(6)]
    single = sparsity(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    assert (single.zeros, single.rows[0].zero_rows, single.rows[0].zero_cols) == (3, 1, 1)
    with pytest.raises(TypeError, match="Received: model_or_params=int"):
        sparsity(3)
    with pytest.raises(TypeError, match=r"model_or_params\[1\]=str"):
        sparsity([("a", torch.zeros(1)), "b"])
    with pytest.raises(TypeError, match="when example_inputs is given"):
        sparsity(model.state_dict(), example_inputs=torch.zeros(1, 4, 5, 5))


def test_sparsity_shared_parameters_counted_once():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert sparsity(model).numel == 12


def test_report_presentation_and_serialisation(capsys):
    model = _structured_model()
    report = sparsity(model, tol=1e-3, example_inputs=torch.rand(2, 4, 5, 5))
    table = report.table()
    assert isinstance(table, Table)
    assert table.row_count == 6 and len(table.columns) == 8  # |x|<=tol column present
    text = str(report)
    assert "3.weight" in text and "2/8" in text and "10/150" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["zeros"] == report.zeros and data["params"][2]["zero_cols"] == 10
    assert data["flops"] == report.flops and len(data["layers"]) == 3
    assert capsys.readouterr().out == ""  # measurement never prints
    assert len(sparsity(model).table().columns) == 7  # no tol column at tol=0


# --------------------------------------------------------------------------- FLOPs


def test_flops_linear_by_hand():
    lin = nn.Linear(7, 5)
    assert flops(lin, torch.zeros(3, 7)) == 2 * 3 * 7 * 5
    assert flops(lin, torch.zeros(2, 4, 7)) == 2 * 8 * 7 * 5  # leading dims are batch


def test_flops_conv2d_by_hand_stride_padding_groups():
    conv = nn.Conv2d(4, 6, kernel_size=(3, 2), stride=2, padding=1, groups=2)
    x = torch.zeros(2, 4, 9, 8)
    h_out = (9 + 2 - 3) // 2 + 1  # 5
    w_out = (8 + 2 - 2) // 2 + 1  # 5
    macs = 2 * 6 * h_out * w_out * (4 // 2) * 3 * 2
    assert flops(conv, x) == 2 * macs


def test_flops_match_torch_flop_counter():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(3, 8, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, groups=4),
        nn.Flatten(),
        nn.Linear(8 * 30, 16),
        nn.Tanh(),
        nn.Linear(16, 4),
    )
    x = torch.randn(5, 3, 32)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert flops(model, x) == counter.get_total_flops()
    conv3 = nn.Conv3d(2, 4, 3)
    conv_t = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    for layer, inp in [(conv3, torch.randn(2, 2, 5, 6, 7)), (conv_t, torch.randn(3, 4, 5, 5))]:
        with FlopCounterMode(display=False) as counter:
            layer(inp)
        assert flops(layer, inp) == counter.get_total_flops()


def test_structured_flops_equal_flops_of_physically_smaller_model():
    model = _structured_model()
    x = torch.rand(3, 4, 5, 5)
    layers = layer_flops(model, x)
    assert [(r.name, r.kind) for r in layers] == [("0", "Conv2d"), ("3", "Linear"), ("5", "Linear")]
    # Hand count: conv keeps 5 of 6 output channels and 3 of 4 input channels.
    assert layers[0].flops_structured == 2 * 3 * 25 * 5 * 3 * 9
    assert layers[1].flops_structured == 2 * 3 * (150 - 10) * (8 - 2)
    assert layers[2].flops_structured == layers[2].flops == 2 * 3 * 8 * 3
    # Oracle: the same layers built without the zero rows/columns.
    small = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Flatten(), nn.Linear(140, 6))
    small_x = torch.rand(3, 3, 5, 5)
    small_flops = flops(small[0], small_x) + flops(small[2], torch.rand(3, 140))
    assert layers[0].flops_structured + layers[1].flops_structured == small_flops
    report = sparsity(model, example_inputs=x)
    assert report.flops == flops(model, x) == sum(r.flops for r in layers)
    assert report.flops_structured == sum(r.flops_structured for r in layers)


def test_flops_counts_repeated_calls_and_keyword_inputs():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, scale=1.0):
            return self.lin(self.lin(x) * scale)

    model = Twice()
    assert flops(model, torch.zeros(2, 4)) == 2 * (2 * 2 * 4 * 4) == 128
    assert flops(model, {"x": torch.zeros(2, 4), "scale": 2.0}) == 128
    assert flops(model, (torch.zeros(1, 4), 3.0)) == 64
    assert [r.name for r in layer_flops(model, torch.zeros(1, 4))] == ["lin", "lin"]


def test_layer_flops_restores_mode_and_keeps_batchnorm_stats():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    model[2].eval()
    before = model[1].running_mean.clone()
    flops(model, torch.randn(8, 3) + 5)
    assert torch.equal(model[1].running_mean, before)
    assert model.training and model[1].training and not model[2].training
    with pytest.raises(TypeError, match="Expected an nn.Module"):
        flops(lambda x: x, torch.zeros(1))


# --------------------------------------------------------------------------- ActivationMonitor


def _record_outputs(modules):
    recorded = {name: [] for name in modules}
    handles = [
        m.register_forward_hook(lambda mod, i, o, n=name: recorded[n].append(o.detach().clone()))
        for name, m in modules.items()
    ]
    return recorded, handles


def test_monitor_matches_direct_computation_on_recorded_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU())
    with torch.no_grad():
        model[0].bias[:3] = -50.0  # three dead units
    recorded, handles = _record_outputs({"1": model[1], "3": model[3]})
    with ActivationMonitor(model, tol=0.05) as mon:
        assert mon.names == ["1", "3"]
        for batch in (7, 5, 9):
            model(torch.randn(batch, 6))
    for h in handles:
        h.remove()
    stats = mon.stats()
    for name, acts in recorded.items():
        a = torch.cat(acts)
        zero = a.abs() <= 0.05
        assert stats[name]["samples"] == 21 and stats[name]["elements"] == a.numel()
        assert stats[name]["zero_fraction"] == pytest.approx(zero.float().mean().item())
        assert stats[name]["mean_l0"] == pytest.approx((~zero).sum(1).float().mean().item())
        dead = zero.all(0)
        assert stats[name]["dead_units"] == int(dead.sum()) and stats[name]["n_units"] == 12
        assert torch.equal(mon.dead_mask(name), dead)
    assert stats["1"]["dead_units"] >= 3


def test_monitor_conv_channels_and_unit_dim():
    torch.manual_seed(1)
    conv = nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU())
    with torch.no_grad():
        conv[0].bias[4] = -100.0
    recorded, handles = _record_outputs({"1": conv[1]})
    with ActivationMonitor(conv) as mon:
        conv(torch.randn(4, 2, 6, 6))
    handles[0].remove()
    a = recorded["1"][0]
    stats = mon.stats()["1"]
    assert stats["n_units"] == 5  # channels, dim 1
    assert torch.equal(mon.dead_mask("1"), (a == 0).all(dim=(0, 2, 3)))
    assert stats["mean_l0"] == pytest.approx((a != 0).flatten(1).sum(1).float().mean().item())

    seq = nn.Sequential(nn.Linear(3, 7), nn.ReLU())
    with ActivationMonitor(seq, unit_dim=-1) as mon:
        seq(torch.randn(2, 10, 3))  # [N, T, D]: units are the last dim
    assert mon.stats()["1"]["n_units"] == 7 and mon.stats()["1"]["samples"] == 2


def test_monitor_default_selection_and_explicit_modules():
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 4), nn.Sigmoid())
    assert ActivationMonitor(model).names == ["1", "3"]
    leaves = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 2)))
    assert ActivationMonitor(leaves).names == ["0", "1.0"]
    assert ActivationMonitor(nn.Linear(2, 2)).names == ["<model>"]
    mixed = ActivationMonitor(model, modules=[model[2], "0", nn.Sigmoid])
    assert mixed.names == ["0", "2", "3"]
    assert ActivationMonitor(model, modules=nn.Linear).names == ["0", "2"]


def test_monitor_bad_modules_raise():
    model = nn.Sequential()
    model.add_module("encoder", nn.Linear(3, 4))
    model.add_module("act", nn.ReLU())
    with pytest.raises(ValueError, match=r"Close names: \['encoder'\]") as err:
        ActivationMonitor(model, modules=["encodr"])
    assert "Received: name='encodr'" in str(err.value)
    with pytest.raises(ValueError, match="part of the model"):
        ActivationMonitor(model, modules=[nn.ReLU()])
    with pytest.raises(ValueError, match="module type present"):
        ActivationMonitor(model, modules=nn.Conv2d)
    with pytest.raises(TypeError, match="Received: modules item=3"):
        ActivationMonitor(model, modules=[3])
    with pytest.raises(TypeError, match="Expected an nn.Module"):
        ActivationMonitor("model")
    mon = ActivationMonitor(model, unit_dim=0)
    with pytest.raises(ValueError, match="Expected unit_dim"):
        model(torch.zeros(2, 3))
    mon.remove()
    with pytest.raises(ValueError, match="Close names"):
        ActivationMonitor(model).dead_mask("ac")
    with pytest.raises(ValueError, match="at least once"):
        ActivationMonitor(model).dead_mask("act")


def test_monitor_remove_reset_and_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.ReLU())
    x = torch.randn(3, 4)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mon = ActivationMonitor(model)
    assert len(model[1]._forward_hooks) == 1
    assert torch.equal(model(x), expected)
    assert mon.stats()["1"]["samples"] == 3
    mon.reset()
    assert mon.stats()["1"] == {
        "zero_fraction": 0.0,
        "mean_l0": 0.0,
        "dead_units": 0,
        "n_units": 0,
        "samples": 0,
        "elements": 0,
    }
    model(x)
    mon.remove()
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    model(x)  # not counted any more
    assert mon.stats()["1"]["samples"] == 3
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert "removed" in repr(mon)


def test_monitor_shared_activation_with_different_widths():
    act = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 6), act, nn.Linear(6, 4), act)
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # all 4 units of the second use are dead
        model[2].weight.zero_()
    with ActivationMonitor(model) as mon:
        model(torch.randn(5, 3))
    stats = mon.stats()["1"]
    assert stats["n_units"] == 10 and stats["samples"] == 10
    assert stats["dead_units"] >= 4
    assert mon.dead_mask("1")[6:].all()


def test_monitor_does_not_synchronise_during_forward(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    mon = ActivationMonitor(model, tol=0.1)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in the hook")

    for attr in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    for _ in range(3):
        model(torch.randn(2, 4))
    monkeypatch.undo()
    assert mon.stats()["1"]["samples"] == 6
    assert not math.isnan(mon.stats()["1"]["zero_fraction"])


def _projection_flops(counter, suffix):
    """FlopCounterMode's matrix products (the projections) inside the module named ``…suffix``."""
    rows = [ops for name, ops in counter.get_flop_counts().items() if name.endswith(suffix)]
    return sum(n for ops in rows for op, n in ops.items() if str(op) in ("aten.mm", "aten.addmm"))


@pytest.mark.parametrize("batch_first", [True, False])
def test_flops_count_attention_projections_as_pytorch_counts_them(batch_first):
    # nn.MultiheadAttention applies its weights functionally: no Linear hook sees them. The
    # oracle is PyTorch's FlopCounterMode (its mm/addmm inside the attention module).
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first).eval()
    cross = nn.MultiheadAttention(16, 2, kdim=6, vdim=10, batch_first=True).eval()
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            layer(x)
            cross(torch.randn(2, 4, 16), torch.randn(2, 7, 6), torch.randn(2, 7, 10))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    records = layer_flops(layer, x)
    assert [r.kind for r in records] == ["MultiheadAttention", "Linear", "Linear"]
    assert records[0].flops == _projection_flops(counter, "self_attn") == 2 * 15 * 4 * 16 * 16
    keywords = {"query": torch.randn(2, 4, 16), "key": torch.randn(2, 7, 6), "value": torch.randn(2, 7, 10)}
    assert flops(cross, keywords) == _projection_flops(counter, "MultiheadAttention") > 0
    # Structured: zero rows of the query block and zero columns of the output projection drop out.
    with torch.no_grad():
        layer.self_attn.in_proj_weight[:4] = 0
        layer.self_attn.out_proj.weight[:, :2] = 0
    att = layer_flops(layer, x)[0]
    assert att.flops_structured == 2 * 15 * (12 * 16 + 2 * 16 * 16 + 16 * 14)
    assert torch.backends.mha.get_fastpath_enabled() == fast_path  # restored after the pass
