"""Channel spaces and layouts: what the channel analysis of ``_graph`` records.

A :class:`Layout` says where the channels of one traced tensor are and which
of them are constant; :class:`Spaces` joins channel spaces (union-find); the
:class:`Analysis` is the result handed to :func:`compact`. The weight queries
(:func:`column_weights`, :func:`column_nonzero`, :func:`zero_padded`) tell
which input channels a Linear/Conv reads and what constant inputs contribute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

_LINEAR = (nn.Linear,)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RNN = (nn.LSTM, nn.GRU, nn.RNN)


@dataclass
class Layout:
    """Where the channels of one traced tensor are, and which are constant.

    Attributes:
        space: Channel space id (see :class:`Spaces`).
        dim: Non-negative dimension holding the channels.
        rep: Contiguous features per channel along ``dim`` (1, or H*W after flatten).
        shape: Shape of the tensor in the example call.
        const: Per-channel constant value (float64), meaningful where ``is_const``.
        is_const: Per-channel flag: the channel has the same value everywhere.
    """

    space: int
    dim: int
    rep: int
    shape: tuple[int, ...]
    const: torch.Tensor
    is_const: torch.Tensor


class Spaces:
    """Union-find over channel spaces (a residual add merges two spaces)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        self.parent[b] = a
        return a


@dataclass
class Analysis:
    """Result of :func:`analyse`.

    Attributes:
        spaces: The channel spaces.
        producers: Linear/Conv module name -> space of its output.
        norms: BatchNorm module name -> space it normalises.
        consumers: Linear/Conv module name -> layout of its input (followed inputs only).
        keep: Space root -> bool mask of the channels to keep.
        skipped: ``(name, reason)`` of the layers and operations not followed.
    """

    spaces: Spaces = field(default_factory=Spaces)
    producers: dict[str, int] = field(default_factory=dict)
    norms: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, Layout] = field(default_factory=dict)
    keep: dict[int, torch.Tensor] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def zero_padded(conv: nn.Module) -> bool:
    """Whether ``conv`` pads with zeros (then a constant input is not constant at borders)."""
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(
            (k - 1) * d > 0 for k, d in zip(conv.kernel_size, conv.dilation, strict=True)
        )
    return any(p > 0 for p in conv.padding)


def input_weight_names(rnn: nn.Module) -> list[str]:
    """The parameters through which a recurrent layer reads its input (both directions)."""
    return ["weight_ih_l0"] + (["weight_ih_l0_reverse"] if rnn.bidirectional else [])


def _input_weight(module: nn.Module) -> torch.Tensor:
    if isinstance(module, _RNN):
        return torch.cat([getattr(module, n).detach() for n in input_weight_names(module)])
    return module.weight.detach()


def folds_only_zero(module: nn.Module) -> bool:
    """Whether only the constant 0 can be folded into ``module`` (padded conv, RNN without bias)."""
    if isinstance(module, _RNN):
        return not module.bias
    return isinstance(module, _CONV) and zero_padded(module)


def column_weights(module: nn.Module, rep: int) -> torch.Tensor:
    """Per input channel, the weight summed over its features (Linear) or kernel (Conv).

    Returns a float64 ``[out, channels]`` matrix: multiplying it by a vector of
    constant channel values gives the contribution of those constants (for a
    recurrent layer: to the rows of ``weight_ih_l0`` and its reverse, stacked).
    """
    w = _input_weight(module).cpu().double()
    if isinstance(module, _RNN):
        return w
    if isinstance(module, _LINEAR):
        return w.reshape(w.shape[0], -1, rep).sum(-1)
    return w.flatten(2).sum(-1)


def column_nonzero(module: nn.Module, rep: int) -> torch.Tensor:
    """``[out, channels]`` bool: the weights from a channel to an output unit are not all zero."""
    w = _input_weight(module).cpu()
    if isinstance(module, _RNN):
        return w != 0
    if isinstance(module, _LINEAR):
        return (w.reshape(w.shape[0], -1, rep) != 0).any(-1)
    return (w.flatten(2) != 0).any(-1)
