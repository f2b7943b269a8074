"""Where penalties apply: parameters, module outputs (activities) and raw tensors.

A :class:`Regularizer` binds penalties to places in a model. It never replaces
a parameter or adds state to the model: weight terms keep a reference to the
parameter, activity terms a forward hook on the module, and :meth:`remove`
leaves the model exactly as it was.

Semantics follow Keras (see DESIGN.md): a weight term is ``penalty(W)``,
recomputed from the current parameter at every :meth:`Regularizer.loss`; an
activity term is ``penalty(output) / batch_size`` for every call of the module
during the last forward of the model (for a tuple output, its first tensor by
default: see :meth:`Regularizer.add_activity`).
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from . import penalties as _penalties
from . import select as _select
from ._outputs import check_output_selector, select_outputs
from ._space import ModelSpace
from ._term import Explanation, Term

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
        self._seen_forward = False  # an outermost forward seen by the hooks

    # -- adding terms ----------------------------------------------------------------
    @property
    def terms(self) -> tuple[Term, ...]:
        return tuple(self._terms)

    def add_weight(
        self,
        selector: Any,
        penalty: Any,
        *,
        exclude: Any = None,
        trainable_only: bool = False,
    ) -> list[Term]:
        """Penalise parameters: ``penalty(W)`` recomputed at every :meth:`loss`.

        One parameter has one term: a tied weight (``out.weight = emb.weight``)
        matched under several names gets one term, whose ``where`` in
        :meth:`explain` lists every name; a parameter that already has a term
        with the same penalty is skipped with a warning naming that term, and
        one with a different penalty raises.

        Args:
            selector: a parameter name (``"fc1.weight"``), a glob
                (``"encoder.*.weight"``), a module name (its ``weight``), a module
                type (``nn.Linear``: every such module's ``weight``), a module
                object, a ``(module_or_type, "bias")`` pair, a Parameter, a
                predicate ``(name, param) -> bool``, a :mod:`sparsecraft.select`
                selection (``select.matrices()``) or a list of these; on the torch
                backend also Keras layers, layer classes and variables
                (see :mod:`sparsecraft.select`).
            penalty: a Penalty, or anything :func:`sparsecraft.penalties.get` takes.
            exclude: parameters to leave out, in the same forms; a module, module
                name or module type here stands for every parameter it holds
                (``exclude=(nn.LayerNorm, nn.BatchNorm2d)``, ``exclude=select.norms()``).
            trainable_only: skip parameters with ``requires_grad=False`` (frozen
                layers), which a :class:`~sparsecraft.ProximalOptimizer` cannot update.

        Returns:
            The new terms, one per selected parameter.

        Raises:
            ValueError: the selection matches nothing (or only excluded or frozen
                parameters), or a parameter already has a term with another penalty.
        """
        penalty = _penalties.get(penalty)
        if not isinstance(trainable_only, bool):
            raise TypeError(f"Expected trainable_only to be a bool. Received: trainable_only={trainable_only!r}")
        space = self._space()
        found = _select.resolve(space, selector)
        unique: dict[int, tuple[str, Tensor]] = {}
        for name, p in found:
            unique.setdefault(id(p), (name, p))
        chosen = list(unique.values())
        if exclude is not None:
            excluded = {id(p) for _, p in _select.resolve(space, exclude, whole=True)}
            chosen = [(n, p) for n, p in chosen if id(p) not in excluded]
        frozen = [n for n, p in chosen if not p.requires_grad]
        if trainable_only:
            chosen = [(n, p) for n, p in chosen if p.requires_grad]
        if not chosen:
            why = (f"matches {len(unique)} parameter(s), none left after exclude={exclude!r}"
                   + (f" and trainable_only=True (frozen: {frozen})" if trainable_only else "")
                   if unique else "matches no parameter of the model")
            raise ValueError(
                f"Expected a selection that leaves parameters to penalise. Received: {selector!r}, which {why}"
            )
        existing = {id(t.target): t for t in self._terms if t.kind == "weight"}
        clashes = [
            f"{n} already has {existing[id(p)].name} = {existing[id(p)].penalty!r}"
            for n, p in chosen
            if id(p) in existing and not _same_penalty(existing[id(p)].penalty, penalty)
        ]
        if clashes:
            raise ValueError(
                f"Expected one penalty per parameter (one parameter = one term). Received: "
                f"{penalty!r} for parameters with another penalty: {'; '.join(clashes)}. Put both "
                f"in one penalty (e.g. L1L2) on one term, or exclude= the parameter here"
            )
        new = []
        for n, p in chosen:
            if id(p) in existing:
                warnings.warn(
                    f"{n} is the tensor of {existing[id(p)].name}, which already has {penalty!r}: "
                    f"skipped (one parameter = one term)",
                    stacklevel=2,
                )
                continue
            aliases = tuple(a for a in space.names_of(p) if a != n)
            new.append(Term("weight", n, penalty, p, aliases=aliases))
        self._terms.extend(new)
        return new

    def add_activity(
        self,
        module: Any,
        penalty: Any,
        reduction: str = "batch",
        *,
        output: Any = None,
        batch_dim: int | None = None,
    ) -> Term:
        """Penalise a module's output: ``penalty(output) / batch_size`` per call.

        A module that returns a tuple (``nn.LSTM``: ``(out, (h_n, c_n))``,
        ``nn.MultiheadAttention``: ``(attn_output, attn_weights)``) has its first
        floating tensor penalised, the one a Keras layer returns; the batch size
        is read from the module's batch dimension (dim 1 for RNN, attention and
        transformer layers with ``batch_first=False``, and for ``h_n``/``c_n``).

        Args:
            module: the module, its name in the model, or (torch backend) a Keras layer.
            penalty: a Penalty, or anything :func:`sparsecraft.penalties.get` takes.
            reduction: ``"batch"`` (default, Keras ≥ 3.14), ``"sum"`` (Keras 3.0–3.13),
                ``"mean"`` (per element).
            output: which part of a tuple/dict output: ``None`` (the first floating
                tensor), an index, a name (``"h_n"``, ``"c_n"``, ``"attn_output_weights"``,
                a dict key or namedtuple field), ``"all"`` (every floating tensor, each
                divided by its own batch size: Keras's rule for multi-output layers),
                or a callable ``output -> tensor`` (batch dim 0 unless ``batch_dim``).
            batch_dim: the dimension holding the batch, overriding the module's.

        Returns:
            The new term.
        """
        penalty = _penalties.get(penalty)
        if reduction not in _REDUCTIONS:
            raise ValueError(f"Expected reduction in {_REDUCTIONS}. Received: reduction={reduction!r}")
        if batch_dim is not None and (isinstance(batch_dim, bool) or not isinstance(batch_dim, int)):
            raise TypeError(f"Expected batch_dim to be an int or None. Received: batch_dim={batch_dim!r}")
        name, mod = self._module(module)
        check_output_selector(mod, output)
        term = Term("activity", name, penalty, mod, reduction=reduction, part=_part_label(output))

        def hook(m: Any, _args: Any, out: Any) -> None:
            term._capture(select_outputs(m, out, output, batch_dim))

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
            if t.kind == "activity" and not self._seen_forward:
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
                    "term": t.name, "kind": t.kind, "where": t.where_text, "shape": t.shape,
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
                self._seen_forward = True
                for t in self._terms:
                    if t.kind == "activity":
                        t.captured = []
            self._depth += 1

        def post(_m: nn.Module, _args: Any, _out: Any) -> None:
            self._depth -= 1

        self._handles.append(root.register_forward_pre_hook(pre))
        # always_call: the depth count must come back down when a forward raises.
        self._handles.append(root.register_forward_hook(post, always_call=True))
        self._root_hooked.add(id(root))

    def _space(self) -> ModelSpace:
        # Built per call: parameters and modules may be added to the model between calls.
        return ModelSpace.of(self.model)

    def _module(self, module: Any) -> tuple[str, Any]:
        space = self._space()
        if isinstance(module, str):
            for n, m in space.modules:
                if n == module:  # named by its first name (a Keras layer: its path)
                    return space.module_name(m) or n, m
            close = difflib.get_close_matches(module, [n for n, _ in space.modules if n], n=5)
            raise ValueError(f"Expected a module name of the model. Received: {module!r}. Close names: {close}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"Expected an nn.Module or a module name. Received: {type(module).__name__}")
        name = space.module_name(module)
        if name is None and self.model is not None:
            raise ValueError(
                f"Expected a {type(module).__name__} that belongs to the regularizer's model. "
                f"Received: one that is not among its {len(space.modules)} entries"
            )
        keras_name = getattr(module, "name", None) if self.model is None else None
        return name or (keras_name if isinstance(keras_name, str) else None) or type(module).__name__, module


def _same_penalty(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a.get_config() == b.get_config()


def _part_label(output: Any) -> str | None:
    if output is None:
        return None
    if callable(output) and not isinstance(output, str):
        return getattr(output, "__name__", type(output).__name__)
    return str(output)


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
        # A Keras layer's "weight" is its kernel (or embeddings): Keras's kernel_regularizer.
        reg.add_weight((module, reg._space().default_attr(module)), weight)
    if bias is not None:
        reg.add_weight((module, "bias"), bias)
    if activity is not None:
        reg.add_activity(module, activity, reduction=reduction)
    return reg
