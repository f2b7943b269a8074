"""ProximalOptimizer under hostile use (issue 10, items 2, 3, 5, 6, 13, 14).

Each case either works or raises a clear error before anything changed. Where the
inner optimizer defines the answer (a bad gradient, a coordinate it did not
move), the prox is compared with a plain copy of the inner optimizer run on the
same gradients.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import sparsecraft as sc
from sparsecraft.optim import FLOOR_REFRESH, ProximalOptimizer, _fused, _prox_step, threshold


def _state_equal(a, b) -> bool:
    """Deep equality of state_dicts (tensors bit for bit, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_state_equal, a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and isinstance(b, float) and math.isnan(b))


# ----------------------------------------------------------------------------- item 2
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("pen", [sc.L1(0.5), sc.L1L2(0.5, 0.1)], ids=["l1_blocked", "l1l2_whole"])
def test_one_bad_gradient_damages_no_more_than_adam_and_never_poisons_the_floor(bad, pen):
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    plain = copy.deepcopy(layer)
    reg = sc.Regularizer(layer)
    reg.add_weight(layer, pen)
    opt = ProximalOptimizer(torch.optim.Adam(layer.parameters(), lr=1e-2), reg)  # default floor
    adam = torch.optim.Adam(plain.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(64, 64, generator=g) for _ in range(3 * FLOOR_REFRESH)]
    grads[3][3, 5] = bad

    def step(k: int) -> None:
        for model, o in ((layer, opt), (plain, adam)):
            model.weight.grad = grads[k].clone()
            model.bias.grad = torch.zeros(64)
            o.step()

    # The bad gradient at step 4; Adam keeps the bad value in its moments, so the floor's
    # refresh at step FLOOR_REFRESH + 1 sees it too.
    for k in range(FLOOR_REFRESH + 2):
        step(k)
    bad_prox, bad_adam = ~layer.weight.isfinite(), ~plain.weight.isfinite()
    assert int(bad_adam.sum()) == 1 and bool(bad_adam[3, 5])
    assert torch.equal(bad_prox, bad_adam)  # the prox widened nothing (it was 4096 weights)
    assert all(bool(t.isfinite().all()) for t in opt.state_dict()["prox"]["typical"].values())

    # Repair the weight and Adam's moments, as a user would: training goes on, finite, prox on.
    with torch.no_grad():
        for model, o in ((layer, opt), (plain, adam)):
            model.weight[3, 5] = 0.0
            st = o.state[model.weight]
            st["exp_avg"][3, 5] = 0.0
            st["exp_avg_sq"][3, 5] = 0.0
    zeros_before = int((layer.weight == 0).sum())
    for k in range(FLOOR_REFRESH + 2, 3 * FLOOR_REFRESH):  # one more floor refresh
        step(k)
    assert bool(layer.weight.isfinite().all()) and bool(plain.weight.isfinite().all())
    typical = opt.state_dict()["prox"]["typical"]
    assert all(bool(t.isfinite().all()) and float(t) > 0 for t in typical.values())
    # The prox still shrinks (an infinite reference switched it off for good).
    assert int((layer.weight == 0).sum()) > zeros_before + 20
    assert float(layer.weight.detach().abs().sum()) < float(plain.weight.detach().abs().sum())


# ----------------------------------------------------------------------------- item 3
def _latent_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    reg = sc.Regularizer(model)
    reg.add_weight(nn.Linear, sc.L1(0.05))
    opt = ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), reg, mode="latent")
    return model, reg, opt


def _steps(model, opt, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("change", ["model_load_state_dict", "in_place_mul", "threshold"])
def test_latent_copy_follows_weights_changed_outside_the_optimizer(change):
    model, _, opt = _latent_setup()
    _steps(model, opt, _data(4, seed=1))
    with torch.no_grad():
        if change == "model_load_state_dict":
            pretrained = _latent_setup(seed=5)[0].state_dict()
            model.load_state_dict(pretrained)
        elif change == "in_place_mul":
            model[0].weight.mul_(3.0)
            model[2].weight.mul_(0.5)
        else:
            threshold(model, 0.2, params="*.weight")
    changed = copy.deepcopy(model)
    # The oracle: a ProximalOptimizer built now on the changed weights, same inner state.
    oracle_model = copy.deepcopy(model)
    oracle_reg = sc.Regularizer(oracle_model)
    oracle_reg.add_weight(nn.Linear, sc.L1(0.05))
    inner = torch.optim.SGD(oracle_model.parameters(), lr=0.1, momentum=0.9)
    inner.load_state_dict(copy.deepcopy(opt.inner.state_dict()))
    oracle = ProximalOptimizer(inner, oracle_reg, mode="latent")

    batches = _data(3, seed=2)
    _steps(model, opt, batches)
    _steps(oracle_model, oracle, batches)
    for (name, a), b in zip(model.named_parameters(), oracle_model.parameters(), strict=True):
        assert torch.equal(a, b), name
    # The change was kept: the latent copies restarted from the changed weights.
    sd = opt.state_dict()["prox"]
    assert sd["gamma"][0] == pytest.approx(0.3) and sd["gamma"][2] == pytest.approx(0.3)
    assert not torch.equal(model[0].weight, changed[0].weight)  # and training went on


@pytest.mark.parametrize("order", ["model_first", "optimizer_first"])
def test_resume_keeps_the_restored_latent_copies_in_either_load_order(order):
    model, _, opt = _latent_setup()
    batches = _data(6, seed=3)
    _steps(model, opt, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _steps(model, opt, batches[3:])
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, _, opt2 = _latent_setup(seed=9)
    if order == "model_first":
        model2.load_state_dict(saved["model"])
        opt2.load_state_dict(saved["opt"])
    else:
        opt2.load_state_dict(saved["opt"])
        model2.load_state_dict(saved["model"])
    _steps(model2, opt2, batches[3:])
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert _state_equal(opt.state_dict(), opt2.state_dict())


# ----------------------------------------------------------------------------- item 5
def _linear_opt(out: int, mode: str, floor: float = 0.1, steps: int = 2):
    torch.manual_seed(out)
    layer = nn.Linear(8, out)
    reg = sc.Regularizer(layer)
    reg.add_weight(layer, sc.L1(0.01))
    opt = ProximalOptimizer(torch.optim.Adam(layer.parameters(), lr=0.01), reg, mode=mode, floor=floor)
    for _ in range(steps):
        opt.zero_grad()
        layer(torch.randn(4, 8)).square().sum().backward()
        opt.step()
    return layer, opt


def _corrupt(sd, part, edit):
    sd = copy.deepcopy(sd)
    edit(sd[part] if part else sd)
    return sd


@pytest.mark.parametrize("mode", ["forward_backward", "latent"])
def test_load_state_dict_of_another_model_or_corrupted_changes_nothing(mode):
    _, small = _linear_opt(1, mode)
    layer, opt = _linear_opt(6, mode)
    good = opt.state_dict()
    bad = {"Linear(8, 1) state": small.state_dict()}
    key = 0  # the weight: a penalised parameter
    bad["floor out of range"] = _corrupt(good, "prox", lambda p: p.update(floor=1.5))
    bad["NaN floor reference"] = _corrupt(good, "prox", lambda p: p["typical"].update({key: torch.tensor(math.nan)}))
    bad["reference of a parameter without term"] = _corrupt(
        good, "prox", lambda p: p["typical"].update({1: torch.tensor(1.0)}))
    bad["negative floor step count"] = _corrupt(good, "prox", lambda p: p["floor_steps"].update({key: -1}))
    bad["unknown prox key"] = _corrupt(good, "prox", lambda p: p.update(extra=1))
    bad["inner state of another shape"] = _corrupt(
        good, "inner", lambda i: i["state"][0].update(exp_avg_sq=torch.zeros(1, 8)))
    bad["inner state of an unknown index"] = _corrupt(
        good, "inner", lambda i: i["state"].update({7: i["state"][0]}))
    if mode == "latent":
        bad["latent of another dtype"] = _corrupt(good, "prox", lambda p: p["latent"].update({0: p["latent"][0].double()}))
        bad["latent of another shape"] = _corrupt(good, "prox", lambda p: p["latent"].update({0: torch.zeros(6)}))
        bad["missing latent copy"] = _corrupt(good, "prox", lambda p: p["latent"].clear())
        bad["NaN gamma"] = _corrupt(good, "prox", lambda p: p["gamma"].update({0: math.nan}))
    else:
        bad["latent in forward_backward"] = _corrupt(good, "prox", lambda p: p["latent"].update({0: torch.zeros(6, 8)}))
    weight = layer.weight.detach().clone()
    for what, sd in bad.items():
        with pytest.raises(ValueError, match="Expected") as err:
            opt.load_state_dict(sd)
        assert "Received" in str(err.value), what
        assert _state_equal(opt.state_dict(), good), what  # nothing was loaded
        assert opt.param_groups is opt.inner.param_groups
    assert torch.equal(layer.weight, weight)


def test_load_state_dict_restores_the_saved_floor():
    _, saved = _linear_opt(6, "forward_backward", floor=0.0)
    _, opt = _linear_opt(6, "forward_backward", floor=0.1)
    opt.load_state_dict(saved.state_dict())
    assert opt.floor == 0.0
    assert _state_equal(opt.state_dict(), saved.state_dict())


# ----------------------------------------------------------------------------- item 6
EMBEDDING_OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-1),
    "rmsprop_centered": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, centered=True),
}


@pytest.mark.parametrize("path", ["blocked", "whole_tensor", "fused_eager", "group_lasso_rows"])
@pytest.mark.parametrize("floor", [0.1, 0.0])
@pytest.mark.parametrize("name", sorted(EMBEDDING_OPTIMIZERS))
def test_untouched_embedding_rows_get_no_prox_step(name, floor, path, monkeypatch):
    if path == "whole_tensor":
        monkeypatch.setattr(_prox_step, "_contiguous", lambda p, step: False)
    if path == "fused_eager":  # the fused kernel's own code, run eagerly (compiling takes ~40 s)
        monkeypatch.setattr(_prox_step, "_compiled_kernel", lambda: _fused._adaptive_prox_kernel)
    make = EMBEDDING_OPTIMIZERS[name]
    torch.manual_seed(0)
    emb = nn.Embedding(1000, 16, dtype=torch.float64)
    plain = copy.deepcopy(emb)
    reg = sc.Regularizer(emb)
    # Group penalties: one step per group, the mean over the coordinates the optimizer moved.
    reg.add_weight(emb, sc.GroupLasso(1e-3, groups="rows") if path == "group_lasso_rows" else sc.L1(1e-4))
    opt = ProximalOptimizer(make(emb.parameters()), reg, floor=floor, fused=path == "fused_eager")
    inner = make(plain.parameters())
    ids = torch.randint(0, 1000, (32,), generator=torch.Generator().manual_seed(1))
    c = torch.randn(32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for _ in range(20):
        for e, o in ((emb, opt), (plain, inner)):
            o.zero_grad()
            (e(ids) * c).sum().backward()  # a linear loss: the prox can only shrink
            o.step()
    assert opt.fused is (path == "fused_eager")
    touched = torch.zeros(1000, dtype=torch.bool)
    touched[ids] = True
    # Rows never in a batch: exactly what the inner optimizer made of them (AdamW decays them).
    assert torch.equal(emb.weight[~touched], plain.weight[~touched])
    # Rows in the batch: shrunk by the prox.
    shrunk, unpenalised = emb.weight.detach()[touched], plain.weight.detach()[touched]
    assert float(shrunk.abs().sum()) < float(unpenalised.abs().sum()) - 1e-3


# ----------------------------------------------------------------------------- item 13
@pytest.mark.parametrize(("mode", "make", "pen"), [
    ("forward_backward", lambda ps: torch.optim.Adam(ps, lr=0.1), sc.L1(0.1)),
    ("forward_backward", lambda ps: torch.optim.Adam(ps, lr=0.1), sc.L1L2(0.1, 0.1)),
    ("forward_backward", lambda ps: torch.optim.SGD(ps, lr=0.1), sc.L1(0.1)),
    ("latent", lambda ps: torch.optim.Adam(ps, lr=0.1), sc.L1(2.0)),  # λ in units of Adam's step
], ids=["adam_l1", "adam_l1l2", "sgd_l1", "adam_latent"])
def test_empty_parameter_is_a_no_op(mode, make, pen):
    results = []
    for with_empty in (True, False):
        module = nn.Module()
        if with_empty:
            module.empty = nn.Parameter(torch.zeros(5, 0))
        module.full = nn.Parameter(torch.tensor([0.05, -2.0, 3.0, 0.01]))
        reg = sc.Regularizer(module)
        reg.add_weight("*", pen)
        opt = ProximalOptimizer(make(module.parameters()), reg, mode=mode)
        for _ in range(2):
            if with_empty:
                module.empty.grad = torch.zeros(5, 0)
            module.full.grad = torch.tensor([0.01, 1.0, -1.0, -0.02])
            opt.step()
        results.append(module.full.detach().clone())
        assert not with_empty or module.empty.shape == (5, 0)
    # The other term is stepped exactly as without the empty parameter, and it was shrunk.
    assert torch.equal(results[0], results[1])
    assert bool((results[0] == 0).any())


# ----------------------------------------------------------------------------- item 14
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, -0.0001, "2", True, None])
def test_term_scale_refuses_nan_inf_and_negative(value):
    layer = nn.Linear(4, 3)
    reg = sc.Regularizer(layer)
    reg.add_weight(layer, sc.L1(0.1))
    term = reg.terms[0]
    term.scale = 2
    assert term.scale == 2.0 and isinstance(term.scale, float)
    with pytest.raises(ValueError, match=r"Expected a non-negative finite float for `scale`. Received: scale="):
        term.scale = value
    assert term.scale == 2.0  # unchanged
    # The optimizer never sees a bad scale: its step still runs with the last good one.
    opt = ProximalOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), reg)
    layer(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert bool(layer.weight.isfinite().all())


# ----------------------------------------------------------------------------- threshold()
def test_threshold_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="Expected an nn.Module. Received: dict"):
        threshold({"w": torch.zeros(2)}, 0.1)
