"""How penalties are minimised by prox: exact zeros with any torch optimizer.

:class:`ProximalOptimizer` wraps an optimizer. After the inner step it applies
the prox of every proximable weight term of a :class:`~sparsecraft.Regularizer`
with the step size the inner optimizer really used for each coordinate
(forward–backward splitting), or keeps a dense latent copy updated by the inner
optimizer and shows the model ``prox(latent, γ)`` with the accumulated step γ
(dual averaging, as in RDA, Xiao 2010, and torchao's prototype PAT).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import distributed as _dist
from .penalties import L1, L1L2, L2
from .regularizer import Regularizer, Term

__all__ = ["ProximalOptimizer", "AdaptiveStep", "register_step_rule", "threshold"]

_MODES = ("forward_backward", "latent")

# A step rule returns the prox step the inner optimizer used for ``p``: a float
# (the same for every coordinate); an AdaptiveStep after writing the square root
# of the optimizer's second-moment estimate into ``ws`` (the step is then
# ``lr / (scale·ws + eps)`` per coordinate); or None before the optimizer has
# state for ``p``. The built-in rules also name the state tensors they read
# (``moment``, ``centered``) and skip the write when ``ws`` is None: the fused
# kernel reads the optimizer state directly.
class AdaptiveStep(NamedTuple):
    lr: float
    scale: float
    eps: float
    moment: Tensor | None = None  # ws = sqrt(moment − centered²)
    centered: Tensor | None = None


StepRule = Callable[[dict, dict, Tensor, Tensor], "float | AdaptiveStep | None"]
_RULES: dict[type, StepRule] = {}


def register_step_rule(optimizer_type: type, rule: StepRule) -> None:
    """Teach :class:`ProximalOptimizer` the step size of another optimizer class.

    ``rule(group, state, param, workspace)`` returns a float step, or writes
    ``sqrt(second moment)`` into ``workspace`` and returns
    ``AdaptiveStep(lr, scale, eps)`` (step ``lr / (scale·workspace + eps)``), or
    None before the optimizer has state for ``param``.
    """
    if not isinstance(optimizer_type, type):
        raise TypeError(f"Expected an optimizer class. Received: {optimizer_type!r}")
    _RULES[optimizer_type] = rule


def _lr(group: dict) -> float:
    if "lr" not in group:
        raise ValueError(f"Expected a param group with an 'lr' (the prox step). Received keys: {sorted(group)}")
    lr = float(group["lr"])
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"Expected a finite learning rate >= 0 for the prox step. Received: lr={lr}")
    return lr


def _penalty_scale(group: dict) -> float:
    scale = group.get("penalty_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < math.inf:
        raise ValueError(f"Expected a finite penalty_scale >= 0 in the param group. Received: penalty_scale={scale!r}")
    return float(scale)


def _sgd(group, state, p, ws):
    return _lr(group)


def _adam(group, state, p, ws):
    v = state.get("max_exp_avg_sq") if group.get("amsgrad") else state.get("exp_avg_sq")
    if v is None or "step" not in state:
        return None
    bc2 = 1.0 - group["betas"][1] ** float(state["step"])
    if ws is not None:
        torch.sqrt(v, out=ws)
    return AdaptiveStep(_lr(group), 1.0 / math.sqrt(bc2), group["eps"], v)


def _adagrad(group, state, p, ws):
    if "sum" not in state:
        return None
    clr = _lr(group) / (1.0 + (float(state["step"]) - 1.0) * group["lr_decay"])
    if ws is not None:
        torch.sqrt(state["sum"], out=ws)
    return AdaptiveStep(clr, 1.0, group["eps"], state["sum"])


def _rmsprop(group, state, p, ws):
    if "square_avg" not in state:
        return None
    centered = state["grad_avg"] if group.get("centered") else None
    if ws is not None and centered is not None:
        torch.addcmul(state["square_avg"], centered, centered, value=-1, out=ws)
        ws.sqrt_()
    elif ws is not None:
        torch.sqrt(state["square_avg"], out=ws)
    return AdaptiveStep(_lr(group), 1.0, group["eps"], state["square_avg"], centered)


register_step_rule(torch.optim.SGD, _sgd)
for _t in (torch.optim.Adam, torch.optim.AdamW):
    register_step_rule(_t, _adam)
register_step_rule(torch.optim.Adagrad, _adagrad)
register_step_rule(torch.optim.RMSprop, _rmsprop)
_BUILTIN_RULES = (_adam, _adagrad, _rmsprop)


def _rule_for(optimizer: torch.optim.Optimizer) -> tuple[StepRule, bool]:
    for cls in type(optimizer).__mro__:
        if cls in _RULES:
            return _RULES[cls], True
    return _sgd, False


class ProximalOptimizer(torch.optim.Optimizer):
    """Wraps any optimizer; after its step, applies the prox of the regularizer's weight terms.

    Args:
        optimizer: the inner ``torch.optim.Optimizer``. Its ``param_groups`` are
            shared, so LR schedulers work on either object. A group may carry
            ``"penalty_scale"`` (default 1.0) to scale the strengths of its terms.
        regularizer: every weight term with a closed-form prox whose parameter
            the optimizer holds is applied by prox and leaves ``regularizer.loss()``.
        mode: ``"forward_backward"`` (default): ``w ← prox_{tR}(inner_step(w))``,
            with ``t`` the inner optimizer's step (SGD: ``lr``; Adam/AdamW:
            ``lr/(sqrt(v̂)+eps)``; Adagrad, RMSprop from their state; any other
            optimizer: ``lr``, with a warning). ``"latent"``: the inner optimizer
            updates a dense latent copy ``z`` of each parameter, and the model
            holds ``prox_{γR}(z)`` with ``γ = Σ lr`` over the steps taken (dual
            averaging); costs one extra copy of the penalised parameters.
        floor: guard for adaptive optimizers. Where a gradient dies, ``v̂`` decays
            to 0 and the threshold ``lr·λ/(sqrt(v̂)+eps)`` explodes, zeroing the
            weight, then its neighbours (REFERENCES.md; ProxGen, Yun et al.
            2021). Each coordinate's ``sqrt(v)`` (the optimizer's raw second
            moment, before bias correction) is raised to at least ``floor``
            times the largest mean ``sqrt(v)`` the tensor has had (the mean is
            taken every ``FLOOR_REFRESH`` = 10 steps), so its prox step is at
            most about ``1/floor`` times a typical one. 0 disables the guard. It does not prevent the collapse of Adam's
            forward–backward prox at a large ``λ`` (docs/optim.md).
        fused: opt in to one compiled kernel (``torch.compile``) for the prox
            of L1, L2 and L1L2 terms under Adam/AdamW, Adagrad and RMSprop: it
            reads the optimizer state and the weights once and writes the
            weights once, instead of about eight memory passes. The first step
            compiles (tens of seconds on CPU; it needs a C++ compiler); if
            compiling fails, it warns once and runs the unfused path.

    Memory: with adaptive optimizers, forward–backward holds two step buffers of
    ``BLOCK`` elements for L1 terms, or of the largest penalised parameter for
    other penalties; latent mode holds a copy of every penalised parameter.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        regularizer: Regularizer,
        *,
        mode: str = "forward_backward",
        floor: float = 0.1,
        fused: bool = False,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Expected a torch.optim.Optimizer. Received: {type(optimizer).__name__}")
        if isinstance(optimizer, ProximalOptimizer):
            raise TypeError("Expected an inner optimizer. Received: a ProximalOptimizer (wrap only once)")
        if not isinstance(regularizer, Regularizer):
            raise TypeError(f"Expected a sparsecraft.Regularizer. Received: {type(regularizer).__name__}")
        if mode not in _MODES:
            raise ValueError(f"Expected mode in {_MODES}. Received: mode={mode!r}")
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
            raise ValueError(f"Expected floor in [0, 1]. Received: floor={floor!r}")
        if not isinstance(fused, bool):
            raise TypeError(f"Expected fused to be a bool. Received: fused={fused!r}")
        self.inner = optimizer
        self.regularizer = regularizer
        self.mode = mode
        self.floor = float(floor)
        self.fused = fused
        self._rule, known = _rule_for(optimizer)
        if not known:
            warnings.warn(
                f"ProximalOptimizer does not know the step size of {type(optimizer).__name__}; "
                f"it uses the group's lr as the prox step (register_step_rule() teaches it).",
                stacklevel=2,
            )
        # Share everything a scheduler or a trainer reads off an optimizer.
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self._optimizer_step_pre_hooks = type(optimizer._optimizer_step_pre_hooks)()
        self._optimizer_step_post_hooks = type(optimizer._optimizer_step_post_hooks)()
        self._optimizer_state_dict_pre_hooks = type(optimizer._optimizer_step_pre_hooks)()
        self._optimizer_state_dict_post_hooks = type(optimizer._optimizer_step_pre_hooks)()
        self._optimizer_load_state_dict_pre_hooks = type(optimizer._optimizer_step_pre_hooks)()
        self._optimizer_load_state_dict_post_hooks = type(optimizer._optimizer_step_pre_hooks)()
        self._patch_step_function()

        self._terms = self._bind(regularizer)
        self._workspaces: dict[tuple, Tensor] = {}
        self._latent: dict[Tensor, Tensor] = {}
        self._gamma: dict[Tensor, float] = {}
        self._typical: dict[Tensor, Tensor] = {}
        self._floor_steps: dict[Tensor, int] = {}
        if mode == "latent":
            with torch.no_grad():
                for p in self._terms:
                    self._latent[p] = p.detach().clone()
                    self._gamma[p] = 0.0

    # -- binding -----------------------------------------------------------------------
    def _bind(self, reg: Regularizer) -> dict[Tensor, Term]:
        owned = {p for g in self.param_groups for p in g["params"]}
        terms: dict[Tensor, Term] = {}
        missing = []
        for t in reg.terms:
            if t.kind != "weight" or not t.penalty.proximable:
                continue
            p = t.target
            if p not in owned:
                missing.append(t.where)
                continue
            if not p.requires_grad:
                raise ValueError(
                    f"Expected parameters with requires_grad=True for prox terms. Received: {t.where} "
                    f"does not require grad"
                )
            if p in terms:
                raise ValueError(
                    f"Expected at most one prox term per parameter. Received: {terms[p].name} and {t.name} "
                    f"on {t.where}; combine them into one penalty (e.g. L1L2, SparseGroupLasso)"
                )
            terms[p] = t
        if missing:
            raise ValueError(
                f"Expected the regularizer's prox parameters to be in the optimizer. Received: {missing} "
                f"are not in any of its param_groups"
            )
        for t in terms.values():
            t.prox = True
        return terms

    def release(self) -> None:
        """Hand the terms back to the loss (``regularizer.loss()`` includes them again)."""
        for t in self._terms.values():
            t.prox = False

    # -- stepping ----------------------------------------------------------------------
    def _workspace(self, p: Tensor, which: int = 0) -> Tensor:
        key = (p.dtype, p.device, which)
        buf = self._workspaces.get(key)
        if buf is None or buf.numel() < p.numel():
            # One buffer per dtype/device, sized to the largest parameter, reused by all.
            # Steps of 16-bit parameters are computed in float32: in float16 Adam's eps
            # (1e-8) underflows, lr/sqrt(v) becomes lr/0 = inf and the prox writes NaN.
            buf = torch.empty(max(t.numel() for t in self._terms if (t.dtype, t.device) == key[:2]),
                              dtype=_step_dtype(p.dtype), device=p.device)
            self._workspaces[key] = buf
        return buf[: p.numel()].view_as(p)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Inner step, then prox (forward–backward), or latent update then prox (latent)."""
        # Validated before anything changes: a NaN lr must not reach the weights.
        scales = [_penalty_scale(g) if any(p in self._terms for p in g["params"]) else 0.0
                  for g in self.param_groups]
        lrs = [_lr(g) if sc > 0 or self.mode == "latent" else 0.0
               for g, sc in zip(self.param_groups, scales, strict=True)]
        if self.mode == "latent":
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            active = [p for p in self._terms if p.grad is not None]
            for p in active:
                p.copy_(self._latent[p])
            self.inner.step()
            for group, scale, lr in zip(self.param_groups, scales, lrs, strict=True):
                for p in group["params"]:
                    if p in self._terms and p.grad is not None:
                        self._latent[p].copy_(p)
                        term = self._terms[p]
                        self._gamma[p] += lr
                        _apply_prox(term.penalty, p, self._gamma[p] * term.scale * scale)
            return loss
        loss = self.inner.step(closure)
        for group, scale in zip(self.param_groups, scales, strict=True):
            for p in group["params"]:
                term = self._terms.get(p)
                if term is None or p.grad is None or scale * term.scale == 0:
                    continue  # a zero strength: the prox is the identity
                self._prox(term, p, group, scale * term.scale)
        return loss

    def _prox(self, term: Term, p: Tensor, group: dict, scale: float) -> None:
        state = self.inner.state.get(p, {})
        # A sharded (FSDP2 DTensor) parameter: step rules see local shards; the means
        # below are taken over the whole parameter, as one process would.
        sharded = _dist.is_sharded(p)
        x = p.to_local() if sharded else p
        if sharded:
            state = _dist.local_state(state)
        pen = term.penalty
        if not sharded and self._rule in _BUILTIN_RULES and type(pen) in _FUSABLE:
            step = self._rule(group, state, x, None)
            if step is None or (self.fused and self._fused_prox(pen, p, step, scale)):
                return
            if type(pen) is L1 and _contiguous(p, step):
                self._blocked_l1(p, step, scale * pen.l1)
                return
        ws = self._workspace(x) if self._rule is not _sgd else None
        step = self._rule(group, state, x, ws)
        if step is None:
            return
        if isinstance(step, float):
            _apply_prox(pen, p, step * scale)
            return
        if self.floor > 0:
            # The floor is anchored to the largest typical sqrt(v) seen so far: when a
            # whole layer's gradients fade, its thresholds cannot grow without bound.
            # The mean is refreshed every FLOOR_REFRESH steps: it moves slowly, and
            # skipping it saves a pass over v.
            ref = self._typical.get(p)
            if self._refresh(p) or ref is None:
                typical = _dist.mean(ws, p) if sharded else ws.mean()
                ref = typical if ref is None else torch.maximum(ref, typical)
                self._typical[p] = ref
            ws.clamp_(min=ref * self.floor)
        ws.add_(step.eps / step.scale)
        coef = step.lr * scale / step.scale
        if type(pen) is L1:
            # τ = coef·l1/ws, then x − clamp(x, −τ, τ): four passes over two buffers
            # (Penalty.prox_ on one buffer needs six); the hot path of Adam + L1.
            tau = torch.div(torch.tensor(coef * pen.l1, dtype=ws.dtype, device=ws.device), ws, out=ws)
            neg = torch.neg(tau, out=self._workspace(x, 1))
            x.sub_(torch.clamp(x, min=neg, max=tau, out=neg))
            return
        lr = torch.tensor(coef, dtype=ws.dtype, device=ws.device)
        t = torch.div(lr, ws, out=ws)
        if not pen.separable:
            # Group penalties need one step per group: the mean of the group's steps.
            lay = pen.layout(p)
            if sharded:
                t = _merge_groups(_dist.slice_means(t, p, lay.dim), lay)
            else:
                t = _group_mean(t, lay)
        _apply_prox(pen, p, t)

    def _fused_prox(self, pen: Any, p: Tensor, step: AdaptiveStep, scale: float) -> bool:
        """The adaptive prox in one compiled kernel; False when it cannot run (then unfused)."""
        tensors = [p, step.moment] + ([step.centered] if step.centered is not None else [])
        if not all(t.is_contiguous() for t in tensors):
            return False
        l1 = pen.l1 if isinstance(pen, (L1, L1L2)) else 0.0
        l2 = pen.l2 if isinstance(pen, (L2, L1L2)) else 0.0
        dtype = _step_dtype(p.dtype)
        coef = step.lr * scale / step.scale
        scalars = torch.tensor([coef * l1, step.eps / step.scale, self.floor, 2.0 * l2 * coef],
                               dtype=dtype, device=p.device)
        moment = step.moment.view(-1)
        centered = None if step.centered is None else step.centered.view(-1)
        ref = self._typical.get(p)
        if ref is None:
            ref = torch.zeros((), dtype=dtype, device=p.device)  # mean sqrt(v) >= 0: max(0, mean) = mean
        refresh = self.floor > 0 and self._refresh(p, peek=True)
        try:
            new_ref = _compiled_kernel()(p.view(-1), moment, centered, ref, scalars, self.floor > 0,
                                         refresh, l2 > 0)
        except Exception as err:  # noqa: BLE001 - any compiler failure: warn once, run unfused
            self.fused = False
            warnings.warn(f"ProximalOptimizer(fused=True) could not compile its kernel ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); using the unfused prox.",
                          stacklevel=3)
            return False
        if self.floor > 0:
            self._refresh(p)
            self._typical[p] = new_ref
        return True

    def _blocked_l1(self, p: Tensor, step: AdaptiveStep, strength: float) -> None:
        """Adaptive L1 prox in blocks of BLOCK elements: the step buffers stay in cache.

        The same arithmetic as the whole-tensor path below; from memory it reads
        ``v`` and ``w`` and writes ``w`` once (eight cache-resident passes per
        block instead of eight passes over the tensor).
        """
        x, v = p.view(-1), step.moment.view(-1)
        c = None if step.centered is None else step.centered.view(-1)
        n = x.numel()
        size = min(n, BLOCK)
        dtype = _step_dtype(p.dtype)
        a, b = self._block(size, dtype, p.device, 0), self._block(size, dtype, p.device, 1)

        def root(i: int, m: int) -> Tensor:
            r = a[:m]
            if c is None:
                return torch.sqrt(v[i:i + m], out=r)
            return torch.addcmul(v[i:i + m], c[i:i + m], c[i:i + m], value=-1, out=r).sqrt_()

        low = None
        if self.floor > 0:
            ref = self._typical.get(p)
            if self._refresh(p) or ref is None:
                total = torch.zeros((), dtype=dtype, device=p.device)
                for i in range(0, n, size):
                    total += root(i, min(size, n - i)).sum()
                typical = total / n
                ref = typical if ref is None else torch.maximum(ref, typical)
                self._typical[p] = ref
            low = ref * self.floor
        coef = torch.tensor(step.lr * strength / step.scale, dtype=dtype, device=p.device)
        eps = step.eps / step.scale
        for i in range(0, n, size):
            m = min(size, n - i)
            tau = root(i, m)
            if low is not None:
                tau.clamp_(min=low)
            tau = torch.div(coef, tau.add_(eps), out=tau)
            neg = torch.neg(tau, out=b[:m])
            xi = x[i:i + m]
            xi.sub_(torch.clamp(xi, min=neg, max=tau, out=neg))

    def _block(self, size: int, dtype: torch.dtype, device: torch.device, which: int) -> Tensor:
        key = ("block", dtype, device, which)
        buf = self._workspaces.get(key)
        if buf is None or buf.numel() < size:
            buf = torch.empty(size, dtype=dtype, device=device)
            self._workspaces[key] = buf
        return buf

    def _refresh(self, p: Tensor, peek: bool = False) -> bool:
        """Whether this step takes a fresh mean for the floor (counts the step unless ``peek``)."""
        n = self._floor_steps.get(p, 0)
        if not peek:
            self._floor_steps[p] = n + 1
        return n % FLOOR_REFRESH == 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    # -- state -------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """Inner optimizer state plus the prox state (latent copies and accumulated steps)."""
        index = {p: i for i, p in enumerate(self._params())}
        return {
            "inner": self.inner.state_dict(),
            "prox": {
                "mode": self.mode,
                "floor": self.floor,
                "latent": {index[p]: z.clone() for p, z in self._latent.items()},
                "gamma": {index[p]: g for p, g in self._gamma.items()},
                "typical": {index[p]: t.clone() for p, t in self._typical.items()},
                "floor_steps": {index[p]: n for p, n in self._floor_steps.items()},
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"inner", "prox"}:
            raise ValueError(
                "Expected a ProximalOptimizer state_dict with keys 'inner' and 'prox'. "
                f"Received keys: {sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}"
            )
        prox = state_dict["prox"]
        if prox["mode"] != self.mode:
            raise ValueError(f"Expected a state_dict of mode {self.mode!r}. Received: mode={prox['mode']!r}")
        self.inner.load_state_dict(state_dict["inner"])
        # The inner load rebuilt its param_groups list: share it again.
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        params = self._params()
        with torch.no_grad():
            for i, z in prox["latent"].items():
                self._latent[params[int(i)]].copy_(z)
        for i, g in prox["gamma"].items():
            self._gamma[params[int(i)]] = float(g)
        self._typical = {params[int(i)]: t.clone() for i, t in prox.get("typical", {}).items()}
        self._floor_steps = {params[int(i)]: int(n) for i, n in prox.get("floor_steps", {}).items()}

    def __repr__(self) -> str:
        return (f"ProximalOptimizer({type(self.inner).__name__}, mode={self.mode!r}, "
                f"{len(self._terms)} prox terms)")


_FUSABLE = (L1, L2, L1L2)
FLOOR_REFRESH = 10  # steps between two means of sqrt(v) for the floor's reference
BLOCK = 1 << 20  # elements per block of the unfused adaptive L1 prox (4 MiB in float32: in L3)


def _contiguous(p: Tensor, step: AdaptiveStep) -> bool:
    return p.is_contiguous() and step.moment.is_contiguous() and (
        step.centered is None or step.centered.is_contiguous())
_KERNEL: Callable[..., Tensor] | None = None


def _adaptive_prox_kernel(x: Tensor, moment: Tensor, centered: Tensor | None, ref: Tensor,
                          scalars: Tensor, use_floor: bool, refresh: bool, has_l2: bool) -> Tensor:
    """``x ← soft_threshold(x, l1·t) / (1 + 2·l2·t)``, ``t = coef / (max(sqrt(v), floor·ref) + eps)``.

    The same arithmetic as the unfused path (``ProximalOptimizer._prox``), written
    for ``torch.compile`` to fuse into one pass that reads ``v`` and ``x`` and
    writes ``x`` (plus a pass for the floor's mean on ``refresh`` steps).
    Scalars travel as a tensor (``[coef·l1, eps, floor, 2·l2·coef]``) so that
    a changing ``lr`` or bias correction does not recompile. Returns the
    floor's reference.
    """
    coef_l1, eps, floor, two_l2_coef = scalars.unbind()
    v = moment if centered is None else torch.addcmul(moment, centered, centered, value=-1)
    root = torch.sqrt(v.to(scalars.dtype))
    new_ref = ref
    if use_floor:
        if refresh:
            new_ref = torch.maximum(ref, root.mean())
        root = torch.maximum(root, new_ref * floor)
    denom = root + eps
    tau = coef_l1 / denom
    xs = x.to(scalars.dtype)
    out = xs - torch.clamp(xs, -tau, tau)
    if has_l2:
        out = out / (1 + two_l2_coef / denom)
    x.copy_(out)
    return new_ref


def _compiled_kernel() -> Callable[..., Tensor]:
    global _KERNEL
    if _KERNEL is None:
        # dynamic: one compiled kernel for every parameter size (the inputs are flat).
        _KERNEL = torch.compile(_adaptive_prox_kernel, dynamic=True, fullgraph=True)
    return _KERNEL


def _step_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _apply_prox(pen: Any, p: Tensor, step: float | Tensor) -> None:
    if _dist.is_sharded(p):
        _dist.prox_(pen, p, step)
    else:
        pen.prox_(p, step)


def _group_mean(step: Tensor, lay: Any) -> Tensor:
    other = [d for d in range(step.ndim) if d != lay.dim]
    return _merge_groups(step.mean(dim=other) if other else step, lay)


def _merge_groups(per_slice: Tensor, lay: Any) -> Tensor:
    """Per-group mean of per-slice mean steps (slices of one tensor have one size)."""
    if lay.index is None:
        return per_slice
    sums = torch.zeros(lay.n_groups, dtype=per_slice.dtype, device=per_slice.device)
    sums.index_add_(0, lay.index, per_slice)
    counts = torch.bincount(lay.index, minlength=lay.n_groups).clamp_min(1)
    return sums / counts


@torch.no_grad()
def threshold(model: nn.Module, tol: float, params: str = "*") -> dict[str, dict[str, float]]:
    """Zero every weight with ``|w| <= tol``: for models trained with the penalty in the loss.

    An L1 penalty minimised by SGD or Adam leaves weights small, never zero;
    this makes them zero. Matching parameters are selected by a glob on their
    names. Returns, per parameter, how many values were zeroed, the zeros
    before and after, and the largest magnitude removed.
    """
    import fnmatch

    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"Expected a finite tol >= 0. Received: tol={tol!r}")
    report = {}
    for name, p in model.named_parameters():
        if not fnmatch.fnmatchcase(name, params) or not p.is_floating_point():
            continue
        mask = p.abs() <= tol
        before = int((p == 0).sum())
        removed = float(p[mask].abs().max()) if bool(mask.any()) else 0.0
        p.masked_fill_(mask, 0.0)
        after = int(mask.sum())
        report[name] = {"numel": p.numel(), "zeros_before": before, "zeros_after": after,
                        "zeroed": after - before, "max_removed": removed}
    if not report:
        raise ValueError(f"Expected params={params!r} to match parameters of the model. Received: no match")
    return report
