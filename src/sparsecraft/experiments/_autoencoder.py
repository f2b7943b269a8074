"""Activity sparsity: sparse autoencoders on the superposition task, scored on the true features.

Three ways of making the hidden code ``f(x)`` sparse, all with one hidden layer
``f = act(W_enc x + b_enc)``, ``x̂ = W_dec f + b_dec``:

* ``"l1"``: the Keras way, an L1 activity penalty on the code
  (:meth:`Regularizer.add_activity`, ``λ·Σ|f| / batch``);
* ``"l1_unit"``: the same penalty with the decoder columns renormalised to
  unit norm after every step (Bricken et al. 2023, "Towards Monosemanticity"):
  without it the code can shrink while the decoder grows, dodging the penalty;
* ``"l1_weighted"``: L1 on the code weighted by the decoder column norms,
  ``‖x − x̂‖² + λ Σᵢ fᵢ(x)·‖W_dec,i‖₂`` (Anthropic, "Circuits Updates", 2024),
  so the penalty cannot be dodged by shrinking codes and growing the decoder;
* ``"topk"``: a TopK activation keeping the ``k`` largest pre-activations
  (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), no penalty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..datasets import Split
from ..metrics import ActivationMonitor
from ..penalties import L1
from ..regularizer import Regularizer
from ._train import Callback

__all__ = ["Autoencoder", "AutoencoderResult", "TopK", "autoencoder_metrics", "train_autoencoder"]

KINDS = ("l1", "l1_unit", "l1_weighted", "topk")


class TopK(nn.Module):
    """Keeps the ``k`` largest values of each row (after a ReLU) and zeros the rest."""

    def __init__(self, k: int):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Expected k to be a positive int. Received: k={k!r}")
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = torch.topk(x, min(self.k, x.shape[-1]), dim=-1)
        return torch.zeros_like(x).scatter(-1, top.indices, torch.relu(top.values))

    def extra_repr(self) -> str:
        return f"k={self.k}"


class Autoencoder(nn.Module):
    """``decoder(act(encoder(x)))``: one hidden layer of ``latents`` units."""

    def __init__(self, d: int, latents: int, act: nn.Module | None = None):
        super().__init__()
        self.encoder = nn.Linear(d, latents)
        self.act = act if act is not None else nn.ReLU()
        self.decoder = nn.Linear(latents, d)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))


@dataclass
class AutoencoderResult:
    """One trained autoencoder and its scores (see :func:`autoencoder_metrics`)."""

    kind: str
    metrics: dict[str, float]
    seconds: float
    model: Autoencoder = field(repr=False)
    history: list[dict[str, float]] = field(default_factory=list, repr=False)
    config: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.config, **self.metrics, "seconds": self.seconds}


@torch.no_grad()
def autoencoder_metrics(
    model: Autoencoder, data: Split, threshold: float = 0.9
) -> dict[str, float]:
    """How well the autoencoder found the true features of a superposition split.

    Returns:
        ``recovered``: fraction of true directions ``meta["features"][:, j]``
        whose best cosine with a decoder column exceeds ``threshold``;
        ``mean_cosine``: mean of those best cosines; ``l0``: mean number of
        non-zero latents per test sample; ``fvu``: fraction of variance
        unexplained on the test set, ``Σ‖x − x̂‖² / Σ‖x − x̄‖²``; ``dead``:
        latents never active on the test set; ``latents``: their number.

    Raises:
        ValueError: If ``data`` has no true features (only superposition splits do).
    """
    features = data.meta.get("features")
    if features is None:
        raise ValueError(
            f"Expected a superposition split. Received: data={data.name!r} without features"
        )
    was_training = model.training
    model.eval()
    with ActivationMonitor(model, modules=[model.act]) as monitor:
        x_hat = model(data.X_test)
    stats = next(iter(monitor.stats().values()))
    model.train(was_training)
    dec = model.decoder.weight  # [d, latents]: column i is latent i's direction
    cos = (features / features.norm(dim=0)).T @ (dec / dec.norm(dim=0).clamp_min(1e-12))
    best = cos.max(dim=1).values
    x = data.X_test
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    return {
        "recovered": float((best > threshold).float().mean()),
        "mean_cosine": float(best.mean()),
        "l0": float(stats["mean_l0"]),
        "fvu": fvu,
        "dead": int(stats["dead_units"]),
        "latents": int(stats["n_units"]),
    }


def train_autoencoder(
    data: Split,
    kind: str = "l1",
    *,
    latents: int = 128,
    lam: float = 3e-3,
    k: int = 4,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
    on_epoch: Callback | None = None,
) -> AutoencoderResult:
    """Trains a sparse autoencoder on ``data`` (``X_train`` → ``X_train``) with Adam.

    Args:
        data: A superposition split (any regression split trains; only
            superposition splits can be scored).
        kind: ``"l1"``, ``"l1_unit"``, ``"l1_weighted"`` or ``"topk"`` (see the module docstring).
        latents: Hidden units.
        lam: Strength of the activity penalty (L1 kinds).
        k: Active latents per sample (``"topk"``).
        epochs, batch_size, lr, seed: Training settings.
        on_epoch: ``(epoch, record)`` after each epoch.

    Raises:
        ValueError: On an unknown ``kind``.
    """
    if kind not in KINDS:
        raise ValueError(f"Expected kind in {KINDS}. Received: kind={kind!r}")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = Autoencoder(data.n_features, latents, TopK(k) if kind == "topk" else nn.ReLU())
    reg = None
    if kind in ("l1", "l1_unit"):
        reg = Regularizer(model)
        reg.add_activity(model.act, L1(lam))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = data.n_train
    history = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(0, n, batch_size):
            x = data.X_train[perm[i : i + batch_size]]
            opt.zero_grad()
            # Squared error summed over features, averaged over the batch: ‖x − x̂‖² per sample.
            if kind == "l1_weighted":
                code = model.encode(x)
                loss = ((model.decoder(code) - x) ** 2).sum(1).mean()
                loss = loss + lam * (code * model.decoder.weight.norm(dim=0)).sum(1).mean()
            else:
                # A call of the whole model: the regularizer clears its captured activity there.
                loss = ((model(x) - x) ** 2).sum(1).mean()
                if reg is not None:
                    loss = loss + reg.loss()
            loss.backward()
            opt.step()
            if kind == "l1_unit":
                with torch.no_grad():
                    w = model.decoder.weight
                    w.div_(w.norm(dim=0, keepdim=True).clamp_min(1e-12))
            total += float(loss.detach()) * len(x)
        record = {"epoch": epoch + 1, "loss": total / n}
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
    if reg is not None:
        reg.remove()
    config = {
        "latents": latents,
        "epochs": epochs,
        "seed": seed,
        **({"k": k} if kind == "topk" else {"lam": lam}),
    }
    return AutoencoderResult(
        kind, autoencoder_metrics(model, data), time.perf_counter() - t0, model, history, config
    )
