"""Regularizer: selectors, activity semantics, values, explain() and clean removal.

Keras parity of the numbers is in test_keras_parity.py; here the expected
values are hand-written torch expressions of the documented formulas.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecraft as sc
from sparsecraft.regularizer import Explanation, Regularizer, Term, regularize


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))
        self.head = nn.Linear(5, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.head(self.encoder(x)))


class Twice(nn.Module):
    """Calls the same Linear twice in one forward (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


class Fails(nn.Module):
    """Runs its Linear, then raises when asked to."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, fail: bool = False) -> torch.Tensor:
        y = self.lin(x)
        if fail:
            raise RuntimeError("boom")
        return y


class Pair(nn.Module):
    """Returns a tuple: two float tensors and an integer one (which carries no penalty)."""

    def forward(self, x: torch.Tensor):
        return x * 2.0, (x - 1.0,), x.argmax(dim=1)


class Total(nn.Module):
    """Returns a scalar (0-dim) output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


class Wrap(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor):
        return self.inner(x)


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


def _lin(x: torch.Tensor, m: nn.Linear) -> torch.Tensor:
    """The output of ``m`` without calling it (calling it would fire the hooks under test)."""
    return F.linear(x, m.weight, m.bias)


def _names(terms: list[Term]) -> list[str]:
    return [t.where for t in terms]


# --- selectors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("head.weight", ["head.weight"]),
        ("encoder.*.weight", ["encoder.0.weight", "encoder.2.weight"]),
        ("*.bias", ["encoder.0.bias", "encoder.2.bias", "head.bias", "norm.bias"]),
        ("encoder.[02].bias", ["encoder.0.bias", "encoder.2.bias"]),
        ("head", ["head.weight"]),  # a module name means its weight
        (nn.Linear, ["encoder.0.weight", "encoder.2.weight", "head.weight"]),
        ((nn.Linear, "bias"), ["encoder.0.bias", "encoder.2.bias", "head.bias"]),
        (nn.LayerNorm, ["norm.weight"]),
        (("head", "bias"), ["head.bias"]),
        # A pair's string names modules: only their bias, not every parameter the glob matches.
        (("encoder.*", "bias"), ["encoder.0.bias", "encoder.2.bias"]),
    ],
)
def test_selectors_by_name_glob_and_type(net: Net, selector, expected: list[str]) -> None:
    reg = Regularizer(net)
    terms = reg.add_weight(selector, sc.L1(0.1))
    assert _names(terms) == expected
    params = dict(net.named_parameters())
    for t in terms:
        assert t.target is params[t.where]  # the very Parameter, not a copy
        assert t.kind == "weight" and t.name == f"weight:{t.where}"


def test_selectors_by_object(net: Net) -> None:
    reg = Regularizer(net)
    (by_module,) = reg.add_weight(net.head, "l1:0.1")
    (by_pair,) = reg.add_weight((net.encoder[2], "bias"), "l2:0.1")
    (by_param,) = reg.add_weight(net.encoder[0].bias, sc.L2(0.1))
    assert (by_module.where, by_module.target) == ("head.weight", net.head.weight)
    assert by_pair.where == "encoder.2.bias" and by_pair.target is net.encoder[2].bias
    assert by_param.where == "encoder.0.bias" and by_param.target is net.encoder[0].bias
    assert reg.parameters() == [net.head.weight, net.encoder[2].bias, net.encoder[0].bias]


def test_parameters_lists_each_once(net: Net) -> None:
    reg = Regularizer(net)
    reg.add_weight("head.weight", sc.L1(0.1))
    # One parameter = one term: a second penalty on head.weight is refused (see
    # test_regularizer_models.py); exclude= leaves it to the first term.
    with pytest.raises(ValueError, match=r"head\.weight already has weight:head\.weight"):
        reg.add_weight(nn.Linear, sc.L2(0.1))
    assert len(reg.terms) == 1  # refused whole: nothing added
    reg.add_weight(nn.Linear, sc.L2(0.1), exclude="head.weight")
    assert reg.parameters() == [net.head.weight, net.encoder[0].weight, net.encoder[2].weight]


def test_selector_matching_nothing_lists_close_names(net: Net) -> None:
    reg = Regularizer(net)
    with pytest.raises(ValueError, match=r"Expected .*Received: 'haed.weight'.*head\.weight"):
        reg.add_weight("haed.weight", sc.L1(0.1))
    with pytest.raises(ValueError, match="matches none"):
        reg.add_weight("decoder.*", sc.L1(0.1))
    with pytest.raises(ValueError, match=r"Close names: \['encoder'"):
        reg.add_activity("encodr", sc.L1(0.1))
    with pytest.raises(ValueError, match="Conv2d"):
        reg.add_weight(nn.Conv2d, sc.L1(0.1))
    with pytest.raises(ValueError, match=r"ReLU to have a parameter `weight`"):
        reg.add_weight(net.encoder[1], sc.L1(0.1))
    with pytest.raises(ValueError, match="'head.weight.bias'"):
        reg.add_weight(("head.weight", "bias"), sc.L1(0.1))  # not silently the weight
    assert reg.terms == ()  # failed selections add nothing


def test_objects_of_another_model_are_refused(net: Net) -> None:
    reg = Regularizer(net)
    stranger = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="belongs to the regularizer's model"):
        reg.add_weight(stranger, sc.L1(0.1))
    with pytest.raises(ValueError, match="belongs to the regularizer's model"):
        reg.add_weight(stranger.bias, sc.L1(0.1))
    with pytest.raises(ValueError, match="belongs to the regularizer's model"):
        reg.add_activity(stranger, sc.L1(0.1))


# --- attaching and removing leave the model as it was -----------------------------------------
def _hook_counts(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    return {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_always_called))
        for n, m in model.named_modules()
    }


def test_attach_and_remove_leave_the_model_unchanged(net: Net) -> None:
    ids = {n: id(p) for n, p in net.named_parameters()}
    keys = list(net.state_dict())
    hooks = _hook_counts(net)
    x = torch.randn(3, 4)
    before = net(x).detach()

    reg = Regularizer(net)
    reg.add_weight(nn.Linear, sc.L1(0.1))
    reg.add_activity("encoder.0", sc.L1(0.1))
    reg.add_activity(net.head, sc.L2(0.1))
    reg.add_activity(net, sc.L1(0.1))
    # Attaching neither replaces a parameter nor adds state.
    assert {n: id(p) for n, p in net.named_parameters()} == ids
    assert list(net.state_dict()) == keys
    assert _hook_counts(net) != hooks
    torch.testing.assert_close(net(x), before)  # hooks observe, never change outputs
    assert float(reg.loss().detach()) > 0

    reg.remove()
    assert {n: id(p) for n, p in net.named_parameters()} == ids
    assert list(net.state_dict()) == keys
    assert _hook_counts(net) == hooks
    assert reg.terms == () and reg.parameters() == []
    net(x)
    assert float(reg.loss()) == 0.0


# --- activity semantics -----------------------------------------------------------------------
def test_activity_is_divided_by_the_batch_size(net: Net) -> None:
    x = torch.randn(4, 4)
    reg = Regularizer(net)
    reg.add_activity("encoder.0", sc.L1(0.1))
    net(x)
    expected = 0.1 * _lin(x, net.encoder[0]).abs().sum() / 4
    torch.testing.assert_close(reg.loss(), expected)


@pytest.mark.parametrize(
    ("reduction", "divisor"), [("batch", 4), ("sum", 1), ("mean", 4 * 6)]
)
def test_activity_reductions(net: Net, reduction: str, divisor: int) -> None:
    x = torch.randn(4, 4)
    reg = Regularizer(net)
    reg.add_activity("encoder.0", sc.L2(0.1), reduction=reduction)
    net(x)
    expected = 0.1 * _lin(x, net.encoder[0]).square().sum() / divisor
    torch.testing.assert_close(reg.loss(), expected)


def test_activity_on_3d_output_divides_by_dim0() -> None:
    lin = nn.Linear(4, 3)
    reg = regularize(lin, activity=sc.L1(0.5))
    x = torch.randn(2, 7, 4)  # (N, T, F): batch is N = 2, not N·T
    lin(x)
    torch.testing.assert_close(reg.loss(), 0.5 * _lin(x, lin).abs().sum() / 2)


def test_module_called_twice_contributes_twice() -> None:
    torch.manual_seed(1)
    model = Twice()
    reg = Regularizer(model)
    term = reg.add_activity("lin", sc.L1(0.1))
    x = torch.randn(3, 4)
    model(x)
    first = _lin(x, model.lin)
    second = _lin(torch.tanh(first), model.lin)
    expected = 0.1 * first.abs().sum() / 3 + 0.1 * second.abs().sum() / 3
    torch.testing.assert_close(reg.loss(), expected)
    assert len(term.captured) == 2
    assert "Σ over 2 calls" in term.formula()


def test_captured_values_cleared_at_each_outermost_forward(net: Net) -> None:
    reg = Regularizer(net)
    reg.add_activity("encoder.0", sc.L1(0.1))
    reg.add_activity("head", sc.L1(0.1))
    x1, x2 = torch.randn(2, 4), torch.randn(5, 4)
    net(x1)
    net(x2)
    h = _lin(x2, net.encoder[0])
    out = _lin(net.encoder[2](torch.relu(h)), net.head)
    expected = 0.1 * h.abs().sum() / 5 + 0.1 * out.abs().sum() / 5
    torch.testing.assert_close(reg.loss(), expected)


def test_clearing_happens_at_the_outermost_forward_only() -> None:
    """A model nested in a wrapper: the regularizer's model is the inner one, called once."""
    torch.manual_seed(2)
    inner = Twice()
    outer = Wrap(inner)
    reg = Regularizer(inner)
    term = reg.add_activity("lin", sc.L1(0.1))
    outer(torch.randn(3, 4))
    assert len(term.captured) == 2  # the inner root's pre-hook cleared once, before both calls
    outer(torch.randn(3, 4))
    assert len(term.captured) == 2


def test_a_forward_that_raises_does_not_break_the_next() -> None:
    torch.manual_seed(3)
    model = Fails()
    reg = Regularizer(model)
    term = reg.add_activity("lin", sc.L1(0.1))
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(8, 4), fail=True)
    x = torch.randn(2, 4)
    model(x)
    # Had the depth count stayed up, the failed call's capture would still be there.
    assert len(term.captured) == 1
    torch.testing.assert_close(reg.loss(), 0.1 * _lin(x, model.lin).abs().sum() / 2)


def test_tuple_outputs_penalise_the_first_tensor_or_all_with_output_all() -> None:
    model = Pair()
    reg = Regularizer(model)
    first = reg.add_activity(model, sc.L1(0.1))
    every = reg.add_activity(model, sc.L1(0.1), output="all")  # Keras's flatten rule
    x = torch.randn(3, 4)
    model(x)
    torch.testing.assert_close(first.current(), 0.1 * (x * 2.0).abs().sum() / 3)
    expected = 0.1 * (x * 2.0).abs().sum() / 3 + 0.1 * (x - 1.0).abs().sum() / 3
    torch.testing.assert_close(every.current(), expected)  # the integer argmax carries none
    assert len(every.captured) == 1 and "Σ over" not in every.formula()  # one call, not 2 tensors


def test_scalar_outputs_are_not_divided() -> None:
    model = Total()
    reg = Regularizer(model)
    reg.add_activity(model, sc.L1(0.1))
    x = torch.randn(6, 4)
    model(x)
    torch.testing.assert_close(reg.loss(), 0.1 * x.sum().abs())


@pytest.mark.parametrize("reduction", ["batch", "sum", "mean"])
def test_empty_batch_gives_zero(reduction: str) -> None:
    lin = nn.Linear(4, 3)
    reg = regularize(lin, activity=sc.L2(0.1), reduction=reduction)
    lin(torch.randn(0, 4))
    loss = reg.loss()
    assert float(loss.detach()) == 0.0
    loss.backward()  # still a graph: a training step on an empty batch does not crash
    assert lin.weight.grad is not None and not torch.isnan(lin.weight.grad).any()


def test_activity_without_a_model_hooks_the_module_itself() -> None:
    lin = nn.Linear(4, 3)
    reg = Regularizer()
    reg.add_activity(lin, sc.L1(0.2))
    x1, x2 = torch.randn(2, 4), torch.randn(3, 4)
    lin(x1)
    lin(x2)  # each call of the module is its own outermost forward
    torch.testing.assert_close(reg.loss(), 0.2 * _lin(x2, lin).abs().sum() / 3)


# --- weight terms, loss and value -------------------------------------------------------------
def test_weight_terms_follow_in_place_updates(net: Net) -> None:
    reg = Regularizer(net)
    reg.add_weight("head.weight", sc.L1(0.1))
    first = float(reg.loss().detach())
    with torch.no_grad():
        net.head.weight.mul_(3.0)
        net.head.weight[0].zero_()
    expected = 0.1 * net.head.weight.detach().abs().sum()
    torch.testing.assert_close(reg.loss().detach(), expected)
    assert float(expected) != pytest.approx(first)


def test_value_includes_prox_terms_and_loss_leaves_them_out(net: Net) -> None:
    reg = Regularizer(net)
    (w,) = reg.add_weight("head.weight", sc.L1(0.1))
    (b,) = reg.add_weight("head.bias", sc.L2(0.3))
    act = reg.add_activity("encoder.0", sc.L1(0.05))
    x = torch.randn(4, 4)
    net(x)
    lw = 0.1 * net.head.weight.abs().sum()
    lb = 0.3 * net.head.bias.square().sum()
    la = 0.05 * _lin(x, net.encoder[0]).abs().sum() / 4
    torch.testing.assert_close(reg.loss(), lw + lb + la)
    w.prox = True
    torch.testing.assert_close(reg.loss(), lb + la)
    torch.testing.assert_close(reg.value(), (lw + lb + la).detach())
    assert not reg.value().requires_grad
    assert [r["mode"] for r in reg.explain().rows] == ["prox", "loss", "loss"]
    b.prox = act.prox = True
    assert float(reg.loss()) == 0.0
    torch.testing.assert_close(reg.value(), (lw + lb + la).detach())


def test_scale_multiplies_a_term(net: Net) -> None:
    reg = Regularizer(net)
    (t,) = reg.add_weight("head.weight", sc.L1(0.1))
    t.scale = 2.5
    torch.testing.assert_close(reg.loss(), 2.5 * 0.1 * net.head.weight.abs().sum())
    assert t.formula() == "2.5 × (0.1·Σ|W|)"


def test_gradient_equals_the_hand_written_expression(net: Net) -> None:
    reg = Regularizer(net)
    reg.add_weight("head.weight", sc.L1(0.1))
    reg.add_weight(("head", "bias"), sc.L1L2(l1=0.01, l2=0.2))
    reg.add_activity("encoder.2", sc.L2(0.05))
    x = torch.randn(4, 4)
    net(x)
    params = [net.head.weight, net.head.bias, net.encoder[0].weight, net.encoder[2].weight]
    got = torch.autograd.grad(reg.loss(), params)
    h = _lin(torch.relu(_lin(x, net.encoder[0])), net.encoder[2])
    by_hand = (
        0.1 * net.head.weight.abs().sum()
        + 0.01 * net.head.bias.abs().sum()
        + 0.2 * net.head.bias.square().sum()
        + 0.05 * h.square().sum() / 4
    )
    want = torch.autograd.grad(by_hand, params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert got[2].abs().sum() > 0  # the activity term reaches earlier layers


def test_loss_with_no_terms_is_zero(net: Net) -> None:
    reg = Regularizer(net)
    assert float(reg.loss()) == 0.0 and float(reg.value()) == 0.0


# --- explain ----------------------------------------------------------------------------------
def test_explain_rows_formulas_and_total(net: Net) -> None:
    reg = Regularizer(net)
    reg.add_weight("head.weight", sc.L1(0.1))
    reg.add_weight("head.bias", sc.L2(0.25))
    reg.add_activity("encoder.0", sc.L1(0.1))
    before = reg.explain()
    assert "/ batch" in before.rows[2]["formula"] and before.rows[2]["value"] == 0.0
    net(torch.randn(2, 4))
    ex = reg.explain()
    assert isinstance(ex, Explanation)
    rows = {r["term"]: r for r in ex.rows}
    assert rows["weight:head.weight"]["formula"] == "0.1·Σ|W|"
    assert rows["weight:head.weight"]["shape"] == (3, 5)
    assert rows["weight:head.bias"]["formula"] == "0.25·Σb²"
    assert rows["activity:encoder.0"]["formula"] == "0.1·Σ|out| / 2"
    assert rows["activity:encoder.0"]["shape"] is None
    assert rows["weight:head.weight"]["value"] == pytest.approx(
        float(0.1 * net.head.weight.detach().abs().sum()), rel=1e-6
    )
    assert ex.total == pytest.approx(float(reg.value()), rel=1e-6)
    assert ex.to_dict()["total"] == ex.total and len(ex.to_dict()["terms"]) == 3


def test_str_of_explain_is_a_text_table(net: Net) -> None:
    reg = Regularizer(net)
    reg.add_weight("head.weight", sc.L1(0.1))
    reg.add_activity("encoder.0", sc.L1(0.1), reduction="mean")
    net(torch.randn(2, 4))
    text = str(reg.explain())
    lines = text.splitlines()
    assert lines[0].split() == ["term", "where", "shape", "formula", "mode", "value"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].startswith("weight:head.weight") and "0.1·Σ|W|" in lines[2]
    assert "0.1·Σ|out| / numel" in lines[3]
    assert lines[-1].split()[0] == "total"
    assert float(lines[-1].split()[-1]) == pytest.approx(reg.explain().total, rel=1e-5)
    assert "\x1b[" not in text  # plain text, no terminal escapes
    assert hasattr(reg.explain(), "__rich__")


# --- non-finite values ------------------------------------------------------------------------
def test_nan_activity_raises_naming_the_term(net: Net) -> None:
    reg = Regularizer(net)
    reg.add_weight("head.weight", sc.L1(0.1))
    reg.add_activity("encoder.2", sc.L1(0.1))
    x = torch.randn(2, 4)
    x[1, 0] = float("nan")
    net(x)
    with pytest.raises(FloatingPointError, match=r"activity:encoder\.2"):
        reg.loss()
    unchecked = Regularizer(net, check_finite=False)
    unchecked.add_activity("encoder.2", sc.L1(0.1))
    net(x)
    assert torch.isnan(unchecked.loss())


def test_nan_weight_raises_naming_the_term(net: Net) -> None:
    reg = Regularizer(net)
    reg.add_weight("encoder.0.weight", sc.L2(0.1))
    reg.add_weight("head.weight", sc.L2(0.1))
    with torch.no_grad():
        net.head.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"weight:head\.weight"):
        reg.loss()


# --- raw tensors ------------------------------------------------------------------------------
def test_add_tensor_penalises_any_tensor() -> None:
    z = torch.randn(5, 3, requires_grad=True)
    reg = Regularizer()
    term = reg.add_tensor(z, sc.L1(0.2), name="code")
    assert term.kind == "tensor" and term.name == "tensor:code" and term.shape == (5, 3)
    loss = reg.loss()
    torch.testing.assert_close(loss, 0.2 * z.abs().sum())
    loss.backward()
    torch.testing.assert_close(z.grad, 0.2 * z.detach().sign())
    with torch.no_grad():
        z.mul_(2)
    torch.testing.assert_close(reg.loss(), 0.2 * z.abs().sum())  # recomputed, like weights
    assert reg.explain().rows[0]["formula"] == "0.2·Σ|x|"


# --- bad inputs -------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(net: Net) -> None:
    with pytest.raises(TypeError, match=r"Expected an nn.Module or None. Received: str"):
        Regularizer("net")  # type: ignore[arg-type]
    reg = Regularizer(net)
    with pytest.raises(ValueError, match=r"Received: reduction='avg'"):
        reg.add_activity("head", sc.L1(0.1), reduction="avg")
    with pytest.raises(ValueError, match=r"Expected a penalty name.*Received: .*'l3'"):
        reg.add_weight("head.weight", "l3")
    with pytest.raises(ValueError, match="l1"):
        reg.add_weight("head.weight", "lasso")  # the message lists the known names
    with pytest.raises(TypeError, match="Received: float"):
        reg.add_weight(3.0, sc.L1(0.1))
    with pytest.raises(TypeError, match="Received: int"):
        reg.add_activity(42, sc.L1(0.1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Received: list"):
        reg.add_tensor([1.0, 2.0], sc.L1(0.1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Received: l1=-1"):
        reg.add_weight("head.weight", "l1:-1")
    with pytest.raises(ValueError, match=r"Received: reduction='avg'"):
        regularize(nn.Linear(2, 2), weight=sc.L1(0.1), reduction="avg")  # even without activity
    with pytest.raises(ValueError, match="model=None"):
        Regularizer().add_weight(nn.Linear, sc.L1(0.1))
    with pytest.raises(ValueError, match="Close parameter names"):
        Regularizer().add_weight("head.weight", sc.L1(0.1))
    assert reg.terms == ()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_regularize_is_the_keras_shortcut() -> None:
    lin = nn.Linear(4, 3)
    reg = regularize(lin, weight="l1:0.1", bias=sc.L2(0.2), activity=sc.L1(0.3))
    assert [t.name for t in reg.terms] == ["weight:weight", "weight:bias", "activity:Linear"]
    x = torch.randn(2, 4)
    lin(x)
    expected = (
        0.1 * lin.weight.abs().sum()
        + 0.2 * lin.bias.square().sum()
        + 0.3 * _lin(x, lin).abs().sum() / 2
    )
    torch.testing.assert_close(reg.loss(), expected)
    assert "Regularizer(3 terms" in repr(reg)
