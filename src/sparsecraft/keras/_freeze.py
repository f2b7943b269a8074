"""The exact count of zeros and the fixed support, in ``keras.ops`` (run inside the train step or eagerly).

The torch library does both on the host (``TargetSparsity.finalize`` and
``ProximalOptimizer.freeze_support``, src/sparsecraft/optim/_support.py).
Here the selection is a fixed-length bisection (``ops.fori_loop``) and a rank
cut (two ``argsort``), so that ``hold="freeze"`` runs inside a compiled train
step, behind an ``ops.cond``, with no host sync. The fixed support is one
non-trainable mask per zero-making variable (ones until the freeze) and a
0/1 flag, all optimizer variables: they are saved with the model.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import keras
from keras import ops

from . import _display, _fine_tune
from ._math import count_zeros

# Bisection steps on log(multiplier) over a bracket of 4·LOG_BOUND ≈ 74: 40 halvings leave
# 7e-11, below float32's resolution there; what ties remain is cut by rank.
_BISECTIONS = 40


def create_state(optimizer: Any, var_list: list) -> None:
    """The flag, the statistics of the freeze and one mask per zero-making prox variable."""
    add = optimizer.add_variable
    optimizer._frozen = add((), initializer="zeros", dtype="float32", name="support_frozen")
    optimizer._frozen_at = add((), initializer="zeros", dtype="float32", name="frozen_at")
    optimizer._before_freeze = add((), initializer="zeros", dtype="float32", name="before_freeze")
    optimizer._scale_before_freeze = add((), initializer="zeros", dtype="float32", name="scale_before_freeze")
    optimizer._latent_freeze = add((), initializer="zeros", dtype="float32", name="latent_freeze")
    optimizer._masks = {
        k: optimizer.add_variable_from_reference(var_list[i], name="support_mask", initializer="ones")
        for k, i in enumerate(optimizer._slots) if optimizer._regs[k].makes_zeros
    }


def zero_making(optimizer: Any) -> list[int]:
    """The slots whose regularizer makes zeros (those the target counts), in build order."""
    return [k for k, r in enumerate(optimizer._regs) if r.makes_zeros]


def numel(optimizer: Any) -> int:
    return sum(optimizer._numel[k] for k in zero_making(optimizer))


def _latent_count(optimizer: Any, ks: list[int], log_scale: Any) -> tuple[Any, list]:
    """Zeros of ``prox(latent, γ·exp(log_scale))`` over the slots ``ks``, and those values."""
    m = ops.exp(log_scale)
    values = []
    for k in ks:
        z = ops.convert_to_tensor(optimizer._latents[k])
        step = ops.cast(ops.convert_to_tensor(optimizer._gammas[k]) * m, z.dtype)
        values.append(optimizer._regs[k].prox(z, step))
    total = ops.convert_to_tensor(0.0, "float32")
    for value in values:
        total = total + count_zeros(value)
    return total, values


def _solve_latent(optimizer: Any, ks: list[int], wanted: float) -> tuple[list, Any]:
    """The multiplier whose prox of the latent copies has ``wanted`` zeros (or the largest below it).

    The zeros grow with the multiplier (the λ path); bisection in log space on
    ``log_scale ± 2·LOG_BOUND``, as ``TargetSparsity.finalize`` did on the host.
    The values are what the optimizer shows (:mod:`._display`): with the relaxed
    display the latent values on the prox's count per variable, as torch's
    finalize takes them; the count is the prox's either way, so the bisection
    counts the cheaper prox.
    """
    from ._control import LOG_BOUND

    centre = ops.convert_to_tensor(optimizer._log_scale)
    lo, hi = centre - 2.0 * LOG_BOUND, centre + 2.0 * LOG_BOUND
    count_hi, _ = _latent_count(optimizer, ks, hi)

    def halve(_, bracket):
        lo, hi, count_hi = bracket
        mid = 0.5 * (lo + hi)
        c, _ = _latent_count(optimizer, ks, mid)
        enough = c >= wanted
        return ops.where(enough, lo, mid), ops.where(enough, mid, hi), ops.where(enough, c, count_hi)

    lo, hi, count_hi = ops.fori_loop(0, _BISECTIONS, halve, (lo, hi, count_hi))
    chosen = ops.where(ops.equal(count_hi, wanted), hi, lo)  # a tie past wanted: stay below, cut the rest
    _, values = _latent_count(optimizer, ks, chosen)
    if _display.is_relaxed(optimizer):
        values = [_display.relax(optimizer, k, ops.convert_to_tensor(optimizer._latents[k]), v)
                  for k, v in zip(ks, values, strict=True)]
    return values, chosen


def _cut_smallest(values: list, need: Any) -> list:
    """Zero the ``need`` smallest non-zero magnitudes over all ``values`` (exactly ``need``: ranks, not a threshold)."""
    flat = ops.concatenate([ops.reshape(ops.abs(ops.cast(v, "float32")), (-1,)) for v in values])
    ranked = ops.where(ops.equal(flat, 0.0), float("inf"), flat)
    ranks = ops.argsort(ops.argsort(ranked))
    drop = ranks < ops.cast(need, ranks.dtype)
    out, offset = [], 0
    for v in values:
        size = math.prod(int(d) for d in v.shape)
        piece = ops.reshape(drop[offset: offset + size], v.shape)
        offset += size
        out.append(ops.where(piece, ops.zeros_like(v), v))
    return out


def select(optimizer: Any, target: float) -> dict[str, Any]:
    """``round(target·numel)`` zeros over the zero-making variables, as new values (assigns nothing).

    Latent mode (every accumulated step ``γ`` > 0, and a count that is not
    already right): the multiplier is solved on the latent copies, then the
    remaining ties are cut by magnitude; forward–backward mode: the smallest
    magnitudes are cut. More zeros than wanted are left as they are (only the
    latent solve could undo them; forward–backward mode cannot).

    Returns:
        ``{"values", "log_scale", "before", "after", "latent"}`` as tensors
        (``values``: one per zero-making slot, in build order).
    """
    ks = zero_making(optimizer)
    n = float(numel(optimizer))
    wanted = float(round(target * n))
    current = [ops.convert_to_tensor(optimizer._trainable_variables[optimizer._slots[k]]) for k in ks]
    zeros = ops.convert_to_tensor(0.0, "float32")
    for v in current:
        zeros = zeros + count_zeros(v)
    log_scale = ops.convert_to_tensor(optimizer._log_scale)
    latent = ops.convert_to_tensor(0.0, "float32")
    values = current
    if optimizer.mode == "latent":
        started = ops.convert_to_tensor(True)
        for k in ks:
            started = ops.logical_and(started, ops.convert_to_tensor(optimizer._gammas[k]) > 0)
        use = ops.logical_and(started, ops.logical_not(ops.equal(zeros, wanted)))
        solved, chosen = _solve_latent(optimizer, ks, wanted)
        values = [ops.where(use, ops.cast(s, v.dtype), v) for s, v in zip(solved, current, strict=True)]
        log_scale = ops.where(use, chosen, log_scale)
        latent = ops.cast(use, "float32")
    have = ops.convert_to_tensor(0.0, "float32")
    for v in values:
        have = have + count_zeros(v)
    values = _cut_smallest(values, ops.maximum(wanted - have, 0.0))
    after = ops.convert_to_tensor(0.0, "float32")
    for v in values:
        after = after + count_zeros(v)
    return {"values": values, "log_scale": log_scale, "before": zeros / n, "after": after / n, "latent": latent}


def _host_steps(optimizer: Any) -> bool:
    """True where a Python ``if`` on a tensor would sync every step: the eager torch backend."""
    if keras.backend.backend() != "torch":
        return False
    return not sys.modules["torch"].compiler.is_compiling()


def host_frozen(optimizer: Any) -> bool | None:
    """Eager torch: whether the support is fixed, kept on the host (read once); None elsewhere.

    Eager torch runs each step as Python, so the optimizer can leave the mask
    operations out of an unfrozen step (they cost up to 20 % of a step there).
    The copy is set by :func:`freeze` and :func:`release` and read again after
    ``load_own_variables`` and at the start of each ``fit()`` with TargetSparsity.
    """
    if not _host_steps(optimizer):
        return None
    if optimizer._host_frozen is None:
        optimizer._host_frozen = bool(ops.convert_to_numpy(optimizer._frozen) > 0)
    return optimizer._host_frozen


def at_step(optimizer: Any, config: dict[str, Any]) -> None:
    """In the train step, after the prox: fix the support once the step reaches ``freeze_step``.

    TensorFlow and JAX: an ``ops.cond`` whose branch returns the new values
    (JAX's ``lax.cond`` must not assign), assigned after it. Eager torch: the
    optimizer counts its steps on the host (read once), so the check is a
    Python comparison, not a read of ``iterations`` from the device.
    """
    freeze_step = float(config["freeze_step"])
    if _host_steps(optimizer):
        if optimizer._host_step is None:
            optimizer._host_step = int(ops.convert_to_numpy(optimizer.iterations))
        else:
            optimizer._host_step += 1
        if optimizer._host_step >= freeze_step and not host_frozen(optimizer):
            freeze(optimizer, config["target"], step=float(optimizer._host_step),
                   lr_scale=config.get("fine_tune_scale", 1.0))
        return
    t = ops.cast(optimizer.iterations, "float32")
    due = ops.logical_and(t >= freeze_step, ops.convert_to_tensor(optimizer._frozen) <= 0)
    ks = zero_making(optimizer)
    targets = [optimizer._trainable_variables[optimizer._slots[k]] for k in ks]
    keep = [ops.convert_to_tensor(v) for v in targets] + [ops.convert_to_tensor(optimizer._masks[k]) for k in ks] \
        + [ops.convert_to_tensor(x) for x in _scalars(optimizer)]

    def selected():
        return _frozen_state(optimizer, config["target"], t, config.get("fine_tune_scale", 1.0))

    new = ops.cond(due, selected, lambda: keep)
    for var, value in zip(targets + [optimizer._masks[k] for k in ks] + _scalars(optimizer), new, strict=True):
        var.assign(value)


def _scalars(optimizer: Any) -> list:
    return [optimizer._log_scale, optimizer._frozen, optimizer._frozen_at, optimizer._before_freeze,
            optimizer._scale_before_freeze, optimizer._latent_freeze, optimizer._control_state["measured"],
            optimizer._lr_scale]


def _frozen_state(optimizer: Any, target: float, t: Any, lr_scale: float) -> list:
    """The values after the freeze, in the order of :func:`at_step`'s variables."""
    ks = zero_making(optimizer)
    chosen = select(optimizer, target)
    values = [ops.cast(v, optimizer._trainable_variables[optimizer._slots[k]].dtype)
              for k, v in zip(ks, chosen["values"], strict=True)]
    masks = [ops.cast(ops.not_equal(v, 0), optimizer._masks[k].dtype) for k, v in zip(ks, values, strict=True)]
    f32 = lambda x: ops.cast(x, "float32")  # noqa: E731
    scalars = [f32(chosen["log_scale"]), f32(1.0), f32(t), f32(chosen["before"]),
               ops.exp(ops.convert_to_tensor(optimizer._log_scale)), f32(chosen["latent"]), f32(chosen["after"]),
               f32(lr_scale)]
    return values + masks + scalars


def freeze(optimizer: Any, target: float | None, step: float | None = None, lr_scale: float = 1.0) -> None:
    """Fix the support now (eagerly): select ``target`` first when given, else keep today's zeros.

    ``lr_scale``: the inner optimizer's learning-rate multiplier while frozen (:mod:`._fine_tune`).
    """
    ks = zero_making(optimizer)
    t = ops.cast(optimizer.iterations, "float32") if step is None else ops.convert_to_tensor(step, "float32")
    if target is None:
        current = [ops.convert_to_tensor(optimizer._trainable_variables[optimizer._slots[k]]) for k in ks]
        masks = [ops.not_equal(v, 0) for v in current]
        share = sum(float(ops.convert_to_numpy(count_zeros(v))) for v in current) / max(numel(optimizer), 1)
        s = ops.convert_to_tensor(optimizer._log_scale)
        new = current + masks + [s, 1.0, t, share, ops.exp(s), 0.0, share, lr_scale]
    else:
        new = _frozen_state(optimizer, target, t, lr_scale)
    targets = [optimizer._trainable_variables[optimizer._slots[k]] for k in ks]
    for var, value in zip(targets + [optimizer._masks[k] for k in ks] + _scalars(optimizer), new, strict=True):
        var.assign(ops.cast(value, var.dtype))
    optimizer._host_frozen = True if _host_steps(optimizer) else None


def release(optimizer: Any) -> None:
    """Undo the freeze: masks back to ones, no lr multiplier, no average; latent mode restarts from the weights."""
    _fine_tune.forget(optimizer)
    for mask in optimizer._masks.values():
        mask.assign(ops.ones_like(ops.convert_to_tensor(mask)))
    optimizer._frozen.assign(0.0)
    if optimizer.mode == "latent":
        for k, i in enumerate(optimizer._slots):
            optimizer._latents[k].assign(ops.copy(ops.convert_to_tensor(optimizer._trainable_variables[i])))
            optimizer._gammas[k].assign(0.0)
    optimizer._host_step = None
    optimizer._host_frozen = False if _host_steps(optimizer) else None
