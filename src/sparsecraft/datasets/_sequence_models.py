"""The MNIST-1D models: a 1-D CNN with BatchNorm and an LSTM/GRU classifier."""

from __future__ import annotations

from torch import Tensor, nn

from ._common import _positive_int

__all__ = ["CNN1d", "RecurrentClassifier", "cnn1d"]


class CNN1d(nn.Module):
    """A 1-D CNN with BatchNorm for ``[batch, length]`` sequences (MNIST-1D).

    ``x.unsqueeze(1)`` (one input channel) goes through ``body``: ``layers``
    times ``Conv1d(kernel 5, stride 2, padding 2) → BatchNorm1d → ReLU`` (each
    halves the length), ``Flatten`` and a ``Linear`` classifier. This is the
    convolutional baseline of the MNIST-1D paper (3 conv layers, ~94 %) with
    BatchNorm added, the layout BN-CNNs in practice have (a BatchNorm after
    every conv, so the function is invariant to each conv's weight scale).
    With the defaults it holds 12,000 weights in kernels and matrices.

    Args:
        length: Sequence length.
        n_classes: Classes.
        channels: Channels of every conv layer.
        layers: Conv layers.

    Raises:
        ValueError: If a size is not a positive int.
    """

    def __init__(self, length: int = 40, n_classes: int = 10, channels: int = 32, layers: int = 3):
        super().__init__()
        length = _positive_int("length", length)
        n_classes = _positive_int("n_classes", n_classes)
        channels = _positive_int("channels", channels)
        layers = _positive_int("layers", layers)
        mods: list[nn.Module] = []
        c_in, n = 1, length
        for _ in range(layers):
            mods += [
                nn.Conv1d(c_in, channels, kernel_size=5, stride=2, padding=2),
                nn.BatchNorm1d(channels),
                nn.ReLU(),
            ]
            c_in, n = channels, (n - 1) // 2 + 1
        mods += [nn.Flatten(), nn.Linear(channels * n, n_classes)]
        self.body = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.unsqueeze(1))


def cnn1d(length: int = 40, n_classes: int = 10, channels: int = 32, layers: int = 3) -> CNN1d:
    """A :class:`CNN1d` (PyTorch's default initialisation); see there for the arguments."""
    return CNN1d(length, n_classes, channels, layers)


class RecurrentClassifier(nn.Module):
    """An LSTM or GRU that reads a ``[batch, length]`` sequence in patches and classifies it.

    The sequence is cut into ``length / patch`` consecutive patches of
    ``patch`` values, read one patch per step (``batch_first=True``); the
    output at the last step goes through a ``Linear`` head. Patches of 4
    (10 steps for MNIST-1D) make the recurrence short enough to learn in a
    few epochs; ``patch=1`` reads one value per step, as the MNIST-1D paper's
    GRU does (slower to train).

    Args:
        n_classes: Classes.
        hidden: Hidden state width.
        kind: ``"lstm"`` or ``"gru"``.
        num_layers: Stacked recurrent layers.
        patch: Values read per step; the sequence length must be a multiple of it.

    Raises:
        ValueError: On an unknown ``kind`` or a size that is not a positive int.
    """

    def __init__(
        self,
        n_classes: int = 10,
        hidden: int = 64,
        kind: str = "lstm",
        num_layers: int = 1,
        patch: int = 4,
    ):
        super().__init__()
        cells = {"lstm": nn.LSTM, "gru": nn.GRU}
        if kind not in cells:
            raise ValueError(f"Expected kind in {tuple(cells)}. Received: kind={kind!r}")
        self.kind = kind
        self.patch = _positive_int("patch", patch)
        self.rnn = cells[kind](
            patch,
            _positive_int("hidden", hidden),
            num_layers=_positive_int("num_layers", num_layers),
            batch_first=True,
        )
        self.head = nn.Linear(hidden, _positive_int("n_classes", n_classes))

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x.reshape(x.shape[0], -1, self.patch))
        return self.head(out[:, -1])
