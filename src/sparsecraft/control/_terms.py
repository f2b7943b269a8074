"""Which terms a :class:`~sparsecraft.control.TargetSparsity` can steer: prox terms whose penalty makes exact zeros."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..optim import ProximalOptimizer
from ..regularizer import Regularizer, Term


def _probe_makes_zeros(term: Term) -> bool:
    """Whether the term's prox zeros an all-ones tensor of its shape at a huge step.

    ``makes_zeros`` is a class property; a strength of 0 (``L1(0)``,
    ``L1L2(l1=0, l2=…)``) makes none, whatever the multiplier. float64, so
    that an L2 shrink by 1/(1 + 2·t·l2) cannot underflow to a false zero.
    """
    if not (term.penalty.proximable and term.penalty.makes_zeros):
        return False
    ones = torch.ones(term.target.shape, dtype=torch.float64)
    return bool((term.penalty.prox(ones, 1e30) == 0).any())


def choose_terms(source: Any, terms: Iterable[Term | str] | None) -> list[Term]:
    """The terms to control: ``terms`` checked, or every prox weight term whose prox makes zeros.

    ``source`` is a ProximalOptimizer (only the terms on parameters it owns) or
    a Regularizer. Terms minimised through the loss, or whose prox only
    shrinks, are refused with the reason.
    """
    if isinstance(source, ProximalOptimizer):
        reg = source.regularizer
        owned = {id(p) for g in source.param_groups for p in g["params"]}
        candidates = [t for t in reg.terms if t.prox and t.kind == "weight" and id(t.target) in owned]
    elif isinstance(source, Regularizer):
        reg = source
        candidates = [t for t in reg.terms if t.prox and t.kind == "weight"]
    else:
        raise TypeError(
            "Expected a sparsecraft.ProximalOptimizer or a Regularizer. "
            f"Received: {type(source).__name__}"
        )
    in_loss = [t.name for t in reg.terms if not t.prox]
    if terms is None:
        chosen = [t for t in candidates if _probe_makes_zeros(t)]
        if not chosen:
            why = []
            if in_loss:
                why.append(
                    f"{in_loss} are minimised through the loss, which makes weights small but never "
                    f"exactly zero (wrap the optimizer: ProximalOptimizer(opt, reg))"
                )
            no_zero = [f"{t.name} ({t.penalty.formula()})" for t in candidates]
            if no_zero:
                why.append(f"the prox of {no_zero} makes no zeros (L2 only shrinks; a strength of 0 "
                           f"does nothing)")
            raise ValueError(
                "Expected prox terms whose penalty makes exact zeros (L1, L1L2 with l1 > 0, L0, MCP, "
                f"GroupLasso, SparseGroupLasso). Received: {'; '.join(why) or 'no terms'}; "
                "no strength can reach a target sparsity"
            )
        return chosen
    chosen = []
    for item in terms:
        if isinstance(item, Term):
            matches = [t for t in reg.terms if t is item]
        elif isinstance(item, str):
            matches = [t for t in reg.terms if item in (t.name, t.where)]
        else:
            raise TypeError(f"Expected Term objects or term names. Received: {type(item).__name__}")
        if not matches:
            raise ValueError(
                f"Expected terms of the regularizer. Received: {item!r}; its terms are "
                f"{[t.name for t in reg.terms]}"
            )
        for t in matches:
            if t not in candidates:
                raise ValueError(
                    f"Expected terms applied by a ProximalOptimizer (exact zeros). Received: {t.name} is "
                    f"minimised through the loss, which makes weights small but never exactly zero"
                )
            if not _probe_makes_zeros(t):
                raise ValueError(
                    f"Expected terms whose prox makes exact zeros. Received: {t.name} with "
                    f"{t.penalty.formula()}, which only shrinks; no strength reaches a target sparsity"
                )
            if t not in chosen:
                chosen.append(t)
    if not chosen:
        raise ValueError("Expected at least one term to control. Received: terms=[]")
    return chosen
