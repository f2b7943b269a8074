"""Training loops and method comparisons, written once for the demo, ``train`` and the benchmarks.

Every method trains the same model on the same split with the same budget and
returns a :class:`RunResult`: test accuracy, exact-zero sparsity of the weight
matrices, non-zero parameter count, wall time and a per-epoch history.
:func:`compare` runs several methods over seeds, :func:`summarize` averages
them and :func:`best_within` picks the sparsest setting within a tolerance of
a reference accuracy. :func:`train_autoencoder` is the activity-sparsity
experiment (sparse autoencoders on the superposition task).
:func:`export_summary` compacts, sparsifies, saves and times a trained model;
:func:`structured_zeros` counts the weights in all-zero rows/columns.
"""

from __future__ import annotations

from ._autoencoder import (
    Autoencoder,
    AutoencoderResult,
    TopK,
    autoencoder_metrics,
    train_autoencoder,
)
from ._compare import METHODS, best_within, compare, pattern_f1, summarize
from ._demo import DEMO_EPOCHS, demo_plan, reference_case
from ._export import export_summary, structured_zeros
from ._methods import (
    run_dense,
    run_l1_loss,
    run_l1_loss_thresholds,
    run_prox,
    run_target,
)
from ._pat import pat_available, run_pat, run_pat_target
from ._pruning import cubic_sparsity, run_gradual, run_magnitude
from ._spec import MODELS, default_hidden, run_spec
from ._train import (
    RunResult,
    build_model,
    evaluate,
    evaluate_loss,
    make_optimizer,
    matrices,
    steps_per_epoch,
    train,
    weight_names,
    weight_sparsity,
)

__all__ = [
    "DEMO_EPOCHS",
    "METHODS",
    "MODELS",
    "Autoencoder",
    "AutoencoderResult",
    "RunResult",
    "TopK",
    "autoencoder_metrics",
    "best_within",
    "build_model",
    "compare",
    "cubic_sparsity",
    "default_hidden",
    "demo_plan",
    "evaluate",
    "evaluate_loss",
    "export_summary",
    "make_optimizer",
    "matrices",
    "pat_available",
    "pattern_f1",
    "run_dense",
    "run_gradual",
    "run_l1_loss",
    "run_l1_loss_thresholds",
    "run_magnitude",
    "run_pat",
    "run_pat_target",
    "run_prox",
    "run_spec",
    "run_target",
    "reference_case",
    "steps_per_epoch",
    "structured_zeros",
    "summarize",
    "train",
    "train_autoencoder",
    "weight_names",
    "weight_sparsity",
]
