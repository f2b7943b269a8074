"""Toy models of superposition: sparse features embedded in fewer dimensions (Elhage et al. 2022)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._common import Split, _fraction, _int, _positive_int

__all__ = ["superposition"]


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
