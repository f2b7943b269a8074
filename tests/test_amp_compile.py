"""Mixed precision and torch.compile.

* Under ``torch.autocast`` penalty values are computed in float32 with autocast
  off, as tf.keras does for regularizers.
* The prox on float16/bfloat16 parameters gives the float32 result rounded to
  the parameter's precision (and never NaN: Adam's eps underflows in float16).
* A compiled model with activity terms gives the eager loss and gradients;
  terms added after compiling are refused with a clear error (dynamo does
  not guard on hooks), and work again after ``torch._dynamo.reset()``.

Compile tests use the ``aot_eager`` backend (dynamo + AOT autograd, no C++
compile: seconds on CPU); inductor compiles for tens of seconds here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsecraft as sc
from sparsecraft.optim import ProximalOptimizer

LOW = [torch.float16, torch.bfloat16]


def small_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


# ----------------------------------------------------------------------------- autocast


def test_activity_values_are_float32_under_bf16_autocast():
    model = small_model()
    reg = sc.Regularizer(model)
    act = reg.add_activity("0", sc.L1(0.1))
    act_sum = reg.add_activity("2", sc.L2(0.05), reduction="sum")
    seen = {}
    model[0].register_forward_hook(lambda m, i, o: seen.__setitem__("0", o.detach()))
    model[2].register_forward_hook(lambda m, i, o: seen.__setitem__("2", o.detach()))
    x = torch.randn(5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = reg.loss()
    assert out.dtype == torch.bfloat16 and seen["0"].dtype == torch.bfloat16
    assert act.current().dtype == torch.float32 and loss.dtype == torch.float32
    # The same numbers as float32 math on the bf16 outputs, outside autocast.
    want = 0.1 * seen["0"].float().abs().sum() / 5 + 0.05 * seen["2"].float().square().sum()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    assert act_sum.current().dtype == torch.float32


def test_weight_penalties_run_with_autocast_off():
    """Orthogonal multiplies matrices: under autocast that product would be bf16."""
    w = torch.randn(6, 10)
    pen = sc.Orthogonal(0.5)
    plain = pen(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = pen(w)
        autocast_math = pen._value(w)  # the formula without the guard, for contrast
    assert inside.dtype == torch.float32
    assert torch.equal(inside, plain)
    assert not torch.equal(autocast_math, plain)  # the guard matters for this penalty


@pytest.mark.parametrize("dtype", LOW)
def test_values_of_16bit_tensors_are_float32_and_finite(dtype):
    x = torch.full((4, 8), 300.0, dtype=dtype)  # 300² overflows float16
    for pen in [sc.L2(1.0), sc.L1L2(0.1, 1.0), sc.GroupLasso(1.0, "rows"), sc.Hoyer(1.0), sc.MCP(1.0, 400.0)]:
        got = pen(x)
        assert got.dtype == torch.float32 and torch.isfinite(got), pen
        torch.testing.assert_close(got, pen(x.float()), rtol=1e-6, atol=0)


def test_grad_scaler_steps_through_the_prox_optimizer_and_skips_inf_steps():
    """GradScaler unscales the shared param_groups; a skipped step skips the prox too."""
    model = small_model()
    reg = sc.Regularizer(model)
    reg.add_weight("0.weight", sc.L1(0.5))
    opt = ProximalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reg)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(16, 6)

    def step(scale_loss: float) -> None:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(x).float().square().mean() * scale_loss + reg.loss()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    reference = small_model()
    ref_reg = sc.Regularizer(reference)
    ref_reg.add_weight("0.weight", sc.L1(0.5))
    ref_opt = ProximalOptimizer(torch.optim.SGD(reference.parameters(), lr=0.1), ref_reg)
    for _ in range(3):
        step(1.0)
        ref_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            ref_loss = reference(x).float().square().mean()
        ref_loss.backward()
        ref_opt.step()
    # Unscaled gradients: the same weights as without the scaler (powers of two scale exactly).
    torch.testing.assert_close(model[0].weight, reference[0].weight, rtol=1e-6, atol=1e-7)
    assert (model[0].weight == 0).any()
    before = model[0].weight.detach().clone()
    step(float("inf"))  # overflow: the scaler skips the step, and the prox with it
    assert torch.equal(model[0].weight, before)
    assert scaler.get_scale() == 2.0**9


# ----------------------------------------------------------------------------- prox in 16 bits


def _one_step(dtype, inner: str, penalty, w, g):
    p = nn.Parameter(w.to(dtype).clone())
    reg = sc.Regularizer()
    reg.add_weight(p, penalty)
    # Fused Adam computes in float32 (torch's foreach Adam itself returns 0/0 = NaN for
    # zero gradients of float16 parameters: its eps underflows).
    opt = (torch.optim.SGD([p], lr=0.1, momentum=0.9) if inner == "sgd"
           else torch.optim.Adam([p], lr=0.05, fused=True))
    # Separable penalties without the floor: dead coordinates get the step lr/eps.
    # Group steps are means over a group, which one such step would dominate.
    popt = ProximalOptimizer(opt, reg, floor=0.0 if penalty.separable else 0.1)
    for _ in range(2):
        p.grad = g.to(dtype).clone()
        popt.step()
    return p.detach()


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("inner", ["sgd", "adam"])
@pytest.mark.parametrize("penalty", [sc.L1(0.4), sc.L1L2(0.3, 0.2), sc.GroupLasso(1.0, "rows"),
                                     sc.SparseGroupLasso(0.375, 1.5, "columns"), sc.L0(0.02)],
                         ids=["l1", "l1l2", "group_rows", "sgl_columns", "l0"])
def test_prox_on_16bit_parameters_matches_float32(dtype, inner, penalty):
    g0 = torch.Generator().manual_seed(3)
    # Values exactly representable in both 16-bit types, so both runs start equal.
    w = torch.randn(8, 12, generator=g0)
    w[:3] *= 0.05  # small rows: some groups go to zero, others stay
    w = w.to(dtype).float()
    g = (torch.rand(8, 12, generator=g0) * 0.9 + 0.1) * torch.randn(8, 12, generator=g0).sign()
    g = g.to(dtype).float()
    g[:, 0] = 0.0  # dead inputs: Adam's v = 0, and eps (1e-8) is 0 in float16
    low = _one_step(dtype, inner, penalty, w, g)
    ref = _one_step(torch.float32, inner, penalty, w, g)
    assert low.dtype == dtype
    assert torch.isfinite(low).all()
    eps = torch.finfo(dtype).eps
    # Within the rounding of a few 16-bit operations (the optimizer's own steps included).
    torch.testing.assert_close(low.float(), ref, rtol=8 * eps, atol=8 * eps * float(ref.abs().max()))
    assert (ref == 0).any() and (ref != 0).any()
    # The same zeros, but for coordinates within rounding of the threshold.
    differ = (low == 0) != (ref == 0)
    assert int(differ.sum()) <= 2


@pytest.mark.parametrize("dtype", LOW)
def test_group_prox_of_large_16bit_values_shrinks(dtype):
    """‖v_g‖² above 65504 overflowed float16, and the group was never shrunk."""
    v = torch.full((2, 4), 300.0, dtype=dtype)
    got = sc.GroupLasso(1.0, "rows", weights="none").prox(v, 10.0)
    want = sc.GroupLasso(1.0, "rows", weights="none").prox(v.float(), 10.0)  # 300·(1 − 10/600)
    assert float(want[0, 0]) == pytest.approx(295.0)
    torch.testing.assert_close(got.float(), want, rtol=2 * torch.finfo(dtype).eps, atol=0)


# ----------------------------------------------------------------------------- torch.compile


def _activity_reg(model: nn.Module) -> sc.Regularizer:
    reg = sc.Regularizer(model)
    reg.add_activity("1", sc.L1(0.1))
    reg.add_activity("2", sc.L2(0.05), reduction="sum")
    reg.add_weight("0.weight", sc.L2(0.01))
    return reg


def _loss_and_grads(model, call, reg, x):
    model.zero_grad()
    loss = call(x).square().mean() + reg.loss()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_model_with_activity_terms_matches_eager(fresh_dynamo):
    eager_model, model = small_model(), small_model()
    eager_reg, reg = _activity_reg(eager_model), _activity_reg(model)
    compiled = torch.compile(model, backend="aot_eager")
    for seed in range(3):  # captured values are cleared at each forward, compiled or not
        x = torch.randn(7 + seed, 6, generator=torch.Generator().manual_seed(seed))
        want_loss, want_grads = _loss_and_grads(eager_model, eager_model, eager_reg, x)
        got_loss, got_grads = _loss_and_grads(model, compiled, reg, x)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
        for a, b in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert [len(t.captured) for t in reg.terms if t.kind == "activity"] == [1, 1]


def test_compiled_training_step_with_regularizer_loss(fresh_dynamo):
    """reg.loss() inside a compiled function (its finiteness check breaks the graph once)."""
    eager_model, model = small_model(), small_model()
    eager_reg, reg = _activity_reg(eager_model), _activity_reg(model)

    def step(m, r, x):
        return m(x).square().mean() + r.loss()

    compiled_step = torch.compile(step, backend="aot_eager")
    x = torch.randn(5, 6)
    torch.testing.assert_close(compiled_step(model, reg, x), step(eager_model, eager_reg, x),
                               rtol=1e-6, atol=1e-7)


def test_regularizer_loss_compiles_in_one_graph_without_the_finiteness_check(fresh_dynamo):
    model = small_model()
    reg = sc.Regularizer(model, check_finite=False)  # the check reads a value on the host
    reg.add_activity("1", sc.L1(0.1))
    reg.add_weight("2.weight", sc.GroupLasso(0.05, "columns"))
    fn = torch.compile(lambda x: model(x).sum() + reg.loss(), backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 6)
    got = fn(x)
    torch.testing.assert_close(got, model(x).sum() + reg.loss(), rtol=1e-6, atol=1e-7)


def test_terms_added_after_compiling_are_refused_then_work_after_reset(fresh_dynamo):
    model = small_model()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(5, 6)
    compiled(x)  # compiled without hooks
    reg = _activity_reg(model)
    compiled(x)  # the compiled code does not run the new hooks
    assert all(not t.captured for t in reg.terms if t.kind == "activity")
    with pytest.raises(ValueError, match=r"torch\.compile.*_dynamo\.reset"):
        reg.loss()
    torch._dynamo.reset()
    compiled(x)
    eager = small_model()
    eager_reg = _activity_reg(eager)
    eager(x)
    torch.testing.assert_close(reg.loss(), eager_reg.loss(), rtol=1e-6, atol=1e-7)
