"""Zeros in activations: :class:`ActivationMonitor` and its forward hooks."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._counts import _check_tol, _fraction, _unknown_name_error

__all__ = ["ACTIVATION_TYPES", "ActivationMonitor"]

# Modules treated as "activations" by ActivationMonitor's default selection.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Tanhshrink,
    nn.Threshold,
    nn.LogSigmoid,
    nn.GLU,
)


def _is_keras(model: Any) -> bool:
    # Recognised without importing keras: only an already loaded keras can have made it.
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(model, keras.layers.Layer)


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


class _Counts:
    """Running counts of one module's outputs; device tensors are updated in place."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.elements = 0  # from shapes: known on the host, no synchronisation
        self.samples = 0
        self.nonzeros: torch.Tensor | None = None
        # One "ever active" mask per output width, in first-seen order (see ActivationMonitor).
        self.active: dict[int, torch.Tensor] = {}


class ActivationMonitor:
    """Counts zeros in module outputs with forward hooks, keeping no activations.

    Per monitored module it accumulates, across forward calls: elements seen,
    elements with ``|a| > tol`` (non-zeros), samples seen (size of dim 0) and
    a per-unit "ever active" flag. The counts live on the activation's device
    and are updated in place under ``torch.no_grad()``; nothing synchronises
    with the host until :meth:`stats` is called.

    Unit rule: for an output of shape ``[N, C]`` a unit is a column (last
    dim); for ``[N, C, ...]`` (convolution-style) a unit is a channel (dim 1).
    Pass ``unit_dim=-1`` for sequence outputs ``[N, T, D]`` whose units are the
    last dim. A 1-D output ``[N]`` is N samples of one unit, a 0-d output one
    sample of one unit. Tuple/list outputs use their first tensor.

    A module called several times per forward counts every call (``samples``
    grows by the batch size per call). A module reused after layers of
    different widths (one ``nn.ReLU`` shared by a block) keeps one "ever
    active" mask per output width, and ``n_units`` is their sum; uses with the
    same width share a mask, so such a unit is dead only if it is zero at all
    of them. Monitor the distinct producing modules to separate them.

    Hooks are registered at construction; :meth:`remove` (or leaving a
    ``with`` block) removes them and keeps the counts.

    Args:
        model: The model.
        modules: Which modules to watch: names, module objects, module types,
            or a list mixing them. Default: every activation module
            (:data:`ACTIVATION_TYPES`), or every leaf module if there is none.
        tol: Outputs with ``|a| <= tol`` count as zero.
        unit_dim: Dimension holding the units for outputs with ``ndim >= 2``
            (default 1, which is the last dim of ``[N, C]``).

    Raises:
        TypeError: On a ``modules`` item of the wrong type.
        ValueError: If ``tol`` is invalid, a name is not a module of the model
            (the error lists close names), or a module/type is not found.

    Example:
        >>> with ActivationMonitor(model) as mon:
        ...     for x, _ in loader:
        ...         model(x)
        >>> mon.stats()["1"]["dead_units"]
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Any = None,
        tol: float = 0.0,
        unit_dim: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module) or _is_keras(model):
            # On the torch backend a Keras model is an nn.Module, but the layers of a Sequential
            # or Functional model are not its torch children: no hook would see them.
            raise TypeError(
                "Expected an nn.Module whose layers are its torch submodules. Received: "
                f"model={type(model).__name__}"
                + (" (a Keras model: its layers are not torch submodules, so no forward hook "
                   "would see them; read activations with a Keras sub-model "
                   "keras.Model(model.inputs, layer.output) instead)" if _is_keras(model) else "")
            )
        if unit_dim is not None and (isinstance(unit_dim, bool) or not isinstance(unit_dim, int)):
            raise TypeError(
                f"Expected unit_dim to be an int or None. Received: unit_dim={unit_dim!r}"
            )
        self.tol = _check_tol(tol)
        self.unit_dim = 1 if unit_dim is None else unit_dim
        self.model = model
        self._selected = _select_modules(model, modules)
        self._counts = {name: _Counts() for name, _ in self._selected}
        self._handles = [
            module.register_forward_hook(self._make_hook(name)) for name, module in self._selected
        ]

    @property
    def names(self) -> list[str]:
        """Names of the monitored modules (``"<model>"`` for the model itself)."""
        return [name for name, _ in self._selected]

    def _make_hook(self, name: str) -> Callable[..., None]:
        counts = self._counts[name]

        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            a = _first_tensor(output)
            if a is not None:
                self._update(name, counts, a)

        return hook

    def _update(self, name: str, counts: _Counts, a: torch.Tensor) -> None:
        with torch.no_grad():
            a = a.detach()
            nz = a != 0 if self.tol == 0.0 else a.abs() > self.tol
            if a.ndim == 0:
                samples, units = 1, nz.reshape(1)
            elif a.ndim == 1:
                samples, units = a.shape[0], nz.any().reshape(1)
            else:
                dim = self.unit_dim
                if not -a.ndim <= dim < a.ndim or dim % a.ndim == 0:
                    raise ValueError(
                        f"Expected unit_dim to index a non-batch dim of the output of {name!r} "
                        f"(shape {tuple(a.shape)}). Received: unit_dim={self.unit_dim}"
                    )
                samples = a.shape[0]
                units = nz.movedim(dim, 0).reshape(a.shape[dim], -1).any(1)
            count = torch.count_nonzero(nz)
            if counts.nonzeros is None:
                counts.nonzeros = count
            else:
                counts.nonzeros += count.to(counts.nonzeros.device)
            mask = counts.active.get(units.numel())
            if mask is None:
                counts.active[units.numel()] = units.clone()
            else:
                mask |= units.to(mask.device)
            counts.elements += a.numel()
            counts.samples += samples

    def stats(self) -> dict[str, dict[str, float | int]]:
        """Statistics per monitored module (synchronises with the device once per module).

        Returns:
            ``{name: {"zero_fraction", "mean_l0", "dead_units", "n_units",
            "samples", "elements"}}`` where ``zero_fraction`` is the fraction
            of output elements with ``|a| <= tol``, ``mean_l0`` the mean number
            of non-zeros per sample, ``dead_units`` the units never active
            (``|a| > tol``) on any sample seen. A module not yet called has
            zeros everywhere (``samples == 0``).
        """
        out: dict[str, dict[str, float | int]] = {}
        for name, c in self._counts.items():
            if c.nonzeros is None:
                out[name] = {
                    "zero_fraction": 0.0,
                    "mean_l0": 0.0,
                    "dead_units": 0,
                    "n_units": 0,
                    "samples": 0,
                    "elements": 0,
                }
                continue
            device = c.nonzeros.device
            alive = [m.sum().to(device) for m in c.active.values()]
            nonzeros, *alive = torch.stack([c.nonzeros.to(torch.int64), *alive]).tolist()
            n_units = sum(c.active)
            out[name] = {
                "zero_fraction": _fraction(c.elements - nonzeros, c.elements),
                "mean_l0": _fraction(nonzeros, c.samples),
                "dead_units": n_units - sum(alive),
                "n_units": n_units,
                "samples": c.samples,
                "elements": c.elements,
            }
        return out

    def dead_mask(self, name: str) -> torch.Tensor:
        """Boolean mask of the units of ``name`` never active so far.

        For a module seen with several output widths, the masks of each width
        are concatenated in first-seen order.

        Raises:
            ValueError: If ``name`` is not monitored or has not been called yet.
        """
        if name not in self._counts:
            raise _unknown_name_error("monitored module", name, self._counts)
        active = self._counts[name].active
        if not active:
            raise ValueError(
                f"Expected module {name!r} to have run at least once. Received: 0 calls"
            )
        device = next(iter(active.values())).device
        return ~torch.cat([m.to(device) for m in active.values()])

    def reset(self) -> None:
        """Clears all counts; hooks stay in place."""
        for counts in self._counts.values():
            counts.clear()

    def remove(self) -> None:
        """Removes the hooks; the model is left as before. Counts are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> ActivationMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self._handles else "removed"
        return f"ActivationMonitor({len(self._selected)} modules, tol={self.tol:g}, {state})"


def _select_modules(model: nn.Module, modules: Any) -> list[tuple[str, nn.Module]]:
    named = [(name or "<model>", m) for name, m in model.named_modules()]
    if modules is None:
        chosen = [(n, m) for n, m in named if isinstance(m, ACTIVATION_TYPES)]
        return chosen or [(n, m) for n, m in named if next(m.children(), None) is None]
    if isinstance(modules, (str, nn.Module, type)):
        modules = [modules]
    by_name = dict(named)
    by_module = {m: n for n, m in named}
    wanted: set[str] = set()
    for item in modules:
        if isinstance(item, str):
            if item not in by_name:
                raise _unknown_name_error("module", item, by_name)
            wanted.add(item)
        elif isinstance(item, nn.Module):
            if item not in by_module:
                raise ValueError(
                    "Expected a module that is part of the model. "
                    f"Received: modules item={type(item).__name__} not found in the model"
                )
            wanted.add(by_module[item])
        elif isinstance(item, type) and issubclass(item, nn.Module):
            found = [n for n, m in named if isinstance(m, item)]
            if not found:
                raise ValueError(
                    f"Expected a module type present in the model. Received: modules item={item.__name__}"
                )
            wanted.update(found)
        else:
            raise TypeError(
                "Expected module names, module objects or module types. "
                f"Received: modules item={item!r}"
            )
    return [(n, m) for n, m in named if n in wanted]
