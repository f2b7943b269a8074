"""Checkpoint and resume: stopping at step k and resuming gives the weights of an uninterrupted run.

Saved: the model, the ProximalOptimizer (inner state, latent copies, accumulated
steps, the floor's reference), the Regularizer (term scales), the controller
and an LR scheduler — through a file, loaded with ``weights_only=True``. On
CPU the resumed run must equal the uninterrupted one bit for bit.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import sparsecraft as sc
from sparsecraft.optim import ProximalOptimizer

STEPS, STOP = 10, 4
HAS_CONTROL = importlib.util.find_spec("sparsecraft.control") is not None


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    reg = sc.Regularizer(model)
    adam = kind.startswith("adam")
    # Adam's forward-backward prox steps are lr/sqrt(v) (large); its latent steps Σ lr (small).
    l1, group = {"adam": (3e-3, 2e-3), "adam_latent": (1.0, 0.5)}.get(kind, (0.05, 0.1))
    reg.add_weight("0.weight", sc.L1(l1))
    reg.add_weight("2.weight", sc.GroupLasso(group, groups="columns"))
    reg.add_weight("4.weight", sc.L2(1e-2))
    reg.add_activity("1", sc.L1(1e-2))
    if adam:
        inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mode = "latent" if kind.endswith("latent") else "forward_backward"
    opt = ProximalOptimizer(inner, reg, mode=mode, floor=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    ctrl = None
    if HAS_CONTROL and kind == "sgd_target":
        from sparsecraft.control import TargetSparsity

        ctrl = TargetSparsity(opt, target=0.6, end_step=8, every=1)
    return model, reg, opt, sched, ctrl


def run(parts, start: int, stop: int) -> None:
    model, reg, opt, sched, ctrl = parts
    for step in range(start, stop):
        x, y = batch(step)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + reg.loss()
        loss.backward()
        opt.step()
        sched.step()
        if ctrl is not None:
            ctrl.step()


def save(parts, path) -> None:
    model, reg, opt, sched, ctrl = parts
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "regularizer": reg.state_dict(),
             "scheduler": sched.state_dict()}
    if ctrl is not None:
        state["controller"] = ctrl.state_dict()
    torch.save(state, path)


def load(parts, path) -> None:
    model, reg, opt, sched, ctrl = parts
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    reg.load_state_dict(state["regularizer"])
    sched.load_state_dict(state["scheduler"])
    if ctrl is not None:
        ctrl.load_state_dict(state["controller"])


KINDS = ["sgd", "adam", "adam_latent", "sgd_latent"] + (["sgd_target"] if HAS_CONTROL else [])


@pytest.mark.parametrize("kind", KINDS)
def test_resume_is_bit_identical(kind, tmp_path):
    straight = build(kind)
    run(straight, 0, STEPS)

    first = build(kind)
    run(first, 0, STOP)
    save(first, tmp_path / "ckpt.pt")
    resumed = build(kind, seed=123)  # a fresh process would start from other weights
    load(resumed, tmp_path / "ckpt.pt")
    run(resumed, STOP, STEPS)

    for (name, a), b in zip(straight[0].named_parameters(), resumed[0].parameters(), strict=True):
        assert torch.equal(a, b), f"{kind}: {name} differs after resuming"
    assert [t.scale for t in straight[1].terms] == [t.scale for t in resumed[1].terms]
    assert straight[3].get_last_lr() == resumed[3].get_last_lr()
    # the run made exact zeros (otherwise the prox state would not have been exercised)
    assert (straight[0][0].weight == 0).any()


def test_resume_needs_the_prox_state(tmp_path):
    """Dropping the latent copies (loading only the inner optimizer) gives other weights."""
    straight = build("adam_latent")
    run(straight, 0, STEPS)
    first = build("adam_latent")
    run(first, 0, STOP)
    resumed = build("adam_latent", seed=123)
    resumed[0].load_state_dict(first[0].state_dict())
    resumed[2].inner.load_state_dict(first[2].inner.state_dict())
    resumed[3].load_state_dict(first[3].state_dict())
    run(resumed, STOP, STEPS)
    assert not torch.equal(straight[0][0].weight, resumed[0][0].weight)


def test_regularizer_state_dict_round_trip_and_errors():
    model, reg, *_ = build("sgd")
    reg.terms[0].scale = 2.5
    reg.terms[3].scale = 0.25
    state = reg.state_dict()
    assert state == {"terms": [t.name for t in reg.terms], "scales": [2.5, 1.0, 1.0, 0.25]}
    other = build("sgd")[1]
    other.load_state_dict(state)
    assert [t.scale for t in other.terms] == [2.5, 1.0, 1.0, 0.25]
    assert float(other.value()) != float(build("sgd")[1].value())  # the scales act on the values

    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict({"scales": [1.0]})
    with pytest.raises(ValueError, match="terms"):
        other.load_state_dict({"terms": ["weight:0.weight"], "scales": [1.0]})
    bad = dict(state, scales=[1.0, float("nan"), 1.0, 1.0])
    with pytest.raises(ValueError, match="scale"):
        other.load_state_dict(bad)
    assert [t.scale for t in other.terms] == [2.5, 1.0, 1.0, 0.25]  # refused whole
