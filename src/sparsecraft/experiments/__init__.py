"""Training loops and method comparisons, written once for the demo, ``train`` and the benchmarks.

Every method trains the same model on the same split with the same budget and
returns a :class:`RunResult`: test accuracy, exact-zero sparsity of the weight
matrices, non-zero parameter count, wall time and a per-epoch history.
:func:`compare` runs several methods over seeds, :func:`summarize` averages
them and :func:`best_within` picks the sparsest setting within a tolerance of
a reference accuracy. :func:`train_autoencoder` is the activity-sparsity
experiment (sparse autoencoders on the superposition task).
"""

from __future__ import annotations

from ._autoencoder import (
    Autoencoder,
    AutoencoderResult,
    TopK,
    autoencoder_metrics,
    train_autoencoder,
)
from ._compare import best_within, compare, pattern_f1, summarize
from ._methods import (
    METHODS,
    cubic_sparsity,
    run_dense,
    run_gradual,
    run_l1_loss,
    run_l1_loss_thresholds,
    run_magnitude,
    run_pat,
    run_prox,
    run_target,
)
from ._train import (
    RunResult,
    build_model,
    evaluate,
    make_optimizer,
    steps_per_epoch,
    train,
    weight_names,
    weight_sparsity,
)

__all__ = [
    "METHODS",
    "Autoencoder",
    "AutoencoderResult",
    "RunResult",
    "TopK",
    "autoencoder_metrics",
    "best_within",
    "build_model",
    "compare",
    "cubic_sparsity",
    "evaluate",
    "make_optimizer",
    "pattern_f1",
    "run_dense",
    "run_gradual",
    "run_l1_loss",
    "run_l1_loss_thresholds",
    "run_magnitude",
    "run_pat",
    "run_prox",
    "run_target",
    "steps_per_epoch",
    "summarize",
    "train",
    "train_autoencoder",
    "weight_names",
    "weight_sparsity",
]
