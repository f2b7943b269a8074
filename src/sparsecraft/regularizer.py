"""Where penalties apply: parameters, module outputs (activities) and raw tensors.

A :class:`Regularizer` binds penalties to places in a model. It never replaces
a parameter or adds state to the model: weight terms keep a reference to the
parameter, activity terms a forward hook on the module, and :meth:`remove`
leaves the model exactly as it was.

Semantics follow Keras (see DESIGN.md): a weight term is ``penalty(W)``,
recomputed from the current parameter at every :meth:`Regularizer.loss`; an
activity term is ``penalty(output) / batch_size`` for every output of every
call of the module during the last forward of the model.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any

import torch
from torch import Tensor, nn

from . import penalties as _penalties
from ._term import Explanation, Term, _tensors

__all__ = ["Regularizer", "Term", "Explanation", "regularize"]

_REDUCTIONS = ("batch", "sum", "mean")


class Regularizer:
    """Binds penalties to a model's parameters, module outputs and tensors.

    Args:
        model: the model whose parameters and modules selectors refer to. Its
            forward marks the start of each step for activity terms: captured
            values are cleared at the start of each outermost forward.
        check_finite: make :meth:`loss` raise, naming the term, when a term is
            NaN or infinite (one host sync per call).

    Example:
        >>> reg = Regularizer(model)
        >>> reg.add_weight("*.weight", "l1:1e-4")
        >>> reg.add_activity("encoder", L1(1e-3))
        >>> loss = criterion(model(x), y) + reg.loss()
    """

    def __init__(self, model: nn.Module | None = None, *, check_finite: bool = True):
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"Expected an nn.Module or None. Received: {type(model).__name__}")
        self.model = model
        self.check_finite = check_finite
        self._terms: list[Term] = []
        self._handles: list[Any] = []
        self._root_hooked: set[int] = set()
        self._depth = 0
        self._forwards = 0  # outermost forwards seen by the hooks

    # -- adding terms ----------------------------------------------------------------
    @property
    def terms(self) -> tuple[Term, ...]:
        return tuple(self._terms)

    def add_weight(self, selector: Any, penalty: Any) -> list[Term]:
        """Penalise parameters: ``penalty(W)`` recomputed at every :meth:`loss`.

        Args:
            selector: a parameter name (``"fc1.weight"``), a glob
                (``"encoder.*.weight"``), a module name (its ``weight``), a module
                type (``nn.Linear``: every such module's ``weight``), a module
                object, a ``(module_or_type, "bias")`` pair, or a Parameter.
            penalty: a Penalty, or anything :func:`sparsecraft.penalties.get` takes.

        Returns:
            The new terms, one per matched parameter.
        """
        penalty = _penalties.get(penalty)
        new = [Term("weight", name, penalty, p) for name, p in self._select(selector)]
        self._terms.extend(new)
        return new

    def add_activity(self, module: nn.Module | str, penalty: Any, reduction: str = "batch") -> Term:
        """Penalise a module's output: ``penalty(output) / batch_size`` per call.

        Args:
            module: the module, or its name in the model.
            penalty: a Penalty, or anything :func:`sparsecraft.penalties.get` takes.
            reduction: ``"batch"`` (default, Keras ≥ 3.14), ``"sum"`` (Keras 3.0–3.13),
                ``"mean"`` (per element).
        """
        penalty = _penalties.get(penalty)
        if reduction not in _REDUCTIONS:
            raise ValueError(f"Expected reduction in {_REDUCTIONS}. Received: reduction={reduction!r}")
        name, mod = self._module(module)
        term = Term("activity", name, penalty, mod, reduction=reduction)

        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            for t in _tensors(output):
                term._capture(t)

        self._handles.append(mod.register_forward_hook(hook))
        self._hook_root(self.model if self.model is not None else mod)
        self._terms.append(term)
        return term

    def add_tensor(self, tensor: Tensor, penalty: Any, name: str = "tensor") -> Term:
        """Penalise any tensor (a latent code, an embedding table): ``penalty(tensor)``."""
        penalty = _penalties.get(penalty)
        if not isinstance(tensor, Tensor):
            raise TypeError(f"Expected a torch.Tensor. Received: {type(tensor).__name__}")
        term = Term("tensor", name, penalty, tensor)
        self._terms.append(term)
        return term

    # -- values ----------------------------------------------------------------------
    def loss(self) -> Tensor:
        """The differentiable sum of every term not applied by prox."""
        total: Tensor | None = None
        for t in self._terms:
            if t.prox:
                continue
            if t.kind == "activity" and self._forwards == 0:
                # A model compiled (torch.compile) before the terms were added runs its
                # compiled code without their hooks: dynamo does not guard on hooks
                # (torch._dynamo.config.skip_nnmodule_hook_guards), so nothing is captured.
                raise ValueError(
                    f"Expected a forward of the model before loss() (activity terms are "
                    f"computed from its outputs). Received: no forward seen by the hooks of "
                    f"{t.name}. If the model was compiled before the terms were added, add them "
                    f"before torch.compile or call torch._dynamo.reset()"
                )
            v = t.current()
            total = v if total is None else total + v
        if total is None:
            return torch.zeros(())
        if self.check_finite and not bool(torch.isfinite(total)):
            self._raise_not_finite()
        return total

    def value(self) -> Tensor:
        """The detached total of every term, prox terms included (on the CPU, in the terms' dtype)."""
        total = torch.zeros(())
        with torch.no_grad():
            for t in self._terms:
                total = total + t.current().detach().cpu()
        return total

    def explain(self) -> Explanation:
        """A table of the terms: where each applies, its formula with numbers, its value."""
        rows = []
        with torch.no_grad():
            for t in self._terms:
                rows.append({
                    "term": t.name, "kind": t.kind, "where": t.where, "shape": t.shape,
                    "formula": t.formula(), "mode": "prox" if t.prox else "loss",
                    "value": float(t.current()),
                })
        return Explanation(rows, sum(r["value"] for r in rows))

    def parameters(self) -> list[nn.Parameter]:
        """The parameters that have weight terms (each once)."""
        seen: dict[int, nn.Parameter] = {}
        for t in self._terms:
            if t.kind == "weight":
                seen.setdefault(id(t.target), t.target)
        return list(seen.values())

    def state_dict(self) -> dict[str, Any]:
        """What training changes in a regularizer, for checkpoints: each term's ``scale``.

        Penalties, selectors and hooks are built by your script; only the scales
        (adjusted by :class:`~sparsecraft.TargetSparsity` or by hand) change.
        """
        return {"terms": [t.name for t in self._terms], "scales": [float(t.scale) for t in self._terms]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the term scales saved by :meth:`state_dict` (same terms, same order)."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"terms", "scales"}:
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"Expected a Regularizer state_dict with keys ['scales', 'terms']. Received: {got}")
        names = [t.name for t in self._terms]
        if list(state_dict["terms"]) != names or len(state_dict["scales"]) != len(names):
            raise ValueError(
                f"Expected a state_dict of the terms {names}. Received: one of {list(state_dict['terms'])}"
            )
        scales = [_penalties.check_strength("scale", s) for s in state_dict["scales"]]
        for t, s in zip(self._terms, scales, strict=True):
            t.scale = s

    def remove(self) -> None:
        """Detach every hook and forget every term; the model is left as it was."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._root_hooked.clear()
        for t in self._terms:
            t.prox = False
            t.captured.clear()
        self._terms.clear()

    def __repr__(self) -> str:
        return f"Regularizer({len(self._terms)} terms: {', '.join(t.name for t in self._terms)})"

    # -- internals -------------------------------------------------------------------
    def _raise_not_finite(self) -> None:
        for t in self._terms:
            if not t.prox and not bool(torch.isfinite(t.current().detach()).all()):
                raise FloatingPointError(
                    f"Expected finite regularization terms. Received: {t.name} = "
                    f"{float(t.current().detach())} ({t.formula()}); check the {t.kind} it penalises"
                )
        raise FloatingPointError("Expected a finite regularization loss. Received: a non-finite sum")

    def _hook_root(self, root: nn.Module) -> None:
        if id(root) in self._root_hooked:
            return

        def pre(_m: nn.Module, _args: Any) -> None:
            if self._depth == 0:
                self._forwards += 1
                for t in self._terms:
                    if t.kind == "activity":
                        t.captured.clear()
            self._depth += 1

        def post(_m: nn.Module, _args: Any, _out: Any) -> None:
            self._depth -= 1

        self._handles.append(root.register_forward_pre_hook(pre))
        # always_call: the depth count must come back down when a forward raises.
        self._handles.append(root.register_forward_hook(post, always_call=True))
        self._root_hooked.add(id(root))

    def _named_params(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.model.named_parameters()) if self.model is not None else []

    def _name_of(self, obj: Any, named: list[tuple[str, Any]], default: str) -> str:
        for n, o in named:
            if o is obj:
                return n
        if self.model is not None:
            raise ValueError(
                f"Expected a {type(obj).__name__} that belongs to the regularizer's model. "
                f"Received: one that is not among its {len(named)} entries"
            )
        return default

    def _module(self, module: nn.Module | str) -> tuple[str, nn.Module]:
        mods = list(self.model.named_modules()) if self.model is not None else []
        if isinstance(module, str):
            for n, m in mods:
                if n == module:
                    return n, m
            close = difflib.get_close_matches(module, [n for n, _ in mods if n], n=5)
            raise ValueError(f"Expected a module name of the model. Received: {module!r}. Close names: {close}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"Expected an nn.Module or a module name. Received: {type(module).__name__}")
        return self._name_of(module, mods, type(module).__name__) or type(module).__name__, module

    def _select(self, selector: Any) -> list[tuple[str, nn.Parameter]]:
        named = self._named_params()
        pname = "weight"
        pair = isinstance(selector, tuple) and len(selector) == 2 and isinstance(selector[1], str)
        if pair:
            selector, pname = selector
        if isinstance(selector, nn.Parameter):
            return [(self._name_of(selector, named, "param"), selector)]
        if isinstance(selector, str):
            if pair:
                # ("encoder.*", "bias") names modules: their `bias`, never their other parameters.
                selector = f"{selector}.{pname}" if selector else pname
            if any(c in selector for c in "*?["):
                found = [(n, p) for n, p in named if fnmatch.fnmatchcase(n, selector)]
            else:
                found = [(n, p) for n, p in named if n == selector]
                if not found and self.model is not None and not pair:
                    found = [(n, p) for n, p in named if n == f"{selector}.{pname}"]
            if not found:
                close = difflib.get_close_matches(selector, [n for n, _ in named], n=5, cutoff=0.4)
                raise ValueError(
                    f"Expected a selector that matches parameters of the model. Received: {selector!r}, "
                    f"which matches none. Close parameter names: {close or [n for n, _ in named][:8]}"
                )
            return found
        if isinstance(selector, type) and issubclass(selector, nn.Module):
            if self.model is None:
                raise ValueError("Expected a Regularizer built on a model to select by module type. Received: model=None")
            found = [
                (f"{mn}.{pname}" if mn else pname, getattr(m, pname))
                for mn, m in self.model.named_modules()
                if isinstance(m, selector) and isinstance(getattr(m, pname, None), nn.Parameter)
            ]
            if not found:
                raise ValueError(
                    f"Expected the model to hold {selector.__name__} modules with a `{pname}` parameter. "
                    f"Received: none found"
                )
            return found
        if isinstance(selector, nn.Module):
            p = getattr(selector, pname, None)
            if not isinstance(p, nn.Parameter):
                have = [n for n, _ in selector.named_parameters(recurse=False)]
                raise ValueError(
                    f"Expected {type(selector).__name__} to have a parameter `{pname}`. Received: it has {have}"
                )
            return [(self._name_of(p, named, pname), p)]
        raise TypeError(
            "Expected a parameter name, glob, module, module type, (module, name) pair or Parameter. "
            f"Received: {type(selector).__name__}"
        )


def regularize(
    module: nn.Module,
    weight: Any = None,
    bias: Any = None,
    activity: Any = None,
    *,
    reduction: str = "batch",
) -> Regularizer:
    """The Keras-style shortcut: ``kernel_regularizer``, ``bias_regularizer``, ``activity_regularizer``.

    ``regularize(nn.Linear(4, 3), weight=L1(0.1))`` is Keras's
    ``Dense(3, kernel_regularizer=L1(0.1))``. Returns the :class:`Regularizer`;
    add its :meth:`~Regularizer.loss` to your loss.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"Expected reduction in {_REDUCTIONS}. Received: reduction={reduction!r}")
    reg = Regularizer(module)
    if weight is not None:
        reg.add_weight((module, "weight"), weight)
    if bias is not None:
        reg.add_weight((module, "bias"), bias)
    if activity is not None:
        reg.add_activity(module, activity, reduction=reduction)
    return reg
