"""A synthetic language with known structure for causal sequence models: copy a random string."""

from __future__ import annotations

import torch

from ._common import Split, _int, _positive_int

__all__ = ["IGNORE", "copy_task"]

# Targets that no model can predict are marked with the index cross_entropy ignores.
IGNORE = -100


def copy_task(
    length: int = 8,
    vocab: int = 16,
    n_train: int = 8192,
    n_test: int = 1024,
    seed: int = 0,
) -> Split:
    """Next-token prediction on ``x₁ … x_L <sep> x₁ … x_L``: the second half copies the first.

    Each sentence draws ``length`` tokens uniformly from ``vocab`` symbols
    (ids ``0 … vocab−1``; ``<sep>`` is id ``vocab``). A causal language model
    reads ``sentence[:-1]`` (``2·length`` tokens) and predicts
    ``sentence[1:]``. The first ``length`` targets are random, so they are
    marked :data:`IGNORE` (−100, what ``cross_entropy`` skips); the last
    ``length`` are fully determined by the prefix. A perfect model has
    accuracy 1 and perplexity 1 on them; chance is ``1/vocab``. A model
    solves it by attending ``length`` positions back (a previous-token /
    induction-style head, Olsson et al. 2022), which two causal attention
    layers learn in a few hundred steps.

    Args:
        length: Tokens to copy (>= 1).
        vocab: Content symbols (>= 2).
        n_train: Training sentences.
        n_test: Test sentences (drawn after the training ones from the same generator).
        seed: Seed of the generator.

    Returns:
        A :class:`Split` with int64 inputs ``[n, 2·length]`` and int64
        targets ``[n, 2·length]``; ``n_features`` is the sequence length,
        ``n_classes`` the vocabulary size including ``<sep>`` (``vocab + 1``),
        and ``meta = {"length", "vocab", "sep", "ignore_index"}``.

    Raises:
        ValueError: If a size is not a positive int or ``vocab < 2``.
        TypeError: If ``seed`` is not an int.
    """
    length = _positive_int("length", length)
    vocab = _positive_int("vocab", vocab)
    if vocab < 2:
        raise ValueError(
            f"Expected vocab >= 2 (a copy of one symbol is trivial). Received: vocab={vocab}"
        )
    n_train = _positive_int("n_train", n_train)
    n_test = _positive_int("n_test", n_test)
    seed = _int("seed", seed)
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(vocab, (n_train + n_test, length), generator=g)
    sep = torch.full((n_train + n_test, 1), vocab, dtype=torch.int64)
    sentences = torch.cat([words, sep, words], dim=1)
    x = sentences[:, :-1].contiguous()
    y = sentences[:, 1:].clone()
    y[:, :length] = IGNORE
    return Split(
        X_train=x[:n_train],
        y_train=y[:n_train],
        X_test=x[n_train:],
        y_test=y[n_train:],
        name="copy",
        n_features=2 * length,
        n_classes=vocab + 1,
        meta={"length": length, "vocab": vocab, "sep": vocab, "ignore_index": IGNORE},
    )
