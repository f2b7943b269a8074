"""scikit-learn's 8x8 handwritten digits, split and standardised (shipped with scikit-learn, never downloaded)."""

from __future__ import annotations

import torch

from ._common import Split, _fraction, _int

__all__ = ["digits"]


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
