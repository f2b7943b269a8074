"""ProximalOptimizer: step sizes from the inner optimizer's state, torch-optimizer behaviour, errors.

A prox result is checked by the optimality condition of the prox, never by a
second copy of the code: ``x = prox_{τ|·|}(u)`` iff ``u − x = τ·sign(x)`` where
``x ≠ 0`` and ``|u| <= τ`` where ``x = 0``; for the group lasso
``u_g − x_g = τ_g·x_g/‖x_g‖`` or ``‖u_g‖ <= τ_g``. The point ``u`` is what a
plain copy of the inner optimizer produces from the same state.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import sparsecraft as sc
from sparsecraft.optim import FLOOR_REFRESH, ProximalOptimizer, _prox_step, threshold


@pytest.fixture(autouse=True)
def _float64():
    # float64 for exact comparisons, restored so that other test modules are not affected.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _train(model, opt, reg, batches, scheduler=None):
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + reg.loss()
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _l1_model(lam: float = 0.02, seed: int = 0):
    model = _mlp(seed)
    reg = sc.Regularizer(model)
    reg.add_weight(nn.Linear, sc.L1(lam))
    return model, reg


def _assert_soft_threshold(u: torch.Tensor, x: torch.Tensor, tau: torch.Tensor | float, tol=1e-12):
    """x is prox_{τ|·|}(u), by the optimality condition; at least one zero and one survivor."""
    tau = torch.as_tensor(tau, dtype=u.dtype).expand_as(u)
    nz = x != 0
    assert nz.any() and (~nz).any(), "the case must exercise both branches"
    assert torch.all(torch.sign(x[nz]) == torch.sign(u[nz]))
    torch.testing.assert_close(u[nz] - x[nz], tau[nz] * torch.sign(x[nz]), rtol=0, atol=tol)
    assert torch.all(u[~nz].abs() <= tau[~nz] * (1 + 1e-12))


# ----------------------------------------------------------------------------- torch behaviour
def test_param_groups_shared_and_scheduler_on_wrapper_changes_inner_lr():
    model, reg = _l1_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = ProximalOptimizer(inner, reg)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        _train(model, opt, reg, _batches(4), sched)
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)
    inner.param_groups[0]["lr"] = 0.3
    assert opt.param_groups[0]["lr"] == 0.3


def test_scheduler_lr_is_the_prox_step():
    # After StepLR halves lr, the prox threshold is the new lr·λ (plain SGD: u = w − lr·g).
    model, reg = _l1_model(lam=0.5)
    opt = ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.2), reg)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, reg, _batches(1), sched)
    x, y = _batches(1, seed=5)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    w = model[0].weight
    u = (w - 0.1 * w.grad).detach()
    opt.step()
    _assert_soft_threshold(u, w.detach(), 0.1 * 0.5)


@pytest.mark.parametrize("mode", ["forward_backward", "latent"])
def test_closure_returns_loss_and_matches_explicit_backward(mode):
    batches = _batches(3)
    results = []
    for use_closure in (False, True):
        model, reg = _l1_model()
        opt = ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), reg, mode=mode)
        losses = []
        for x, y in batches:
            def closure(x=x, y=y, model=model, opt=opt, reg=reg):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y) + reg.loss()
                loss.backward()
                return loss

            if use_closure:
                losses.append(float(opt.step(closure).detach()))
            else:
                losses.append(float(closure().detach()))
                assert opt.step() is None
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["forward_backward", "latent"])
@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=0.01),
], ids=["sgd", "adam"])
def test_state_dict_round_trip_continues_bit_for_bit(mode, make):
    batches = _batches(5 + FLOOR_REFRESH + 1)  # the resumed run refreshes the floor's mean
    model, reg = _l1_model(lam=0.05)
    opt = ProximalOptimizer(make(model.parameters()), reg, mode=mode)
    _train(model, opt, reg, batches[:5])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, reg, batches[5:])

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # loads without unpickling code
    model2, reg2 = _l1_model(lam=0.05, seed=7)  # different init: everything must come from the file
    opt2 = ProximalOptimizer(make(model2.parameters()), reg2, mode=mode)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    _train(model2, opt2, reg2, batches[5:])
    for (name, a), b in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert any(bool((p == 0).any()) for p in model.parameters())
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    for k, z in sd["prox"]["latent"].items():
        assert torch.equal(z, sd2["prox"]["latent"][k])
    assert sd["prox"]["gamma"] == sd2["prox"]["gamma"]
    for k, st in sd["inner"]["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sd2["inner"]["state"][k][key]))


def test_load_state_dict_of_other_mode_is_refused():
    model, reg = _l1_model()
    sd = ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg).state_dict()
    model2, reg2 = _l1_model()
    opt2 = ProximalOptimizer(torch.optim.SGD(model2.parameters(), lr=0.1), reg2, mode="latent")
    with pytest.raises(ValueError, match="mode"):
        opt2.load_state_dict(sd)
    with pytest.raises(ValueError, match="'inner' and 'prox'"):
        opt2.load_state_dict(sd["inner"])


def test_penalty_scale_per_group_and_term_scale():
    model = _mlp()
    reg = sc.Regularizer(model)
    reg.add_weight(nn.Linear, sc.L1(0.05))
    inner = torch.optim.SGD([
        {"params": [model[0].weight, model[0].bias], "penalty_scale": 0.0},
        {"params": [model[2].weight, model[2].bias], "penalty_scale": 2.0},
    ], lr=0.1)
    opt = ProximalOptimizer(inner, reg)
    reg.terms[1].scale = 3.0  # the controller's knob multiplies too
    x, y = _batches(1)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    u0 = (model[0].weight - 0.1 * model[0].weight.grad).detach()
    u2 = (model[2].weight - 0.1 * model[2].weight.grad).detach()
    opt.step()
    assert torch.equal(model[0].weight.detach(), u0)  # scale 0: no prox at all
    _assert_soft_threshold(u2, model[2].weight.detach(), 0.1 * 0.05 * 2.0 * 3.0)


@pytest.mark.parametrize("mode", ["forward_backward", "latent"])
def test_parameters_without_term_are_stepped_exactly_like_the_inner_optimizer(mode):
    model, reg = _l1_model(lam=0.05)
    make = lambda ps: torch.optim.Adam(ps, lr=0.01)  # noqa: E731
    opt = ProximalOptimizer(make(model.parameters()), reg, mode=mode)
    _train(model, opt, reg, _batches(3))
    x, y = _batches(1, seed=3)[0]
    twin, _ = _one_checked_step(model, opt, make, x, y)
    assert torch.equal(model[0].bias, twin[0].bias)
    assert torch.equal(model[2].bias, twin[2].bias)
    assert not torch.equal(model[0].weight, twin[0].weight)


def test_prox_terms_leave_loss_and_show_as_prox_in_explain():
    model = _mlp()
    reg = sc.Regularizer(model)
    reg.add_weight("0.weight", sc.L1(0.1))
    reg.add_weight("2.weight", sc.Hoyer(0.1))  # no closed-form prox: stays in the loss
    reg.add_activity("0", sc.L1(0.01))
    model(torch.randn(4, 6))
    expected_all = float(reg.loss().detach())
    l1_value = 0.1 * float(model[0].weight.detach().abs().sum())
    opt = ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg)
    assert float(reg.loss().detach()) == pytest.approx(expected_all - l1_value, rel=1e-12)
    assert float(reg.value()) == pytest.approx(expected_all, rel=1e-6)
    modes = {row["where"]: row["mode"] for row in reg.explain().rows}
    assert modes == {"0.weight": "prox", "2.weight": "loss", "0": "loss"}
    assert "prox" in str(reg.explain())
    opt.release()
    assert float(reg.loss().detach()) == pytest.approx(expected_all, rel=1e-12)


def test_unknown_optimizer_warns_exactly_once_and_uses_lr():
    model, reg = _l1_model(lam=0.05)
    make = lambda ps: torch.optim.Adadelta(ps, lr=0.5)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = ProximalOptimizer(make(model.parameters()), reg)
        _train(model, opt, reg, _batches(3))
        x, y = _batches(1, seed=9)[0]
        twin, _ = _one_checked_step(model, opt, make, x, y)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert "Adadelta" in str(caught[0].message) and "register_step_rule" in str(caught[0].message)
    # The prox step it falls back to is the group's lr.
    _assert_soft_threshold(twin[0].weight.detach(), model[0].weight.detach(), 0.5 * 0.05)


# ----------------------------------------------------------------------------- adaptive steps
def _adam_step(group, state):
    v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
    bc2 = 1 - group["betas"][1] ** float(state["step"])
    return group["lr"] / (v.sqrt() / math.sqrt(bc2) + group["eps"])


def _adagrad_step(group, state):
    clr = group["lr"] / (1 + (float(state["step"]) - 1) * group["lr_decay"])
    return clr / (state["sum"].sqrt() + group["eps"])


def _rmsprop_step(group, state):
    v = state["square_avg"]
    if group["centered"]:
        v = v - state["grad_avg"] ** 2
    return group["lr"] / (v.sqrt() + group["eps"])


ADAPTIVE = {
    "adam": (lambda ps: torch.optim.Adam(ps, lr=0.05, eps=1e-3), _adam_step),
    "adam_amsgrad": (lambda ps: torch.optim.Adam(ps, lr=0.05, amsgrad=True, betas=(0.8, 0.9)), _adam_step),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1), _adam_step),
    "adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=0.05, lr_decay=0.1,
                                               initial_accumulator_value=0.01), _adagrad_step),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5), _rmsprop_step),
    "rmsprop_centered": (lambda ps: torch.optim.RMSprop(ps, lr=0.01, centered=True), _rmsprop_step),
}


def _one_checked_step(model, opt, make, x, y):
    """Step ``opt`` and a plain twin of its inner optimizer from the same state; return (u, twin state)."""
    twin = copy.deepcopy(model)
    twin_opt = make(twin.parameters())
    # A deep copy: load_state_dict keeps tensors of the right dtype as they are (shared).
    twin_opt.load_state_dict(copy.deepcopy(opt.inner.state_dict()))
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    return twin, twin_opt


@pytest.mark.parametrize("block", [None, 5], ids=["one_block", "blocks_of_5"])
@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_adaptive_step_sizes_come_from_the_optimizer_state(name, block, monkeypatch):
    if block is not None:  # the L1 prox runs block by block, with a shorter last block
        monkeypatch.setattr(_prox_step, "BLOCK", block)
    make, rule = ADAPTIVE[name]
    lam = 0.02
    model, reg = _l1_model(lam=lam)
    opt = ProximalOptimizer(make(model.parameters()), reg, floor=0.0)
    _train(model, opt, reg, _batches(3))
    x, y = _batches(1, seed=11)[0]
    twin, twin_opt = _one_checked_step(model, opt, make, x, y)
    for i in (0, 2):
        p = twin[i].weight
        t = rule(twin_opt.param_groups[0], twin_opt.state[p])
        _assert_soft_threshold(p.detach(), model[i].weight.detach(), lam * t, tol=1e-10)
        # the biases carry no term: identical to the plain optimizer
        assert torch.equal(twin[i].bias, model[i].bias)


@pytest.mark.parametrize(("name", "lam"), [("adam", 0.05), ("adagrad", 0.1), ("rmsprop", 0.05)])
def test_group_lasso_with_adaptive_optimizer_uses_the_mean_step_of_each_group(name, lam):
    make, rule = ADAPTIVE[name]
    model = _mlp()
    reg = sc.Regularizer(model)
    reg.add_weight("0.weight", sc.GroupLasso(lam, groups="rows"))
    opt = ProximalOptimizer(make(model.parameters()), reg, floor=0.0)
    _train(model, opt, reg, _batches(3))
    x, y = _batches(1, seed=13)[0]
    twin, twin_opt = _one_checked_step(model, opt, make, x, y)
    u = twin[0].weight.detach()
    w = model[0].weight.detach()
    t = rule(twin_opt.param_groups[0], twin_opt.state[twin[0].weight]).mean(dim=1)  # per row
    tau = lam * math.sqrt(w.shape[1]) * t
    zero_rows = (w == 0).all(dim=1)
    assert zero_rows.any() and (~zero_rows).any()
    assert torch.all(u[zero_rows].norm(dim=1) <= tau[zero_rows])
    alive = ~zero_rows
    direction = w[alive] / w[alive].norm(dim=1, keepdim=True)
    torch.testing.assert_close(u[alive] - w[alive], tau[alive, None] * direction, rtol=0, atol=1e-10)


@pytest.mark.parametrize("block", [None, 7], ids=["one_block", "blocks_of_7"])
def test_floor_caps_the_threshold_where_the_gradient_died(block, monkeypatch):
    """Coordinate 0 gets gradients, then none: v̂ → 0 and lr·λ/(sqrt(v̂)+eps) explodes without the floor."""
    if block is not None:  # the floor's mean is summed block by block
        monkeypatch.setattr(_prox_step, "BLOCK", block)
    lam, lr, floor, beta2 = 0.01, 1e-3, 0.1, 0.8
    final = {}
    for fl in (0.0, floor):
        layer = nn.Linear(100, 1, bias=False)
        w = layer.weight
        with torch.no_grad():
            w.fill_(0.5)
        reg = sc.Regularizer(layer)
        reg.add_weight(layer, sc.L1(lam))
        inner = torch.optim.Adam([w], lr=lr, betas=(0.9, beta2))
        opt = ProximalOptimizer(inner, reg, floor=fl)
        g = torch.Generator().manual_seed(0)
        ref = 0.0
        for step in range(200):
            grad = torch.randn(1, 100, generator=g)
            if step >= 10:
                grad[0, 0] = 0.0  # the gradient of coordinate 0 dies
            w.grad = grad
            before = float(w.detach()[0, 0])
            opt.step()
            st = inner.state[w]
            if step % FLOOR_REFRESH == 0:  # the floor's mean is refreshed every FLOOR_REFRESH steps
                ref = max(ref, float(st["exp_avg_sq"].sqrt().mean()))
            if step == 150 and fl > 0:
                # The threshold applied to coordinate 0, from the state: w0 = u0 − τ0 (w0 > 0).
                bc1 = 1 - 0.9 ** float(st["step"])
                bc2 = 1 - beta2 ** float(st["step"])
                m0, v0 = float(st["exp_avg"][0, 0]), float(st["exp_avg_sq"][0, 0])
                assert math.sqrt(v0) < 1e-6 * ref  # v̂ has died
                u0 = before - lr * (m0 / bc1) / (math.sqrt(v0) / math.sqrt(bc2) + 1e-8)
                tau = lr * lam / (max(math.sqrt(v0), fl * ref) / math.sqrt(bc2) + 1e-8)
                assert float(w.detach()[0, 0]) == pytest.approx(u0 - tau, rel=0, abs=1e-12)
                # at most 1/floor times the threshold of a coordinate with a typical sqrt(v̂)
                assert tau <= lr * lam / (fl * ref) * (1 + 1e-9)
        final[fl] = float(w.detach()[0, 0])
    assert final[0.0] == 0.0  # no floor: zeroed once its v̂ dies
    assert final[floor] > 0.4  # floor: shrunk by at most ~lr·λ/(floor·typical) per step


def test_no_prox_step_for_a_parameter_without_gradient_this_step():
    for mode, make in [("forward_backward", lambda ps: torch.optim.Adam(ps, lr=0.01)),
                       ("forward_backward", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
                       ("latent", lambda ps: torch.optim.SGD(ps, lr=0.1))]:
        model, reg = _l1_model(lam=0.05)
        opt = ProximalOptimizer(make(model.parameters()), reg, mode=mode)
        _train(model, opt, reg, _batches(2))
        frozen = model[2].weight.detach().clone()
        x, _ = _batches(1)[0]
        opt.zero_grad()
        model[0](x).pow(2).mean().backward()  # only layer 0 gets gradients
        assert model[2].weight.grad is None
        before0 = model[0].weight.detach().clone()
        opt.step()
        assert torch.equal(model[2].weight, frozen), mode
        assert not torch.equal(model[0].weight, before0), mode


def test_latent_mode_holds_prox_of_latent_with_accumulated_lr():
    lam = 0.05
    model, reg = _l1_model(lam=lam)
    w = model[0].weight
    z = w.detach().clone()
    opt = ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.2), reg, mode="latent")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    gamma = 0.0
    for x, y in _batches(5):
        lr = opt.param_groups[0]["lr"]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        z -= lr * w.grad  # the inner step updates the latent copy with the gradient at the shown weights
        gamma += lr
        opt.step()
        sched.step()
        _assert_soft_threshold(z, w.detach(), gamma * lam, tol=1e-12)
    assert opt.state_dict()["prox"]["gamma"][0] == pytest.approx(gamma)


def test_l1l2_with_adam_is_the_elastic_net_prox_with_adaptive_steps():
    # x = prox_{t(l1|·| + l2(·)²)}(u) iff u − (1 + 2·t·l2)·x = t·l1·sign(x) (x ≠ 0), |u| <= t·l1 (x = 0).
    make, rule = ADAPTIVE["adam"]
    pen = sc.L1L2(l1=0.03, l2=0.5)
    model = _mlp()
    reg = sc.Regularizer(model)
    reg.add_weight("0.weight", pen)
    opt = ProximalOptimizer(make(model.parameters()), reg, floor=0.0)
    _train(model, opt, reg, _batches(3))
    x, y = _batches(1, seed=17)[0]
    twin, twin_opt = _one_checked_step(model, opt, make, x, y)
    u, w = twin[0].weight.detach(), model[0].weight.detach()
    t = rule(twin_opt.param_groups[0], twin_opt.state[twin[0].weight])
    nz = w != 0
    assert nz.any() and (~nz).any()
    torch.testing.assert_close(u[nz] - (1 + 2 * t[nz] * pen.l2) * w[nz], t[nz] * pen.l1 * torch.sign(w[nz]),
                               rtol=0, atol=1e-10)
    assert torch.all(u[~nz].abs() <= t[~nz] * pen.l1)


STEADY = {
    "sgd": ("forward_backward", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    "adam": ("forward_backward", lambda ps: torch.optim.Adam(ps, lr=1e-3)),
    "rmsprop_centered": ("forward_backward", lambda ps: torch.optim.RMSprop(ps, centered=True)),
    "sgd_latent": ("latent", lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "adam_latent": ("latent", lambda ps: torch.optim.Adam(ps, lr=1e-3)),
}


@pytest.mark.parametrize("name", sorted(STEADY))
def test_prox_part_allocates_no_parameter_sized_tensor(name):
    from torch.profiler import ProfilerActivity, profile

    mode, make = STEADY[name]
    layer = nn.Linear(256, 256, bias=False)
    reg = sc.Regularizer(layer)
    reg.add_weight(layer, sc.L1(1e-3))
    inner = make(layer.parameters())
    opt = ProximalOptimizer(inner, reg, mode=mode)
    for _ in range(2):  # buffers are made on the first steps
        layer.weight.grad = torch.randn_like(layer.weight)
        opt.step()
    layer.weight.grad = torch.randn_like(layer.weight)
    inner.step()
    inner.step = lambda closure=None: None  # time only the prox part of opt.step()
    before = layer.weight.detach().clone()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    assert not torch.equal(before, layer.weight)  # the prox did run
    quarter = layer.weight.numel() * layer.weight.element_size() // 4
    big = [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage >= quarter]
    assert big == []


@pytest.mark.parametrize("pen", [sc.L1(0.02), sc.L1L2(0.02, 0.5)], ids=["l1", "l1l2"])
@pytest.mark.parametrize("name", ["adam", "rmsprop_centered"])
def test_fused_kernel_matches_the_unfused_prox(name, pen):
    make, _ = ADAPTIVE[name]
    results = []
    for fused in (False, True):
        model = _mlp()
        reg = sc.Regularizer(model)
        reg.add_weight(nn.Linear, pen)
        with warnings.catch_warnings():
            # a compile failure warns and falls back: fail here instead
            warnings.filterwarnings("error", message=".*could not compile")
            opt = ProximalOptimizer(make(model.parameters()), reg, fused=fused)
            _train(model, opt, reg, _batches(FLOOR_REFRESH + 2))
        assert opt.fused is fused
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert torch.equal(a == 0, b == 0)
    assert any(bool((p == 0).any()) for p in results[1])


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    model, reg = _l1_model()
    with pytest.raises(TypeError, match="torch.optim.Optimizer. Received: str"):
        ProximalOptimizer("sgd", reg)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="Regularizer"):
        ProximalOptimizer(sgd, model)
    with pytest.raises(TypeError, match="wrap only once"):
        ProximalOptimizer(ProximalOptimizer(sgd, reg), reg)
    for bad in ({"mode": "fista"}, {"floor": -0.1}, {"floor": 2.0}, {"floor": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg, **bad)


def test_regularizer_parameters_missing_from_optimizer_are_named():
    model, reg = _l1_model()
    with pytest.raises(ValueError, match=r"2\.weight") as err:
        ProximalOptimizer(torch.optim.SGD(model[0].parameters(), lr=0.1), reg)
    assert "0.weight" not in str(err.value)


def test_prox_term_on_parameter_without_grad_is_refused():
    model, reg = _l1_model()
    model[2].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"2\.weight does not require grad"):
        ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg)


def test_two_prox_terms_on_one_parameter_are_refused():
    model = _mlp()
    reg = sc.Regularizer(model)
    reg.add_weight("0.weight", sc.L1(0.1))
    # One parameter = one term (issue 11): the second penalty is refused where it is added.
    with pytest.raises(ValueError, match="one penalty per parameter"):
        reg.add_weight("0.weight", sc.L2(0.1))
    opt = ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg)
    assert [t.prox for t in reg.terms] == [True]
    del opt


@pytest.mark.parametrize("mode", ["forward_backward", "latent"])
@pytest.mark.parametrize(("key", "value", "match"), [
    ("lr", float("nan"), r"Expected a finite learning rate >= 0.*lr=nan"),
    ("lr", float("inf"), r"Expected a finite learning rate >= 0.*lr=inf"),
    ("lr", -0.1, r"Expected a finite learning rate >= 0.*lr=-0.1"),
    ("penalty_scale", float("nan"), r"penalty_scale >= 0.*penalty_scale=nan"),
    ("penalty_scale", -1.0, r"penalty_scale >= 0.*penalty_scale=-1.0"),
    ("penalty_scale", "2", r"penalty_scale >= 0.*penalty_scale='2'"),
])
def test_bad_lr_or_penalty_scale_raises_before_anything_changes(mode, key, value, match):
    model, reg = _l1_model()
    opt = ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg, mode=mode)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0][key] = value
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=match):
        opt.step()
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- threshold()
def test_threshold_zeroes_small_weights_and_reports():
    model = _mlp()
    with torch.no_grad():
        model[0].weight.copy_(torch.linspace(-1, 1, 72).reshape(12, 6))
        model[0].weight[0, 0] = 0.0
    n_small = int((model[0].weight.abs() <= 0.25).sum())
    bias_before = model[0].bias.detach().clone()
    report = threshold(model, 0.25, params="0.weight")
    assert set(report) == {"0.weight"}
    r = report["0.weight"]
    assert r["numel"] == 72 and r["zeros_before"] == 1
    assert r["zeros_after"] == n_small == int((model[0].weight == 0).sum())
    assert r["zeroed"] == n_small - 1
    assert 0.2 < r["max_removed"] <= 0.25
    assert torch.all(model[0].weight[model[0].weight != 0].abs() > 0.25)
    assert torch.equal(model[0].bias, bias_before)
    everything = threshold(model, 0.0)
    assert set(everything) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert everything["0.weight"]["zeroed"] == 0
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="tol"):
            threshold(model, bad)
    with pytest.raises(ValueError, match="no match"):
        threshold(model, 0.1, params="encoder.*")
