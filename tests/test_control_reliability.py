"""TargetSparsity refuses bad checkpoints whole, and never reports success on a dead tensor.

The distributed half of its reliability (settings agreed between ranks,
logging without collectives, a global finalize() under FSDP2) is tested in
tests/test_distributed.py with 2 gloo ranks.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import sparsecraft as sc
from sparsecraft.control import TargetSparsity
from sparsecraft.optim import ProximalOptimizer


def controller(**kwargs) -> tuple[nn.Linear, TargetSparsity]:
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    reg = sc.Regularizer(layer)
    reg.add_weight("weight", sc.L1(0.1))
    opt = ProximalOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), reg)
    return layer, TargetSparsity(opt, target=0.5, end_step=10, every=2, **kwargs)


def put(state: dict, path: str, value) -> dict:
    state = copy.deepcopy(state)
    *parents, key = path.split(".")
    node = state
    for p in parents:
        node = node[p]
    node[key] = value
    return state


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        ("config.target", 7, "target"),
        ("config.every", 0, "every"),
        ("log_scale", math.nan, "log_scale"),
        ("log_scale", math.inf, "log_scale"),
        ("step", -1, "step"),
        ("step", 2.5, "step"),
        ("config.end_step", 0, "end_step > start_step"),
        ("config.gain", 0.0, "gain"),
        ("config.drift", -1.0, "drift"),
        ("config.initial", 1.0, "initial"),
        ("config.ramp", "quadratic", "ramp"),
        ("config.ramp", "callable", "callable"),
        ("config.measure", "groups", "measure"),
        ("config.min_density", 1.5, "min_density"),
        ("trend", 3.0, "trend"),
        ("last_error", math.nan, "last_error"),
        ("measured", 2.0, "measured"),
        ("saturated", "yes", "saturated"),
        ("base_scales", [math.nan], "base_scales"),
        ("base_scales", [1.0, 1.0], "1 controlled terms"),
        ("term_caps", [math.nan], "term_caps"),
        ("term_offsets", [0.5], "term_offsets"),
    ],
)
def test_load_state_dict_checks_every_field_and_loads_nothing_on_error(path, value, match):
    layer, ctrl = controller()
    good = ctrl.state_dict()
    ctrl.load_state_dict(put(good, "log_scale", 0.25))  # a valid state loads
    assert ctrl.scale == pytest.approx(math.exp(0.25))
    before, term_scale = ctrl.state_dict(), ctrl.terms[0].scale
    with pytest.raises(ValueError, match=match):
        ctrl.load_state_dict(put(good, path, value))
    assert ctrl.state_dict() == before and ctrl.terms[0].scale == term_scale  # all or nothing


def test_load_state_dict_of_an_earlier_version_without_caps():
    _, ctrl = controller()
    state = ctrl.state_dict()
    for key in ("term_caps", "term_offsets"):
        del state[key]
    del state["config"]["min_density"]
    ctrl.load_state_dict(put(state, "log_scale", 1.0))
    assert ctrl.terms[0].scale == pytest.approx(0.1 / 0.1 * math.e)  # base scale 1 × e


@pytest.mark.parametrize("bad", [1.0, -0.1, math.nan, True, "0.1"])
def test_min_density_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="min_density"):
        controller(min_density=bad)
    # 30 weights at target 0.5: 15 zeros; keeping ceil(0.6 · 30) = 18 non-zero leaves no room
    with pytest.raises(ValueError, match="leave room for target=0.5"):
        controller(min_density=0.6)


# --------------------------------------------------------------------------- dead tensors


class EmbeddingLSTM(nn.Module):
    """The issue's case: an embedding that holds most weights, a small LSTM and head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(300, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(x))
        return self.head(h[:, -1])


CONTROLLED = ("emb.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "head.weight")


def train_lstm(min_density: float, epochs: int = 8, mode: str = "latent", hold: str | None = None):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 300, (1024, 8), generator=g)
    y = (x < 20).any(1).long()  # does a "keyword" occur
    torch.manual_seed(0)
    net = EmbeddingLSTM()
    reg = sc.Regularizer(net)
    for name in CONTROLLED:
        reg.add_weight(name, sc.L1(1e-3))
    opt = ProximalOptimizer(torch.optim.Adam(net.parameters(), lr=1e-2), reg, mode=mode)
    ctrl = TargetSparsity(opt, target=0.9, end_step=epochs * 8, every=2, min_density=min_density, hold=hold)
    params = dict(net.named_parameters())
    lowest = {n: 1.0 for n in CONTROLLED}  # the lowest density seen right after an update
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(epochs):
            for i in range(0, 1024, 64):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(x[i : i + 64]), y[i : i + 64]) + reg.loss()
                loss.backward()
                opt.step()
                ctrl.step()
                if ctrl.steps % 2 == 0:
                    for n in CONTROLLED:
                        lowest[n] = min(lowest[n], float((params[n] != 0).float().mean()))
        fin = ctrl.finalize()
    dead = [str(w.message) for w in caught if "is all zero" in str(w.message)]
    density = {n: int((params[n] != 0).sum()) / params[n].numel() for n in CONTROLLED}
    return fin, dead, density, lowest, params, ctrl


def test_a_dead_tensor_is_named_once():
    fin, dead, density, _, _, _ = train_lstm(min_density=0.0)
    assert fin["after"] == 0.9  # the global count is right...
    gone = [n for n in CONTROLLED if density[n] == 0]
    assert "lstm.weight_hh_l0" in gone and "head.weight" in gone  # ...but the model is dead
    for n in gone:  # one warning per dead tensor, naming it
        assert sum(f"{n} is all zero" in m for m in dead) == 1, dead
    assert len(dead) == len(gone)


def test_min_density_keeps_every_tensor_alive_in_step_and_finalize():
    # The defaults for Adam: relaxed display, hold="freeze" (finalize() at end_step, then fixed zeros).
    fin, dead, density, lowest, params, ctrl = train_lstm(min_density=0.05)
    assert dead == []  # counted at every update, `every` steps after the last one set the caps
    sel = ctrl.final_selection  # the freeze's finalize(): the λ path on the latent copies
    assert sel is not None and sel["after"] == 0.9 and sel["latent"] == 1.0  # the target is still exact
    assert fin["after"] == 0.9 and fin["zeroed"] == 0.0  # the frozen zeros stayed exact
    for n in CONTROLLED:
        keep = math.ceil(0.05 * params[n].numel()) / params[n].numel()
        assert density[n] >= keep, n  # after finalize()
        assert lowest[n] >= keep, n  # after every update during training
    assert min(density.values()) < 0.1  # the floor was needed: some tensor sits near it


def test_min_density_in_forward_backward_lowers_the_strength_of_a_thin_tensor():
    # hold="track": here the floor acts through the strength at every update (a thin tensor's
    # own strength is halved), which runs only while the controller tracks. With the default
    # hold="freeze" the ramp ends at half of this run and the zeros come from finalize(),
    # whose per-tensor minimum is test_min_density_in_forward_backward_finalize_keeps_the_largest.
    lstm = ("lstm.weight_ih_l0", "lstm.weight_hh_l0")
    _, _, free, _, _, _ = train_lstm(min_density=0.0, mode="forward_backward", hold="track")
    assert min(free[n] for n in lstm) < 0.05  # without the floor the LSTM goes below 5 %
    _, _, density, _, _, ctrl = train_lstm(min_density=0.05, mode="forward_backward", hold="track")
    # Forward-backward has no latent copy to bring zeros back: the floor acts through the
    # strength (halved while below, ×1.1 while above), so a tensor oscillates around its
    # minimum instead of holding it exactly (the latent mode caps the strength exactly).
    assert all(density[n] >= 0.9 * 0.05 and density[n] > free[n] for n in lstm), (density, free)
    # Every term started at scale 1: a term below the common multiplier had its own lowered.
    lowered = {t.where for t in ctrl.terms if t.scale < 0.999 * ctrl.scale}
    assert lowered and lowered <= set(lstm), lowered


def test_min_density_in_forward_backward_finalize_keeps_the_largest():
    # Two tensors: "small" has the 20 smallest magnitudes of all 60. A global cut to 50 %
    # would empty it; with min_density=0.25 it keeps its 5 largest and the other pays.
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Linear(4, 10, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(0.01 + 0.01 * torch.rand(4, 5, generator=g))
        model[1].weight.copy_(1.0 + torch.rand(10, 4, generator=g))
    small, big = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    for floor, small_left in ((0.0, 0), (0.25, 5)):
        for p, w in zip(model.parameters(), (small, big), strict=True):
            with torch.no_grad():
                p.copy_(w)
        reg = sc.Regularizer(model)
        reg.add_weight("*.weight", sc.L1(0.1))
        opt = ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg)
        ctrl = TargetSparsity(opt, target=0.5, end_step=10, min_density=floor)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fin = ctrl.finalize()
        reg.remove()
        left = model[0].weight.detach()
        assert fin["after"] == 0.5 and int((left != 0).sum()) == small_left
        assert any("0.weight is all zero" in str(w.message) for w in caught) == (floor == 0)
        if small_left:  # the survivors are that tensor's largest magnitudes
            assert torch.equal(left[left != 0].sort().values, small.flatten().sort().values[-5:])


def test_finalize_cut_in_latent_mode_keeps_the_latent_copy_and_gamma():
    # An unused layer has γ = 0, so finalize() cannot take the λ path: it cuts the smallest
    # magnitudes. The cut is the optimizer's own write: the trained layer's latent copy is cut
    # with it and γ goes on, so the model still shows prox(latent, γ·λ·m) after the next step
    # (an outside change would restart the latent copy from the shown weights and γ at 0).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    reg = sc.Regularizer(model)
    reg.add_weight("*.weight", sc.L1(1e-2))
    opt = ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg, relaxed=False)
    ctrl = TargetSparsity(opt, target=0.5, end_step=100, hold="track")
    used = model[0].weight
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    for i in range(4):
        opt.zero_grad()
        model[0](x).pow(2).mean().backward()
        opt.step()
        if i == 2:
            before = used.detach().clone()
            fin = ctrl.finalize()
            assert fin["latent"] == 0.0 and fin["after"] == 0.5
            cut = (used == 0) & (before != 0)
            assert 0 < int(cut.sum()) < used.numel()
            assert torch.equal(opt._latent[used][cut], torch.zeros(int(cut.sum())))
    assert opt._gamma[used] == pytest.approx(0.4)
    z, step = opt._latent[used], opt._gamma[used] * 1e-2 * reg.terms[0].scale
    soft = torch.sign(z) * (z.abs() - step).clamp_min(0)  # the L1 prox, written out
    assert torch.equal(used.detach(), soft)
