"""ProximalOptimizer: exact zeros with any torch optimizer.

:class:`ProximalOptimizer` wraps an optimizer. After the inner step it applies
the prox of every proximable weight term of a :class:`~sparsecraft.Regularizer`
with the step size the inner optimizer really used for each coordinate
(forward–backward splitting), or keeps a dense latent copy updated by the inner
optimizer and shows the model ``prox(latent, γ)`` with the accumulated step γ
(dual averaging, as in RDA, Xiao 2010, and torchao's prototype PAT).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import distributed as _dist
from ..regularizer import Regularizer, Term
from ._prox_step import _ProxStep
from ._rules import _BUILTIN_RULES, _lr, _penalty_scale, _rule_for
from ._state import check_state_dict
from ._support import _Support

_MODES = ("auto", "forward_backward", "latent")


class ProximalOptimizer(_Support, _ProxStep, torch.optim.Optimizer):
    """Wraps any optimizer; after its step, applies the prox of the regularizer's weight terms.

    Args:
        optimizer: the inner ``torch.optim.Optimizer``. Its ``param_groups`` are
            shared, so LR schedulers work on either object. A group may carry
            ``"penalty_scale"`` (default 1.0) to scale the strengths of its terms.
        regularizer: every weight term with a closed-form prox whose parameter
            the optimizer holds is applied by prox and leaves ``regularizer.loss()``.
        mode: ``"auto"`` (default): forward–backward for a fixed strength, and
            latent once a :class:`~sparsecraft.control.TargetSparsity` steers
            this optimizer (what measured best for both, docs/optim.md).
            ``"forward_backward"``: ``w ← prox_{tR}(inner_step(w))``,
            with ``t`` the inner optimizer's step (SGD: ``lr``; Adam/AdamW:
            ``lr/(sqrt(v̂)+eps)``; Adagrad, RMSprop from their state; any other
            optimizer: ``lr``, with a warning); ``t = 0`` where the second moment is
            0 (the coordinate never had a gradient) or not finite; its fixed points
            are those of the penalised objective. ``"latent"``: the inner optimizer
            updates a dense latent copy ``z`` of each parameter, and the model
            holds ``prox_{γR}(z)`` with ``γ = Σ lr`` over the steps taken (dual
            averaging); costs one extra copy of the penalised parameters.
            Weights changed outside the optimizer (``model.load_state_dict``, an
            in-place op) are followed: ``z`` becomes them and ``γ`` restarts at 0.
        relaxed: latent mode only: show the latent values on the support the
            prox selects, ``z·[prox_{γR}(z) ≠ 0]``, instead of the prox itself
            (no shrinkage of the survivors; relaxed lasso). Default (None): off at
            a fixed strength (the model shows the prox). Once a
            :class:`~sparsecraft.control.TargetSparsity` steers the optimizer:
            on for adaptive optimizers (Adam, AdamW, Adagrad, RMSprop: the
            latent copy moves by about ``lr`` a step and the shrinkage ate the
            survivors). With an adaptive optimizer and an L1 or L1L2 term the
            relaxed display keeps as many coordinates per tensor as the prox,
            the ones with the largest ``|z|·(sqrt v + eps)^½`` (``v`` its second
            moment): ``|z|`` alone ranks Adam's coordinates by how consistent
            their gradient was, not by how large. For SGD and optimizers
            without a step rule: on only for a sequence model (an RNN,
            attention or an embedding) without BatchNorm. Measured with SGD
            (docs/optim.md): the shrunk display emptied the transformer's
            position embedding (about 21 % accuracy at 90 % zeros against
            100 % relaxed) and cost the LSTM 5 points; but on the digits MLP
            it is 1–2 points better at 99.7–99.8 %, and
            on the BN-CNN relaxed collapses (at 98 %: 14.5 % against 57.5 % in
            10 epochs, 62.3 against 76.5 % in 30; weights feeding BatchNorm are
            scale-invariant, grow without bound when not shrunk, and a global
            threshold then empties the layers that grew least).
        floor: guard for adaptive optimizers. Where a gradient dies, ``v̂`` decays
            to 0 and the threshold ``lr·λ/(sqrt(v̂)+eps)`` explodes, zeroing the
            weight, then its neighbours (REFERENCES.md; ProxGen, Yun et al.
            2021). Each coordinate's ``sqrt(v)`` (the optimizer's raw second
            moment, before bias correction) is raised to at least ``floor``
            times the largest mean ``sqrt(v)`` the tensor has had (the mean is
            taken every ``FLOOR_REFRESH`` = 10 steps over the finite values), so
            its prox step is at most about ``1/floor`` times a typical one. 0
            disables the guard. It does not prevent the collapse of Adam's
            forward–backward prox at a large ``λ`` (docs/optim.md).
        fused: opt in to one compiled kernel (``torch.compile``) for the prox
            of L1, L2 and L1L2 terms under Adam/AdamW, Adagrad and RMSprop: it
            reads the optimizer state and the weights once and writes the
            weights once, instead of about eight memory passes. The first step
            compiles (tens of seconds on CPU; it needs a C++ compiler); if
            compiling fails, it warns once and runs the unfused path.

    Memory: with adaptive optimizers, forward–backward holds three step buffers
    of ``BLOCK`` elements for L1 terms, or two and a boolean one of the largest
    penalised parameter for other penalties; latent mode holds a copy of every
    penalised parameter.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer`` or is a
            ProximalOptimizer; ``regularizer`` is not a Regularizer; ``fused`` is
            not a bool.
        ValueError: ``mode`` unknown; ``floor`` outside [0, 1]; a prox term's
            parameter is not in the optimizer, does not require grad, or has two
            prox terms.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        regularizer: Regularizer,
        *,
        mode: str = "auto",
        floor: float = 0.1,
        fused: bool = False,
        relaxed: bool | None = None,
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
        if relaxed is not None and not isinstance(relaxed, bool):
            raise TypeError(f"Expected relaxed to be a bool or None. Received: relaxed={relaxed!r}")
        self.inner = optimizer
        self.regularizer = regularizer
        # "auto" runs forward-backward until a controller asks for the latent mode (_steer).
        self._auto = mode == "auto"
        self.mode = "forward_backward" if self._auto else mode
        self.floor = float(floor)
        self.fused = fused
        self._rule, known = _rule_for(optimizer)
        self._relaxed_arg = relaxed
        self.relaxed = bool(relaxed)
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
        # Latent mode: each parameter's ``_version`` after this optimizer last wrote it. A
        # different version at the next step means the weights were changed outside
        # (model.load_state_dict, an in-place op, threshold()): the latent copy follows.
        self._versions: dict[Tensor, int] = {}
        self._masks: dict[Tensor, Tensor] = {}  # the frozen support (freeze_support)
        self._lr_scale = 1.0  # the frozen support's learning-rate multiplier (freeze_support)
        self._group_cache: dict[Tensor, dict] = {}  # parameter -> its param group (_group_of)
        if mode == "latent":
            self._start_latent()

    @torch.no_grad()
    def _start_latent(self) -> None:
        self.mode = "latent"
        for p in self._terms:
            self._latent[p] = p.detach().clone()
            self._gamma[p] = 0.0
            self._versions[p] = p._version

    def _steer(self) -> None:
        """Called by a controller: mode ``"auto"`` switches to latent from the current weights,
        and ``relaxed=None`` chooses the display (see ``relaxed``)."""
        if self._auto and self.mode != "latent":
            self._start_latent()
        if self._relaxed_arg is None:
            self.relaxed = adaptive(self) or _unshrunk_sequence_model(self.regularizer.model)

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
                missing.append(t.where if p.requires_grad else f"{t.where} (frozen)")
                continue
            if not p.requires_grad:
                raise ValueError(
                    f"Expected parameters with requires_grad=True for prox terms. Received: {t.where} "
                    f"does not require grad (frozen); leave frozen parameters out with "
                    f"add_weight(..., trainable_only=True)"
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
                + ("; leave frozen parameters out with add_weight(..., trainable_only=True)"
                   if any(m.endswith("(frozen)") for m in missing) else "")
            )
        for t in terms.values():
            t.prox = True
        return terms

    def release(self) -> None:
        """Hand the terms back to the loss (``regularizer.loss()`` includes them again)."""
        for t in self._terms.values():
            t.prox = False

    # -- stepping ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Inner step, then prox (forward–backward), or latent update then prox (latent).

        Raises:
            ValueError: a param group's ``lr`` or ``penalty_scale`` is missing, NaN,
                infinite or negative (before the inner step).
        """
        # Validated before anything changes: a NaN lr must not reach the weights.
        scales = [_penalty_scale(g) if any(p in self._terms for p in g["params"]) else 0.0
                  for g in self.param_groups]
        lrs = [_lr(g) if sc > 0 or self.mode == "latent" else 0.0
               for g, sc in zip(self.param_groups, scales, strict=True)]
        if self._masks:
            return self._frozen_step(closure)
        if self.mode == "latent":
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            active = [p for p in self._terms if p.grad is not None]
            for p in active:
                self._follow(p)
                p.copy_(self._latent[p])
            self.inner.step()
            for group, scale, lr in zip(self.param_groups, scales, lrs, strict=True):
                for p in group["params"]:
                    if p in self._terms and p.grad is not None:
                        self._latent[p].copy_(p)
                        term = self._terms[p]
                        self._gamma[p] += lr
                        self._show_latent(term, p, self._gamma[p] * term.scale * scale)
                        self._versions[p] = p._version
            return loss
        loss = self.inner.step(closure)
        for group, scale in zip(self.param_groups, scales, strict=True):
            for p in group["params"]:
                term = self._terms.get(p)
                if term is None or p.grad is None or scale * term.scale == 0:
                    continue  # a zero strength: the prox is the identity
                self._prox(term, p, group, scale * term.scale)
        return loss

    def _follow(self, p: Tensor) -> None:
        """Latent mode: restart from the weights when they were changed outside this optimizer.

        ``prox_{γR}(z)`` has no inverse in general, so the latent copy becomes the new
        weights and ``γ`` restarts at 0 for this parameter: the next step is the step a
        ProximalOptimizer built now would take (the inner optimizer's state is kept).
        Without it, the stale latent copy overwrote the new weights (issue 10, item 3).
        """
        seen = self._versions.get(p)
        if seen is not None and p._version != seen:
            self._latent[p].copy_(p)
            self._gamma[p] = 0.0

    @torch.no_grad()
    def _display(self, p: Tensor, value: Tensor) -> None:
        """Latent mode: write what the model shows for ``p`` (a controller's prox of the latent copy).

        Unlike a change made outside, this keeps the latent copy and ``γ``: the version
        recorded here tells the next step that the optimizer's own side wrote the weights.
        """
        p.copy_(value)
        if p in self._versions:
            self._versions[p] = p._version

    @torch.no_grad()
    def _cut(self, p: Tensor, mask: Tensor) -> None:
        """Set the weights of ``p`` to zero where ``mask`` (a controller's final cut; local shards).

        Latent mode: the latent copy is zeroed there too (``prox(0) = 0`` under every
        penalty, relaxed or not), so what the model shows stays the prox of the latent
        copy at the accumulated ``γ``, and the version recorded here keeps the next step
        from taking the cut for an outside change (which would restart ``z`` and ``γ``).
        """
        z = self._latent.get(p)
        for x in (p,) if z is None else (p, z):
            (x.to_local() if _dist._is_dtensor(x) else x).masked_fill_(mask, 0.0)
        if p in self._versions:
            self._versions[p] = p._version

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
                "masks": self._support_state(index),
                "lr_scale": self._lr_scale,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned: all of it, or nothing.

        Every key, index, shape, dtype and setting is checked before anything is
        loaded. The saved ``floor`` is restored (as torch restores ``lr``); the
        restored latent copies are trusted at the next step, whether the model's
        weights are loaded before or after this call.

        Raises:
            ValueError: the state_dict is not one of this optimizer's: other keys or
                mode, a floor outside [0, 1], other parameter groups or indices, a
                tensor of another shape or dtype, a non-finite or negative γ or floor
                reference. The optimizer is then unchanged.
        """
        prox = state_dict.get("prox") if isinstance(state_dict, dict) else None
        # Mode "auto" saved after a controller switched it to latent: switch now (undone on error).
        switched = self._auto and self.mode != "latent" and isinstance(prox, dict) \
            and prox.get("mode") == "latent"
        if switched:
            self._start_latent()
        try:
            checked = check_state_dict(self, state_dict)
            masks = self._load_support(prox.get("masks", {}), self._params())
            lr_scale = self._check_lr_scale(prox.get("lr_scale", 1.0))
        except ValueError:
            if switched:
                self.mode = "forward_backward"
                self._latent.clear()
                self._gamma.clear()
                self._versions.clear()
            raise
        self.inner.load_state_dict(state_dict["inner"])
        # The inner load rebuilt its param_groups list: share it again.
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        self.floor = checked.floor
        with torch.no_grad():
            for p, z in checked.latent.items():
                self._latent[p].copy_(z)
        self._gamma.update(checked.gamma)
        self._typical = checked.typical
        self._floor_steps = checked.floor_steps
        self._versions.clear()  # the latent copies just loaded define the weights
        self._masks = masks
        self._lr_scale = lr_scale if masks else 1.0

    def __repr__(self) -> str:
        return (f"ProximalOptimizer({type(self.inner).__name__}, mode={self.mode!r}, "
                f"{len(self._terms)} prox terms)")


_SEQUENCE = (torch.nn.RNNBase, torch.nn.MultiheadAttention, torch.nn.Embedding, torch.nn.EmbeddingBag)


def _unshrunk_sequence_model(model: torch.nn.Module | None) -> bool:
    """SGD's display: relaxed for a model with recurrence, attention or embeddings and no BatchNorm.

    Measured on the four embedded models (docs/optim.md): shrinkage compounds
    through recurrence, gates and attention (products of shrunk weights) and emptied
    the transformer's position embedding; in the ReLU MLP and the BN-CNN it is the
    better display, and with BatchNorm the unshrunk one collapses.
    """
    if model is None:
        return False
    return any(isinstance(m, _SEQUENCE) for m in model.modules()) and not has_batchnorm(model)


def adaptive(opt: ProximalOptimizer) -> bool:
    """Whether ``opt`` wraps an adaptive optimizer (Adam, AdamW, Adagrad, RMSprop): a per-coordinate step."""
    return opt._rule in _BUILTIN_RULES


def has_batchnorm(model: torch.nn.Module | None) -> bool:
    """Whether ``model`` holds a BatchNorm layer (the controller's defaults depend on it)."""
    return model is not None and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
