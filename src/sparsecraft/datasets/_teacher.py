"""Teacher–student data: Gaussian inputs labelled by a random sparse teacher MLP whose pattern is known."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ._common import Split, _fraction, _hidden_sizes, _int, _positive_int, mlp

__all__ = ["teacher_student"]


def _sparse_mask(
    rows: int, cols: int, density: float, cover_cols: bool, g: torch.Generator
) -> torch.Tensor:
    """A random bool mask with ``max(round(density * rows * cols), cover)`` True entries.

    Every row gets at least one entry (no unit without inputs) and, if
    ``cover_cols``, every column too (no hidden unit whose output is unused),
    so the pattern is identifiable from the teacher's function. ``cover`` is
    the fewest entries that achieve this: ``rows``, or ``max(rows, cols)``.
    """
    numel = rows * cols
    cover = max(rows, cols) if cover_cols else rows
    k = min(numel, max(round(density * numel), cover))
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if cover_cols:
        # Walk a random permutation of the longer side, pairing it with a
        # cycling random permutation of the shorter side: covers every row and column.
        r = torch.randperm(rows, generator=g)
        c = torch.randperm(cols, generator=g)
        idx = torch.arange(cover)
        mask[r[idx % rows], c[idx % cols]] = True
    else:
        mask[torch.arange(rows), torch.randint(cols, (rows,), generator=g)] = True
    free = (~mask).flatten().nonzero().squeeze(1)
    extra = free[torch.randperm(free.numel(), generator=g)[: k - int(mask.sum())]]
    mask.view(-1)[extra] = True
    return mask


def _balance_biases(logits: torch.Tensor) -> torch.Tensor:
    """Biases ``b`` making ``argmax(logits + b)`` close to uniform over classes.

    Sinkhorn iterations in the log domain on ``softmax((logits + b) / T)``:
    each step rescales the classes so that their total soft mass is ``n / k``
    (the dual of an equal-capacity assignment, Cuturi 2013), with ``T``
    annealed towards 0 so that the soft assignment approaches the argmax.
    """
    n, k = logits.shape
    scale = logits.std().clamp(min=1e-12)
    by_class = logits.T.contiguous()  # [k, n]: the softmax reduces over the short axis, fast
    b = -logits.mean(0)
    for t in (1.0, 0.3, 0.1, 0.03, 0.01):
        temperature = t * scale
        for _ in range(25):
            mass = torch.softmax((by_class + b[:, None]) / temperature, dim=0).mean(1)
            # A class with no mass at all (underflow) gets a large but finite push.
            b -= temperature * (mass.clamp(min=1e-30).log() - math.log(1.0 / k))
    return b


def teacher_student(
    n_in: int = 64,
    hidden: int | Sequence[int] = (128,),
    n_out: int = 10,
    density: float = 0.1,
    n_train: int = 8192,
    n_test: int = 2048,
    seed: int = 0,
    task: str = "classification",
) -> Split:
    """Gaussian inputs labelled by a random sparse teacher MLP.

    The teacher is ``mlp(n_in, hidden, n_out)`` whose weight matrices keep
    each entry with probability about ``density`` (exactly
    ``round(density * numel)`` entries per matrix, raised where needed so that
    every row has an entry, and in the matrices after the first every column
    too: each hidden unit has inputs and is used). Input features may be
    unused: ``meta["relevant_inputs"]`` marks those that are. Kept weights are
    ``N(0, 2 / fan_in_kept)``. Hidden biases are set to minus the median
    pre-activation (each hidden unit is active on about half the inputs). For
    classification, labels are ``argmax`` of the teacher's logits and output
    biases are tuned so that classes are about equally frequent (on the
    default settings every class has 0.98-1.02 times its fair share; when
    output rows keep only one or two weights, e.g. 20 classes over 16 hidden
    units at density 0.05, logits are constant wherever those ReLUs are off
    and some classes stay rare, since a bias cannot split tied samples); for
    regression, targets are the teacher's outputs, scaled and shifted to zero
    mean and unit variance per output. Inputs are ``N(0, I)``.

    Args:
        n_in: Input features.
        hidden: Hidden widths (an int for one layer).
        n_out: Classes (classification) or outputs (regression).
        density: Fraction of kept teacher weights, in (0, 1].
        n_train: Training samples.
        n_test: Test samples.
        seed: Seed of every random draw (the global RNG is left untouched).
        task: ``"classification"`` or ``"regression"``.

    Returns:
        A :class:`Split` with ``meta["teacher"]`` (the teacher ``nn.Sequential``,
        eval mode, gradients off), ``meta["masks"]`` (parameter name -> bool
        mask of its kept weights, names as in ``mlp(n_in, hidden, n_out)``),
        ``meta["density"]`` (realised fraction of kept weights over all
        matrices) and ``meta["relevant_inputs"]`` (bool ``[n_in]``).

    Raises:
        ValueError: On a non-positive size, ``density`` outside (0, 1],
            ``n_out < 2`` for classification, or an unknown ``task``.
    """
    n_in, n_out = _positive_int("n_in", n_in), _positive_int("n_out", n_out)
    sizes = [n_in, *_hidden_sizes(hidden), n_out]
    density = _fraction("density", density, closed_right=True)
    n_train, n_test = _positive_int("n_train", n_train), _positive_int("n_test", n_test)
    seed = _int("seed", seed)
    if task not in ("classification", "regression"):
        raise ValueError(
            f"Expected task in ('classification', 'regression'). Received: task={task!r}"
        )
    if task == "classification" and n_out < 2:
        raise ValueError(f"Expected n_out >= 2 for classification. Received: n_out={n_out}")

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_train + n_test, n_in, generator=g)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's default init draws from the global RNG
        teacher = mlp(n_in, sizes[1:-1], n_out)
    linears = [m for m in teacher if isinstance(m, nn.Linear)]
    masks: dict[str, torch.Tensor] = {}
    h = X
    with torch.no_grad():
        for i, layer in enumerate(linears):
            mask = _sparse_mask(*layer.weight.shape, density, cover_cols=i > 0, g=g)
            fan_in = mask.sum(1, keepdim=True).clamp(min=1)
            w = torch.randn(layer.weight.shape, generator=g) * (2.0 / fan_in).sqrt()
            layer.weight.copy_(w * mask)
            masks[f"{2 * i}.weight"] = mask
            pre = h @ layer.weight.T
            if i < len(linears) - 1:
                layer.bias.copy_(-pre.median(0).values)
                h = torch.relu(pre + layer.bias)
            elif task == "regression":
                std = pre.std(0).clamp(min=1e-12)
                layer.weight.div_(std[:, None])
                layer.bias.copy_(-pre.mean(0) / std)
            else:
                layer.bias.copy_(_balance_biases(pre))
        teacher.eval().requires_grad_(False)
        out = teacher(X)
    y = out.argmax(1) if task == "classification" else out.float()
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return Split(
        X_train=X[:n_train].contiguous(),
        y_train=y[:n_train].contiguous(),
        X_test=X[n_train:].contiguous(),
        y_test=y[n_train:].contiguous(),
        name="teacher",
        n_features=n_in,
        n_classes=n_out if task == "classification" else None,
        meta={
            "teacher": teacher,
            "masks": masks,
            "density": kept / total,
            "relevant_inputs": masks["0.weight"].any(0),
        },
    )
