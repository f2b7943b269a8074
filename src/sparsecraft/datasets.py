"""Embedded data sets with known structure; nothing is ever downloaded.

* :func:`digits`: scikit-learn's 8x8 handwritten digits (shipped with
  scikit-learn), a fixed stratified split standardised with train statistics.
* :func:`teacher_student`: Gaussian inputs labelled by a random *sparse*
  teacher MLP whose non-zero pattern is returned, so a student's learned
  pattern can be scored against the truth.
* :func:`superposition`: sparse features embedded in fewer dimensions (toy
  models of superposition, Elhage et al. 2022), with the true directions.

:func:`mlp` is the one model family shared by the data sets, the tests and
the experiments; :func:`load` dispatches on a name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Split", "digits", "load", "mlp", "superposition", "teacher_student"]


@dataclass
class Split:
    """A train/test split held as tensors.

    Attributes:
        X_train: Training inputs, float32 ``[n_train, n_features]``.
        y_train: Training targets: int64 class labels ``[n_train]`` for
            classification, float32 ``[n_train, n_outputs]`` for regression.
        X_test: Test inputs, float32.
        y_test: Test targets, same kind as ``y_train``.
        name: Data set name.
        n_features: Input dimension.
        n_classes: Number of classes, or ``None`` for regression.
        meta: Task-specific ground truth (see each constructor).
    """

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    n_features: int
    n_classes: int | None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return "regression" if self.n_classes is None else "classification"

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return self.X_train.shape[0]

    @property
    def n_test(self) -> int:
        """Number of test samples."""
        return self.X_test.shape[0]

    def __repr__(self) -> str:
        kind = f"{self.n_classes} classes" if self.n_classes is not None else "regression"
        return (
            f"Split(name={self.name!r}, n_train={self.n_train}, n_test={self.n_test}, "
            f"n_features={self.n_features}, {kind}, meta={sorted(self.meta)})"
        )


# --------------------------------------------------------------------------- validation


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Expected {name} to be a positive int. Received: {name}={value!r}")
    return value


def _fraction(name: str, value: Any, closed_right: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and 0 < value and (value <= 1 if closed_right else value < 1)
    if not ok:
        interval = "(0, 1]" if closed_right else "(0, 1)"
        raise ValueError(f"Expected {name} in {interval}. Received: {name}={value!r}")
    return float(value)


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected {name} to be an int. Received: {name}={value!r}")
    return value


def _hidden_sizes(hidden: Any) -> tuple[int, ...]:
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = (hidden,)
    if not isinstance(hidden, Sequence) or isinstance(hidden, str):
        raise TypeError(
            f"Expected hidden to be an int or a sequence of ints. Received: hidden={hidden!r}"
        )
    return tuple(_positive_int("hidden[i]", h) for h in hidden)


# --------------------------------------------------------------------------- model family


def mlp(n_in: int, hidden: int | Sequence[int], n_out: int) -> nn.Sequential:
    """A multilayer perceptron ``Linear, ReLU, ..., Linear`` (no final activation).

    Parameter names are ``"0.weight"``, ``"2.weight"``, ... (Linear layers at
    even indices), which is how :func:`teacher_student` names its masks. The
    digits model of the demo is ``mlp(64, (256, 256), 10)``.

    Args:
        n_in: Input features.
        hidden: Width of each hidden layer (an int for one layer, ``()`` for none).
        n_out: Outputs.

    Returns:
        The model, with PyTorch's default initialisation.

    Raises:
        ValueError: If a size is not a positive int.
    """
    sizes = [_positive_int("n_in", n_in), *_hidden_sizes(hidden), _positive_int("n_out", n_out)]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- digits


def digits(seed: int = 0, test_fraction: float = 0.25) -> Split:
    """scikit-learn's handwritten digits: 1797 images of 8x8 pixels, 10 classes.

    The split is ``train_test_split(X, y, test_size=test_fraction,
    stratify=y, random_state=seed)``, so every class keeps its proportion and
    the same seed gives the same split. Inputs are standardised with the
    training mean and standard deviation per pixel only; pixels that are
    constant on the training set get std 1 (so they stay finite).

    Args:
        seed: Seed of the split.
        test_fraction: Fraction of samples in the test set, in (0, 1).

    Returns:
        A :class:`Split` with ``meta = {"mean", "std", "image_shape"}`` (the
        train statistics used, float32 ``[64]``, and ``(8, 8)``).

    Raises:
        ValueError: If ``test_fraction`` is outside (0, 1).
        ImportError: If scikit-learn is not installed.
    """
    seed = _int("seed", seed)
    test_fraction = _fraction("test_fraction", test_fraction)
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # scikit-learn is a dev/bench extra, not a core dependency
        raise ImportError("digits() needs scikit-learn: pip install 'sparsecraft[dev]'") from err
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    mean = X_train.mean(axis=0)
    std = X_train.std(axis=0)
    std[std < 1e-12] = 1.0
    return Split(
        X_train=torch.as_tensor((X_train - mean) / std, dtype=torch.float32),
        y_train=torch.as_tensor(y_train, dtype=torch.int64),
        X_test=torch.as_tensor((X_test - mean) / std, dtype=torch.float32),
        y_test=torch.as_tensor(y_test, dtype=torch.int64),
        name="digits",
        n_features=X.shape[1],
        n_classes=10,
        meta={
            "mean": torch.as_tensor(mean, dtype=torch.float32),
            "std": torch.as_tensor(std, dtype=torch.float32),
            "image_shape": (8, 8),
        },
    )


# --------------------------------------------------------------------------- teacher-student


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


# --------------------------------------------------------------------------- superposition


def _importance(importance: Any, n: int) -> torch.Tensor:
    if importance is None:
        return torch.ones(n)
    if isinstance(importance, (int, float)) and not isinstance(importance, bool):
        decay = _fraction("importance", importance, closed_right=True)
        return decay ** torch.arange(n, dtype=torch.float32)
    values = torch.as_tensor(importance, dtype=torch.float32)
    if values.shape != (n,) or not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError(
            f"Expected importance to be None, a decay in (0, 1], or {n} finite values >= 0. "
            f"Received: importance with shape {tuple(values.shape)}"
        )
    return values


def superposition(
    n_features: int = 64,
    d: int = 32,
    p: float = 0.05,
    n_train: int = 16384,
    n_test: int = 4096,
    seed: int = 0,
    importance: float | Sequence[float] | torch.Tensor | None = None,
) -> Split:
    """Sparse features embedded in fewer dimensions (toy models of superposition).

    Each of ``n_features`` latent features is active independently with
    probability ``p``, with magnitude ``Uniform(0, 1)`` when active: codes
    ``f`` of shape ``[n, n_features]``. They are embedded as ``x = f @ W.T``
    with ``W`` of shape ``[d, n_features]`` whose columns are random unit
    vectors; the targets are ``y = x`` (autoencoding). Elhage et al. 2022,
    "Toy Models of Superposition".

    Args:
        n_features: Number of latent features.
        d: Embedding dimension, ``d < n_features``.
        p: Probability that a feature is active, in (0, 1].
        n_train: Training samples.
        n_test: Test samples.
        seed: Seed of every random draw.
        importance: Per-feature loss weights for the user's loss (they do not
            change the data): ``None`` for all ones, a decay ``r`` in (0, 1]
            for ``r ** i``, or ``n_features`` values >= 0.

    Returns:
        A regression :class:`Split` (``n_features`` of the split is ``d``) with
        ``meta["features"]`` = ``W`` ``[d, n_features]``, ``meta["f_train"]``
        and ``meta["f_test"]`` (the true codes), ``meta["importance"]``
        ``[n_features]``, ``meta["p"]`` and ``meta["n_latent"]``.

    Raises:
        ValueError: On a non-positive size, ``d >= n_features``, ``p``
            outside (0, 1], or a malformed ``importance``.
    """
    n_features, d = _positive_int("n_features", n_features), _positive_int("d", d)
    if d >= n_features:
        raise ValueError(
            f"Expected d < n_features (={n_features}) for superposition. Received: d={d}"
        )
    p = _fraction("p", p, closed_right=True)
    n_train, n_test = _positive_int("n_train", n_train), _positive_int("n_test", n_test)
    seed = _int("seed", seed)
    weights = _importance(importance, n_features)

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, n_features, generator=g)
    W /= W.norm(dim=0, keepdim=True)
    n = n_train + n_test
    active = torch.rand(n, n_features, generator=g) < p
    f = torch.rand(n, n_features, generator=g) * active
    x = f @ W.T
    return Split(
        X_train=x[:n_train].contiguous(),
        y_train=x[:n_train].clone(),
        X_test=x[n_train:].contiguous(),
        y_test=x[n_train:].clone(),
        name="superposition",
        n_features=d,
        n_classes=None,
        meta={
            "features": W,
            "f_train": f[:n_train].contiguous(),
            "f_test": f[n_train:].contiguous(),
            "importance": weights,
            "p": p,
            "n_latent": n_features,
        },
    )


# --------------------------------------------------------------------------- dispatch

_LOADERS: dict[str, Callable[..., Split]] = {
    "digits": digits,
    "teacher": teacher_student,
    "superposition": superposition,
}


def load(name: str, **kw: Any) -> Split:
    """Builds a data set by name: ``"digits"``, ``"teacher"`` or ``"superposition"``.

    Args:
        name: The data set.
        **kw: Keyword arguments of :func:`digits`, :func:`teacher_student` or
            :func:`superposition`.

    Returns:
        The :class:`Split`.

    Raises:
        ValueError: If ``name`` is unknown (the message lists the known names).
    """
    if name not in _LOADERS:
        raise ValueError(f"Expected a data set name in {sorted(_LOADERS)}. Received: name={name!r}")
    return _LOADERS[name](**kw)
