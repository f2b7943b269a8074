"""Running several methods over seeds, summarising them, and scoring learned patterns."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..datasets import Split
from ._methods import run_dense, run_l1_loss, run_prox, run_target
from ._pat import run_pat, run_pat_target
from ._pruning import run_gradual, run_magnitude
from ._train import Callback, RunResult

__all__ = ["METHODS", "compare", "summarize", "best_within", "pattern_f1"]

# name -> (function, the name of its knob, or None)
METHODS: dict[str, tuple[Callable[..., RunResult], str | None]] = {
    "dense": (run_dense, None),
    "l1_loss": (run_l1_loss, "lam"),
    "magnitude": (run_magnitude, "sparsity"),
    "gradual": (run_gradual, "sparsity"),
    "prox": (run_prox, "lam"),
    "target": (run_target, "target"),
    "pat": (run_pat, "lam"),
    "pat_target": (run_pat_target, "target"),
}


_KNOBS = ("model", "lam", "tol", "target", "mode", "optimizer", "finetune_epochs", "frequency",
          "freeze_fraction", "relaxed", "average", "fine_tune_scale", "lr_factor")
# What makes two dense trainings the same (besides seed and hidden), with the methods' defaults.
_DENSE_DEFAULTS = {"model": "mlp", "batch_size": 64, "epochs": 60, "optimizer": "sgd", "lr": None}
_DENSE_KEYS = tuple(_DENSE_DEFAULTS)


def _method_list(
    methods: Mapping[str, Mapping[str, Any]] | Iterable[tuple[str, Mapping[str, Any]]],
) -> list[tuple[str, dict[str, Any]]]:
    items = list(methods.items()) if isinstance(methods, Mapping) else list(methods)
    out = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Mapping)):
            raise TypeError(f"Expected (method, kwargs) pairs. Received: {item!r}")
        name, kw = item
        if name not in METHODS:
            raise ValueError(f"Expected a method in {sorted(METHODS)}. Received: method={name!r}")
        out.append((name, dict(kw)))
    return out


def compare(
    data: Split,
    methods: Mapping[str, Mapping[str, Any]] | Iterable[tuple[str, Mapping[str, Any]]],
    seeds: Sequence[int] = (0,),
    *,
    on_run_start: Callable[[str, int, int], None] | None = None,
    on_epoch: Callback | None = None,
    on_run_end: Callable[[RunResult], None] | None = None,
    **common: Any,
) -> list[RunResult]:
    """Trains each method on ``data`` once per seed; returns the results in order.

    Args:
        data: The data set.
        methods: ``{"dense": {}, "prox": {"lam": 2e-2, "mode": "latent"}}``, or
            ``(name, kwargs)`` pairs when a method appears several times (a sweep).
            Names are those of :data:`METHODS`.
        seeds: One run of every method per seed.
        on_run_start: ``(method, seed, epochs)`` before each run (for progress bars).
        on_epoch: Passed to every run.
        on_run_end: Called with each :class:`RunResult`.
        **common: Keyword arguments for every method (``epochs``, ``hidden``,
            ``model``, ``batch_size``, ``optimizer``, ``lr``), overridden by a
            method's own.

    ``magnitude`` prunes the ``dense`` model of the same seed and settings when
    one was trained in this call (its time is counted in the magnitude run),
    and trains one otherwise.
    """
    plan = _method_list(methods)
    if not seeds:
        raise ValueError(f"Expected at least one seed. Received: seeds={seeds!r}")
    results: list[RunResult] = []
    dense_cache: dict[tuple, RunResult] = {}
    for seed in seeds:
        for name, kw in plan:
            fn, _ = METHODS[name]
            kwargs = {**common, **kw, "seed": seed}
            hidden = kwargs.get("hidden")
            key = (
                seed,
                None if hidden is None else tuple(hidden),
                *(kwargs.get(k, _DENSE_DEFAULTS[k]) for k in _DENSE_KEYS),
            )
            if name == "magnitude" and "dense" not in kwargs:
                if key not in dense_cache:
                    dense_kw = {k: kwargs[k] for k in ("hidden", *_DENSE_KEYS) if k in kwargs}
                    if on_run_start is not None:
                        on_run_start("dense (for magnitude)", seed, kwargs.get("epochs", 60))
                    dense_cache[key] = run_dense(data, seed=seed, on_epoch=on_epoch, **dense_kw)
                kwargs["dense"] = dense_cache[key]
            if on_run_start is not None:
                epochs = (
                    kwargs.get("finetune_epochs", 20)
                    if name == "magnitude"
                    else kwargs.get("epochs", 60)
                )
                on_run_start(name, seed, epochs)
            r = fn(data, on_epoch=on_epoch, **kwargs)
            if name == "dense":
                dense_cache.setdefault(key, r)
            results.append(r)
            if on_run_end is not None:
                on_run_end(r)
    return results


def _setting(r: RunResult) -> tuple:
    return (r.method, *((k, r.config[k]) for k in _KNOBS if k in r.config))


def summarize(results: Iterable[RunResult]) -> list[dict[str, Any]]:
    """Mean (and standard deviation over seeds) of each method setting, in first-seen order.

    Runs that differ only by seed are one setting. Each row: ``method``, the
    knobs, ``seeds``, ``accuracy``, ``accuracy_std``, ``sparsity``,
    ``sparsity_std``, ``nonzero``, ``seconds``.
    """
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        groups.setdefault(_setting(r), []).append(r)
    rows = []
    for key, rs in groups.items():
        row: dict[str, Any] = {"method": key[0], **dict(key[1:]), "seeds": len(rs)}
        for field in ("accuracy", "sparsity", "nonzero", "seconds"):
            values = [float(getattr(r, field)) for r in rs]
            row[field] = statistics.fmean(values)
            if field in ("accuracy", "sparsity"):
                row[f"{field}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def best_within(
    rows: Iterable[Mapping[str, Any]], reference: float, tolerance: float = 0.01
) -> dict[str, Any] | None:
    """The row with the highest ``sparsity`` whose ``accuracy >= reference − tolerance``, or None.

    Ties in sparsity go to the higher accuracy.
    """
    ok = [r for r in rows if r["accuracy"] >= reference - tolerance]
    if not ok:
        return None
    return dict(max(ok, key=lambda r: (r["sparsity"], r["accuracy"])))


@torch.no_grad()
def pattern_f1(model: nn.Module, data: Split) -> dict[str, float]:
    """F1 of the student's non-zero weight pattern against the teacher's (teacher–student data).

    Hidden units have no fixed order, so each student layer is first aligned
    with the teacher's: units are matched one to one (Hungarian algorithm,
    ``scipy.optimize.linear_sum_assignment``) by the correlation of their
    post-ReLU activations on the test inputs, layer after layer, and the
    student's weights are permuted accordingly. A weight is predicted "kept"
    when it is non-zero; student units left unmatched (a wider student) count
    their non-zeros as false positives.

    Returns:
        ``{"f1", "precision", "recall", "student_density", "teacher_density"}``.

    Raises:
        ValueError: If ``data`` has no teacher (only
            :func:`~sparsecraft.datasets.teacher_student` has one).
    """
    from scipy.optimize import linear_sum_assignment

    teacher = data.meta.get("teacher")
    if teacher is None:
        raise ValueError(
            f"Expected a teacher-student split. Received: data={data.name!r} without a teacher"
        )
    s_lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    t_lin = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
    if len(s_lin) != len(t_lin) or s_lin[0].in_features != t_lin[0].in_features:
        raise ValueError(
            f"Expected a student with the teacher's depth and inputs. "
            f"Received: {len(s_lin)} Linear layers "
            f"for the teacher's {len(t_lin)}"
        )
    was_training = model.training
    model.eval()
    hs = ht = data.X_test
    cols = torch.arange(s_lin[0].in_features)  # student input index for each teacher input
    tp = fp = fn = 0
    for i, (s, t) in enumerate(zip(s_lin, t_lin, strict=True)):
        w = s.weight[:, cols]
        dropped = torch.ones(s.in_features, dtype=torch.bool)
        dropped[cols] = False
        fp += int((s.weight[:, dropped] != 0).sum())  # outputs of unmatched student units
        last = i == len(s_lin) - 1
        if last:
            rows = torch.arange(t.out_features)
        else:
            hs = torch.relu(nn.functional.linear(hs, s.weight, s.bias))
            ht = torch.relu(nn.functional.linear(ht, t.weight, t.bias))
            corr = _correlation(hs, ht)  # [student units, teacher units]
            r, c = linear_sum_assignment(corr.numpy(), maximize=True)
            rows = torch.empty(t.out_features, dtype=torch.long)
            rows[torch.as_tensor(c)] = torch.as_tensor(r)
            unmatched = torch.ones(s.out_features, dtype=torch.bool)
            unmatched[rows] = False
            fp += int((w[unmatched] != 0).sum())  # inputs of unmatched student units
        pred = w[rows] != 0
        true = t.weight != 0
        tp += int((pred & true).sum())
        fp += int((pred & ~true).sum())
        fn += int((~pred & true).sum())
        cols = rows
    model.train(was_training)
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    total = sum(m.weight.numel() for m in t_lin)
    return {
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "precision": precision,
        "recall": recall,
        "student_density": (tp + fp) / total,
        "teacher_density": (tp + fn) / total,
    }


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the columns of ``a`` with those of ``b`` (0 for constant columns)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    na = a.norm(dim=0).clamp_min(1e-12)
    nb = b.norm(dim=0).clamp_min(1e-12)
    return (a.T @ b) / na[:, None] / nb[None, :]
