"""Checking a ProximalOptimizer ``state_dict`` whole before any of it is loaded.

:meth:`ProximalOptimizer.load_state_dict` loads all or nothing: every key,
index, shape, dtype and setting of the inner and the prox part is checked
here first, so that a checkpoint of another model (``Linear(8, 1)`` state into
``Linear(8, 6)``, where ``copy_`` would broadcast) is refused before the
optimizer changes (issue 10, item 5).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import distributed as _dist

# Per-parameter state of torch's own optimizers that has the parameter's shape. Other
# keys (``step``, Adafactor's factored rows and columns, ...) are not checked here.
_PARAM_SHAPED = frozenset({
    "momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg",
    "grad_avg", "acc_delta", "exp_inf", "ax", "prev", "step_size",
})
_PROX_KEYS = {"mode", "floor", "latent", "gamma"}
_PROX_OPTIONAL = {"typical", "floor_steps", "masks", "lr_scale"}  # written since the floor / frozen support


class CheckedState(NamedTuple):
    """The prox part of a state_dict, checked and keyed by the optimizer's parameters."""

    floor: float
    latent: dict[Tensor, Tensor]
    gamma: dict[Tensor, float]
    typical: dict[Tensor, Tensor]
    floor_steps: dict[Tensor, int]


def _fail(what: str, received: str) -> ValueError:
    return ValueError(f"Expected {what}. Received: {received}. The state_dict must come from "
                      f"ProximalOptimizer.state_dict() of the same model, optimizer and settings")


def _index(key: Any, allowed: dict[int, Tensor], what: str) -> Tensor:
    if isinstance(key, bool) or not isinstance(key, int) or key not in allowed:
        raise _fail(f"{what} keyed by the indices {sorted(allowed)}", f"key {key!r}")
    return allowed[key]


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise _fail(f"a finite {name} >= 0", f"{name}={value!r}")
    return float(value)


def _check_inner(params: list[Tensor], groups: list[dict], inner: Any) -> None:
    """The checks torch's ``Optimizer.load_state_dict`` leaves out: every state tensor's shape."""
    if not isinstance(inner, dict) or not {"state", "param_groups"} <= set(inner):
        got = sorted(inner) if isinstance(inner, dict) else type(inner).__name__
        raise _fail("an inner optimizer state_dict with 'state' and 'param_groups'", repr(got))
    saved_groups, saved_state = inner["param_groups"], inner["state"]
    if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
        raise _fail("an inner 'param_groups' list and 'state' dict",
                    f"{type(saved_groups).__name__} and {type(saved_state).__name__}")
    sizes = [len(g["params"]) for g in groups]
    saved_sizes = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in saved_groups]
    if saved_sizes != sizes:
        raise _fail(f"param_groups of sizes {sizes}", f"sizes {saved_sizes}")
    ids = [i for g in saved_groups for i in g["params"]]
    by_id = dict(zip(ids, params, strict=True))
    for key, st in saved_state.items():
        p = _index(key, by_id, "inner optimizer state")
        if not isinstance(st, dict):
            raise _fail("a dict of state per parameter", f"{type(st).__name__} for index {key}")
        for name, v in st.items():
            if name in _PARAM_SHAPED and isinstance(v, Tensor) and v.shape != p.shape:
                raise _fail(f"inner state {name!r} of parameter {key} with its shape {tuple(p.shape)}",
                            f"shape {tuple(v.shape)}")


def check_state_dict(opt: Any, state_dict: Any) -> CheckedState:
    """Check a whole ``ProximalOptimizer`` state_dict against ``opt``; raise before any change.

    Args:
        opt: the :class:`~sparsecraft.optim.ProximalOptimizer` to load into.
        state_dict: what its ``state_dict()`` returned (possibly through ``torch.load``).

    Returns:
        The prox part, keyed by ``opt``'s parameters, ready to be assigned.

    Raises:
        ValueError: a missing or extra key, another mode, a floor outside [0, 1], an index
            that is not one of the optimizer's (penalised) parameters, a tensor of another
            shape or dtype, a non-finite or negative accumulated step or floor reference.
    """
    if not isinstance(state_dict, dict) or set(state_dict) != {"inner", "prox"}:
        raise ValueError(
            "Expected a ProximalOptimizer state_dict with keys 'inner' and 'prox'. "
            f"Received keys: {sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}"
        )
    prox = state_dict["prox"]
    if not isinstance(prox, dict) or not _PROX_KEYS <= set(prox) <= _PROX_KEYS | _PROX_OPTIONAL:
        got = sorted(prox) if isinstance(prox, dict) else type(prox).__name__
        raise _fail(f"a 'prox' part with keys {sorted(_PROX_KEYS)} (and {sorted(_PROX_OPTIONAL)})",
                    repr(got))
    if prox["mode"] != opt.mode:
        raise ValueError(f"Expected a state_dict of mode {opt.mode!r}. Received: mode={prox['mode']!r}")
    floor = prox["floor"]
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
        raise _fail("floor in [0, 1]", f"floor={floor!r}")
    params = opt._params()
    _check_inner(params, opt.param_groups, state_dict["inner"])

    index = dict(enumerate(params))
    penalised = {i: p for i, p in index.items() if p in opt._terms}
    with_latent = {i: p for i, p in index.items() if p in opt._latent}
    for part in ("latent", "gamma", "typical", "floor_steps"):
        if not isinstance(prox.get(part, {}), dict):
            raise _fail(f"'{part}' as a dict", type(prox[part]).__name__)
    if set(prox["latent"]) != set(with_latent) or set(prox["gamma"]) != set(with_latent):
        raise _fail(f"latent copies and accumulated steps of the parameters {sorted(with_latent)}",
                    f"latent {sorted(prox['latent'], key=str)}, gamma {sorted(prox['gamma'], key=str)}")
    latent = {}
    for i, z in prox["latent"].items():
        p = _index(i, with_latent, "latent copies")
        mine = opt._latent[p]
        if not isinstance(z, Tensor) or z.shape != mine.shape or z.dtype != mine.dtype:
            got = f"{tuple(z.shape)} {z.dtype}" if isinstance(z, Tensor) else type(z).__name__
            raise _fail(f"the latent copy of parameter {i} of shape {tuple(mine.shape)} and {mine.dtype}",
                        got)
        latent[p] = z
    gamma = {_index(i, with_latent, "accumulated steps"): _real(g, "gamma")
             for i, g in prox["gamma"].items()}
    typical = {}
    for i, t in prox.get("typical", {}).items():
        p = _index(i, penalised, "floor references")
        if not isinstance(t, Tensor) or t.numel() != 1 or not t.is_floating_point() \
                or not bool(torch.isfinite(t).all()) or float(t) < 0:
            raise _fail(f"the floor reference of parameter {i} as a finite one-element tensor >= 0",
                        repr(t))
        dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
        device = p.to_local().device if _dist.is_sharded(p) else p.device
        typical[p] = t.detach().reshape(()).to(device=device, dtype=dtype, copy=True)
    floor_steps = {}
    for i, n in prox.get("floor_steps", {}).items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise _fail(f"floor_steps of parameter {i} as an int >= 0", repr(n))
        floor_steps[_index(i, penalised, "floor step counts")] = n
    return CheckedState(float(floor), latent, gamma, typical, floor_steps)
